"""The sweep schema: the single source of truth for every key, its default and its range.

A sweep YAML is a run configuration in which any leaf may be a search space:

    loss:
      name: {grid: [dpo, spo]}        # grid: every value, crossed with the other grids
      beta: {loguniform: [0.01, 1]}   # random: sampled `tune.num_samples` times
    train:
      seed: {grid: [0, 1, 2]}         # seeds are just another grid axis

Search spaces: grid, choice, uniform, loguniform, randint. `validate_sweep` checks every key and every
value a search space can produce before anything starts, and reports the first problem in one line that
names the key (with "did you mean" for typos); `check_tune` then checks that the `tune` section's searcher
(`search: optuna`) or scheduler (`scheduler: pbt`) can run this sweep at all. User errors raise
`ConfigError`; the CLIs turn it into exit code 2 without a traceback.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spo_ray.losses import (BASE_LOSSES, COMBINE, F_DIVERGENCE_LOSSES, F_DIVERGENCES, LENGTH_LOSSES, LOSSES,
                            NOT_WEIGHTABLE, NOT_WRAPPABLE, REFERENCE_FREE_LOSSES, SPO_ESTIMATORS, f_divergence_unfit,
                            loss_options)


class ConfigError(ValueError):
    """Bad user input (config, search space, override, data or path). One line; exit code 2."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LossConfig(Section):
    """The loss (spo_ray.losses; the table in docs/losses.md). A loss option belongs to the losses that take it:
    `check_loss_options` refuses one that no loss of the sweep takes; a trial passes each loss only its own."""
    name: Literal[LOSSES] = "dpo"                # the loss (the table in docs/losses.md); spo wraps loss.base
    base: Literal[BASE_LOSSES + (COMBINE,)] = "dpo"  # the upper-level loss that spo wraps (or a combination)
    combine: dict[str, float] | None = None      # name (or base) combine: {loss: weight}, e.g. {dpo: 1.0, sft: 1.0}
    beta: float = Field(0.1, gt=0)               # β: the inverse temperature of the implicit reward β·log π/π_ref
    spo_lambda: float = Field(1.0, ge=0)         # λ: weight of the safe-region penalty (0 = the base loss)
    spo_epsilon: float = Field(0.0, ge=0)        # ε: tolerance before a chosen log-prob drop is penalised
    # reference: P(θ) from the reference's log-probs; one_step: from one inner step on the chosen NLL
    spo_estimator: Literal[SPO_ESTIMATORS] = "reference"
    spo_inner_lr: float = Field(0.1, gt=0)       # α: first inner step of one_step (halved until it lowers g)
    spo_lambda_warmup_steps: int = Field(0, ge=0)  # λ ramps linearly from 0 over these steps
    # ε of cdpo and robust (default 0.1), exo_pair (1e-3, must be > 0), aot and aot_unpaired (0)
    label_smoothing: float | None = Field(None, ge=0, lt=0.5)
    gamma: float = 0.5                           # simpo's target margin
    dpop_kappa: float = Field(5.0, ge=0)         # dpop's κ
    discopop_tau: float | None = Field(None, gt=0)  # discopop's temperature τ (default 0.05)
    # f-DPO's divergence from the reference: dpo, cdpo, ipo, hinge, exo_pair, robust, discopop, sigmoid_norm
    f_divergence_type: Literal[F_DIVERGENCES] = "reverse_kl"
    f_alpha_divergence_coef: float = Field(0.5, ge=0, le=1)  # alpha_divergence's α, as in the paper (TRL's 1 − α)
    nll_weight: float = Field(0.0, ge=0)         # RPO-style NLL on the chosen response
    average_logps: bool = False                  # length-averaged log-probs instead of sums (simpo: always)
    # LD-DPO's α: the tokens of the longer reply past the shorter one's length count α times (1: plain sums)
    ld_alpha: float | None = Field(None, ge=0, le=1)
    use_weighting: bool = False                  # WPO: weight each pair's loss by how on-policy its replies are

    @field_validator("base")
    @classmethod
    def spo_can_wrap(cls, value: str) -> str:
        if value in NOT_WRAPPABLE:
            raise ValueError(f"spo cannot wrap {value} ({NOT_WRAPPABLE[value]})")
        return value

    @field_validator("combine")
    @classmethod
    def weights_of_known_losses(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("needs at least one {loss: weight}, e.g. {dpo: 1.0, sft: 1.0}")
        for name, weight in value.items():
            if name not in BASE_LOSSES:
                close = difflib.get_close_matches(name, BASE_LOSSES, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; expected some of {', '.join(BASE_LOSSES)}"
                raise ValueError(f"unknown loss '{name}'{hint}")
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"the weight of {name} must be finite and >= 0, got {weight}")
        return value


#: LossConfig keys every loss takes, and SPO's settings (see `check_loss_options`).
_ALWAYS_ACCEPTED = ("name", "beta", "nll_weight", "average_logps", "ld_alpha", "use_weighting", "base", "spo_lambda",
                    "spo_epsilon", "spo_estimator", "spo_inner_lr", "spo_lambda_warmup_steps")


def check_loss(loss: LossConfig) -> None:
    """What one run's loss settings cannot be together (ConfigError naming the key)."""
    base = loss.base if loss.name == "spo" else loss.name
    if base == COMBINE and not loss.combine:
        key = "loss.name" if loss.name == COMBINE else "loss.base"
        raise ConfigError(f"loss.combine: {key} combine needs the weights of the losses it adds up, "
                          f"e.g. {{dpo: 1.0, sft: 1.0}}")
    members = list(loss.combine) if base == COMBINE else [base]
    if loss.name == "spo":
        for member in members:
            if member in NOT_WRAPPABLE:
                raise ConfigError(f"loss.combine: spo cannot wrap a combination with {member} "
                                  f"({NOT_WRAPPABLE[member]})")
    if loss.f_divergence_type != "reverse_kl" and base == COMBINE:
        unfit = f_divergence_unfit(members)
        if unfit:
            raise ConfigError(f"loss.f_divergence_type: {loss.f_divergence_type} needs losses built on the "
                              f"chosen-minus-rejected reward difference ({', '.join(F_DIVERGENCE_LOSSES)}); "
                              f"the combination has {', '.join(unfit)}")
    divides = [m for m in members if m in LENGTH_LOSSES]
    if divides and loss.average_logps:
        raise ConfigError(f"loss.average_logps: {divides[0]} divides by the response lengths itself; "
                          f"leave average_logps false")
    if divides and "simpo" in members:
        raise ConfigError(f"loss.combine: simpo (on length-averaged log-probs) cannot be combined with "
                          f"{divides[0]}, which divides summed log-probs by the lengths itself")
    if loss.ld_alpha is not None and (loss.average_logps or "simpo" in members):
        view = "loss.average_logps" if loss.average_logps else "simpo"
        raise ConfigError(f"loss.ld_alpha: LD-DPO down-weights the tail of summed log-probs; {view} averages them "
                          f"over the tokens instead (use one or the other)")
    if loss.use_weighting:
        refused = [m for m in members if m in NOT_WEIGHTABLE]
        if refused:
            raise ConfigError(f"loss.use_weighting: WPO weights each pair's loss; {NOT_WEIGHTABLE[refused[0]]}")
    if "exo_pair" in members and loss.label_smoothing == 0:
        raise ConfigError("loss.label_smoothing: exo_pair needs ε > 0 (it takes log ε; the EXO paper uses 1e-3)")


def check_loss_options(raw: dict) -> None:
    """Refuse a loss option set in the sweep that no loss the sweep runs takes (it would change nothing, silently).
    With `loss.name` swept, an option taken by any of the names is fine: each trial's loss reads only its own
    (spo_ray.trainer.batch_loss). SPO's own settings (`base`, `spo_*`) are exempt: sweep files pair a loss with
    its SPO arm and keep them when `--set loss.name=…` picks another loss (docs/results.md does, for SimPO)."""
    loss = raw.get("loss")
    if is_space(loss):
        for value in _space_values("loss", loss):
            check_loss_options({"loss": value})
        return
    if not isinstance(loss, dict):
        return

    def values(key: str, default: Any) -> list:
        value = loss.get(key, default)
        return list(_space_values(f"loss.{key}", value)) if is_space(value) else [value]

    names = values("name", "dpo")
    runs = [name for name in names if name != "spo"] + (values("base", "dpo") if "spo" in names else [])
    weights = [w for w in values("combine", None) if isinstance(w, dict)] if COMBINE in runs else []
    members = {m for m in runs if m != COMBINE} | {m for w in weights for m in w if m in BASE_LOSSES}
    takes = set(_ALWAYS_ACCEPTED) | ({"combine"} if COMBINE in runs else set())
    takes |= {key for member in members for key in loss_options(member)}
    if "alpha_divergence" not in values("f_divergence_type", "reverse_kl"):
        takes.discard("f_alpha_divergence_coef")
    running = ", ".join(dict.fromkeys(names))
    for key in loss:
        if key in takes:
            continue
        if key == "combine":
            raise ConfigError(f"loss.combine: weights of combined losses, but no loss of this sweep combines "
                              f"(loss.name: {running}); set loss.name: combine (or loss.base: combine under spo)")
        if key == "f_alpha_divergence_coef" and "f_divergence_type" in takes:
            raise ConfigError("loss.f_alpha_divergence_coef: only f_divergence_type: alpha_divergence reads it")
        owners = [name for name in BASE_LOSSES if key in loss_options(name)]
        raise ConfigError(f"loss.{key}: not an option of {', '.join(sorted(members)) or running} "
                          f"(it is one of {', '.join(owners)})")


class LoraConfig(Section):
    r: int = Field(8, gt=0)                      # LoRA's rank
    alpha: int = Field(16, gt=0)                 # LoRA's scale numerator: updates are scaled by alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)      # dropout on the adapters' input
    target_modules: list[str] | str = "all-linear"  # the adapted layers: module names, or all-linear


class ModelConfig(Section):
    # A built-in init of the arithmetic task (scratch, base, sft_short, sft_long), or a hub id / local path.
    init: str = "sft_short"
    reference: str | None = None                 # default: the init itself (the usual DPO set-up)
    init_steps: dict[str, int] = {}              # built-in inits: training steps, e.g. {base: 300}
    arch: Literal["llama", "gpt2"] = "llama"     # built-in models only
    hidden_size: int = Field(128, gt=0)          # built-in models only: width
    num_layers: int = Field(4, gt=0)             # built-in models only: depth
    num_heads: int = Field(4, gt=0)              # built-in models only: attention heads
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # weights' dtype; auto: the checkpoint's own
    # A second kind of init: `init` after a short SFT on the sampler's own correct answers to the training
    # prompts (rejection-sampling fine-tuning; needs data.sampled_pairs). The reference is that model too,
    # unless `reference` names another. Built once into the init cache, like the built-in inits.
    sft_steps: int = Field(0, ge=0)
    sft_learning_rate: float = Field(1e-5, gt=0)  # the sft_steps' AdamW learning rate
    sft_batch_size: int = Field(8, gt=0)         # the sft_steps' examples per step
    # transformers' attention kernel (sdpa, eager, ...); default: its choice
    attn_implementation: str | None = None
    # Activation checkpointing: auto → on only when spo_ray.memory finds that a training step would not fit
    # without it, on the fewest layers that fit (each costs its forward once more); true/false: all layers, none.
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    trust_remote_code: bool = False              # run a hub model's own Python code (off unless you trust it)
    lora: LoraConfig | None = None


class ArithmeticTaskConfig(Section):
    min_digits: int = Field(2, ge=1, le=4)       # operands have min_digits to max_digits digits
    max_digits: int = Field(2, ge=1, le=4)       # the operands' most digits
    operations: list[Literal["+", "-"]] = ["+"]  # + and/or -
    reverse_answer: bool = True                  # least-significant digit first: learnable in minutes
    working: bool = False                        # carry-by-carry working before the answer
    mistake_rate: float = Field(0.4, ge=0, le=1)  # share of the base corpus' answers that are mistakes
    pretrain_examples: int = Field(50_000, gt=0)  # the base init's pretraining problems
    sft_examples: int = Field(20_000, gt=0)      # the sft inits' supervised problems
    train_pairs: int = Field(2000, gt=0)         # preference pairs to train on
    eval_pairs: int = Field(256, gt=0)           # held-out pairs (eval/ log-prob metrics)
    eval_problems: int = Field(200, gt=0)        # held-out problems for greedy accuracy and the answer-mass split
    eval_fraction: float = Field(0.2, gt=0, lt=1)  # share of all problems held out for evaluation
    seed: int = 0                                # the task's data seed (not the trial seed)


class ChatArithmeticConfig(Section):
    """`data.source: chat_arithmetic`: arithmetic questions in words, for instruct models (user turns)."""
    operations: list[Literal["+", "-", "*"]] = ["+"]   # "-": the larger operand first (answers are >= 0)
    operands: tuple[int, int] = (0, 20)                 # every operand in [low, high], both included
    # the user turn; {a}, {op} and {b} are filled in
    question: str = "What is {a} {op} {b}? Answer with just the number."
    train_questions: int | None = Field(None, gt=0)     # training prompts (default: every training problem)

    @field_validator("operands")
    @classmethod
    def low_to_high(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError("needs [low, high] with 0 <= low <= high")
        return value

    @field_validator("question")
    @classmethod
    def names_the_operands(cls, value: str) -> str:
        try:
            value.format(a=1, op="+", b=2)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"must be a template with {{a}}, {{op}} and {{b}} only ({error})") from None
        if not all(f"{{{name}}}" in value for name in ("a", "op", "b")):
            raise ValueError("must contain {a}, {op} and {b}")
        return value


class SampledPairsConfig(Section):
    """`data.sampled_pairs`: pairs from the model's own samples, each verified by the source's answer checker
    (Iterative RPO's recipe: spo_ray.sampling). Off (None) by default: the source's own pairs."""
    sampler: str | None = None                   # the model that samples (any model.init value); default model.init
    prompts: int | None = Field(None, gt=0)      # training prompts to sample (default: every one the source has)
    eval_prompts: int = Field(32, gt=0)          # held-out prompts sampled for the evaluation pairs
    samples_per_prompt: int = Field(8, ge=2)     # N
    pairs_per_prompt: int = Field(4, gt=0)       # K, cycling through the prompt's winners and losers
    temperature: float = Field(0.8, ge=0)        # sampling temperature (0: greedy)
    top_p: float = Field(1.0, gt=0, le=1)        # nucleus sampling's mass
    max_new_tokens: int = Field(48, gt=0)        # a sample cut off here is never a winner
    seed: int = 0                                # the samples' seed (with the batch number)
    gold_fallback: bool = True                   # the gold answer wins where no sample is correct
    batch_tokens: int = Field(32768, gt=0)       # rows sampled at once: at most this many tokens at full length
    # who samples (spo_ray.engines): spo_ray's decoder, vllm (where installed: make vllm), or auto (vllm on a
    # GPU where installed, else spo_ray)
    engine: Literal["auto", "spo_ray", "vllm"] = "auto"
    # Self-training in rounds (Iterative RPO; spo_ray.rounds): round 1 trains on the table above; round r > 1
    # samples the trial's own policy as round r - 1 left it, verifies, pairs and trains again.
    rounds: int = Field(1, ge=1)
    steps_per_round: int | None = Field(None, gt=0)   # default train.max_steps: a run trains rounds × this
    fresh_prompts: bool = False                  # each round the next `prompts` training prompts, none repeated
    reference_update: Literal["fixed", "previous"] = "fixed"  # previous: the policy at the round's start
    optimizer_per_round: Literal["reset", "keep"] = "reset"   # reset: a fresh AdamW and warm-up each round


class DataConfig(Section):
    # arithmetic: the built-in task; chat_arithmetic: arithmetic as chat for instruct models; gsm8k: GSM8K
    # preference pairs; files/hub: TRL-style pair datasets.
    source: Literal["arithmetic", "chat_arithmetic", "gsm8k", "files", "hub"] = "arithmetic"
    arithmetic: ArithmeticTaskConfig = ArithmeticTaskConfig()
    chat_arithmetic: ChatArithmeticConfig = ChatArithmeticConfig()
    sampled_pairs: SampledPairsConfig | None = None
    path: str | None = None                      # files: a JSONL/Parquet/CSV file; hub: a dataset id
    eval_path: str | None = None                 # files: held-out pairs (default: eval_fraction of path's)
    name: str | None = None                      # hub dataset config name
    split: str = "train"                         # hub: the training split
    eval_split: str | None = None                # hub: the held-out split (default: eval_fraction of split's)
    revision: str | None = None                  # hub: a dataset commit, tag or branch
    columns: dict[str, str] = {}                 # e.g. {prompt: question, chosen: good, rejected: bad}
    # the share of pairs held out where no eval_path / eval_split is given
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_train_pairs: int | None = Field(None, gt=0)  # at most this many training pairs (a seeded sample)
    max_eval_pairs: int | None = Field(None, gt=0)  # at most this many held-out pairs
    max_length: int = Field(512, gt=8)           # prompt + response tokens; longer pairs are truncated, as TRL does
    tokenizer: str | None = None                 # default: the model's tokenizer
    # gsm8k: render prompts as a user message with the tokenizer's chat template (pairs and accuracy alike);
    # auto: when the tokenizer has one (instruct models), off for base models.
    chat_template: bool | Literal["auto"] = "auto"
    eval_questions: int = Field(64, ge=0)        # gsm8k, chat_arithmetic: held-out questions whose greedy answers are checked
    max_new_tokens: int = Field(256, gt=0)       # gsm8k, chat_arithmetic: the longest greedy answer
    # who decodes those answers (spo_ray.engines): spo_ray's decoder on the model itself, vllm (where installed:
    # make vllm) on a copy of its weights at each evaluation, or auto (vllm on a GPU where installed, else spo_ray)
    eval_engine: Literal["auto", "spo_ray", "vllm"] = "auto"
    # Capability retention, where accuracy is too low to show a regression: the per-token log-prob of
    # held-out reference answers that are in no pair, logged as eval/retention_logp. gsm8k: train.jsonl's
    # solutions; files/hub: retention_path, a local JSONL/Parquet/CSV with prompt and response columns.
    retention_path: str | None = None
    retention_answers: int = Field(64, ge=0)     # how many of them (a seeded sample; 0: off)


class TrainConfig(Section):
    seed: int = 0                                # the run's seed: data order, sampling of batches, dropout
    learning_rate: float = Field(1e-4, gt=0)     # AdamW's peak learning rate
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after the warm-up
    warmup_steps: int = Field(10, ge=0)          # linear warm-up from 0
    weight_decay: float = Field(0.0, ge=0)       # AdamW's decoupled weight decay
    # AdamW as one fused kernel over each parameter (torch's fused=True; TRL's and the HF Trainer's default), or
    # torch's per-tensor loop (the same update, to float32 rounding), or bitsandbytes' 8-bit states (pip install
    # 'spo-ray[lowmem]'); auto: fused, or 8-bit where a training step fits only so (spo_ray.memory.choose_levers)
    optim: Literal["auto", "adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit"] = "auto"
    # Step each parameter as soon as its gradient is ready, then free it (torchtune's optimizer_in_bwd): the
    # gradients never all exist. Needs max_grad_norm null and one worker; auto: on where a step fits only so.
    optimizer_in_backward: bool | Literal["auto"] = "auto"
    activation_offloading: bool = False          # GPU: keep the saved activations in pinned host memory
    # GiB a trial may use, below what is free (trials sharing a GPU); the memory check and auto's levers use it
    memory_budget: float | None = Field(None, gt=0)
    max_steps: int = Field(200, gt=0)            # optimizer steps
    batch_size: int = Field(32, gt=0)            # global pairs per optimizer step, over all workers
    # micro-batches per step (each worker's share of batch_size split this many ways)
    grad_accum_steps: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # global-norm gradient clipping (null: none)
    eval_every: int = Field(50, gt=0)            # steps between held-out evaluations (and at the last step)
    eval_on_start: bool = False                  # also evaluate and probe the initial weights, as step 0 (TRL's name)
    eval_batch_size: int = Field(128, gt=0)      # evaluation batches: at most this many pairs …
    eval_batch_tokens: int = Field(16384, gt=0)  # … and this many tokens (chosen + rejected rows, padding included)
    probe_every: int = Field(50, gt=0)           # gradient-term diagnostics (∇ℓ(y_w), ∇ℓ(y_l))
    probe_pairs: int = Field(8, gt=0)            # pairs the gradient probe measures
    log_every: int = Field(10, gt=0)             # steps between train/ rows (averaged over them)
    checkpoint_every: int = Field(0, ge=0)       # 0: only at the end
    length_grouping: bool = True                 # batch similar lengths together to cut padding
    # auto: run each pair as one row, its prompt once (spo_ray.data.collate_shared_prompts), on the models whose
    # attention takes the mask it needs (spo_ray.logprobs.prefix_sharing_unsupported); true: also other model types
    prefix_sharing: bool | Literal["auto"] = "auto"
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # auto: bf16 autocast on GPUs that have it
    num_threads: int | None = Field(None, gt=0)  # torch threads; default: the CPUs the trial was given


class ReferenceConfig(Section):
    cache: bool = True                           # compute reference log-probs once per sweep and share them
    batch_size: int = Field(128, gt=0)           # reference-pass batches: at most this many pairs …
    batch_tokens: int = Field(16384, gt=0)       # … and this many tokens (chosen + rejected rows, padding included)
    # TR-DPO: every sync_steps steps the reference moves toward the policy, π_ref ← α·π_θ + (1 − α)·π_ref (the
    # trial then runs the reference on every batch; SPO's safe region stays the initial reference's)
    sync: bool = False
    sync_steps: int = Field(512, gt=0)           # TR-DPO's τ: steps between syncs (TRL's ref_model_sync_steps)
    mixup_alpha: float = Field(0.6, gt=0, le=1)  # TR-DPO's α: 1 copies the policy (TRL's ref_model_mixup_alpha)


class ScalingConfig(Section):
    num_workers: int = Field(1, gt=0)            # >1: a Ray Train job of this many workers per trial (DDP or FSDP)
    use_gpu: bool = False                        # one GPU per worker
    cpus_per_worker: float = Field(1, gt=0)      # CPUs per worker (torch threads, too)
    gpus_per_worker: float = Field(1, ge=0)      # fractions let several small trials share a GPU
    resources_per_worker: dict[str, float] = {}  # extra custom resources
    force_ray_train: bool = False                # run 1-worker trials through TorchTrainer too
    strategy: Literal["ddp", "fsdp"] = "ddp"     # fsdp: shard weights, gradients and optimizer state over workers

    @property
    def ray_train(self) -> bool:
        """Trials run as Ray Train jobs (a TorchTrainer per trial), not in their Tune actor."""
        return self.num_workers > 1 or self.force_ray_train


class TuneConfig(Section):
    # basic: Tune's variant generator (grids crossed, random spaces drawn anew per trial); optuna: a model-based
    # searcher over the random spaces, each suggestion run for every train.seed of a seed grid (check_tune).
    search: Literal["basic", "optuna"] = "basic"
    # fifo: every trial runs to the end; asha: stop the worst early; pbt: population based training
    scheduler: Literal["fifo", "asha", "pbt"] = "fifo"
    metric: str = "eval/accuracy"                # what the scheduler, the searcher and the report rank by
    mode: Literal["max", "min"] = "max"          # max or min of tune.metric
    num_samples: int = Field(1, gt=0)            # grid repeats, random spaces drawn anew (optuna: suggestions)
    max_concurrent_trials: int | None = Field(None, gt=0)  # default: as many as the cluster's free resources fit
    grace_period: int = Field(1, gt=0)           # asha: evaluations before a trial may be stopped
    reduction_factor: float = Field(2, gt=1)     # asha: the share of trials kept at each rung is 1 / this
    max_failures: int = Field(1, ge=0)           # retries of a trial whose worker died
    keep_checkpoints: int = Field(1, gt=0)       # checkpoints kept per trial (the latest)
    reuse_actors: bool = True                    # run the next trial in a finished trial's process (no re-import)
    seed: int = 0                                # the searcher's sampler and PBT's mutations
    # optuna
    sampler: Literal["tpe", "random"] = "tpe"    # random: seeded random draws, scored over seeds like TPE's
    startup_trials: int = Field(10, ge=0)        # tpe: random suggestions before the model takes over
    points_to_evaluate: list[dict[str, Any]] = []  # run first: {dotted key: value} naming every searched key
    # pbt (synchronous: every trial stops at each perturbation step, the bottom quantile copies the top's)
    perturbation_interval: int | None = Field(None, gt=0)  # steps between exploit/explore rounds
    mutations: dict[str, dict] = {}              # dotted key -> {uniform|loguniform: [low, high]} or {choice: [...]}
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # share of trials that copy / are copied
    resample_probability: float = Field(0.25, ge=0, le=1)  # explore by a fresh draw, else × 0.8 or × 1.2


class WandbConfig(Section):
    # auto: online with a key in the environment, else offline; online, offline, disabled
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "spo-ray"                     # the W&B project the trials log to
    entity: str | None = None                    # a W&B team or user (default: the key's)
    tags: list[str] = []                         # added to every trial's run


#: Keys whose value may change between two steps of a run (a PBT mutation, a `schedule` entry): numbers that
#: the loss reads every step, or the optimizer takes from its next step on (spo_ray.trainer.apply_optimizer_settings).
CHANGEABLE_KEYS = ("loss.beta", "loss.spo_lambda", "loss.spo_epsilon", "loss.spo_inner_lr",
                   "loss.label_smoothing", "loss.gamma", "loss.dpop_kappa", "loss.discopop_tau",
                   "loss.f_alpha_divergence_coef", "loss.nll_weight", "loss.ld_alpha",
                   "train.learning_rate", "train.weight_decay", "train.max_grad_norm")


class RunConfig(Section):
    """Everything one training run needs."""
    loss: LossConfig = LossConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    reference: ReferenceConfig = ReferenceConfig()
    wandb: WandbConfig = WandbConfig()
    # Piecewise-constant values over training: {dotted key: [[from_step, value], ...]}, e.g. a λ schedule PBT
    # found. An entry [k, v] sets the key to v for every step after the k-th (the key's own value before).
    schedule: dict[str, list[tuple[int, float]]] = {}

    @field_validator("schedule")
    @classmethod
    def schedule_of_changeable_keys(cls, schedule: dict) -> dict:
        for key, entries in schedule.items():
            why = not_changeable(key)
            if why:
                where = key if why.startswith("cannot") else f"{key}:"  # a known key, or a typo's hint
                raise ValueError(f"{where} {why}; a schedule takes {', '.join(CHANGEABLE_KEYS)}")
            steps = [step for step, _ in entries]
            if not entries or steps != sorted(set(steps)) or steps[0] < 0:
                raise ValueError(f"{key} needs [step, value] entries with distinct steps ≥ 0 in increasing order")
            for _, value in entries:
                check_changed_value(key, value, RunConfig())
        return schedule


def not_changeable(key: str, mutated: bool = False) -> str | None:
    """Why `key` cannot be a schedule's (or, `mutated`, PBT's) key, with the nearest changeable one for a
    typo; None where it can."""
    if key in CHANGEABLE_KEYS:
        return None
    if key in _known_keys(SweepConfig):
        return "cannot be mutated" if mutated else "cannot change during a run"
    close = difflib.get_close_matches(key, CHANGEABLE_KEYS, n=1, cutoff=0.6)
    return "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")


