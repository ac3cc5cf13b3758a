"""Analysis of finished (or partial) sweeps: reads experiment directories on disk. Only the W&B logging of a
report (analysis.dashboard) imports spo_ray, for the trials' tracking."""

from analysis.collect import Experiment, ExperimentError, load_experiment, parameter_columns
from analysis.tables import (
    best_configs,
    bootstrap_interval,
    paired_differences,
    paired_runs,
    summary_table,
    to_latex,
    to_markdown,
    write_table,
)

__all__ = [
    "Experiment",
    "ExperimentError",
    "best_configs",
    "bootstrap_interval",
    "load_experiment",
    "paired_differences",
    "paired_runs",
    "parameter_columns",
    "summary_table",
    "to_latex",
    "to_markdown",
    "write_report",
    "write_table",
]


def __getattr__(name: str):
    # Imported lazily: an eager import would make `python -m analysis.report` warn that the module was
    # already in sys.modules before it ran.
    if name == "write_report":
        from analysis.report import write_report

        return write_report
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
