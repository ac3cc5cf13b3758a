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

Measured against this floor (docs/benchmarks.md, `benchmarks/logprob_memory.py`): the real peaks sit above it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

import torch

from spo_ray.config import ConfigError
from spo_ray.data import PairDataset, batch_padded_tokens, length_sorted_batches
from spo_ray.logprobs import LOGITS_CHUNK_BYTES, peft_base

GIB = 2**30


def available_bytes(device: torch.device) -> int | None:
    """Memory a pass can still take: free device memory on a GPU, `MemAvailable` on the CPU (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (AttributeError, OSError, TypeError):  # no malloc_trim; no C library to open (Windows: TypeError)
        return None


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


def training_floor(config, tokens: int, trainable_parameters: int, bytes_per_value: int = 4,
                   checkpointed: int = 0) -> int:
    """Bytes a training step over `tokens` tokens must hold at least, beyond the weights. With activation
    (gradient) checkpointing of every `checkpointed`-th layer (True: every layer; transformers' `every_n_layers`)
    a checkpointed layer keeps only its input, the others all their activations, and one layer's activations
    are recomputed at a time."""
    hidden, mlp, layers = _shape(config)
    per_layer = tokens * (4 * hidden + 3 * mlp) * bytes_per_value
    kept = -(-layers // int(checkpointed)) if checkpointed else 0  # layers 0, n, 2n, … are checkpointed
    activations = kept * tokens * hidden * bytes_per_value + (layers - kept + (1 if kept else 0)) * per_layer
    return activations + 3 * 4 * trainable_parameters + 2 * LOGITS_CHUNK_BYTES


def checkpoints_some_layers(model) -> bool:
    """Whether this transformers model can checkpoint every n-th layer only (`every_n_layers`, transformers
    ≥ 5.2x) rather than all or none."""
    import inspect
    enable = getattr(peft_base(model), "activation_checkpointing_enable", None)
    return enable is not None and "every_n_layers" in inspect.signature(enable).parameters


def checkpointing_needed(model_config, tokens: int, trainable: int, values: int, available: int | None,
                         some_layers: bool) -> int:
    """With `model.gradient_checkpointing: auto`: 0 when the step's floor fits in `available` without
    checkpointing; else the largest n (the fewest layers recomputed) for which checkpointing every n-th layer
    fits, where the model can (`some_layers`); else 1, every layer."""
    if available is None or training_floor(model_config, tokens, trainable, values) <= available:
        return 0
    layers = _shape(model_config)[2]
    for every in range(layers, 1, -1) if some_layers else ():
        if training_floor(model_config, tokens, trainable, values, checkpointed=every) <= available:
            return every
    return 1


def check_fits(key: str, what: str, need: int, device: torch.device, remedy: str | None = None) -> None:
    """ConfigError naming `key` when `need` bytes exceed the memory `device` has available now."""
    available = available_bytes(device)
    if available is not None and need > available:
        raise ConfigError(f"{key}: {what} needs at least {need / GIB:.1f} GiB, but {available / GIB:.1f} GiB "
                          f"are available on {device.type}; {remedy or 'lower it'}")


def largest_batch_tokens(dataset: PairDataset, batches, shared_prompts: bool = False) -> int:
    """The padded tokens of the widest of `batches` (lists of pair indices): chosen and rejected rows, or with
    `shared_prompts` one row a pair (`spo_ray.data.batch_padded_tokens`)."""
    return max((batch_padded_tokens([dataset.pairs[i] for i in b], shared_prompts) for b in batches if b),
               default=0)


def check_run_fits(config, model, train_data: PairDataset, eval_data: PairDataset, micro_batches,
                   device: torch.device, world_size: int = 1, shared_prompts: bool = False) -> int:
    """Refuse (ConfigError naming the key) a run whose reference pass, evaluation or training step cannot fit
    on `device`, with `model` (the policy) loaded; `micro_batches`: the index lists of this worker's steps;
    `shared_prompts`: every pass runs one row a pair (`spo_ray.data.collate_shared_prompts`).
    Returns the activation checkpointing of the training step, as the n of "every n-th layer" (0: none):
    `model.gradient_checkpointing` when it is true (1) or false (0); with auto, `checkpointing_needed`."""
    inner = peft_base(model)
    model_config = getattr(inner, "config", None)
    setting = config.model.gradient_checkpointing
    if model_config is None or not hasattr(model_config, "vocab_size"):
        return int(setting is True)
    values = 2 if device.type == "cuda" and config.train.mixed_precision != "no" else next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) // world_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) // world_size
    ref, train_cfg = config.reference, config.train
    if ref.cache:  # the reference model is loaded beside the policy for its pass
        tokens = max(largest_batch_tokens(d, length_sorted_batches(d, ref.batch_size, ref.batch_tokens, shared_prompts),
                                          shared_prompts) for d in (train_data, eval_data))
        check_fits("reference.batch_tokens", f"the reference pass (batches of {tokens:,} tokens, and the "
                   f"reference's weights)", forward_floor(model_config, tokens, values) + weights, device)
    # A reference run on every batch (reference.cache: false, or TR-DPO's reference.sync) stays loaded beside the
    # policy through the evaluation and every step.
    resident = weights if not ref.cache or ref.sync else 0
    tokens = largest_batch_tokens(eval_data, length_sorted_batches(eval_data, train_cfg.eval_batch_size,
                                                                   train_cfg.eval_batch_tokens, shared_prompts),
                                  shared_prompts)
    check_fits("train.eval_batch_tokens", f"the evaluation pass (batches of {tokens:,} tokens)",
               forward_floor(model_config, tokens, values) + resident, device)
    tokens = largest_batch_tokens(train_data, micro_batches, shared_prompts)
    checkpointed = int(setting is True)
    if setting == "auto":
        available = available_bytes(device)
        checkpointed = checkpointing_needed(model_config, tokens, trainable, values,
                                            None if available is None else available - resident,
                                            checkpoints_some_layers(model))
    need = training_floor(model_config, tokens, trainable, values, checkpointed=checkpointed) + resident
    check_fits("train.batch_size", f"a training step (micro-batches of {tokens:,} tokens"
               f"{', activation checkpointing on' if checkpointed else ''})", need, device,
               "lower it or raise train.grad_accum_steps" + ("" if checkpointed else
                                                              " or turn on model.gradient_checkpointing"))
    return checkpointed
