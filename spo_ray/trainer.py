"""One preference-optimisation run: no Ray in here.

`train(config, ...)` reads as a checklist:

  1. load the task (tokenizer, text pairs, which weights to start from, the task's own evaluator);
  2. tokenize the pairs; load the policy; check the passes fit and choose the memory levers
     (`spo_ray.memory.choose_levers`); get the reference log-probs (shared cache, a frozen model, or TR-DPO's
     drifting one);
  3. loop: one concatenated forward per micro-batch → preference loss (+ SPO penalty) → backward →
     clip → AdamW step (or each parameter's step inside the backward, `spo_ray.optimizers`); every `log_every`
     steps report the averaged train metrics, every `eval_every` the evaluation metrics, every `probe_every`
     the gradient terms of the paper's analysis;
  4. return the final metrics.

Ray Train (spo_ray.distributed) calls the same function on every worker with a `WorkerContext`, a
`wrap_model` that adds DDP, and a `report` callback that forwards metrics and checkpoints to Ray — through
`spo_ray.rounds`, which in self-training rounds calls it once per round with that round's task and end step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.distributed as dist

from spo_ray import storage
from spo_ray.config import ConfigError, LossConfig, RunConfig, TrainConfig, check_batch_size, config_at, get_dotted, to_plain
from spo_ray.data import LengthGroupedSampler, PairDataset, collate, collate_pairs, tokenize_pairs
from spo_ray.init_evaluation import evaluation_key, evaluations_dir, shared_initial_evaluation
from spo_ray.logprobs import (PREFIX_SHARING_MODEL_TYPES, concatenated_forward, prefix_sharing_unsupported,
                              sequence_logps)
from spo_ray.losses import COMBINE, REFERENCE_FREE_LOSSES, ld_logps, loss_options, preference_loss
from spo_ray import optimizers
from spo_ray.memory import Levers, check_run_fits, release_freed_memory, return_freed_blocks
from spo_ray.optimizers import FUSED, accumulating
from spo_ray.reference import (ModelReference, PrecomputedReference, SyncedReference, cached_reference_logps,
                               cached_reference_logps_together, compute_reference_logps, dataset_fingerprint,
                               fingerprint, model_identity, table_path)
from spo_ray.sampling import samples_dir
from spo_ray.sharding import full_state, is_sharded, load_full_state, local, per_pair_tables, shard_model

Report = Callable[[dict, dict | None], None]  # (metrics, checkpoint state or None)


@dataclass
class WorkerContext:
    """Where this copy of the run executes: its rank among `world_size` DDP workers, device and CPUs."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cpus: int = 1
    strategy: str = "ddp"  # "fsdp": shard the policy and reference over the workers (spo_ray.sharding)

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.world_size > 1


class Diverged(RuntimeError):
    """The loss became NaN or infinite; carries the step and the last finite metrics."""

    def __init__(self, step: int, last_metrics: dict):
        super().__init__(f"loss is not finite at step {step}")
        self.step = step
        self.last_metrics = last_metrics


