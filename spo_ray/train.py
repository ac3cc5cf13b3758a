"""`python -m spo_ray.train CONFIG.yaml [--set KEY=VALUE ...] [--output DIR]`: one run, in-process, no Ray.

Reads the same YAML as the sweep CLI. Search spaces are resolved to their first value (and said so),
so a sweep file doubles as a single-run config. Writes `config.yaml`, `history.parquet` (every reported
step) and `metrics.json` (the final metrics) into DIR.

A single run has the machine to itself: torch uses `train.num_threads`, else `scaling.cpus_per_worker`
where the YAML sets it, else every CPU this process may run on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from spo_ray.cli import user_errors_exit_2
from spo_ray.config import ConfigError, apply_overrides, first_point, load_yaml, to_plain, validate_sweep
from spo_ray import environment, storage
from spo_ray.distributed import init_cache_dir
from spo_ray.results import write_json, write_parquet, write_yaml


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m spo_ray.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a sweep YAML (search spaces take their first value)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", help="run directory (default: <storage_path>/runs/<name>-<time>)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def single_run_cpus(sweep) -> int:
    """The CPUs a single run uses (see the module docstring)."""
    if "cpus_per_worker" in sweep.scaling.model_fields_set:
        return max(1, int(sweep.scaling.cpus_per_worker))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@user_errors_exit_2
def main(argv=None) -> int:
    from spo_ray.rounds import train_in_rounds
    from spo_ray.trainer import WorkerContext

    args = parse_args(argv)
    raw = apply_overrides(load_yaml(args.config), args.overrides)
    sweep, spaces = validate_sweep(raw)
    if spaces:
        print(f"note: single run uses the first value of {', '.join(spaces)}", file=sys.stderr)
    config = sweep.run_config()
    # A local folder or a storage URI (spo_ray.storage), like a sweep's experiment directory.
    output = args.output or storage.join(sweep.storage_path, "runs", f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    created = not storage.exists(output)
    storage.make_dirs(output)
    write_yaml(to_plain(config), storage.join(output, "config.yaml"))
    environment.record(output)

    history = []

    def report(metrics, checkpoint):
        history.append(metrics)
        write_parquet(pd.DataFrame(history), storage.join(output, "history.parquet"))

    try:
        final = train_in_rounds(config, cache_dir=init_cache_dir(sweep), reference_dir=output, report=report,
                                context=WorkerContext(cpus=single_run_cpus(sweep)), progress=not args.no_progress)
    except ConfigError:  # bad input (e.g. a malformed data row) before any step: leave no empty run behind
        if created and not history and not storage.is_uri(output):
            shutil.rmtree(output, ignore_errors=True)
        raise
    write_json(final, storage.join(output, "metrics.json"))
    shown = {k: round(v, 4) for k, v in final.items()
             if k in ("eval/accuracy", "eval/chosen_logp_delta", "eval/rejected_logp_delta", "train/loss",
                      "eval/mass_correct", "eval/mass_mistake", "wall_time_s", "round")}
    print(f"wrote {output}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
