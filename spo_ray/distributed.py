"""Ray at the edges: one sweep trial, run in-process or on a Ray Train worker group.

`run_trial(trial_config)` is the Tune function trainable every sweep runs. Its config is the sweep YAML with
Tune's sampled values in place of the search spaces. It takes one of two paths to `trainer.train`:

  (a) in-process (1 worker, the default): the trial's own Tune actor runs the trainer; rows go to
      `tune.report`, checkpoints are `torch.save`d trainer states, a retried or resumed trial restarts from
      `tune.get_checkpoint()`, and Tune's `FailureConfig(max_failures)` retries a crashed trial;
  (b) Ray Train (`scaling.num_workers > 1` or `scaling.force_ray_train`): the trial is a thin driver that
      launches a `TorchTrainer` (Train V2); every worker runs the trainer under DDP (`prepare_model`; gloo on
      CPUs) or, with `scaling.strategy: fsdp`, on its shard of the weights (`spo_ray.sharding`); rows
      and rank 0's checkpoints go to `ray.train.report`, `TuneReportCallback` forwards them to
      Tune, and Train's `FailureConfig(max_failures)` restarts failed workers from `ray.train.get_checkpoint()`.

Path (a) exists because it is measurably cheaper for the small trials this project mostly runs: it skips
the Train controller, the worker actors and the process group (see benchmarks/sweep_overhead.py).

Outcomes reach the sweep driver as follows: a finished run is TERMINATED; a run whose loss became NaN
(`trainer.Diverged`) or that the trainer rejected (`ConfigError`, e.g. a batch size the worker count does not
divide) reports one last row with `trial_status` DIVERGED / ERROR and an `error` line and ends normally —
these outcomes are deterministic, so retrying them would only repeat them; any other exception propagates,
is retried by the failure config, and finally marks the Tune trial ERROR.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from spo_ray import storage
from spo_ray.config import ConfigError, SweepConfig, column_name, get_dotted, to_plain, validate_run

#: Keys of the last row of a trial that ended without training to the end (see the module docstring).
TRIAL_STATUS_KEY, ERROR_KEY = "trial_status", "error"
CHECKPOINT_FILE = "trainer_state.pt"
WRITER_KEY = "trial_id"  # in a checkpoint's state: the trial that wrote it (PBT copies checkpoints between trials)


# ---------------------------------------------------------------------------------------------------
# Where things live and what a trial needs

def experiment_dir(sweep: SweepConfig) -> str:
    """`<storage_path>/<name>`: a local folder or a storage URI (`spo_ray.storage`)."""
    return storage.join(storage.absolute(sweep.storage_path), sweep.name)


def init_cache_dir(sweep: SweepConfig) -> str:
    """Built-in and converted initializations: shared by every sweep under the same storage path. Under a
    URI, each node keeps a local mirror of it (`storage.local_mirror`)."""
    return storage.absolute(sweep.cache_dir or storage.join(sweep.storage_path, ".cache"))


def reference_cache_dir(sweep: SweepConfig) -> str:
    """Reference log-prob tables: computed once per sweep and shared by its trials."""
    return storage.join(experiment_dir(sweep), "reference_cache")


def uses_ray_train(sweep: SweepConfig) -> bool:
    return sweep.scaling.ray_train


def worker_resources(sweep: SweepConfig) -> dict[str, float]:
    """What one training worker holds: its CPUs, its (possibly fractional) GPU, any custom resources."""
    scaling = sweep.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return resources


def trial_resources(sweep: SweepConfig) -> dict[str, float]:
    """What the Tune trial itself reserves.

    In-process trials hold their worker's resources. A Ray Train trial is only a driver (the Train
    controller itself asks for 0 CPUs); its workers reserve the resources, so the driver must reserve
    none — otherwise two trials on a 2-CPU machine would each hold a CPU their own workers then wait for.
    Tune refuses an all-zero request, so the driver asks for one byte of memory: nothing, but not empty.
    """
    return {"CPU": 0, "memory": 1} if uses_ray_train(sweep) else worker_resources(sweep)


def trainable(sweep: SweepConfig):
    """The Tune trainable of a sweep: `run_trial` with the trial's resources attached."""
    from ray import tune
    return tune.with_resources(run_trial, trial_resources(sweep))