def check_changed_value(key: str, value: Any, config: "RunConfig") -> None:
    """Raise a one-line ValueError when `value` is out of range for `key` (one of CHANGEABLE_KEYS)."""
    section, name = key.split(".")
    try:
        setattr(getattr(config, section).model_copy(), name, value)  # validate_assignment checks the range
    except ValidationError as error:
        raise ValueError(f"{key}: {error.errors()[0]['msg'][0].lower()}{error.errors()[0]['msg'][1:]}, "
                         f"got {value!r}") from None


def config_at(config: RunConfig, step: int) -> RunConfig:
    """The config in force for the step after `step` completed steps: each `schedule` key at its last entry
    at or before `step` (the config itself without a schedule)."""
    if not config.schedule:
        return config
    updates: dict[str, dict] = {}
    for key, entries in config.schedule.items():
        due = [value for from_step, value in entries if from_step <= step]
        if due:
            section, name = key.split(".")
            updates.setdefault(section, {})[name] = due[-1]
    return config.model_copy(update={section: getattr(config, section).model_copy(update=values)
                                     for section, values in updates.items()})


#: Query keys of a storage URI that carry credentials (pyarrow's S3 and GCS options).
URI_SECRETS = ("access_key", "secret_key", "session_token", "access_token")


class SweepConfig(RunConfig):
    """A run configuration plus how to sweep, scale and store it."""
    name: str = "sweep"                          # the experiment folder's name, <storage_path>/<name>
    storage_path: str = "results"                # a folder, or a URI: s3://bucket/path, gs://… (spo_ray.storage)
    cache_dir: str | None = None                 # built-in inits; default <storage_path>/.cache
    scaling: ScalingConfig = ScalingConfig()
    tune: TuneConfig = TuneConfig()

    @field_validator("storage_path", "cache_dir")
    @classmethod
    def no_credentials_in_uris(cls, value: str | None) -> str | None:
        # The URI is printed, logged and written to sweep.yaml: credentials come from the environment.
        query = (value or "").partition("?")[2]
        if any(part.split("=", 1)[0] in URI_SECRETS for part in query.split("&")):
            raise ValueError("credentials do not belong in the URI (it is printed and saved in sweep.yaml); "
                             "set them in the environment, e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        return value

    def run_config(self) -> RunConfig:
        return RunConfig(**{k: getattr(self, k) for k in RunConfig.model_fields})


# ---------------------------------------------------------------------------------------------------
# Search spaces

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
#: Column names of swept keys in results.csv; other keys use their last component.
COLUMN_NAMES = {"loss.name": "loss", "loss.base": "base_loss", "model.init": "init", "train.seed": "seed"}
#: Parameters every results table carries, swept or not.
ALWAYS_REPORTED = ("loss.name", "loss.beta", "loss.spo_lambda", "model.init", "train.seed")


def is_space(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SPACE_KINDS


def column_name(key: str) -> str:
    return COLUMN_NAMES.get(key, key.rsplit(".", 1)[-1])


#: Mappings whose values are search spaces for something other than Tune's sampling (PBT's mutations).
NOT_SWEPT = ("tune.mutations",)


def find_spaces(raw: dict, prefix: str = "") -> dict[str, dict]:
    """Dotted key → search space, for every search space in a raw config dict."""
    spaces = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if dotted in NOT_SWEPT:
            continue
        if is_space(value):
            spaces[dotted] = value
        elif isinstance(value, dict):
            spaces.update(find_spaces(value, dotted + "."))
    return spaces


def get_dotted(raw: dict, key: str) -> Any:
    for part in key.split("."):
        raw = raw[part]
    return raw


def set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    raw[leaf] = value


def _space_values(key: str, space: dict) -> list:
    """The values a space can take that validation must check (all of a grid/choice, bounds otherwise)."""
    kind, spec = next(iter(space.items()))
    if not isinstance(spec, list) or not spec:
        raise ConfigError(f"{key}: {kind} needs a non-empty list, got {spec!r}")
    if kind in ("grid", "choice"):
        return spec
    if len(spec) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
        raise ConfigError(f"{key}: {kind} needs [low, high] numbers, got {spec!r}")
    low, high = spec
    if not low < high:
        raise ConfigError(f"{key}: {kind} needs low < high, got {spec!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{key}: loguniform needs low > 0, got {spec!r}")
    if kind == "randint":
        if not all(isinstance(v, int) for v in spec):
            raise ConfigError(f"{key}: randint needs integer bounds, got {spec!r}")
        return [low, high - 1]  # Tune's randint excludes the upper bound
    return [low, high]


# ---------------------------------------------------------------------------------------------------
# Validation with one-line messages

def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = _section_type(field.annotation)
        if sub is not None:
            keys += _known_keys(sub, prefix + name + ".")
    return keys


def _section_type(annotation) -> type[BaseModel] | None:
    candidates = getattr(annotation, "__args__", None) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def _check_unknown_keys(raw: dict, model: type[BaseModel], prefix: str = "") -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping of keys to values, got {raw!r}")
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in model.model_fields:
            known = [k for k in _known_keys(model, prefix)]
            close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
            if not close:  # a typo'd section name: match on the leaf alone
                close = difflib.get_close_matches(str(key), [k.rsplit(".", 1)[-1] for k in known], n=1)
                close = [prefix + close[0]] if close else []
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}")
        sub = _section_type(model.model_fields[key].annotation)
        if sub is not None and value is not None and not is_space(value):
            _check_unknown_keys(value, sub, dotted + ".")


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    message = first["msg"].removeprefix("Value error, ")  # our validators' own sentences
    value = first.get("input")
    secret = isinstance(value, str) and any(f"{name}=" in value for name in URI_SECRETS)
    shown = "" if isinstance(value, dict) or secret else f", got {value!r}"  # never echo a credential
    return f"{key}: {message[0].lower()}{message[1:]}{shown}"


def validate_run(raw: dict, model: type[SweepConfig] | type[RunConfig] = SweepConfig) -> SweepConfig | RunConfig:
    """Validate a config without search spaces."""
    _check_unknown_keys(raw, model)
    try:
        config = model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_one_line(error)) from None
    if config.model.sft_steps and config.data.sampled_pairs is None:
        raise ConfigError("model.sft_steps: SFT on the sampler's own correct answers needs data.sampled_pairs")
    check_loss(config.loss)
    check_rounds(config)
    check_eval_engine(config)
    check_reference_sync(config)
    if isinstance(config, SweepConfig):
        check_batch_size(config.train, world_size=config.scaling.num_workers)
        check_memory_levers(config)
        if config.scaling.strategy == "fsdp" and config.loss.name == "spo" and config.loss.spo_estimator == "one_step":
            raise ConfigError("loss.spo_estimator: one_step cannot run with scaling.strategy: fsdp (its inner step "
                              "evaluates a functional copy of the full weights); use reference or ddp")
    return config


