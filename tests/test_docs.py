"""The README and docs/ point only at things that exist in a clone: relative links and images are files
git tracks (an ignored plot shows on the author's machine and nowhere else), and the tests, scripts,
benchmarks and sweep files they cite as evidence exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CITED_FILE = re.compile(r"\b((?:tests|benchmarks|sweeps|scripts|spo_ray|analysis)/[\w./-]+\.(?:py|yaml|sh|md))\b")
CITED_TEST = re.compile(r"`(test_\w+)")


def tracked_files() -> set[str] | None:
    """Paths git tracks, relative to the repository root; None outside a git checkout."""
    try:
        listing = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(listing.stdout.splitlines())


def unresolved_links(page: Path, root: Path, tracked: set[str] | None) -> list[str]:
    """Relative link and image targets of `page` that are not a tracked (or, outside git, existing) file."""
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # https:, mailto:, an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else None
        found = path.exists() if tracked is None else relative in tracked or any(
            name.startswith(f"{relative}/") for name in tracked)
        if not found:
            missing.append(target)
    return missing


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_images_are_files_a_clone_has(page):
    assert unresolved_links(page, ROOT, tracked_files()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cited_files_and_tests_exist(page):
    text = page.read_text()
    assert [f for f in set(CITED_FILE.findall(text)) if not (ROOT / f).exists()] == []
    defined = set(re.findall(r"^\s*def (test_\w+)", "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py")),
                             flags=re.M))
    assert sorted(set(CITED_TEST.findall(text)) - defined) == []


def test_an_untracked_image_and_a_missing_file_are_reported(tmp_path):
    (tmp_path / "docs" / "img").mkdir(parents=True)
    (tmp_path / "docs" / "img" / "kept.png").write_bytes(b"png")
    (tmp_path / "docs" / "img" / "ignored.png").write_bytes(b"png")
    page = tmp_path / "docs" / "page.md"
    page.write_text("![a](img/kept.png) ![b](img/ignored.png) [c](../gone.md) [d](https://x.org/y) [e](#top) "
                    "[f](img/kept.png#part) [g](img)")
    tracked = {"docs/page.md", "docs/img/kept.png"}
    assert unresolved_links(page, tmp_path, tracked) == ["img/ignored.png", "../gone.md"]
    assert unresolved_links(page, tmp_path, None) == ["../gone.md"]  # outside git: only existence counts