# ---------------------------------------------------------------------------------------------------
# One builder per shared artefact, cluster-wide

BUILD_LOCKS_ACTOR = "spo_ray_build_locks"
LEASE_S = 60.0


class BuildLeases:
    """Leases on names (an init folder, a reference table), kept by one Ray actor on the driver's node.

    `acquire` grants a free or expired lease; the holder renews it while it builds. A holder that dies with
    its node stops renewing, so after `LEASE_S` a waiting trial takes the lease over, finds the artefact
    still missing from the storage and builds it. A lock file cannot do this on a cluster without a shared
    filesystem: each node would lock its own file.
    """

    def __init__(self):
        self.leases: dict[str, tuple[str, float]] = {}  # name -> (holder, expiry time)

    def acquire(self, name: str, holder: str, seconds: float) -> bool:
        now = time.time()
        current = self.leases.get(name)
        if current is None or current[0] == holder or current[1] < now:
            self.leases[name] = (holder, now + seconds)
            return True
        return False

    def renew(self, name: str, holder: str, seconds: float) -> bool:
        return self.acquire(name, holder, seconds)

    def release(self, name: str, holder: str) -> None:
        if self.leases.get(name, ("",))[0] == holder:
            del self.leases[name]


def start_build_locks() -> None:
    """Start the sweep's lease actor on the driver's node (the node that stays), before any trial."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    ray.remote(BuildLeases).options(
        name=BUILD_LOCKS_ACTOR, get_if_exists=True, num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


@contextmanager
def cluster_lock(name: str, poll_s: float = 1.0):
    """Hold the lease on `name` (see `BuildLeases`), renewing it from a thread until the block ends."""
    import ray

    leases = ray.get_actor(BUILD_LOCKS_ACTOR)
    holder = uuid.uuid4().hex
    while not ray.get(leases.acquire.remote(name, holder, LEASE_S)):
        time.sleep(poll_s)
    done = threading.Event()

    def renew():
        while not done.wait(LEASE_S / 4):
            try:
                ray.get(leases.renew.remote(name, holder, LEASE_S))
            except Exception:  # the driver is gone: the sweep is ending anyway
                return

    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        try:
            leases.release.remote(name, holder)
        except Exception:
            pass


def install_cluster_lock() -> None:
    """In a trial or worker of a sweep: build shared artefacts under the driver's leases (when the sweep
    started them; a trial launched some other way keeps local lock files)."""
    import ray
    try:
        ray.get_actor(BUILD_LOCKS_ACTOR)
    except ValueError:
        return
    storage.use_cluster_lock(cluster_lock)


# ---------------------------------------------------------------------------------------------------
# Sampled pairs: a sample table generated across the cluster

class Sampler:
    """A Ray actor holding one engine of the job's (`spo_ray.engines`: the sampler model loaded once, or a vLLM
    engine on its folder); `sample(batch numbers)` returns their table rows."""

    def __init__(self, job, threads: int, use_gpu: bool):
        import torch

        from spo_ray.tasks.sampled import JobSampler
        torch.set_num_threads(threads)
        self.sampler = JobSampler(job, torch.device("cuda" if use_gpu else "cpu"))

    def sample(self, batch_numbers: list[int]) -> list[dict]:
        return self.sampler.rows(batch_numbers)

    def close(self) -> None:
        self.sampler.close()


def sample_on_cluster(job, directory: str, sweep: SweepConfig) -> None:
    """Generate `job`'s sample table (`spo_ray.tasks.sampled.SamplingJob`) on the cluster and write it into
    `directory`: one `Sampler` actor per worker slot the cluster has free (a trial worker's resources each),
    each loading the model once, fed the generation batches one at a time through `ray.util.ActorPool`, so a
    fast worker takes more batches and the driver shows progress batch by batch.

    Why actors and not Ray Data's `map_batches`: the input is a few hundred prompts and the output a few
    thousand short text rows; Ray Data's streaming executor, its operator start-up and its object-store
    materialisation buy nothing at that size, and it is another dependency (`ray[data]`). An actor pool is the
    part of it that matters here: the model loaded once per worker, batches handed to whichever worker is free.
    The rows do not depend on which worker sampled which batch (`spo_ray.sampling`: one generator per batch).
    """
    import ray
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    from spo_ray.decoding import encode_prompts
    from spo_ray.sampling import generation_figures, plan_batches, table_path, write_samples

    batches = plan_batches([len(ids) for ids in encode_prompts(job.tokenizer, job.texts())], job.sampling)
    per_worker = {k: v for k, v in worker_resources(sweep).items() if v}
    available = ray.available_resources()
    slots = min(int(available.get(k, 0) // v) for k, v in per_worker.items())
    slots = max(1, min(slots, len(batches)))
    threads = max(1, int(sweep.scaling.cpus_per_worker))
    options = {"num_cpus": sweep.scaling.cpus_per_worker, "num_gpus": per_worker.get("GPU", 0),
               "resources": {k: v for k, v in per_worker.items() if k not in ("CPU", "GPU")}}
    print(f"sampling {len(job.prompts)} prompts × {job.sampling.samples_per_prompt} ({len(batches)} batches) "
          f"on {slots} worker(s) into {table_path(directory, job.key)}")
    started = time.perf_counter()
    actor = ray.remote(Sampler).options(**options)
    samplers = [actor.remote(job, threads, sweep.scaling.use_gpu) for _ in range(slots)]
    rows = []
    with tqdm(total=len(job.prompts), desc="sampling", unit="prompt") as bar:
        for batch_rows in ActorPool(samplers).map_unordered(lambda a, b: a.sample.remote([b]), range(len(batches))):
            rows += batch_rows
            bar.update(len({row["prompt"] for row in batch_rows}))
    ray.get([handle.close.remote() for handle in samplers])  # a vLLM engine's process ends with its actor's work
    for handle in samplers:  # their CPUs go to the trials
        ray.kill(handle)
    rows.sort(key=lambda row: (row["prompt"], row["sample"]))
    # The wall time includes starting the workers and loading the model: what the sweep waited.
    write_samples(table_path(directory, job.key), rows, generation_figures(rows, time.perf_counter() - started, slots,
                                                                           job.sampling.engine))


# ---------------------------------------------------------------------------------------------------
# Checkpoints: the trainer's state as a torch file in a directory

def save_state(state: dict, directory: str) -> None:
    import torch
    torch.save(state, Path(directory) / CHECKPOINT_FILE)


def load_state(checkpoint, announce: bool = True, trial_id: str | None = None) -> dict | None:
    """The trainer state in a Ray checkpoint (or None). The state holds only tensors, numbers, strings and
    lists (model, AdamW and LambdaLR state dicts, the step, the trial that wrote it), so `weights_only=True`
    loads it. A retried or resumed trial says where it picks up (`announce`: one worker of a group says it);
    so does a trial that PBT restarted from another trial's checkpoint."""
    if checkpoint is None:
        return None
    import torch
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=True)
    if announce:
        donor = state.get(WRITER_KEY)
        whose = f"trial {donor}'s" if trial_id and donor and donor != trial_id else "the"
        print(f"resuming from {whose} checkpoint of step {state['step']} ({checkpoint.path})")
    return state


