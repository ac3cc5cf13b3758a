"""Will a pass fit? Checked before the first step, so a batch that cannot fit is one error line naming the key
to lower, instead of the kernel's OOM killer minutes into the run.

The figures are floors, not forecasts: the least a pass of a decoder-only transformer must hold, from the
model's config, so the check refuses only what surely cannot fit and never a run that would have.

- A no-grad pass (reference log-probs, evaluation) frees each layer's activations before the next layer runs:
  its floor is one layer's MLP activations over the batch's tokens (gate, up and their product, 3 × MLP
  width, plus the residual stream) and one chunk of logits (`spo_ray.logprobs.LOGITS_CHUNK_BYTES`).
- A training step keeps every layer's activations for the backward — at least the inputs of its linear layers
  (4 × hidden + 3 × MLP width per token per layer), gradients of the trainable weights, and AdamW's two
  moments (float32), plus a chunk of logits and its gradient.

Four levers lower the step's floor (`Levers`, `training_floor`): activation checkpointing (a checkpointed layer
keeps only its input), 8-bit AdamW states (2 bytes a parameter instead of 8, `spo_ray.optimizers`), the
optimizer step in the backward (one parameter's gradient alive at a time instead of all) and, on a GPU,
activation offloading (the saved activations wait in host memory). With their settings at auto,
`choose_levers` turns on the cheapest set that fits, and the trainer says in one line what it turned on and why.

Measured against this floor (docs/benchmarks.md, `benchmarks/logprob_memory.py`): the real peaks sit above it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

from dataclasses import dataclass, replace

import torch

from spo_ray.config import ConfigError, step_in_backward_refusal
from spo_ray.optimizers import EIGHT_BIT, FUSED, eight_bit_installed, optimizer_state_bytes
from spo_ray.data import PairDataset, batch_padded_tokens, length_sorted_batches
from spo_ray.logprobs import LOGITS_CHUNK_BYTES, peft_base

GIB = 2**30


def _proc_bytes(path: str, field: str) -> int | None:
    """A "Field: N kB" line of a Linux /proc file, in bytes (None where there is none)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes(device: torch.device) -> int | None:
    """Memory a pass can still take: free device memory on a GPU, `MemAvailable` on the CPU (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def release_freed_memory() -> bool:
    """Give the pages of freed CPU memory back to the system, where the C library can (glibc's `malloc_trim`).

    glibc keeps what a training step frees (its activations, the spent gradients) mapped in its heaps for the
    next step, so a phase that follows one (the evaluation, the probe) would otherwise start at the step's peak
    and add its own rise on top of it. Called between the training steps and those phases: they start from the
    memory in use, and the next step faults its pages in again (4.5 GiB in 1 MiB blocks: 1.42 s after the release
    against 5.08 s reusing the kept ones, `benchmarks/probe_memory.py`). False where there is nothing to call
    (not glibc: macOS, musl), which changes nothing but the RSS."""
    trim = _malloc_trim()
    if trim is not None:
        trim(ctypes.c_size_t(0))
    return trim is not None


@functools.cache
def _malloc_trim():
    """The C library's `malloc_trim`, or None; looked up once (`find_library` runs `ldconfig` on Linux)."""
    return _libc_function("malloc_trim")


def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or None), name)
    except (AttributeError, OSError, TypeError):  # no such function; no C library to open (Windows: TypeError)
        return None


#: glibc's `mallopt` parameter M_MMAP_THRESHOLD, and the threshold `return_freed_blocks` sets (128 KiB, glibc's
#: initial value, which it otherwise raises up to 32 MiB as large blocks are freed).
M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 128 * 1024


def return_freed_blocks() -> bool:
    """Have glibc serve every allocation over 128 KiB with its own mapping, returned to the system when freed
    (`mallopt(M_MMAP_THRESHOLD, 128 KiB)`, what `MALLOC_MMAP_THRESHOLD_=131072` does from the environment): the
    process's resident memory then follows what it holds instead of its past peaks. Costs page faults on every
    large allocation (part 3 of benchmarks/vs_trl.py: 0.468 against 0.614 pairs/s with checkpointing, 3,109
    against 4,199 MiB). The trainer calls it under `train.memory_budget` on a CPU. False where there is no glibc."""
    mallopt = _libc_function("mallopt")
    return bool(mallopt is not None and mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD_BYTES)))