#: The column of every row a run in self-training rounds reports: the round its step belongs to (spo_ray.rounds).
ROUND_KEY = "round"


def total_steps(config: RunConfig) -> int:
    """The optimizer steps a run takes: `train.max_steps`, or rounds × steps_per_round in self-training rounds."""
    spec = config.data.sampled_pairs
    if spec is None or spec.rounds == 1:
        return config.train.max_steps
    return spec.rounds * (spec.steps_per_round or config.train.max_steps)


def check_eval_engine(config: RunConfig) -> None:
    """Where `data.eval_engine: vllm` has nothing to decode or cannot see the whole model."""
    if config.data.eval_engine != "vllm":
        return
    if config.data.source not in ("gsm8k", "chat_arithmetic"):
        raise ConfigError(f"data.eval_engine: vllm decodes the greedy answers of gsm8k and chat_arithmetic; "
                          f"data.source {config.data.source} has none to decode (the built-in arithmetic task's "
                          f"own small model decodes with spo_ray)")
    if isinstance(config, SweepConfig) and config.scaling.strategy == "fsdp":
        raise ConfigError("data.eval_engine: vllm cannot run with scaling.strategy: fsdp yet (the engine loads the "
                          "whole model, which no FSDP worker holds); use spo_ray or ddp")


def step_in_backward_refusal(max_grad_norm: float | None, world_size: int) -> str | None:
    """Why the optimizer cannot step in the backward for this run (one sentence naming the key), or None.

    Clipping by the global norm scales every gradient by min(1, c / ‖g‖), where ‖g‖ is the norm of all the
    gradients together; in the backward a parameter steps as soon as its own gradient is ready, before the
    others' exist, so ‖g‖ is known only after every step has been taken. Clipping each tensor by its own norm
    would be a different method, so there is no clipping here; the global norm of the unclipped gradients is
    still measured (`OptimizerInBackward.grad_norm`).
    With several workers, DDP averages the gradients over them after they are accumulated, and FSDP
    reduce-scatters them after the backward: a step in the backward would take each worker's own gradient.
    """
    if max_grad_norm:
        return (f"train.max_grad_norm: {max_grad_norm} clips by the norm of all gradients together, which "
                "never exist at once when the optimizer steps in the backward (each parameter steps as soon as "
                "its own gradient is ready); set it to null (the gradient norm is still logged)")
    if world_size > 1:
        return (f"scaling: the optimizer steps in the backward on one worker only, not {world_size}: the workers "
                "average their gradients after the backward, and each would step on its own")
    return None