def population_columns(sweep: SweepConfig, trial_id: str, resume: dict | None) -> tuple[dict, dict]:
    """What a PBT trial adds to its rows: on every row the value of each mutated key in force (`hp/<column>`,
    e.g. hp/spo_lambda), and on its first row after an exploit — a start from a checkpoint another trial
    wrote — that trial and the checkpoint's step (`exploit/donor`, `exploit/step`). Nothing without PBT."""
    if sweep.tune.scheduler != "pbt":
        return {}, {}
    plain = to_plain(sweep)
    every = {f"hp/{column_name(key)}": get_dotted(plain, key) for key in sweep.tune.mutations}
    donor = (resume or {}).get(WRITER_KEY)
    first = {"exploit/donor": donor, "exploit/step": resume["step"]} if donor and donor != trial_id else {}
    return every, first


def report_with_checkpoint(report_fn, checkpoint_cls, metrics: dict, state: dict | None, *,
                           write: bool = True) -> None:
    """Call `report_fn(metrics, checkpoint=...)`, packing `state` into a temporary checkpoint directory
    (Ray copies it into the trial's storage before `report_fn` returns)."""
    if state is None or not write:
        report_fn(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_state(state, directory)
        report_fn(metrics, checkpoint=checkpoint_cls.from_directory(directory))


def final_row(status: str, error: BaseException, last_metrics: dict) -> dict:
    """The row a trial that stopped early reports last: its last metrics, the status, the error line."""
    message = " ".join(str(error).split()) or type(error).__name__
    return {**last_metrics, TRIAL_STATUS_KEY: status, ERROR_KEY: message}


# ---------------------------------------------------------------------------------------------------
# W&B: an observer that can never fail a trial

def tracking_dir(sweep: SweepConfig) -> str:
    """Where wandb writes a trial's run: the experiment directory, or under a storage URI this node's local
    mirror of it (`_finish` then copies the run into the storage)."""
    return storage.local_mirror(experiment_dir(sweep))


def start_tracking(sweep: SweepConfig, trial_name: str, rank: int):
    """The trial's W&B run; offline runs land in `<experiment dir>/wandb/` (Ray's local trial folders are
    temporary), ready for `wandb sync`."""
    directory = tracking_dir(sweep)
    try:
        from spo_ray.config import to_plain
        from spo_ray.tracking import start_run
        from spo_ray.environment import describe
        plain = to_plain(sweep.run_config())
        # the trial's own process: a worker node's versions, not the driver's
        flat = {"loss": sweep.loss.name, **_flatten(plain), **_flatten({"environment": describe()})}
        return start_run(plain["wandb"], run_name=trial_name, group=sweep.name, config=flat,
                         tags=[sweep.loss.name], dir=directory, rank=rank)
    except Exception as error:  # tracking is optional: never let it stop training
        print(f"wandb: warning: tracking is off for this trial: {type(error).__name__}: {error}")
        return None


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "init_steps":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _tracked(report, tracker):
    """Wrap a report callback so every row is also logged to W&B (rank 0 only; failures are swallowed)."""
    if tracker is None:
        return report

    def both(metrics: dict, state: dict | None) -> None:
        tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["step"])
        report(metrics, state)
    return both