def unwrap(model):
    """The module inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------------
# The loss of one batch

def spo_lambda_at(loss_cfg: LossConfig, step: int) -> float:
    """λ with its optional linear warm-up: λ · min(1, step / warmup)."""
    if loss_cfg.spo_lambda_warmup_steps == 0:
        return loss_cfg.spo_lambda
    return loss_cfg.spo_lambda * min(1.0, step / loss_cfg.spo_lambda_warmup_steps)


def one_step_penalty(model, batch: dict, chosen_avg_logps: torch.Tensor, inner_lr: float,
                     epsilon: float, max_halvings: int = 10) -> tuple[torch.Tensor, float]:
    """SPO's `one_step` estimate of the lower-level value gap: max(0, g(θ) − sg[g(θ − α∇g(θ))] − ε).

    g is the mean per-token NLL of the chosen responses on the batch. One gradient step of size α on g
    approximates the lower-level (SFT) optimum near θ, so g(θ) − g(θ − α∇g) estimates how far θ is from
    being SFT-optimal; its gradient w.r.t. θ is ∇g wherever the penalty is active (RPO's NLL gradient at
    weight λ), and ε gates it: active only while the step lowers g by more than ε (≈ α‖∇g‖²).

    The step must be a descent step: one that overshoots (g rises) says nothing about the lower-level
    optimum, and max(0, ·) would silently switch the penalty off — at α = 0.1 it did, in 98% of the
    steps, on the built-in task (docs/results.md, Claim 5). So α is halved until g(θ − α∇g) < g(θ) (at
    most `max_halvings` times; no step found: penalty 0). Returns the penalty and the α used (0.0 when none
    lowered g). Costs one extra backward (for ∇g) and one extra forward over the chosen rows per α tried.
    """
    g = -chosen_avg_logps.mean()
    inner = unwrap(model)
    names, params = zip(*[(n, p) for n, p in inner.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(g, params, retain_graph=True, allow_unused=True)
    half = batch["input_ids"].size(0) // 2
    chosen_rows = [batch[k][:half] for k in ("input_ids", "attention_mask", "response_mask")]

    @torch.no_grad()
    def g_after(alpha: float) -> torch.Tensor:
        stepped = {n: p - alpha * gr if gr is not None else p for n, p, gr in zip(names, params, grads)}
        sums, counts = sequence_logps(inner, *chosen_rows, parameters=stepped)
        return -(sums / counts.clamp(min=1)).mean()

    alpha = inner_lr
    for _ in range(max_halvings + 1):
        value = g_after(alpha)
        if value < g.detach():
            return torch.relu(g - value - epsilon), alpha
        alpha /= 2
    return torch.zeros((), device=g.device), 0.0


def batch_loss(loss_cfg: LossConfig, policy: dict, reference: dict, step: int, model=None,
               batch=None) -> tuple[torch.Tensor, dict]:
    """Mean preference loss of a batch and its metrics, from policy and reference log-probs."""
    name = loss_cfg.name
    base = loss_cfg.base if name == "spo" else name
    members = (loss_cfg.combine or {}) if base == COMBINE else {base: 1.0}
    averaged = loss_cfg.average_logps or "simpo" in members  # SimPO is defined on length-averaged log-probs
    key = "avg_logps" if averaged else "logps"
    chosen, rejected = policy[f"chosen_{key}"], policy[f"rejected_{key}"]
    ref_chosen, ref_rejected = reference[f"chosen_{key}"], reference[f"rejected_{key}"]
    # SPO's safe region and the log-prob trajectories: the summed (or averaged) log-probs against the initial
    # reference, whatever view the loss takes (LD-DPO's weighting) and wherever its reference drifted (TR-DPO).
    anchor = "anchor_" if "anchor_chosen_logps" in reference else ""
    safe_region = {"spo_chosen_logps": chosen, "spo_ref_chosen_logps": reference[f"{anchor}chosen_{key}"]}
    if loss_cfg.ld_alpha is not None:  # on summed log-probs only (config.check_loss)
        chosen, rejected, ref_chosen, ref_rejected = (
            ld_logps(side[f"{reply}_logps"], side[f"{reply}_shared_logps"], loss_cfg.ld_alpha)
            for side in (policy, reference) for reply in ("chosen", "rejected"))
    if base in REFERENCE_FREE_LOSSES and name != "spo":
        ref_chosen = ref_rejected = None

    # The options this loss takes (a sweep over several losses sets the others too); None: the loss's default.
    options = {key: getattr(loss_cfg, key) for key in loss_options(base, loss_cfg.combine)
               if getattr(loss_cfg, key) is not None}
    options.update(chosen_lengths=policy["chosen_lengths"], rejected_lengths=policy["rejected_lengths"])
    if loss_cfg.use_weighting:
        options.update(wpo_chosen_logps=policy["chosen_wpo_logps"], wpo_rejected_logps=policy["rejected_wpo_logps"])
    if loss_cfg.nll_weight:
        options["nll_weight"] = loss_cfg.nll_weight
        if averaged:  # ℓ̄(y_w) is already per token: the NLL term's −ℓ/|y_w| must not divide by |y_w| again
            options["chosen_lengths"] = torch.ones_like(policy["chosen_lengths"])
    spo_lambda = spo_lambda_at(loss_cfg, step)
    one_step = name == "spo" and loss_cfg.spo_estimator == "one_step"
    if name == "spo" and not one_step:
        options.update(base=base, spo_lambda=spo_lambda, spo_epsilon=loss_cfg.spo_epsilon, **safe_region)
        losses, metrics = preference_loss("spo", chosen, rejected, ref_chosen, ref_rejected,
                                          beta=loss_cfg.beta, **options)
    else:
        if one_step and base in REFERENCE_FREE_LOSSES:
            ref_chosen = ref_rejected = None
        losses, metrics = preference_loss(base, chosen, rejected, ref_chosen, ref_rejected,
                                          beta=loss_cfg.beta, **options)
    loss = losses.mean()
    if one_step:
        penalty, inner_step = one_step_penalty(model, batch, policy["chosen_avg_logps"], loss_cfg.spo_inner_lr,
                                               loss_cfg.spo_epsilon)
        loss = loss + spo_lambda * penalty
        metrics["spo_penalty"] = penalty.detach()
        metrics["safe_region_violation"] = (penalty > 0).float().detach()  # the step's batch is one unit
        metrics["spo_inner_step"] = torch.tensor(inner_step)  # the α the descent check settled on

    # The log-prob trajectories are always the summed log-probs against the reference (the paper's
    # quantities), whatever view of them the loss used.
    with torch.no_grad():
        metrics["chosen_logps"] = policy["chosen_logps"].mean()
        metrics["rejected_logps"] = policy["rejected_logps"].mean()
        metrics["chosen_logp_delta"] = (policy["chosen_logps"] - reference[f"{anchor}chosen_logps"]).mean()
        metrics["rejected_logp_delta"] = (policy["rejected_logps"] - reference[f"{anchor}rejected_logps"]).mean()
        if name == "spo":
            metrics["spo_lambda"] = torch.tensor(spo_lambda)
    metrics["loss"] = loss.detach()
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# Diagnostics

def gradient_terms(model, probe_batch: dict, max_tokens: int | None = None) -> dict[str, float]:
    """Norms and cosine of ∇ℓ_θ(y_w) and ∇ℓ_θ(y_l) on a fixed probe set (the paper's "gradient terms").

    When chosen and rejected responses are similar these gradients align (cosine near 1), so pushing
    ℓ(y_l) down drags ℓ(y_w) down too: the mechanism behind DPO's likelihood displacement.

    A diagnostic must not set the trial's peak memory: each side gets its own forward and backward (half
    the rows, no retained graph), and only one full gradient is ever held. The chosen side's gradient is
    kept; the rejected side's is consumed parameter by parameter as backward produces it (a hook after each
    parameter's gradient is accumulated adds its dot product with the chosen one and its squared norm, then
    frees it), so at 135M parameters the probe holds 0.5 GiB of gradient, not 1 GiB. With `max_tokens`, a
    side's rows go through in groups of at most that many tokens and their gradients add up in `.grad`
    (the rejected side's are consumed on its last group). The sums are float64.

    Under FSDP (`spo_ray.sharding`) each worker holds the gradients of its shard only, written by FSDP's own
    post-backward: both sides' shards are kept (every worker runs the same probe, so the averaged gradient is
    the probe's), and the workers' partial sums are added up.
    """
    inner = unwrap(model)
    sharded = is_sharded(inner)
    params = [p for p in inner.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    half = probe_batch["input_ids"].size(0) // 2
    sums = torch.zeros(3, dtype=torch.float64, device=params[0].device)  # ⟨c, r⟩, ‖c‖², ‖r‖²

    def backward_side(rows: slice, consume: Callable | None = None) -> None:
        """Backward of the mean summed log-prob of `rows` into `.grad`, over groups of rows that fit
        `max_tokens`; `consume(param)` runs as each parameter's gradient of the last group is complete."""
        width = probe_batch["input_ids"].size(1)
        indices = list(range(*rows.indices(probe_batch["input_ids"].size(0))))
        per_group = max(1, (max_tokens or len(indices) * width) // width)
        starts = range(0, len(indices), per_group)
        for start in starts:
            group = indices[start:start + per_group]
            used = probe_batch["attention_mask"][group].any(0)  # drop the columns that are padding in every row
            input_ids, attention_mask, response_mask = (probe_batch[k][group][:, used] for k in
                                                        ("input_ids", "attention_mask", "response_mask"))
            sums_of_rows, _ = sequence_logps(inner, input_ids, attention_mask, response_mask)
            hooks = ([p.register_post_accumulate_grad_hook(consume) for p in params]
                     if consume is not None and start == starts[-1] else [])
            try:
                (sums_of_rows.sum() / len(indices)).backward()
            finally:
                for hook in hooks:
                    hook.remove()

    def as_float(grad) -> torch.Tensor | None:
        return None if grad is None else local(grad).float()

    backward_side(slice(0, half))
    chosen = {p: as_float(p.grad) for p in params}
    for p in params:
        p.grad = None
    for c in chosen.values():
        if c is not None:
            sums[1] += (c.flatten() @ c.flatten()).double()

    if sharded:  # FSDP writes the sharded gradients itself, after backward: no per-parameter hook sees them
        backward_side(slice(half, None))
        for p in params:
            r, c = as_float(p.grad), chosen[p]
            if r is not None:
                sums[2] += (r.flatten() @ r.flatten()).double()
                if c is not None:
                    sums[0] += (c.flatten() @ r.flatten()).double()
            p.grad = None
        dist.all_reduce(sums)  # each worker summed over its shards
    else:
        def consume(p) -> None:
            r, c = as_float(p.grad).flatten(), chosen[p]
            sums[2] += (r @ r).double()
            if c is not None:
                sums[0] += (c.flatten() @ r).double()
            p.grad = None
        backward_side(slice(half, None), consume)
    dot, chosen_sq, rejected_sq = sums.tolist()
    chosen_norm, rejected_norm = math.sqrt(chosen_sq), math.sqrt(rejected_sq)
    cosine = dot / max(chosen_norm * rejected_norm, 1e-12)
    return {"probe/chosen_grad_norm": chosen_norm, "probe/rejected_grad_norm": rejected_norm,
            "probe/grad_cosine": cosine}


@torch.no_grad()
def evaluate_pairs(model, dataset: PairDataset, reference, loss_cfg: LossConfig, pad_id: int,
                   batch_size: int, device, autocast, max_tokens: int | None = None,
                   shared_prompts: bool = False) -> dict[str, float]:
    """Preference metrics over the whole evaluation set (one loss over all pairs, not a mean of batches).
    A sharded model's workers split the batches and add up their per-pair tables. `shared_prompts`: one row
    a pair (`spo_ray.data.collate_shared_prompts`)."""
    was_training = model.training
    model.eval()

    def forward(batch):
        with autocast():
            policy_out = concatenated_forward(unwrap(model), batch, wpo=loss_cfg.use_weighting)
        return {**{("policy", k): v for k, v in policy_out.items()},
                **{("reference", k): v for k, v in reference(batch).items()}}

    tables = per_pair_tables(dataset, batch_size, pad_id, device, forward, sharded=is_sharded(unwrap(model)),
                             max_tokens=max_tokens, shared_prompts=shared_prompts)
    model.train(was_training)
    policy, ref = ({name: table for (side, name), table in tables.items() if side == wanted}
                   for wanted in ("policy", "reference"))
    loss_cfg = loss_cfg.model_copy(update={"spo_estimator": "reference"})  # one_step needs gradients
    _, metrics = batch_loss(loss_cfg, policy, ref, step=10**9)
    return {f"eval/{k}": float(v) for k, v in metrics.items() if k != "spo_lambda"}


# ---------------------------------------------------------------------------------------------------
# Fault injection: FOR TESTS ONLY (tests/test_reliability.py); inert unless SPO_RAY_FAULT is set

FAULT_ENV = "SPO_RAY_FAULT"
FAULT_ACTIONS = ("diverge_at", "raise_at", "crash_worker_at")


def injected_faults(config: RunConfig, marker_dir: str) -> Callable[[int], bool] | None:
    """The failures `SPO_RAY_FAULT` asks this run to suffer, as `fault(step) -> poison this step's loss?`;
    None (no check at all in the loop) when the variable is unset.

    `SPO_RAY_FAULT="diverge_at=3@loss.name=spo; raise_at=2@loss.name=ipo; crash_worker_at=4:once"`:
    at step K (1-based), `diverge_at` multiplies the loss by NaN, `raise_at` raises RuntimeError and
    `crash_worker_at` kills the process (`os._exit(1)`, a dead worker); `@KEY=VALUE` limits a fault to
    runs whose config has that value; `:once` fires only on the first attempt (a marker file in
    `marker_dir`, named after the run's config), so a restarted run gets past it.
    """
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    plain = to_plain(config)
    run_key = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:12]
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        fault, _, condition = item.partition("@")
        action, _, at = fault.partition("=")
        at, _, once = at.partition(":")
        if action.strip() not in FAULT_ACTIONS or not at.strip().isdigit() or once not in ("", "once"):
            raise ValueError(f"{FAULT_ENV}: cannot parse {item!r} (expected ACTION=STEP[:once][@KEY=VALUE], "
                             f"ACTION one of {', '.join(FAULT_ACTIONS)})")
        if condition:
            key, _, value = condition.partition("=")
            if str(get_dotted(plain, key.strip())) != value.strip():
                continue
        faults.append((action.strip(), int(at), once == "once"))

    def fault(step: int) -> bool:
        poison = False
        for action, at, once in faults:
            if step != at:
                continue
            if once:
                marker = storage.join(marker_dir, f".fault-{action}-{at}-{run_key}")
                if storage.exists(marker):
                    continue
                storage.write_bytes(marker, b"")
            if action == "raise_at":
                raise RuntimeError(f"injected fault at step {step}")
            if action == "crash_worker_at":
                os._exit(1)
            poison = True
        return poison
    return fault if faults else None


# ---------------------------------------------------------------------------------------------------
# The run

def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine or linear decay to zero (or constant)."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)
    return factor


def build_optimizer(params: list[torch.nn.Parameter], train_cfg: TrainConfig,
                    levers: Levers | None = None) -> torch.optim.Optimizer:
    """`train.optim`'s AdamW over `params` (`spo_ray.optimizers`; `levers.optim` where auto chose), stepping in
    the backward where the levers say (`OptimizerInBackward`)."""
    levers = levers or Levers(optim=resolved_optim(train_cfg))

    def make(group):
        return optimizers.build_optimizer(group, levers.optim, train_cfg.learning_rate, train_cfg.weight_decay)

    return optimizers.OptimizerInBackward(params, make) if levers.in_backward else make(params)


def resolved_optim(train_cfg: TrainConfig) -> str:
    """`train.optim`, with auto as the fused AdamW (what auto is where memory does not ask for 8-bit states)."""
    return FUSED if train_cfg.optim == "auto" else train_cfg.optim


def restore_state(model, optimizer, scheduler, state: dict, sharded: bool) -> int:
    """Load a checkpoint's weights, AdamW and schedule state (the run's own, or under PBT another trial's)
    into the run; return its step. The data position follows from the step (`global_batches`). A state
    without weights or optimizer keeps the loaded ones and a fresh AdamW and schedule: the start of a
    self-training round that resets them (`spo_ray.rounds`)."""
    if "model" in state:
        if sharded:
            load_full_state(model, optimizer, state["model"], state["optimizer"])
        else:
            unwrap(model).load_state_dict(state["model"])
    if "optimizer" in state and not sharded:
        optimizer.load_state_dict(state["optimizer"])
    if "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    return state["step"]


def apply_optimizer_settings(optimizer, scheduler, train_cfg: TrainConfig, optim: str | None = None) -> None:
    """Make the optimizer take `train_cfg`'s learning rate and weight decay from its next step on.

    A loaded checkpoint carries the learning rate it was trained with (AdamW's param groups and the
    schedule's base), so a PBT mutation or a `schedule` entry must replace both; the schedule's factor at
    the current step (warm-up, decay) is kept. Changes nothing when the values already agree. The kernels
    (`optim`, the run's resolved `train.optim`) are the run's own, whatever a checkpoint's param groups say.
    """
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    kernels = optimizers.optimizer_kernels(optim or resolved_optim(train_cfg))
    for group in optimizer.param_groups:
        group.update(kernels)
        if group["initial_lr"] != train_cfg.learning_rate:
            group["initial_lr"] = train_cfg.learning_rate
            group["lr"] = train_cfg.learning_rate * factor
        group["weight_decay"] = train_cfg.weight_decay
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]


