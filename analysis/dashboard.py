"""The report on the W&B dashboard: its comparison tables (`wandb.Table`) and figures (`wandb.Image`) as one
run of job type `report` in the sweep's group, beside the trials' runs, so the dashboard shows the comparison
and not only the trials. `python -m analysis.report EXPERIMENT_DIR --wandb` does it.

The run takes the sweep's W&B settings from its sweep.yaml (`name` is the group; `wandb.project`, `entity`,
`tags`, `mode`) and resolves the mode as the trials do: `auto` is online with a key and otherwise an offline
run beside the trials' (`<experiment dir>/wandb/`, for `wandb sync`); `WANDB_MODE` overrides it. As for the
trials, W&B is an observer: a failure is one warning line on stderr and never fails the report.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.collect import CONFIG_FILE, Experiment

JOB_TYPE = "report"


def sweep_settings(exp: Experiment) -> tuple[str, dict]:
    """The sweep's name (the W&B group of its trials) and its `wandb` section, from sweep.yaml; the directory's
    name and W&B's defaults where the file or keys are missing."""
    import yaml

    path = exp.path / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError:
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    settings = raw.get("wandb") if isinstance(raw.get("wandb"), dict) else {}
    return str(raw.get("name") or exp.path.name), dict(settings)


def loggable(table: pd.DataFrame) -> pd.DataFrame:
    """`table` as a wandb.Table takes it: string column names, and a column that mixes numbers with labels (β 0.1,
    0.3 and `all` in the pooled rows) as text; all-number columns stay numbers, so the dashboard sorts them."""
    table = table.rename(columns=str).reset_index(drop=True)
    for column in table.columns:
        kinds = {type(v) for v in table[column] if not (isinstance(v, float) and pd.isna(v)) and v is not None}
        if len(kinds) > 1 and not all(pd.api.types.is_number(v) for v in table[column].dropna()):
            table[column] = [None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)
                             for v in table[column]]
    return table


def log_report(exp: Experiment, tables: dict[str, pd.DataFrame], figures: dict[str, Path | None], metric: str,
               titles: dict[str, str], root: Path, mode: str | None = None) -> Path | None:
    """Log every non-empty table and every drawn figure (captioned with `titles`) as one report run; its wandb
    files go under `root/wandb/`. `mode` overrides sweep.yaml's. Returns the run's local folder, or None when
    nothing was logged (disabled, or W&B failed: one warning line)."""
    from spo_ray.tracking import start_run, warn  # only here: reading an experiment needs pandas alone

    group, settings = sweep_settings(exp)
    if mode:
        settings["mode"] = mode
    config = {"metric": metric, "experiment": exp.path.name, "trials_used": len(exp.results)}
    tracker = start_run(settings, run_name=f"{group}-report", group=group, config=config, tags=[JOB_TYPE],
                        dir=root, job_type=JOB_TYPE)
    if not tracker.enabled:
        return None
    try:
        import wandb

        logged = {f"tables/{stem}": wandb.Table(dataframe=loggable(table))
                  for stem, table in tables.items() if not table.empty}
        logged.update({f"plots/{name}": wandb.Image(str(path), caption=titles.get(name, name))
                       for name, path in figures.items() if path is not None})
    except Exception as error:
        warn(f"wandb could not take the report, nothing logged: {type(error).__name__}: {error}")
        tracker.finish("ERROR")
        return None
    tracker.log(logged, step=0)
    logged_all = tracker.enabled  # a failed log has warned and switched the tracker off
    tracker.finish()
    return tracker.run_folder() if logged_all else None