def check_memory_levers(config: "SweepConfig") -> None:
    """Memory levers (train.optim, train.optimizer_in_backward, train.activation_offloading) this sweep cannot
    take (ConfigError naming the key)."""
    train, scaling = config.train, config.scaling
    if train.optimizer_in_backward is True:
        refusal = step_in_backward_refusal(train.max_grad_norm, scaling.num_workers)
        if refusal:
            raise ConfigError(refusal)
        if train.grad_accum_steps > 1:
            raise ConfigError("train.optimizer_in_backward: with grad_accum_steps > 1 every gradient is kept "
                              "between micro-batches, so stepping in the backward saves nothing; set it to 1")
    if train.optim == "adamw_bnb_8bit" and scaling.strategy == "fsdp":
        raise ConfigError("train.optim: adamw_bnb_8bit is not tested with scaling.strategy: fsdp (sharded "
                          "parameters); use ddp or an adamw_torch optim")
    if train.activation_offloading and not scaling.use_gpu:
        raise ConfigError("train.activation_offloading: moves saved activations from a GPU to host memory; "
                          "without scaling.use_gpu they already are in host memory")


def check_reference_sync(config: RunConfig) -> None:
    """Where TR-DPO's reference sync (`reference.sync`) has no reference to move, or cannot move it."""
    if not config.reference.sync:
        return
    loss = config.loss
    base = loss.base if loss.name == "spo" else loss.name
    members = list(loss.combine or {}) if base == COMBINE else [base]
    if all(m in REFERENCE_FREE_LOSSES for m in members):
        over = f" (SPO's penalty keeps the initial reference)" if loss.name == "spo" else ""
        raise ConfigError(f"reference.sync: loss {base} uses no reference model{over}, so there is none to sync")
    if isinstance(config, SweepConfig) and config.scaling.strategy == "fsdp":
        raise ConfigError("reference.sync: cannot run with scaling.strategy: fsdp yet (the reference would be "
                          "sharded and saved with every checkpoint); use ddp")