def _mean_over_workers(values: dict[str, float], context: WorkerContext) -> dict[str, float]:
    if context.world_size == 1 or not dist.is_initialized():
        return values
    keys = sorted(values)
    vector = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=context.device)
    dist.all_reduce(vector)
    return {k: v / context.world_size for k, v in zip(keys, vector.tolist())}


def _autocast_factory(device: torch.device, mixed_precision: str):
    use_bf16 = device.type == "cuda" and mixed_precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext


def initial_evaluator(task, config: RunConfig, directory: str, context: WorkerContext) -> Callable | None:
    """The task's evaluation of the starting weights, shared by the trials that start from them
    (`spo_ray.init_evaluation`); a sharded model's workers evaluate together, so they compute their own."""
    if task.evaluate is None or context.sharded:
        return task.evaluate
    return shared_initial_evaluation(task.evaluate, directory, evaluation_key(task.policy_path, config))


def shares_prompts(config: RunConfig, model, dataset: PairDataset, context: WorkerContext, say: bool = True) -> bool:
    """Whether `model`'s passes over `dataset` run each pair as one row with its prompt once
    (`train.prefix_sharing`: the training steps, evaluation and reference pass; the gradient probe keeps the
    two rows a pair, one side's gradient at a time). auto: where the model supports it; true: also untested
    model types, and a ConfigError naming the key where it cannot be done. `say`: print why auto is off."""
    setting = config.train.prefix_sharing
    if setting is False:
        return False
    if config.loss.name == "spo" and config.loss.spo_estimator == "one_step":
        reason = "the one_step estimator re-scores the chosen replies in rows of their own"
    else:
        longest = max((p.shared_length for p in dataset.pairs), default=0)
        reason = prefix_sharing_unsupported(model, longest, None if setting is True else PREFIX_SHARING_MODEL_TYPES)
    if reason and setting is True:
        raise ConfigError(f"train.prefix_sharing: {reason}")
    if reason and say and context.rank == 0:
        print(f"train.prefix_sharing (auto): off — {reason}")
    return reason is None


