"""What produced a result: package versions, the machine and the project's commit, recorded with the results.

A results table says what the losses did under one set of versions; research users must be able to say which.
`describe()` gathers Python, torch, Ray, transformers, TRL, peft, pydantic (where installed), the CPU and GPU
models and the project's git commit (and whether its tree had uncommitted changes); `record(directory)` appends
it to `<directory>/environment.json` — one entry per start, so a sweep resumed under other versions shows both
(`changes` names what differs). The sweep's driver and `spo_ray.train` record it; each trial's W&B run carries
its own process's `describe()` in its config (`environment.torch`, …), and `analysis.report` prints it under the
tables.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import time
from pathlib import Path

from spo_ray import storage

ENVIRONMENT_FILE = "environment.json"
PACKAGES = ("torch", "ray", "transformers", "trl", "peft", "pydantic", "vllm")
REPO_ROOT = Path(__file__).resolve().parent.parent


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_models() -> list[str]:
    """The names of the CUDA devices torch sees (none: an empty list)."""
    try:
        import torch
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch, no driver: no GPU to name
        return []


def git_commit(root: Path = REPO_ROOT) -> dict:
    """{"commit", "dirty"} of the checkout the code runs from; None values outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit.strip() if commit else None, "dirty": bool(status.strip()) if status is not None else None}


def describe() -> dict:
    """This process's environment: Python, the packages that decide results, CPU, GPUs, commit."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            **{name: package_version(name) for name in PACKAGES},
            "cpu": cpu_model(), "gpus": gpu_models(), **git_commit()}


def changes(before: dict, after: dict) -> list[str]:
    """What differs between two descriptions, as `key: old → new` (the start time aside)."""
    keys = [k for k in dict.fromkeys([*before, *after]) if k != "started"]
    return [f"{k}: {before.get(k)} → {after.get(k)}" for k in keys if before.get(k) != after.get(k)]


def record(directory: str) -> list[str]:
    """Append this process's `describe()` (with its start time) to `<directory>/environment.json`; return
    what changed since the last entry (empty for the first, or the same environment)."""
    path = storage.join(directory, ENVIRONMENT_FILE)
    entries = read(directory)
    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **describe()}
    storage.write_bytes(path, json.dumps(entries + [entry], indent=1).encode())
    return changes(entries[-1], entry) if entries else []


def read(directory: str) -> list[dict]:
    """The entries of `<directory>/environment.json`, oldest first (none where it is missing)."""
    path = storage.join(directory, ENVIRONMENT_FILE)
    if not storage.exists(path):
        return []
    return json.loads(storage.read_bytes(path))