def check_rounds(config: RunConfig) -> None:
    """What self-training rounds (`data.sampled_pairs.rounds > 1`, spo_ray.rounds) cannot be combined with."""
    spec = config.data.sampled_pairs
    if spec is None or spec.rounds == 1:
        if spec is not None and "steps_per_round" in spec.model_fields_set and spec.steps_per_round is not None:
            raise ConfigError("data.sampled_pairs.steps_per_round: needs data.sampled_pairs.rounds > 1")
        return
    key = "data.sampled_pairs.rounds"
    if spec.optimizer_per_round == "keep" and config.model.lora is not None:
        raise ConfigError("data.sampled_pairs.optimizer_per_round: keep cannot carry LoRA's optimizer state over "
                          "rounds (each round merges the adapters into the weights and starts new ones); use reset")
    if isinstance(config, SweepConfig):
        if config.scaling.strategy == "fsdp":
            raise ConfigError(f"{key}: rounds cannot run with scaling.strategy: fsdp yet (a round samples from "
                              f"the whole policy on one worker); use ddp")
        if config.tune.scheduler == "pbt":
            raise ConfigError(f"{key}: rounds cannot run under tune.scheduler: pbt (an exploit would hand a trial "
                              f"another trial's round and samples); use fifo or asha")


def check_batch_size(train: TrainConfig, train_pairs: int | None = None, world_size: int = 1) -> None:
    """The global batch must split evenly over workers × micro-batches and fit in the training pairs
    (checked on the config, again by the sweep driver once it has the pairs, and by the trainer)."""
    if train.batch_size % (world_size * train.grad_accum_steps):
        raise ConfigError(f"train.batch_size: {train.batch_size} is not divisible by num_workers × "
                          f"grad_accum_steps = {world_size * train.grad_accum_steps}")
    if train_pairs is not None and train_pairs < train.batch_size:
        raise ConfigError(f"train.batch_size: {train.batch_size} is larger than the {train_pairs} training pairs")