def fit_passes(config: RunConfig, policy, train_data: PairDataset, eval_data: PairDataset, micro_batches,
               context: WorkerContext, shared_prompts: bool = False) -> Levers:
    """Would the widest batch of each pass fit? One error line now rather than an OOM kill minutes later
    (`spo_ray.memory.check_run_fits`), on every worker when any worker's memory refuses it (the others would
    wait for it in their first collective). Returns the training step's memory levers: with the auto settings,
    what a step needs to fit (`spo_ray.memory.choose_levers`), said in one line; activation checkpointing is
    turned on here. Every worker takes the most any of them needs: under FSDP a recomputed layer gathers its
    shards again, a collective all must join."""
    from spo_ray.models import enable_activation_checkpointing

    try:
        outcome = check_run_fits(config, policy, train_data, eval_data, micro_batches, context.device,
                                 context.world_size if context.sharded else 1, shared_prompts,
                                 workers=context.world_size), None
    except ConfigError as error:
        outcome = None, str(error)
    outcomes = [outcome]
    if context.world_size > 1 and dist.is_initialized():  # every worker learns every worker's outcome
        outcomes = [None] * context.world_size
        dist.all_gather_object(outcomes, outcome)
    refusal = next((r for _, r in outcomes if r), None)
    if refusal:  # one worker's refusal stops all: none is left waiting for it in a collective
        raise ConfigError(refusal)
    every = [levers for levers, _ in outcomes]
    levers = Levers(checkpointed=min((l.checkpointed for l in every if l.checkpointed), default=0),
                    optim=next((l.optim for l in every if l.optim == optimizers.EIGHT_BIT), every[0].optim),
                    in_backward=any(l.in_backward for l in every), offloaded=every[0].offloaded)
    if levers.checkpointed and config.model.gradient_checkpointing == "auto":
        enable_activation_checkpointing(policy, levers.checkpointed)
    chosen = []
    if levers.in_backward and config.train.optimizer_in_backward == "auto":
        chosen.append("train.optimizer_in_backward (auto): on")
    if levers.optim != resolved_optim(config.train):
        chosen.append(f"train.optim (auto): {levers.optim}")
    if levers.checkpointed and config.model.gradient_checkpointing == "auto":
        which = "every layer" if levers.checkpointed == 1 else f"one layer in every {levers.checkpointed} (the fewest that fit)"
        chosen.append(f"model.gradient_checkpointing (auto): on, {which}")
    if chosen and context.rank == 0:
        budget = config.train.memory_budget
        room = f"train.memory_budget ({budget} GiB)" if budget else "the memory available"
        print(f"{'; '.join(chosen)} — a training step does not fit in {room} without "
              f"{'it' if len(chosen) == 1 else 'them'}")
    return levers


