"""Result tables, written whole (atomically) to a local folder or a storage URI, so a reader (or a crash)
never sees half a file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import yaml

from spo_ray.storage import read_bytes, write_bytes


def write_csv(frame: pd.DataFrame, location: str | Path) -> None:
    write_bytes(location, frame.to_csv(index=False).encode())


def write_parquet(frame: pd.DataFrame, location: str | Path) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_bytes(location, buffer.getvalue())


def write_json(data: dict, location: str | Path) -> None:
    write_bytes(location, (json.dumps(data, indent=2, default=str) + "\n").encode())


def write_yaml(data: dict, location: str | Path) -> None:
    write_bytes(location, yaml.safe_dump(data, sort_keys=False).encode())


def read_csv(location: str | Path, **kwargs) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(read_bytes(location)), **kwargs)


def read_parquet(location: str | Path) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(read_bytes(location)))