def validate_sweep(raw: dict) -> tuple[SweepConfig, dict[str, dict]]:
    """Check every key and every value each search space can take. Returns (first point, spaces)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: the sweep must be a mapping of keys to values, got {type(raw).__name__}")
    _check_unknown_keys(raw, SweepConfig)
    spaces = find_spaces(raw)
    if spaces and any(k.split(".")[0] in ("tune", "scaling", "name", "storage_path", "cache_dir") for k in spaces):
        key = next(k for k in spaces if k.split(".")[0] in ("tune", "scaling", "name", "storage_path", "cache_dir"))
        raise ConfigError(f"{key}: cannot be swept (only run settings can: loss, model, data, train, reference)")
    values = {key: _space_values(key, space) for key, space in spaces.items()}  # every space's shape first
    for key, space_values in values.items():
        for value in space_values:
            check_value(raw, key, value)
    sweep = validate_run(first_point(raw))
    check_loss_options(raw)
    check_tune(raw, sweep, spaces)
    return sweep, spaces


def check_value(raw: dict, key: str, value: Any) -> None:
    """Validate the sweep with `key` set to `value` (every other space at its first value)."""
    point = copy.deepcopy(raw)
    set_dotted(point, key, value)
    validate_run(first_point(point))


# ---------------------------------------------------------------------------------------------------
# The tune section: can its searcher or scheduler run this sweep?

SEED_KEY = "train.seed"
MUTATION_KINDS = ("uniform", "loguniform", "choice")


def searched_keys(spaces: dict[str, dict]) -> list[str]:
    """The keys a searcher chooses values for: every search space but the seed grid."""
    return [key for key, space in spaces.items() if key != SEED_KEY]


def seed_values(raw: dict, sweep: SweepConfig) -> list[int]:
    """The seeds each suggestion runs for: the train.seed grid, or the one seed."""
    space = find_spaces(raw).get(SEED_KEY)
    return list(space["grid"]) if space else [sweep.train.seed]


def check_tune(raw: dict, sweep: SweepConfig, spaces: dict[str, dict]) -> None:
    """`tune.metric` must be one the trials report; `tune.search: optuna` and `tune.scheduler: pbt` ask things
    of the rest of the sweep; say which one is missing, in one line naming the key, before Ray starts (Tune would
    fail later, with a trace)."""
    tune = sweep.tune
    check_metric(raw, sweep)
    if tune.search == "optuna":
        _check_searcher(raw, spaces, tune)
    elif tune.points_to_evaluate:
        raise ConfigError("tune.points_to_evaluate: only tune.search: optuna evaluates points")
    if tune.scheduler == "pbt":
        _check_pbt(raw, sweep)
    elif tune.mutations or tune.perturbation_interval:
        key = "tune.mutations" if tune.mutations else "tune.perturbation_interval"
        raise ConfigError(f"{key}: only tune.scheduler: pbt perturbs trials (the scheduler is {tune.scheduler})")


def _check_searcher(raw: dict, spaces: dict[str, dict], tune: TuneConfig) -> None:
    for key, space in spaces.items():
        kind = next(iter(space))
        if key == SEED_KEY and kind != "grid":
            raise ConfigError(f"{key}: a searcher must not search the seed (a lucky seed would pass for a good "
                              f"configuration); make it a grid: each suggestion runs for every seed")
        if key != SEED_KEY and kind == "grid":
            raise ConfigError(f"{key}: tune.search: optuna cannot take a grid axis (only train.seed may be a grid: "
                              f"each suggestion runs for every seed); use choice, uniform, loguniform or randint")
    searched = searched_keys(spaces)
    if not searched:
        raise ConfigError("tune.search: optuna needs a search space to search (choice, uniform, loguniform or "
                          "randint on a loss, model, data, train or reference key)")
    if tune.scheduler == "pbt":
        raise ConfigError("tune.scheduler: pbt cannot run with tune.search: optuna (PBT mutates its own "
                          "population); use tune.search: basic")
    for i, point in enumerate(tune.points_to_evaluate):
        where = f"tune.points_to_evaluate[{i}]"
        if set(point) != set(searched):
            missing, extra = sorted(set(searched) - set(point)), sorted(set(point) - set(searched))
            raise ConfigError(f"{where}: " + (f"{extra[0]} is not a searched key ({did_you_mean(extra[0], searched)})"
                                              if extra else f"gives no value "
                                              f"for {missing[0]} (a point names every searched key)"))
        for key, value in point.items():
            kind, spec = next(iter(spaces[key].items()))
            inside = value in spec if kind == "choice" else (
                is_finite_number(value) and spec[0] <= value <= spec[1]
                and (kind != "randint" or (isinstance(value, int) and value < spec[1])))
            if not inside:
                raise ConfigError(f"{where}.{key}: {value!r} is outside its search space {spaces[key]}")
            check_value(raw, key, value)


def _check_pbt(raw: dict, sweep: SweepConfig) -> None:
    tune, train = sweep.tune, sweep.train
    if sweep.scaling.ray_train:
        raise ConfigError(f"tune.scheduler: pbt cannot run Ray Train trials (scaling.num_workers: "
                          f"{sweep.scaling.num_workers}): Train V2's Tune callback hands Tune no checkpoint to copy "
                          f"into another trial; use scaling.num_workers: 1 (and force_ray_train: false)")
    if not tune.mutations:
        raise ConfigError("tune.mutations: tune.scheduler: pbt needs at least one key to mutate, e.g. "
                          "{loss.spo_lambda: {loguniform: [0.1, 10]}}")
    for key, space in tune.mutations.items():
        where = f"tune.mutations.{key}"
        why = not_changeable(key, mutated=True)
        if why:
            raise ConfigError(f"{where}: {why}; PBT mutates numeric keys a run can change between steps: "
                              f"{', '.join(CHANGEABLE_KEYS)}")
        if not is_space(space) or next(iter(space)) not in MUTATION_KINDS:
            raise ConfigError(f"{where}: a mutation is {{uniform: [low, high]}}, {{loguniform: [low, high]}} or "
                              f"{{choice: [values in order]}}, got {space!r}")
        for value in _space_values(where, space):
            if not is_finite_number(value):
                raise ConfigError(f"{where}: PBT mutates numbers, got {value!r}")
            try:
                check_value(raw, key, value)
            except ConfigError as error:
                raise ConfigError(f"{where}: {value!r} is out of range ({error})") from None
        if key in sweep.schedule:
            raise ConfigError(f"{where}: the key also has a schedule; PBT's mutations would override it")
    interval = tune.perturbation_interval
    if interval is None:
        raise ConfigError("tune.perturbation_interval: tune.scheduler: pbt needs the steps between perturbations")
    if interval >= train.max_steps:
        raise ConfigError(f"tune.perturbation_interval: {interval} steps is not below train.max_steps "
                          f"({train.max_steps}): PBT would never perturb")
    if not train.checkpoint_every or interval % train.checkpoint_every:
        raise ConfigError(f"train.checkpoint_every: PBT copies a trial's checkpoint into another at every "
                          f"perturbation, so it needs one there: set it to a divisor of tune.perturbation_interval "
                          f"({interval}), got {train.checkpoint_every}")
    every = {"eval/": ("train.eval_every", train.eval_every), "probe/": ("train.probe_every", train.probe_every)}
    for prefix, (key, value) in every.items():
        if tune.metric.startswith(prefix) and interval % value:
            raise ConfigError(f"tune.perturbation_interval: {interval} is not a multiple of {key} ({value}): PBT "
                              f"compares trials by {tune.metric}, which is measured only every {value} steps")
    if tune.max_concurrent_trials is not None:
        raise ConfigError("tune.max_concurrent_trials: PBT needs its whole population alive (Tune would make a "
                          "trial only when another ends); leave it unset: the CPUs each trial reserves "
                          "(scaling.cpus_per_worker) limit how many train at once")


# ---------------------------------------------------------------------------------------------------
# Names: a value that names something else (a metric, a key, an init) names one that exists

def did_you_mean(value: str, valid, shown=None) -> str:
    """The hint of a one-line error about a name: the nearest valid names, else `shown` (default: every valid
    one), at most 12 of them."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(value, valid, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"'{name}'" for name in close) + "?"
    shown = list(dict.fromkeys(valid if shown is None else shown))
    return "expected one of " + ", ".join(shown[:12]) + (", …" if len(shown) > 12 else "")