def _finish(tracker, status: str, sweep: SweepConfig) -> None:
    if tracker is None:
        return
    tracker.finish(status)
    folder = tracker.run_folder()
    if folder is not None and storage.is_uri(experiment_dir(sweep)):
        try:  # the offline run (or a live run's local files) next to the tables: `wandb sync` it from there
            storage.upload_dir(folder, storage.join(experiment_dir(sweep), "wandb", folder.name))
        except Exception as error:
            print(f"wandb: warning: could not copy {folder} to the experiment's storage: {error}")


# ---------------------------------------------------------------------------------------------------
# The trainable

def run_trial(trial_config: dict) -> None:
    """One sweep trial (a Tune function trainable): path (a) or (b) of the module docstring."""
    sweep = validate_run(trial_config)
    install_cluster_lock()
    if uses_ray_train(sweep):
        _run_with_ray_train(sweep, trial_config)
    else:
        _run_in_process(sweep)


def _run_in_process(sweep: SweepConfig) -> None:
    from ray import tune
    from spo_ray.trainer import WorkerContext

    context = tune.get_context()
    tracker = start_tracking(sweep, context.get_trial_name(), 0)
    trial_id = context.get_trial_id()
    resume = load_state(tune.get_checkpoint(), trial_id=trial_id)
    _train_and_report(sweep, tune.report, tune.Checkpoint, tracker, trial_id=trial_id,
                      extra_columns=population_columns(sweep, trial_id, resume),
                      context=WorkerContext(cpus=max(1, int(sweep.scaling.cpus_per_worker))), resume=resume)


