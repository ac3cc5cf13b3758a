"""Self-training in rounds: sample from the policy being trained, verify, pair, train again. No Ray in here.

Iterative RPO (Pang et al. 2024, arXiv:2404.19733) repeats one recipe: round t samples answers from the model
M_t that round t − 1 produced, checks them by their final answer, pairs right against wrong and trains M_{t+1}
from M_t, with M_t as the reference. It is also where the paper's "catastrophic preference shift" should
compound: each round trains on what the last one made likely.

`train_in_rounds` is what a trial runs (`spo_ray.distributed`, `python -m spo_ray.train`). With
`data.sampled_pairs.rounds: 1` (the default) it is `trainer.train` itself. With R rounds of S steps
(`steps_per_round`, default `train.max_steps`) a run takes R·S steps, numbered on from round to round; round r
trains steps (r − 1)·S + 1 … r·S, and every row it reports carries `round: r`:

  1. round 1 trains on the source's task as `load_task` builds it: the table sampled once from the init and
     shared by every trial (`spo_ray.tasks.sampled`);
  2. the trainer checkpoints at the end of each round (weights, AdamW, schedule, step);
  3. round r + 1 starts from those weights, written once as a model folder in the init cache under the hash of
     the weights (`round_start`; LoRA adapters merged in, new ones start the round). That folder samples the
     round's prompts — a table keyed by the weights, so a retried or resumed trial reads it instead of
     sampling again —, the pairs are built by round 1's rule, and the trainer runs the round's steps from it.

Between rounds:
  - `reference_update: fixed` keeps round 1's reference (the init) for every round; `previous` makes the
    round's start its reference (Iterative RPO), so the reference pass runs anew on each round's pairs. For
    SPO this moves the safe region: under `previous` its penalty keeps a round from lowering the chosen
    log-prob below the *last round's policy*, not below the SFT solution.
  - `optimizer_per_round: reset` (the default, as Iterative RPO trains each iteration: a fresh AdamW and
    warm-up, the schedule over the round's S steps) or `keep` (one AdamW and one schedule over all R·S steps).
  - The held-out pairs stay round 1's, so `eval/*` is one yardstick across rounds; under `previous` their
    deltas are the round's own change (Δ against the round's start), under `fixed` the change since the init.

A round whose samples give no pair (the policy is now always right, or never and without a gold answer), or
fewer pairs than a batch, ends the trial's rounds: its last row is reported again with `round/stopped` saying
why, and the trial ends normally with the rounds it finished.

Resuming: every checkpoint names the round's start folder (`round_start`), so a trial killed in round r
restarts in round r from its last checkpoint, with round r's start weights (its reference and the key of its
samples) found again in the cache — no round is sampled twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from spo_ray.config import ROUND_KEY, ConfigError, RunConfig, total_steps
from spo_ray.models import cached_init, load_causal_lm, save_to_cache
from spo_ray.sampling import no_pairs_message, samples_dir
from spo_ray.storage import local_mirror
from spo_ray.tasks import load_task
from spo_ray.tasks.sampled import round_pairs, round_sampling_job
from spo_ray.tasks.task import Task
from spo_ray.trainer import Report, WorkerContext, train

START_KEY = "round_start"        # in every checkpoint: the folder name of the round's starting weights
STOPPED_KEY = "round/stopped"    # the reason a trial's rounds ended before the last one


def rounds_of(config: RunConfig) -> tuple[int, int]:
    """(rounds, steps per round); (1, train.max_steps) without self-training rounds."""
    spec = config.data.sampled_pairs
    if spec is None or spec.rounds == 1:
        return 1, config.train.max_steps
    return spec.rounds, spec.steps_per_round or config.train.max_steps


def round_config(config: RunConfig, round_number: int) -> RunConfig:
    """The config the trainer runs round `round_number` with: `train.max_steps` is the span of the learning-rate
    schedule (the round's steps under `reset`, the whole run's under `keep`); step 0's evaluation is round 1's."""
    rounds, steps = rounds_of(config)
    keep = config.data.sampled_pairs.optimizer_per_round == "keep"
    train_cfg = config.train.model_copy(update={"max_steps": total_steps(config) if keep else steps,
                                                "eval_on_start": config.train.eval_on_start and round_number == 1})
    return config.model_copy(update={"train": train_cfg})


def weights_key(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names and exact bytes (any dtype): the identity of a round's starting weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def rounds_dir(cache_dir: str) -> Path:
    """Where rounds' starting weights live: `rounds/` of the init cache (a node's mirror of it under a URI)."""
    return Path(local_mirror(cache_dir)) / "rounds"


def round_start(config: RunConfig, task: Task, loaded_from: str, state: dict, round_number: int,
                cache_dir: str, context: WorkerContext) -> str:
    """The folder of the weights in checkpoint `state` (the policy as round `round_number` − 1 left it; that
    round loaded its policy from `loaded_from`), written once per weights hash with `task`'s tokenizer —
    under a URI cache, uploaded, so the other nodes of a trial fetch it. LoRA adapters are merged in.

    Of a trial's DDP workers rank 0 writes it while the others wait: transformers' `save_pretrained` writes
    weights only on rank 0 of an initialized process group (another rank's folder would hold none)."""
    key = weights_key(state["model"])
    target = rounds_dir(cache_dir) / f"round-{key}"
    together = context.world_size > 1 and dist.is_initialized()
    if together and context.rank != 0:
        dist.barrier()  # rank 0 has written (and uploaded) the folder
        return existing_round_start(target.name, cache_dir)
    with cached_init(target) as found:
        if not found:
            model = load_causal_lm(loaded_from, config.model.model_copy(update={"gradient_checkpointing": False}))
            model.load_state_dict(state["model"])
            if config.model.lora is not None:
                model = model.merge_and_unload()
            info = {"name": f"{config.model.init} after round {round_number - 1}", "weights_sha256": key,
                    "round": round_number, "from": str(loaded_from), "step": state["step"]}
            save_to_cache(model, task.tokenizer, info, target)
            del model
    if together:
        dist.barrier()
    return str(target)


def existing_round_start(name: str, cache_dir: str) -> str:
    """The start folder a checkpoint names (`START_KEY`), fetched from the shared cache where another node wrote
    it; a cache that lost it cannot resume the round with the same reference and samples."""
    target = rounds_dir(cache_dir) / name
    with cached_init(target) as found:
        if not found:
            shutil.rmtree(target, ignore_errors=True)
            raise RuntimeError(f"cannot resume: the round's starting weights {target} are gone from the cache "
                               f"(delete the trial's checkpoints to train its rounds again)")
    return str(target)


def round_task(first: Task, config: RunConfig, start: str, round_number: int, cache_dir: str,
               progress: bool = False) -> tuple[Task, str | None]:
    """Round `round_number`'s task: `first` (round 1's) with the pairs `start`'s own samples give, starting from
    `start` — and taking it as reference under `reference_update: previous`. Returns (task, why the rounds
    end here: no pairs, or fewer than a batch; None to train on)."""
    spec = config.data.sampled_pairs
    job = round_sampling_job(first, config, start, round_number)
    pairs, metrics, counts = round_pairs(first, config, job, samples_dir(cache_dir), progress)
    stopped = None
    if not pairs:
        stopped = f"round {round_number}: " + no_pairs_message("data.sampled_pairs", counts).split(": ", 1)[1]
    elif len(pairs) < config.train.batch_size:
        stopped = (f"round {round_number}: {len(pairs)} pairs, fewer than train.batch_size "
                   f"({config.train.batch_size}): {metrics['sampler/sample_accuracy']:.0%} of the samples right")
    reference = start if spec.reference_update == "previous" else first.reference_path
    task = dataclasses.replace(first, train_pairs=pairs, policy_path=start, reference_path=reference,
                               metrics={**first.metrics, **metrics},
                               notes=first.notes + [f"round {round_number}: {len(pairs)} pairs from {job.key}"])
    return task, stopped


def train_in_rounds(config: RunConfig, *, cache_dir: str, reference_dir: str | None = None,
                    context: WorkerContext | None = None, report: Report | None = None,
                    resume: dict | None = None, wrap_model=None, progress: bool = False) -> dict[str, float]:
    """Train `config` — in self-training rounds where `data.sampled_pairs.rounds` > 1 (module docstring) — and
    return the final metrics. The arguments are `trainer.train`'s."""
    rounds, steps = rounds_of(config)
    common = dict(cache_dir=cache_dir, reference_dir=reference_dir, context=context, wrap_model=wrap_model,
                  progress=progress)
    if rounds == 1:
        return train(config, report=report, resume=resume, **common)
    context = context or WorkerContext()
    began = time.perf_counter()
    keep = config.data.sampled_pairs.optimizer_per_round == "keep"
    step = resume["step"] if resume else 0
    if step >= rounds * steps:
        return {}
    first = load_task(config, cache_dir=cache_dir, progress=progress and context.rank == 0,
                      samples_dir=samples_dir(cache_dir))
    round_number = step // steps + 1
    start = existing_round_start(resume[START_KEY], cache_dir) if resume and resume.get(START_KEY) else None
    final: dict[str, float] = {}
    while round_number <= rounds:
        first_step = (round_number - 1) * steps
        if round_number == 1:
            task, stopped = first, None
        else:
            if step == first_step:  # at the round's boundary: the checkpoint holds the round's starting weights
                start = round_start(config, first, start or first.policy_path, resume, round_number, cache_dir,
                                    context)
            task, stopped = round_task(first, config, start, round_number, cache_dir,
                                       progress and context.rank == 0)
        if stopped:
            if context.rank == 0:
                print(f"self-training rounds end: {stopped}")
            final = {**final, STOPPED_KEY: stopped}
            # The last row again, with the reason: a row of the step already reported replaces it, so only where
            # this process holds that row (a trial resumed at the boundary has it in its tables, not here).
            if report and final:
                report({**final, "step": step, ROUND_KEY: round_number - 1}, None)
            return final
        if step > first_step:  # a checkpoint inside this round: its weights, AdamW, schedule and step
            round_resume = resume
        elif round_number == 1:
            round_resume = None
        else:  # the round's start: the weights come from `start`; AdamW and schedule carried over under `keep`
            round_resume = {"step": step, **({k: resume[k] for k in ("optimizer", "scheduler")} if keep else {})}
        captured: dict = {}

        def round_report(row: dict, state: dict | None, round_number=round_number, start=start) -> None:
            # the trial's time so far, sampling and reference passes between rounds included
            row = {**row, ROUND_KEY: round_number, "wall_time_s": time.perf_counter() - began}
            if state is not None:
                state = {**state, START_KEY: Path(start).name if start else ""}
                captured["state"] = state
            if report:
                report(row, state)

        final = {**train(round_config(config, round_number), report=round_report, resume=round_resume, task=task,
                         until=round_number * steps, **common), ROUND_KEY: round_number}
        resume, step = captured["state"], round_number * steps
        round_number += 1
    return final


def check_prompt_pool(task: Task, config: RunConfig) -> None:
    """Bad input before any trial: `fresh_prompts` asks for more training prompts than the source has."""
    spec = config.data.sampled_pairs
    if spec is None or spec.rounds == 1 or not spec.fresh_prompts or task.sampling is None:
        return
    round_sampling_job(task, config, task.policy_path, spec.rounds)  # raises ConfigError naming the key


__all__ = ["train_in_rounds", "rounds_of", "round_config", "weights_key", "check_prompt_pool", "ROUND_KEY",
           "START_KEY", "STOPPED_KEY", "ConfigError"]