def activation_offloading(levers: Levers, device: torch.device) -> Callable:
    """A factory of the context each micro-batch's forward runs in: activation offloading where the levers ask
    for it (`spo_ray.optimizers.activation_offload`; refused off a GPU), else nothing."""
    if not levers.offloaded:
        return nullcontext
    reason = optimizers.activation_offload(device)
    if isinstance(reason, str):
        raise ConfigError(f"train.activation_offloading: {reason}")
    return lambda: optimizers.activation_offload(device)


def references(config: RunConfig, reference_model: Callable, reference_path: str, splits: dict[str, PairDataset],
               policy, reference_dir: str, context: WorkerContext, autocast, pad_id: int, progress: bool):
    """The training and evaluation splits' reference log-probs (`spo_ray.reference`): the shared tables
    (`reference.cache`), or the frozen model on every batch (`reference.cache: false`), or — TR-DPO's
    `reference.sync` — a model that drifts toward the policy, with the initial reference's tables beside it
    (read from the cache, or computed in the trial without it) for SPO's safe region."""
    loaded = []

    def frozen():  # loaded once, whichever split first needs it
        if not loaded:
            loaded.append(reference_model())
        return loaded[0]

    if not (config.reference.cache or config.reference.sync):
        return (ModelReference(frozen()),) * 2
    tables = {}
    for split, dataset in splits.items():
        key = fingerprint(model_identity(reference_path), dataset_fingerprint(dataset), split)
        def compute(dataset=dataset):
            ref = frozen()
            with autocast():
                return compute_reference_logps(ref, dataset, pad_id, config.reference.batch_size, context.device,
                                               progress=progress and context.rank == 0,
                                               max_tokens=config.reference.batch_tokens,
                                               shared_prompts=shares_prompts(config, ref, dataset, context, say=False))
        if not config.reference.cache:
            tables[split] = compute()
            continue
        if context.sharded:  # every worker takes part in a sharded reference's forward
            tables[split], hit = cached_reference_logps_together(reference_dir, key, dataset, compute,
                                                                 rank=context.rank, device=context.device)
        else:
            tables[split], hit = cached_reference_logps(reference_dir, key, dataset, compute)
        if context.rank == 0:
            print(f"reference log-probs ({split}, {len(dataset)} pairs): "
                  f"{'read from' if hit else 'computed into'} {table_path(reference_dir, key)}")
    if config.reference.sync:
        sync = config.reference
        return tuple(SyncedReference(frozen(), tables[split], sync.sync_steps, sync.mixup_alpha, policy)
                     for split in ("train", "eval"))
    return PrecomputedReference(tables["train"]), PrecomputedReference(tables["eval"])


