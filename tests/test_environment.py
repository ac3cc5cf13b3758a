"""Results carry their environment (spo_ray.environment): the versions, machine and commit a run had, appended
per start to environment.json, what changed between starts, and the report's Environment section."""

import json
import subprocess
from pathlib import Path

import ray
import torch
import transformers

import spo_ray.environment as environment
from analysis.report import write_report
from test_analysis import write_experiment


def test_the_description_names_the_versions_the_packages_report_themselves():
    described = environment.describe()
    assert described["torch"] == torch.__version__
    assert described["ray"] == ray.__version__
    assert described["transformers"] == transformers.__version__
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert described["commit"] == (head or None) and isinstance(described["dirty"], (bool, type(None)))
    assert described["gpus"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    assert described["cpu"]


def test_each_start_is_appended_and_a_changed_version_is_named(tmp_path, monkeypatch):
    assert environment.record(str(tmp_path)) == []
    assert environment.record(str(tmp_path)) == []  # the same environment again
    real = environment.package_version
    monkeypatch.setattr(environment, "package_version", lambda name: "9.9.9" if name == "torch" else real(name))
    assert environment.record(str(tmp_path)) == [f"torch: {torch.__version__} → 9.9.9"]
    entries = json.loads((tmp_path / "environment.json").read_text())
    assert [e["torch"] for e in entries] == [torch.__version__, torch.__version__, "9.9.9"]
    assert all(e["started"] for e in entries)


def test_outside_a_git_checkout_the_commit_is_unknown(tmp_path):
    assert environment.git_commit(tmp_path) == {"commit": None, "dirty": None}


def test_the_report_prints_the_environment_and_what_differed_at_earlier_starts(tmp_path):
    directory = write_experiment(tmp_path / "exp")
    entries = [{"started": "2026-12-01T10:00:00+0000", **environment.describe(), "torch": "2.12.0"},
               {"started": "2026-12-02T10:00:00+0000", **environment.describe(), "commit": "abc123", "dirty": True}]
    (directory / "environment.json").write_text(json.dumps(entries))
    text = write_report(directory).read_text()
    assert "## Environment" in text
    assert "Last started 2026-12-02T10:00:00+0000 at commit `abc123` (with uncommitted changes)." in text
    assert f"| torch | {torch.__version__} |" in text and f"| Ray | {ray.__version__} |" in text
    assert f"- Started before on 2026-12-01T10:00:00+0000 with commit {entries[0]['commit']}; torch 2.12.0." in text


def test_a_report_without_an_environment_file_says_so(tmp_path):
    text = write_report(write_experiment(tmp_path / "exp")).read_text()
    assert "Not recorded (environment.json is missing" in text
