"""The configuration and CLI reference pages, generated: `python scripts/reference_docs.py --write` (`make docs`
runs it first).

- docs/reference/configuration.md: every key of the sweep schema (spo_ray/config.py, pydantic) as it is written
  in YAML (its dotted path), its type, default, allowed range or values (from the fields' constraints and
  Literal types) and the comment written beside it or directly above it in config.py — read from the source,
  so the schema stays the one place a key is explained.
- docs/reference/cli.md: the `--help` of `python -m spo_ray.sweep`, `python -m spo_ray.train` and
  `python -m analysis.report`, from their own argparse parsers.

tests/test_reference_docs.py regenerates both and fails, naming the key, when the committed pages are stale.
Nothing in spo_ray imports this file (it reads spo_ray and analysis, never the other way round).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
CONFIG_PAGE = ROOT / "docs" / "reference" / "configuration.md"
CLI_PAGE = ROOT / "docs" / "reference" / "cli.md"
REGENERATE = "python scripts/reference_docs.py --write"
HELP_COLUMNS = 100  # argparse wraps --help to the terminal; a fixed width keeps the page the same everywhere


# ---------------------------------------------------------------------------------------------------
# Comments in the source: the one-line explanation of each field

def field_comments(source_path: Path) -> dict[str, dict[str, str]]:
    """class name → field name → its comment: the comment lines directly above the field (no blank line
    between) followed by the comment on the field's own lines, joined into one line."""
    text = source_path.read_text()
    comments: dict[int, str] = {}  # line number → comment text
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = text.splitlines()
    found: dict[str, dict[str, str]] = {}
    for node in ast.parse(text).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = found.setdefault(node.name, {})
        for statement in node.body:
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            above, line = [], statement.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            beside = [comments[n] for n in range(statement.lineno, statement.end_lineno + 1) if n in comments]
            parts = [part for part in above + beside if part]
            fields[statement.target.id] = " ".join(parts)
    return found


# ---------------------------------------------------------------------------------------------------
# Types, defaults and ranges, from the pydantic schema

def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section (a pydantic model) a field holds, also through `Section | None`."""
    for candidate in typing.get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def type_name(annotation: Any) -> str:
    """A YAML reader's name for a type: number, integer, string, bool, list of …, mapping …, or null."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        kinds = {type(value) for value in args}
        return "string" if kinds == {str} else " or ".join(sorted(type_name(k) for k in kinds))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(type_name(arg) for arg in args))
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(type_name(arg) for arg in args) + "]"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    names = {bool: "bool", int: "integer", float: "number", str: "string", dict: "mapping", list: "list"}
    return names.get(annotation, "any" if annotation is Any else getattr(annotation, "__name__", str(annotation)))