#: What a trial reports (spo_ray.trainer's rows), by prefix. The loss's metrics go to train/ (each logged
#: window's mean) and eval/ (over the evaluation pairs): spo_ray.losses.preference_loss's, `<member>_loss` of a
#: combination, the trainer's one_step terms (train/ only, as spo_lambda; tests/test_names.py runs every loss).
LOSS_METRICS = ("loss", "chosen_logps", "rejected_logps", "chosen_logp_delta", "rejected_logp_delta",
                "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy", "nll", "spo_penalty",
                "safe_region_violation", "wpo_weight", *(f"{name}_loss" for name in BASE_LOSSES))
TRAIN_METRICS = LOSS_METRICS + ("spo_lambda", "spo_inner_step", "grad_norm", "learning_rate", "tokens_per_s")
PROBE_METRICS = ("chosen_grad_norm", "rejected_grad_norm", "grad_cosine")  # spo_ray.trainer.gradient_terms
#: Each data.source's evaluator (`evaluate` in spo_ray/tasks/*.py; their tests pin the keys), under eval/.
#: retention_logp: where held-out answers exist (data.retention_path, or GSM8K's solutions).
EVALUATOR_METRICS = {"arithmetic": ("accuracy", "mass_correct", "mass_mistake", "mass_other", "mass_malformed"),
                     "chat_arithmetic": ("accuracy", "ended_share", "retention_logp"),
                     "gsm8k": ("accuracy", "accuracy_flexible", "retention_logp"),
                     "files": ("retention_logp",), "hub": ("retention_logp",)}