def _train_and_report(sweep: SweepConfig, report_fn, checkpoint_cls, tracker, *, trial_id: str,
                      write_checkpoints: bool = True, extra_columns: tuple[dict, dict] = ({}, {}),
                      **train_kwargs) -> None:
    """Run the trainer, forwarding rows (and checkpoints, marked with `trial_id`) to `report_fn`, with the
    `extra_columns` (on every row, on the first row) added. A divergence or a rejected config ends the run
    with one last row (see the module docstring); any other error propagates."""
    from spo_ray.rounds import train_in_rounds
    from spo_ray.trainer import Diverged

    last: dict = {}
    every_row, first_row = extra_columns

    def report(metrics: dict, state: dict | None) -> None:
        metrics = {**metrics, **every_row, **({} if last else first_row)}
        last.update(metrics)
        state = {**state, WRITER_KEY: trial_id} if state is not None else None
        report_with_checkpoint(report_fn, checkpoint_cls, metrics, state, write=write_checkpoints)

    try:
        train_in_rounds(sweep.run_config(), cache_dir=init_cache_dir(sweep), reference_dir=reference_cache_dir(sweep),
                        report=_tracked(report, tracker), **train_kwargs)
    except Diverged as error:
        # Under DDP every rank raises at the same step (the trainer also checks the all-reduced gradient
        # norm), so every rank reaches this report and none is left waiting in a collective.
        outcome, row = "DIVERGED", final_row("DIVERGED", error, {**last, **error.last_metrics})
    except ConfigError as error:  # raised before any collective, on every rank alike
        outcome, row = "ERROR", final_row("ERROR", error, last)
    except BaseException:
        _finish(tracker, "ERROR", sweep)
        raise
    else:
        outcome, row = "TERMINATED", None
    if row is not None:
        report_fn(row)
    _finish(tracker, outcome, sweep)


def _run_with_ray_train(sweep: SweepConfig, trial_config: dict) -> None:
    """The trial as a Ray Train driver: one TorchTrainer per trial, named after the trial, so a retried
    or resumed trial finds its run's checkpoints again (Train V2 restores a run from its storage)."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    context = tune.get_context()
    scaling = sweep.scaling
    resources = worker_resources(sweep)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"sweep": trial_config, "trial_name": context.get_trial_name(),
                           "trial_id": context.get_trial_id()},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=TrainRunConfig(
            **storage.for_ray(storage.join(experiment_dir(sweep), "ray_train")),
            name=context.get_trial_id(),
            failure_config=FailureConfig(max_failures=sweep.tune.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=sweep.tune.keep_checkpoints),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()  # raises TrainingFailedError once Train's retries are spent: the trial is ERROR


def train_loop_per_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs: the trainer under DDP, reporting to Ray Train."""
    import ray.train
    import ray.train.torch
    from spo_ray.trainer import WorkerContext

    sweep = validate_run(loop_config["sweep"])
    train_context = ray.train.get_context()
    rank, world_size = train_context.get_world_rank(), train_context.get_world_size()
    context = WorkerContext(rank=rank, world_size=world_size, device=ray.train.torch.get_device(),
                            cpus=max(1, int(sweep.scaling.cpus_per_worker)), strategy=sweep.scaling.strategy)
    install_cluster_lock()
    tracker = start_tracking(sweep, loop_config["trial_name"], rank) if rank == 0 else None
    # Every rank calls ray.train.report (it synchronises the workers); only rank 0 uploads checkpoints:
    # the DDP replicas hold the same weights, and under FSDP rank 0 gathers the full state.
    _train_and_report(sweep, ray.train.report, ray.train.Checkpoint, tracker, trial_id=loop_config["trial_id"],
                      write_checkpoints=rank == 0,
                      context=context, wrap_model=None if context.sharded else ray.train.torch.prepare_model,
                      resume=load_state(ray.train.get_checkpoint(), announce=rank == 0))


def one_line_error(error: BaseException | None) -> str:
    """The user-facing line of an error that ended a trial: the innermost cause, without the Ray wrapping."""
    if error is None:
        return ""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)  # Train's WorkerGroupError: rank -> exception
        if failures:
            error = next(iter(failures.values()))
            continue
        inner = getattr(error, "cause", None) or error.__cause__
        if inner is None or not isinstance(inner, BaseException):
            break
        error = inner
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # a text trace (Tune's error file)
        return lines[-1]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


__all__ = ["run_trial", "trainable", "train_loop_per_worker", "uses_ray_train", "trial_resources",
           "experiment_dir", "init_cache_dir", "reference_cache_dir", "one_line_error", "start_build_locks",
           "TRIAL_STATUS_KEY", "ERROR_KEY"]
