"""What the README and docs/ tell a user to type works: every fenced YAML block is a sweep the schema accepts,
and every command in a fenced shell block is checked the cheap way, so the docs cannot drift from the code.

- ```yaml blocks are validated as whole sweeps (`spo_ray.config.validate_sweep`), unless their first line is a
  comment starting with `# fragment` (a piece of a section, e.g. `# fragment: under data:`).
- ```bash / ```sh blocks, one command a line (`\\` continues one): `python -m spo_ray.sweep …` runs with
  `--dry-run` (validation and the trial list; Ray is never imported); `python -m spo_ray.train …` has its YAML
  and `--set` overrides validated; `python -m analysis.report …` has its arguments parsed; `make TARGET` must
  be a Makefile target; `python FILE` / `bash FILE` must name a file of the repository. Other programs (ray,
  pip, wandb, …) are listed in EXTERNAL and not run; anything else fails, so a new kind of command gets a check.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spo_ray.config import ConfigError, apply_overrides, load_yaml, validate_sweep

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")
FRAGMENT = "# fragment"
#: Programs the docs show that are not ours to run here (a cluster's, a package manager's).
EXTERNAL = {"ray", "export", "pip", "wandb", "cd", "git"}


def fenced_blocks(page: Path) -> list[tuple[str, int, str]]:
    """(language, line number of the opening fence, text) of every fenced block of `page`."""
    blocks, language, start, body = [], None, 0, []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = re.match(r"\s*```\s*(\w*)", line)
        if language is None and fence:
            language, start, body = fence.group(1).lower(), number, []
        elif language is not None and fence and not fence.group(1):
            blocks.append((language, start, "\n".join(body)))
            language = None
        elif language is not None:
            body.append(line)
    return blocks


def blocks_of(languages: tuple[str, ...]) -> list:
    return [pytest.param(page, text, id=f"{page.relative_to(ROOT).as_posix()}:{line}")
            for page in PAGES for language, line, text in fenced_blocks(page) if language in languages]


def is_fragment(text: str) -> bool:
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first.startswith(FRAGMENT)


@pytest.mark.parametrize("page, text", blocks_of(("yaml", "yml")))
def test_every_yaml_block_is_a_sweep_the_schema_accepts(page, text):
    if is_fragment(text):
        assert yaml.safe_load(text) is not None  # a fragment is still YAML
        return
    raw = yaml.safe_load(text)
    try:
        validate_sweep(raw)
    except ConfigError as error:
        pytest.fail(f"{page.relative_to(ROOT)}: {error} (mark a partial block with a first line '{FRAGMENT}')")


def commands(text: str) -> list[list[str]]:
    """The commands of a shell block: continuations joined, comments and a `$ ` prompt dropped, leading
    VAR=value assignments and `time` removed."""
    found = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        words = shlex.split(line.strip().removeprefix("$ "), comments=True)
        while words and (re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]) or words[0] == "time"):
            words = words[1:]
        if words:
            found.append(words)
    return found


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def check_command(words: list[str], capsys) -> None:
    program, *args = words
    if program in EXTERNAL:
        return
    if program == "make":
        targets = [a for a in args if not a.startswith("-") and "=" not in a]
        assert set(targets) <= makefile_targets(), f"make {' '.join(targets)}: no such Makefile target"
        return
    if program == "bash":
        assert (ROOT / args[0]).is_file(), f"{args[0]}: no such file"
        return
    assert program in ("python", "python3") or program.endswith("/python"), f"{program}: a command this test " \
        f"cannot check; check it here or add it to EXTERNAL"
    if args[0] != "-m":
        assert (ROOT / args[0]).is_file(), f"{args[0]}: no such file"
        return
    module, argv = args[1], args[2:]
    if module == "spo_ray.sweep":
        from spo_ray import sweep
        code = sweep.main(argv if "--dry-run" in argv else [*argv, "--dry-run"])
        assert code == 0, capsys.readouterr().err
    elif module == "spo_ray.train":
        from spo_ray import train
        parsed = train.parse_args(argv)
        validate_sweep(apply_overrides(load_yaml(ROOT / parsed.config), parsed.overrides))
    elif module == "analysis.report":
        from analysis.report import build_parser
        build_parser().parse_args(argv)
    else:
        pytest.fail(f"python -m {module}: a command this test cannot check")


@pytest.mark.parametrize("page, text", blocks_of(SHELL))
def test_every_shell_command_in_the_docs_runs_its_cheap_form(page, text, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for words in commands(text):
        try:
            check_command(words, capsys)
        except (ConfigError, SystemExit) as error:
            pytest.fail(f"{page.relative_to(ROOT)}: {shlex.join(words)}: {error!r} {capsys.readouterr().err}")


def test_the_report_command_answers_help():
    done = subprocess.run([sys.executable, "-m", "analysis.report", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--metric" in done.stdout, done.stderr


def test_a_bad_block_and_a_fragment_are_told_apart(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```yaml\n# fragment: under data:\n  source: hub\n```\n\n```bash\n"
                    "python -m spo_ray.sweep sweeps/beta.yaml \\\n  --set loss.beta=0.3   # a comment\n"
                    "time make demo SWEEP=sweeps/lambda.yaml\n```\n")
    (yaml_block, shell_block) = [(lang, text) for lang, _, text in fenced_blocks(page)]
    assert yaml_block[0] == "yaml" and is_fragment(yaml_block[1])
    assert not is_fragment("loss:\n  name: dpo\n")
    assert commands(shell_block[1]) == [["python", "-m", "spo_ray.sweep", "sweeps/beta.yaml", "--set",
                                         "loss.beta=0.3"], ["make", "demo", "SWEEP=sweeps/lambda.yaml"]]
    with pytest.raises(ConfigError, match="loss.bta"):
        validate_sweep({"loss": {"bta": 0.1}})