#: With data.sampled_pairs: spo_ray.sampling.sampler_figures, and the evaluation pairs sampled.
SAMPLER_METRICS = ("prompts", "samples", "sample_accuracy", "ended_share", "prompts_with_pair",
                   "prompts_right_and_wrong", "prompts_all_correct", "prompts_none_correct", "gold_used", "pairs",
                   "tokens_per_s", "seconds", "eval_pairs")


def evaluator_metrics(sources) -> list[str]:
    """What the evaluators of every one of these data sources report, and the loss's main ones: the names
    worth showing first."""
    common = [name for name in EVALUATOR_METRICS[sources[0]] if all(name in EVALUATOR_METRICS[s] for s in sources)]
    return [*(f"eval/{m}" for m in common), "eval/reward_accuracy", "eval/reward_margin", "eval/loss"]


def reported_metrics(sources, sampled: bool) -> list[str]:
    """The metrics the trials of every one of these data sources may report (with data.sampled_pairs:
    `sampled`); which loss metrics a trial reports depends on its loss (checked at its first report)."""
    return list(dict.fromkeys([*evaluator_metrics(sources), *(f"train/{m}" for m in TRAIN_METRICS),
                               *(f"eval/{m}" for m in LOSS_METRICS), *(f"probe/{m}" for m in PROBE_METRICS),
                               *(f"sampler/{m}" for m in SAMPLER_METRICS if sampled)]))


def metric_is_used(tune: TuneConfig) -> bool:
    """Whether `tune.metric` steers anything: typed in the YAML, or read by a scheduler or searcher. (The default
    eval/accuracy under FIFO only labels Tune's best result; pair files, which have no accuracy, keep it.)"""
    return "metric" in tune.model_fields_set or tune.scheduler != "fifo" or tune.search != "basic"


def check_metric(raw: dict, sweep: SweepConfig) -> None:
    """`tune.metric` must be a metric the sweep's trials report. A name this module does not know, and that is
    close to none it knows, is left to the trials' first report (`missing_metric`): a new evaluator's metric
    must not be refused here before this list learns it."""
    metric = sweep.tune.metric
    if not metric_is_used(sweep.tune):
        return
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    source = data.get("source", "arithmetic")
    sources = list(_space_values("data.source", source)) if is_space(source) else [source]
    reported = reported_metrics(sources, sampled=data.get("sampled_pairs") is not None)
    if metric in reported:
        return
    known = reported_metrics(list(EVALUATOR_METRICS), sampled=True) + [
        f"eval/{name}" for names in EVALUATOR_METRICS.values() for name in names]
    shown = evaluator_metrics(sources)
    if metric in known:  # a metric of another source, or of sampled pairs
        owners = [source for source, names in EVALUATOR_METRICS.items() if metric.removeprefix("eval/") in names]
        where = "data.sampled_pairs" if metric.startswith("sampler/") else f"data.source {' or '.join(owners)}"
        raise ConfigError(f"tune.metric: '{metric}' is reported only with {where}, not by every trial of this "
                          f"sweep ({did_you_mean(metric, shown)})")
    typo = difflib.get_close_matches(metric, known, n=1, cutoff=0.8)
    if typo or metric.partition("/")[0] not in ("train", "eval", "probe", "sampler"):
        raise ConfigError(f"tune.metric: '{metric}' is not a metric the trials report "
                          f"({did_you_mean(metric, reported, shown)})")


def missing_metric(metric: str, row: dict) -> str | None:
    """The one line for a trial's report that should hold `metric` and does not: one with other metrics of its
    kind (eval/, train/, probe/, sampler/ arrive together), naming those nearest to it. None otherwise."""
    prefix = metric.partition("/")[0] + "/"
    if metric in row or not any(key.startswith(prefix) for key in row):
        return None
    reported = [key for key, value in row.items() if "/" in key and is_finite_number(value)]
    return f"tune.metric: '{metric}' is not a metric the trials report ({did_you_mean(metric, reported)})"


def first_point(raw: dict) -> dict:
    """The config with every search space replaced by its first value (lower bound for ranges)."""
    point = copy.deepcopy(raw)
    for key, space in find_spaces(raw).items():
        kind, spec = next(iter(space.items()))
        set_dotted(point, key, spec[0] if isinstance(spec, list) and spec else spec)
    return point


def grid_points(raw: dict, spaces: dict[str, dict]) -> list[dict[str, Any]]:
    """The grid's points in order (last key varies fastest), as {dotted key: value}; random spaces shown as text."""
    grid_keys = [k for k, s in spaces.items() if "grid" in s]
    other = {k: f"{next(iter(s))}({', '.join(map(str, next(iter(s.values()))))})"
             for k, s in spaces.items() if "grid" not in s}
    points = [dict(zip(grid_keys, values)) for values in itertools.product(*(spaces[k]["grid"] for k in grid_keys))]
    return [{**p, **other} for p in points]


# ---------------------------------------------------------------------------------------------------
# Files and overrides

def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read ({error.__class__.__name__})") from None
    if not isinstance(raw, (dict, type(None))):
        raise ConfigError(f"{path}: must hold a mapping of keys to values, got {type(raw).__name__}")
    if not raw:  # it would run one trial with every default: almost always the wrong file
        raise ConfigError(f"{path}: holds no keys (an empty sweep would run every default; is it the right file?)")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set loss.beta=0.3 train.seed='{grid: [0, 1]}'`: values are YAML, keys are dotted."""
    raw = copy.deepcopy(raw)
    known = set(_known_keys(SweepConfig))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"--set {key}: unknown key{hint}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML") from None
        set_dotted(raw, key, value)
    return raw


def to_plain(config: BaseModel) -> dict:
    return config.model_dump(mode="json")


def trial_columns(point: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """The parameter columns of one trial: the always-reported keys plus every swept key."""
    plain = to_plain(config)
    keys = list(ALWAYS_REPORTED) + [k for k in point if k not in ALWAYS_REPORTED]
    return {column_name(k): get_dotted(plain, k) for k in keys}


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