def train(config: RunConfig, *, cache_dir: str, reference_dir: str | None = None,
          context: WorkerContext | None = None,
          report: Report | None = None, resume: dict | None = None,
          wrap_model: Callable | None = None, progress: bool = False, task=None,
          until: int | None = None) -> dict[str, float]:
    """Run one training job and return its final metrics (see the module docstring).

    cache_dir: where built-in initializations are built and reused (shared across sweeps);
    reference_dir: where the reference log-prob tables go (the experiment directory; default cache_dir).
    task, until: one self-training round (`spo_ray.rounds`): its pairs and starting weights, and the step it
    ends at (default `train.max_steps`, the steps the learning-rate schedule spans).
    """
    from spo_ray.models import load_causal_lm
    from spo_ray.tasks import load_task

    context = context or WorkerContext()
    cfg = config.train
    torch.set_num_threads(cfg.num_threads or max(1, int(context.cpus)))
    if cfg.memory_budget is not None and context.device.type == "cpu":
        return_freed_blocks()  # a budget caps the resident memory: let it follow what is held, not past peaks
    torch.manual_seed(cfg.seed)
    device = context.device

    # 1. The task: tokenizer, pairs (sampled ones read from, or sampled into, the shared cache), initial
    # weights, task evaluator.
    task = task or load_task(config, cache_dir=cache_dir, progress=progress and context.rank == 0,
                             samples_dir=samples_dir(cache_dir))
    until = until or cfg.max_steps
    tokenizer = task.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_pairs, _ = tokenize_pairs(task.train_pairs, tokenizer, config.data.max_length)
    eval_pairs, _ = tokenize_pairs(task.eval_pairs, tokenizer, config.data.max_length)
    train_data, eval_data = PairDataset(train_pairs), PairDataset(eval_pairs)
    check_batch_size(cfg, len(train_data), context.world_size)
    sampler = LengthGroupedSampler([p.length for p in train_pairs], cfg.batch_size, seed=cfg.seed,
                                   group_factor=8 if cfg.length_grouping else 1)
    local_size = cfg.batch_size // context.world_size
    micro_size = local_size // cfg.grad_accum_steps

    # 2. Policy and reference.
    policy = load_causal_lm(task.policy_path, config.model, device=device)
    policy.train()
    own = (b[context.rank * local_size:(context.rank + 1) * local_size] for b in sampler.batches())
    shared_prompts = shares_prompts(config, policy, train_data, context)
    collate_step = collate(shared_prompts)
    levers = fit_passes(config, policy, train_data, eval_data,
                        [m[i:i + micro_size] for m in own for i in range(0, local_size, micro_size)], context,
                        shared_prompts)
    if context.sharded:
        model = shard_model(policy, device)
    else:
        model = wrap_model(policy) if wrap_model else policy
    autocast = _autocast_factory(device, getattr(cfg, "mixed_precision", "auto"))
    reference_path = task.reference_path  # the task resolves built-in names and model.reference

    def reference_model():
        ref = load_causal_lm(reference_path, config.model.model_copy(update={"lora": None}), device=device)
        return shard_model(ref, device) if context.sharded else ref

    train_reference, eval_reference = references(config, reference_model, reference_path,
                                                 {"train": train_data, "eval": eval_data}, policy,
                                                 reference_dir or cache_dir, context, autocast, pad_id, progress)
    synced = train_reference if isinstance(train_reference, SyncedReference) else None

    # 3. Optimiser, schedule, data order.
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "auto" and resume and "optimizer" in resume:  # the checkpoint's kind, whatever memory chose
        levers = replace(levers, optim=optimizers.state_optim(resume["optimizer"]) or FUSED)
    optimizer = build_optimizer(params, cfg, levers)
    offload = activation_offloading(levers, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps,
                                                                      cfg.max_steps))
    step = restore_state(model, optimizer, scheduler, resume, context.sharded) if resume else 0
    if synced and resume and "reference" in resume:  # TR-DPO: the reference as far as it had drifted
        synced.load_state_dict(resume["reference"])
    initial_evaluation = initial_evaluator(task, config, evaluations_dir(cache_dir), context)
    probe_items = [eval_data[i] for i in range(min(cfg.probe_pairs, len(eval_data)))]
    probe_batch = {k: v.to(device) for k, v in collate_pairs(probe_items, pad_id).items()}

    def global_batches(from_step: int):
        """Deterministic batch order: step s always trains on the same pairs, also after a resume."""
        steps_per_epoch = len(sampler)
        epoch, position = divmod(from_step, steps_per_epoch)
        while True:
            sampler.epoch = epoch
            for indices in sampler.batches()[position:]:
                yield indices
            epoch, position = epoch + 1, 0

    def checkpoint_state() -> dict:
        if context.sharded:  # a collective: every rank gathers, rank 0 gets the full state
            model_state, optimizer_state = full_state(model, optimizer)
        else:
            model_state, optimizer_state = unwrap(model).state_dict(), optimizer.state_dict()
        state = {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                 "step": step}
        if synced:
            state["reference"] = synced.state_dict()
        return state

    def diagnostics(do_probe: bool, do_eval: bool, loss_cfg: LossConfig) -> dict[str, float]:
        """The gradient probe and the evaluation, on rank 0 — or on every rank of a sharded model, whose
        forward needs every worker (rank 0 reports them)."""
        row = {}
        if context.rank != 0 and not context.sharded:
            return row
        on_cpu = device.type == "cpu"  # each phase starts from the memory in use, not the last one's peak
        if do_probe:
            if on_cpu:
                release_freed_memory()
            with accumulating(optimizer):  # the probe's backward must not step an optimizer in the backward
                row.update(gradient_terms(model, probe_batch, cfg.eval_batch_tokens))
        if do_eval:
            if on_cpu:
                release_freed_memory()
            row.update(evaluate_pairs(model, eval_data, eval_reference, loss_cfg, pad_id,
                                      cfg.eval_batch_size, device, autocast, cfg.eval_batch_tokens,
                                      shared_prompts))
            if task.evaluate is not None:
                evaluate = initial_evaluation if step == 0 else task.evaluate
                with autocast():
                    row.update({f"eval/{k}": v for k, v in evaluate(unwrap(model)).items()})
            row.update(task.metrics)  # what the data are (e.g. the sampler's figures), with every evaluation
        return row

    # 4. The loop (after step 0's evaluation, when asked: the "before training" row of every curve).
    bar = None
    if progress and context.rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=until, initial=step, desc=f"{config.loss.name} β={config.loss.beta}")
    window: dict[str, list[float]] = {}
    last_finite: dict[str, float] = {}
    final: dict[str, float] = {}
    tokens, window_start, run_start = 0, time.perf_counter(), time.perf_counter()
    if cfg.eval_on_start and step == 0:
        row = {**diagnostics(True, True, config.loss), "step": 0, "wall_time_s": time.perf_counter() - run_start}
        last_finite = {**row}
        final.update(row)
        if report:
            report(row, None)
        window_start = time.perf_counter()
    batches = global_batches(step)
    fault = injected_faults(config, reference_dir or cache_dir)  # None unless a test sets SPO_RAY_FAULT
    while step < until:
        current = config_at(config, step)  # a `schedule` changes values between steps
        apply_optimizer_settings(optimizer, scheduler, current.train, levers.optim)
        poison = fault is not None and fault(step + 1)
        indices = next(batches)[context.rank * local_size:(context.rank + 1) * local_size]
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, list[float]] = {}
        for m in range(cfg.grad_accum_steps):
            items = [train_data[i] for i in indices[m * micro_size:(m + 1) * micro_size]]
            batch = {k: v.to(device) for k, v in collate_step(items, pad_id).items()}
            tokens += int(batch["attention_mask"].sum())
            last_micro = m == cfg.grad_accum_steps - 1
            sync = nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
            with sync, accumulating(optimizer, not last_micro):
                with autocast(), offload():
                    policy_out = concatenated_forward(model, batch, wpo=current.loss.use_weighting)
                loss, metrics = batch_loss(current.loss, policy_out, train_reference(batch), step, model, batch)
                if poison:
                    loss = metrics["loss"] = loss * float("nan")
                (loss / cfg.grad_accum_steps).backward()
            for k, v in metrics.items():
                step_metrics.setdefault(k, []).append(float(v))
        lr = optimizer.param_groups[0]["lr"]
        if levers.in_backward:  # every parameter already stepped, unclipped (config.step_in_backward_refusal)
            grad_norm = optimizer.grad_norm()
        else:  # with max_grad_norm 0 this only measures the norm (an infinite bound scales the gradients by 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, current.train.max_grad_norm or math.inf)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the gradients are spent: free them before any evaluation or probe
        scheduler.step()
        step += 1
        if synced:
            synced.step_done(unwrap(model), step)
        if bar:
            bar.update(1)

        step_mean = {k: sum(v) / len(v) for k, v in step_metrics.items()}
        # The gradient norm comes from the all-reduced gradients, so under DDP every rank sees it turn
        # non-finite at the same step and all ranks stop together (none is left waiting in a collective).
        if not (math.isfinite(step_mean["loss"]) and math.isfinite(float(grad_norm))):
            raise Diverged(step, last_finite)
        step_mean.update(grad_norm=float(grad_norm), learning_rate=lr)
        for k, v in step_mean.items():
            window.setdefault(k, []).append(v)

        is_last = step == until
        do_eval = step % cfg.eval_every == 0 or is_last
        do_probe = step % cfg.probe_every == 0 or is_last
        do_checkpoint = is_last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if step % cfg.log_every and not (do_eval or do_probe or do_checkpoint):
            continue

        elapsed = time.perf_counter() - window_start
        row = {f"train/{k}": sum(v) / len(v) for k, v in window.items()}
        row["train/tokens_per_s"] = tokens / max(elapsed, 1e-9)
        row = _mean_over_workers(row, context)
        window, tokens = {}, 0
        row.update(diagnostics(do_probe, do_eval, current.loss))
        row["step"] = step
        row["wall_time_s"] = time.perf_counter() - run_start
        last_finite = {**last_finite, **row}
        final.update(row)
        if report:
            report(row, checkpoint_state() if do_checkpoint else None)
        if bar:
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", refresh=False)
        window_start = time.perf_counter()  # evaluation time is not training throughput
    if bar:
        bar.close()
    if levers.in_backward:  # its hooks would step the next round's parameters too
        optimizer.remove_hooks()
    return final