def literal_values(annotation: Any) -> list[Any]:
    """Every value a Literal in the annotation allows (also inside `bool | Literal["auto"]`)."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    values = []
    for arg in typing.get_args(annotation):
        values += literal_values(arg)
    return values


def yaml_value(value: Any) -> str:
    """A value as it is written in YAML (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return "{…}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        special = not value or value in ("true", "false", "null") or any(c in value for c in ":{}[],#&*!|>'\"%@`")
        return repr(value) if special or value != value.strip() else value
    return repr(value)


def allowed(field: Any) -> str:
    """The allowed values (a Literal) or range (Field's gt/ge/lt/le) of one field."""
    values = literal_values(field.annotation)
    if values:
        others = {arg for arg in typing.get_args(field.annotation) if typing.get_origin(arg) is not Literal}
        extra = [yaml_value(v) for v in (True, False)] if bool in others else []
        return ", ".join(extra + [yaml_value(v) for v in values])
    low = high = None
    for constraint in field.metadata:
        for name, sign in (("gt", ">"), ("ge", "≥")):
            if isinstance(constraint, getattr(annotated_types, name.title())):
                low = f"{sign} {yaml_value(getattr(constraint, name))}"
        for name, sign in (("lt", "<"), ("le", "≤")):
            if isinstance(constraint, getattr(annotated_types, name.title())):
                high = f"{sign} {yaml_value(getattr(constraint, name))}"
    return " and ".join(part for part in (low, high) if part)


def default_of(field: Any) -> Any:
    if field.default is PydanticUndefined and field.default_factory is not None:
        return field.default_factory()
    return field.default


def config_rows(model: type[BaseModel], comments: dict[str, dict[str, str]], prefix: str = ""
                ) -> list[tuple[str, str, list[dict[str, str]]]]:
    """(section path, its docstring, rows) for `model` and every section below it, in the schema's order; each
    row is a key's cells: key, type, default, allowed, meaning (its comment in the source, else its Field's
    description)."""
    rows, sections = [], []
    for name, field in model.model_fields.items():
        key = prefix + name
        comment = next((comments.get(cls.__name__, {}).get(name) for cls in model.__mro__
                        if comments.get(cls.__name__, {}).get(name)), "") or field.description or ""
        sub = section_type(field.annotation)
        if sub is not None:
            if default_of(field) is None:
                rows.append({"key": key, "type": "section or null", "default": "null", "allowed": "",
                             "meaning": comment + (" " if comment else "") + "(null: off; the keys below when set)"})
            sections += config_rows(sub, comments, key + ".")
            continue
        rows.append({"key": key, "type": type_name(field.annotation), "default": yaml_value(default_of(field)),
                     "allowed": allowed(field), "meaning": comment})
    doc = " ".join((model.__doc__ or "").split()) if "__doc__" in vars(model) else ""
    return [(prefix.rstrip("."), doc, rows)] + sections if rows else sections


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell (a pipe would split it; `<…>` would read as HTML)."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def row_line(row: dict[str, str]) -> str:
    code = lambda text: f"`{text}`" if text else ""  # noqa: E731
    return (f"| `{row['key']}` | {row['type']} | {code(cell(row['default']))} | {cell(row['allowed'])} "
            f"| {cell(row['meaning'])} |")


def configuration_page() -> str:
    import spo_ray.config as config

    comments = field_comments(Path(config.__file__))
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from spo_ray/config.py by `{REGENERATE}` (`make docs` runs it); do not edit by hand. -->",
        "",
        "Every key a sweep or run YAML may hold, as it is written in YAML (`loss.spo_lambda` is `spo_lambda:` under",
        "`loss:`), with its type, its default, what it allows and the comment beside it in `spo_ray/config.py`,",
        "the schema the CLIs validate against. Unknown keys are refused (with the nearest known key), as are",
        "values outside the range; the CLIs say which key, in one line, and exit 2.",
        "",
        "Any key of `loss`, `model`, `data`, `train` and `reference` may also be a search space instead of a value:",
        "`{grid: [...]}`, `{choice: [...]}`, `{uniform: [low, high]}`, `{loguniform: [low, high]}` or",
        "`{randint: [low, high]}` (see [Search and PBT](../guides/search-and-pbt.md)). `tune`, `scaling`, `name`,",
        "`storage_path` and `cache_dir` cannot be swept.",
    ]
    for section, doc, rows in config_rows(config.SweepConfig, comments):
        lines += ["", f"## `{section}`" if section else "## Top level", ""]
        lines += [cell(doc), ""] if doc and section else []
        lines += ["| key | type | default | allowed | what it is |", "| --- | --- | --- | --- | --- |"]
        lines += [row_line(row) for row in rows]
    return "\n".join(lines) + "\n"


def config_keys() -> dict[str, str]:
    """Dotted key → its table row in the generated page (what the test compares, key by key)."""
    import spo_ray.config as config

    comments = field_comments(Path(config.__file__))
    return {row["key"]: row_line(row) for _, _, rows in config_rows(config.SweepConfig, comments) for row in rows}


# ---------------------------------------------------------------------------------------------------
# The CLIs' --help

def help_text(parse: Any) -> str:
    """What `parse(["--help"])` prints, at HELP_COLUMNS columns."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            parse(["--help"])
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return out.getvalue().rstrip("\n")


def cli_page() -> str:
    from analysis import report
    from spo_ray import sweep, train

    commands = [
        ("python -m spo_ray.sweep", sweep.parse_args, sweep.__doc__),
        ("python -m spo_ray.train", train.parse_args, train.__doc__),
        ("python -m analysis.report", lambda argv: report.build_parser().parse_args(argv), report.__doc__),
    ]
    lines = [
        "# Command-line reference",
        "",
        f"<!-- Generated from the commands' argparse parsers by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "The three commands, each with the `--help` it prints. Exit codes, for all three: `0` success; `1` the",
        "sweep ran but some trials failed (`spo_ray.sweep`); `2` bad input, one `error:` line naming the key,",
        "file or row; `130` interrupted (`spo_ray.sweep`; continue with `--resume`).",
    ]
    for command, parse, doc in commands:
        # the module docstring after its first paragraph (the usage line, which --help shows too)
        details = textwrap.dedent("\n\n".join((doc or "").strip().split("\n\n")[1:])).strip()
        lines += ["", f"## `{command}`", "", "```text", help_text(parse), "```"]
        lines += ["", details] if details else []
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------

PAGES = {CONFIG_PAGE: configuration_page, CLI_PAGE: cli_page}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the pages (default: say which are stale)")
    args = parser.parse_args(argv)
    stale = []
    for page, make in PAGES.items():
        text = make()
        if page.exists() and page.read_text() == text:
            continue
        stale.append(page.relative_to(ROOT).as_posix())
        if args.write:
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(text)
    verb = "wrote" if args.write else "stale (regenerate with --write):"
    print(f"{verb} {', '.join(stale)}" if stale else "the reference pages are up to date")
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
