"""Result tables on disk, written atomically so a reader (or a crash) never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import yaml


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    _atomic(Path(path), lambda tmp: frame.to_csv(tmp, index=False))


def write_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    _atomic(Path(path), lambda tmp: frame.to_parquet(tmp, index=False))


def write_json(data: dict, path: str | Path) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def write_yaml(data: dict, path: str | Path) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(yaml.safe_dump(data, sort_keys=False)))
