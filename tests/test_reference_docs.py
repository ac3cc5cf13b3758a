"""The generated reference pages (docs/reference/) match the code: every key of the schema in spo_ray/config.py
with its type, default, range and comment, and the three commands' --help. Regenerate with
`python scripts/reference_docs.py --write` (or `make docs`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "regenerate with `python scripts/reference_docs.py --write` (or `make docs`)"


@pytest.fixture(scope="module")
def reference_docs():
    spec = importlib.util.spec_from_file_location("reference_docs", ROOT / "scripts" / "reference_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed_rows(page: Path) -> dict[str, str]:
    """Dotted key → its table row, as the committed page shows it."""
    rows = {}
    for line in page.read_text().splitlines():
        match = re.match(r"\| `([\w.]+)` \|", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_the_configuration_reference_shows_every_key_as_the_schema_defines_it(reference_docs):
    generated, committed = reference_docs.config_keys(), committed_rows(reference_docs.CONFIG_PAGE)
    missing = sorted(set(generated) - set(committed))
    assert not missing, f"docs/reference/configuration.md lacks {', '.join(missing)}: {REGENERATE}"
    gone = sorted(set(committed) - set(generated))
    assert not gone, f"docs/reference/configuration.md shows {', '.join(gone)}, no longer in the schema: {REGENERATE}"
    changed = [key for key in generated if generated[key] != committed[key]]
    assert not changed, (f"docs/reference/configuration.md shows {', '.join(changed)} differently from "
                         f"spo_ray/config.py (type, default, range or comment): {REGENERATE}")
    assert reference_docs.CONFIG_PAGE.read_text() == reference_docs.configuration_page(), REGENERATE


def test_the_cli_reference_is_each_commands_help(reference_docs):
    assert reference_docs.CLI_PAGE.read_text() == reference_docs.cli_page(), REGENERATE


def test_the_reference_covers_nested_sections_ranges_literals_and_comments(reference_docs):
    rows = reference_docs.config_keys()
    # a nested section's key, its Literal values and the comment above it in config.py
    assert "| `data.sampled_pairs.engine` | string | `auto` | auto, spo_ray, vllm | who samples" in rows[
        "data.sampled_pairs.engine"]
    assert rows["loss.spo_lambda"].startswith("| `loss.spo_lambda` | number | `1.0` | ≥ 0 | λ")
    assert "| ≥ 0 and &lt; 0.5 |" in rows["loss.label_smoothing"]
    assert "| true, false, auto |" in rows["model.gradient_checkpointing"]
    assert "spo" in rows["loss.name"] and "dpo" in rows["loss.name"]


def test_a_new_or_changed_key_is_named_by_the_check(reference_docs, tmp_path):
    """What the first test reports when config.py gains a key or changes a default the page does not show."""
    page = tmp_path / "configuration.md"
    text = reference_docs.configuration_page()
    stale = text.replace("| `loss.spo_epsilon` | number | `0.0` |", "| `loss.spo_epsilon` | number | `0.5` |")
    stale = "\n".join(line for line in stale.splitlines() if not line.startswith("| `train.max_steps` |"))
    page.write_text(stale)
    generated, committed = reference_docs.config_keys(), committed_rows(page)
    assert sorted(set(generated) - set(committed)) == ["train.max_steps"]
    assert [key for key in generated if key in committed and generated[key] != committed[key]] == [
        "loss.spo_epsilon"]