def _shape(config) -> tuple[int, int, int]:
    """(hidden size, MLP width, layers) of a transformers config (Llama/Qwen names, GPT-2 names)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    return hidden, mlp, layers


def forward_floor(config, tokens: int, bytes_per_value: int = 4) -> int:
    """Bytes a no-grad forward over `tokens` tokens must hold at least, beyond the weights."""
    hidden, mlp, _ = _shape(config)
    return tokens * (3 * mlp + 2 * hidden) * bytes_per_value + LOGITS_CHUNK_BYTES


@dataclass(frozen=True)
class Levers:
    """How a training step holds less memory: activation checkpointing of every `checkpointed`-th layer (0:
    none), the optimizer (`train.optim`: 8-bit states or float32), the optimizer step in the backward, and
    activation offloading to host memory."""
    checkpointed: int = 0
    optim: str = FUSED
    in_backward: bool = False
    offloaded: bool = False

    def described(self) -> list[str]:
        """The levers that are on, as the config names them."""
        on = []
        if self.in_backward:
            on.append("train.optimizer_in_backward")
        if self.optim == EIGHT_BIT:
            on.append(f"train.optim {EIGHT_BIT}")
        if self.checkpointed:
            which = "every layer" if self.checkpointed == 1 else f"one layer in every {self.checkpointed}"
            on.append(f"model.gradient_checkpointing ({which})")
        if self.offloaded:
            on.append("train.activation_offloading")
        return on


def training_floor(config, tokens: int, trainable_parameters: int, bytes_per_value: int = 4,
                   checkpointed: int = 0, levers: Levers | None = None, largest_parameter: int = 0) -> int:
    """Bytes a training step over `tokens` tokens must hold at least, beyond the weights.

    Activations: with activation (gradient) checkpointing of every `checkpointed`-th layer (True: every layer;
    transformers' `every_n_layers`) a checkpointed layer keeps only its input, the others all their activations,
    and one layer's activations are recomputed at a time; offloaded, the device holds one layer's at a time.
    Gradients (float32) of every trainable parameter, or with the step in the backward of the largest parameter
    only (`largest_parameter` values: it is freed after its step, before the next one's gradient is complete).
    The optimizer's state (`spo_ray.optimizers.optimizer_state_bytes`: 8 bytes a parameter, 2 in 8-bit). And a
    chunk of logits with its gradient. `levers` (default: none) gives the optimizer, the step in the backward and
    offloading; its own `checkpointed` is used where `checkpointed` is 0."""
    levers = levers or Levers()
    checkpointed = checkpointed or levers.checkpointed
    hidden, mlp, layers = _shape(config)
    per_layer = tokens * (4 * hidden + 3 * mlp) * bytes_per_value
    kept = -(-layers // int(checkpointed)) if checkpointed else 0  # layers 0, n, 2n, … are checkpointed
    activations = kept * tokens * hidden * bytes_per_value + (layers - kept + (1 if kept else 0)) * per_layer
    if levers.offloaded:
        activations = per_layer
    gradients = 4 * (largest_parameter if levers.in_backward else trainable_parameters)
    optimizer = optimizer_state_bytes(trainable_parameters, levers.optim if levers.optim != "auto" else FUSED)
    return activations + gradients + optimizer + 2 * LOGITS_CHUNK_BYTES


def checkpoints_some_layers(model) -> bool:
    """Whether this transformers model can checkpoint every n-th layer only (`every_n_layers`, transformers
    ≥ 5.2x) rather than all or none."""
    import inspect
    enable = getattr(peft_base(model), "activation_checkpointing_enable", None)
    return enable is not None and "every_n_layers" in inspect.signature(enable).parameters


def checkpointing_needed(model_config, tokens: int, trainable: int, values: int, available: int | None,
                         some_layers: bool, levers: Levers | None = None, largest_parameter: int = 0) -> int:
    """With `model.gradient_checkpointing: auto`: 0 when the step's floor (with the other `levers`) fits in
    `available` without checkpointing; else the largest n (the fewest layers recomputed) for which checkpointing
    every n-th layer fits, where the model can (`some_layers`); else 1, every layer."""
    levers = replace(levers or Levers(), checkpointed=0)

    def fits(every: int) -> bool:
        return training_floor(model_config, tokens, trainable, values, every, levers, largest_parameter) <= available

    if available is None or fits(0):
        return 0
    layers = _shape(model_config)[2]
    for every in range(layers, 1, -1) if some_layers else ():
        if fits(every):
            return every
    return 1


#: The auto levers in the order they are tried, cheapest in step time first. The step in the backward does the
#: same arithmetic, earlier: free. On a GPU bitsandbytes' 8-bit step costs little beside a forward and backward,
#: while checkpointing runs the checkpointed layers' forward again; on a CPU its 8-bit kernel is the slow one
#: (benchmarks/optimizer.py, 134.5M parameters: 1.79 s a step against the fused AdamW's 0.124 s, 14.5×, about a
#: forward's time at part 3's batch), so checkpointing goes first there.
LEVER_ORDER = {"cuda": ("in_backward", "eight_bit", "checkpointing"),
               "cpu": ("in_backward", "checkpointing", "eight_bit")}


#: Under `train.memory_budget` the auto levers are chosen for the step's floor times this: a budget is a cap the
#: user wants kept, and a real step rises above its floor (part 3 of benchmarks/vs_trl.py, SmolLM2-135M with every
#: lever and freed blocks returned, `return_freed_blocks`: the training step rose 1,343 MiB over its start against
#: a floor of 990). Without a budget the floor alone decides (auto turns a lever on only where it is needed).
BUDGET_MARGIN = 1.4


def choose_levers(model_config, tokens: int, trainable: int, largest_parameter: int, values: int,
                  available: int | None, train, checkpointing, some_layers: bool, world_size: int,
                  device_type: str) -> Levers:
    """The levers of a training step: the settings that are not auto as given; the auto ones (`train.optim`,
    `train.optimizer_in_backward`, `model.gradient_checkpointing` = `checkpointing`) off where the step fits
    without them, else added in `LEVER_ORDER` until it fits — checkpointing at the fewest layers that fit with
    the others. Where even all of them do not fit, all (the memory check then names the key to lower). An auto
    lever that cannot apply stays off: the step in the backward with gradient clipping, gradient accumulation or
    several workers; 8-bit states without bitsandbytes. Under `train.memory_budget` a step fits when its floor
    times `BUDGET_MARGIN` does."""
    levers = Levers(checkpointed=int(checkpointing is True), optim=FUSED if train.optim == "auto" else train.optim,
                    in_backward=train.optimizer_in_backward is True, offloaded=train.activation_offloading)
    if available is not None and train.memory_budget is not None:
        available = int(available / BUDGET_MARGIN)

    def floor(candidate: Levers) -> int:
        return training_floor(model_config, tokens, trainable, values, 0, candidate, largest_parameter)

    if available is None or floor(levers) <= available:
        return levers
    usable = {
        "in_backward": train.optimizer_in_backward == "auto" and train.grad_accum_steps == 1
                       and step_in_backward_refusal(train.max_grad_norm, world_size) is None,
        "eight_bit": train.optim == "auto" and eight_bit_installed(),
        "checkpointing": checkpointing == "auto",
    }
    for lever in LEVER_ORDER["cuda" if device_type == "cuda" else "cpu"]:
        if not usable[lever]:
            continue
        if lever == "in_backward":
            levers = replace(levers, in_backward=True)
        elif lever == "eight_bit":
            levers = replace(levers, optim=EIGHT_BIT)
        if usable["checkpointing"] and (lever == "checkpointing" or levers.checkpointed):
            levers = replace(levers, checkpointed=checkpointing_needed(model_config, tokens, trainable, values,
                                                                       available, some_layers, levers,
                                                                       largest_parameter))
        if floor(levers) <= available:
            return levers
    return levers


def in_use_bytes(device: torch.device) -> int:
    """What this process holds now: torch's allocated memory on a GPU, the resident set (`VmRSS`) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_bytes("/proc/self/status", "VmRSS") or 0


def budgeted_available(device: torch.device, budget_gib: float | None) -> int | None:
    """`available_bytes`, or where `train.memory_budget` is given and lower, what the budget leaves beside what
    this process already holds (`in_use_bytes`: the budget caps the trial's whole memory, weights included)."""
    available = available_bytes(device)
    if budget_gib is None:
        return available
    left = max(0, int(budget_gib * GIB) - in_use_bytes(device))
    return left if available is None else min(available, left)


def check_fits(key: str, what: str, need: int, device: torch.device, remedy: str | None = None,
               budget_gib: float | None = None) -> None:
    """ConfigError naming `key` when `need` bytes exceed the memory `device` has available now (or the budget)."""
    available = budgeted_available(device, budget_gib)
    if available is not None and need > available:
        within = (f" within train.memory_budget ({budget_gib} GiB, of which this process holds "
                  f"{in_use_bytes(device) / GIB:.1f})" if budget_gib is not None and available < available_bytes(device)
                  else "")
        raise ConfigError(f"{key}: {what} needs at least {need / GIB:.1f} GiB, but {available / GIB:.1f} GiB "
                          f"are available on {device.type}{within}; {remedy or 'lower it'}")


def largest_batch_tokens(dataset: PairDataset, batches, shared_prompts: bool = False) -> int:
    """The padded tokens of the widest of `batches` (lists of pair indices): chosen and rejected rows, or with
    `shared_prompts` one row a pair (`spo_ray.data.batch_padded_tokens`)."""
    return max((batch_padded_tokens([dataset.pairs[i] for i in b], shared_prompts) for b in batches if b),
               default=0)


def check_run_fits(config, model, train_data: PairDataset, eval_data: PairDataset, micro_batches,
                   device: torch.device, world_size: int = 1, shared_prompts: bool = False,
                   workers: int = 1) -> Levers:
    """Refuse (ConfigError naming the key) a run whose reference pass, evaluation or training step cannot fit
    on `device` (within `train.memory_budget`), with `model` (the policy) loaded; `micro_batches`: the index
    lists of this worker's steps; `shared_prompts`: every pass runs one row a pair
    (`spo_ray.data.collate_shared_prompts`); `world_size`: the workers the weights are sharded over, `workers`:
    the run's workers. Returns the training step's levers (`choose_levers`)."""
    inner = peft_base(model)
    model_config = getattr(inner, "config", None)
    setting, train_cfg = config.model.gradient_checkpointing, config.train
    budget = train_cfg.memory_budget
    if model_config is None or not hasattr(model_config, "vocab_size"):  # no shapes to reckon with: as set
        return choose_levers(None, 0, 0, 0, 4, None, train_cfg, setting, False, workers, device.type)
    values = 2 if device.type == "cuda" and train_cfg.mixed_precision != "no" else next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) // world_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) // world_size
    largest = max((p.numel() for p in model.parameters() if p.requires_grad), default=0) // world_size
    ref = config.reference
    if ref.cache:  # the reference model is loaded beside the policy for its pass
        tokens = max(largest_batch_tokens(d, length_sorted_batches(d, ref.batch_size, ref.batch_tokens, shared_prompts),
                                          shared_prompts) for d in (train_data, eval_data))
        check_fits("reference.batch_tokens", f"the reference pass (batches of {tokens:,} tokens, and the "
                   f"reference's weights)", forward_floor(model_config, tokens, values) + weights, device,
                   budget_gib=budget)
    # A reference run on every batch (reference.cache: false, or TR-DPO's reference.sync) stays loaded beside the
    # policy through the evaluation and every step.
    resident = weights if not ref.cache or ref.sync else 0
    tokens = largest_batch_tokens(eval_data, length_sorted_batches(eval_data, train_cfg.eval_batch_size,
                                                                   train_cfg.eval_batch_tokens, shared_prompts),
                                  shared_prompts)
    check_fits("train.eval_batch_tokens", f"the evaluation pass (batches of {tokens:,} tokens)",
               forward_floor(model_config, tokens, values) + resident, device, budget_gib=budget)
    tokens = largest_batch_tokens(train_data, micro_batches, shared_prompts)
    available = budgeted_available(device, budget)
    levers = choose_levers(model_config, tokens, trainable, largest, values,
                           None if available is None else available - resident, train_cfg, setting,
                           checkpoints_some_layers(model), workers, device.type)
    need = training_floor(model_config, tokens, trainable, values, 0, levers, largest) + resident
    on = levers.described()
    check_fits("train.batch_size", f"a training step (micro-batches of {tokens:,} tokens"
               f"{', with ' + ', '.join(on) if on else ''})", need, device,
               "lower it or raise train.grad_accum_steps" + ("" if levers.checkpointed else
                                                              " or turn on model.gradient_checkpointing"),
               budget_gib=budget)
    return levers
