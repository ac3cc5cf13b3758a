"""FSDP for models that do not fit one device: PyTorch's `fully_shard` (FSDP2), no Ray in here.

`scaling.strategy: fsdp` shards the policy (and the reference model, where one is loaded) over the trial's
workers: each transformer block (a model's `_no_split_modules`, e.g. `LlamaDecoderLayer`) becomes one FSDP
unit and the root module holds the rest, so a worker keeps 1/N of the weights, gradients and AdamW state and
gathers one block's weights at a time for the forward and backward. Gradients are reduce-scattered (averaged)
over workers, as DDP all-reduces them, so a sharded run follows the same trajectory as a replicated one.

What changes for the trainer when a model is sharded (`is_sharded`):
- every forward involves every worker, so the evaluation and the reference pass are split over the workers
  by batch (`per_pair_tables`), and the gradient probe and the task's own evaluation (generation)
  run on all of them (rank 0 reports);
- the probe's gradients come from `backward()` into the sharded `.grad`s (autograd.grad does not reach the
  sharded parameters), and each worker's shard contributes its part of the norms and dot product;
- checkpoints hold full (unsharded) state dicts, gathered to rank 0's CPU, so a checkpoint loads the same way
  with any worker count or strategy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from spo_ray.data import PairDataset, collate, length_sorted_batches
from spo_ray.logprobs import peft_base


def is_sharded(model) -> bool:
    """Whether `model`'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor
    return isinstance(model, torch.nn.Module) and any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model, device: torch.device):
    """Apply FSDP2 to `model` in place over the default process group: each transformer block is one unit,
    the root holds the embeddings, the final norm and the LM head. Returns the same module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    block_types = set(getattr(peft_base(model), "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in block_types:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def share_of(batches: list, sharded: bool) -> list[tuple[object, bool]]:
    """This worker's part of a pass over `batches` (reference log-probs, evaluation) as (batch, keep) pairs.

    Unsharded: every batch, kept. Sharded: every world_size-th batch from this rank on, so the workers split
    the pass; a sharded forward is a collective, so each worker runs the same number of them, and a worker
    left one short repeats the first batch and drops (keep=False) its result."""
    if not sharded:
        return [(batch, True) for batch in batches]
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    return [(batch, True) for batch in mine] + [(batches[0], False)] * (rounds - len(mine))


def per_pair_tables(dataset: PairDataset, batch_size: int, pad_id: int, device, forward, *, sharded: bool,
                    max_tokens: int | None = None, progress: str | None = None, shared_prompts: bool = False) -> dict:
    """One pass over every pair of `dataset` (reference log-probs, evaluation): `forward(batch)` returns (B,)
    values per name, and each name becomes an (N,) float32 table on `device`, indexed by pair. Batches run
    shortest pairs first (`length_sorted_batches`: at most `batch_size` pairs and `max_tokens` tokens each), so
    little of each is padding; a sharded model's workers split them (`share_of`) and add up their tables.
    `progress`: a progress bar's label; `shared_prompts`: one row a pair (`spo_ray.data.collate_shared_prompts`)."""
    batches = share_of(length_sorted_batches(dataset, batch_size, max_tokens, shared_prompts), sharded)
    collate_batch = collate(shared_prompts)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=progress, leave=False)
    tables = {}
    for indices, keep in batches:
        batch = {k: v.to(device) for k, v in collate_batch([dataset[i] for i in indices], pad_id).items()}
        for name, values in forward(batch).items():  # every worker makes every table, also from a dropped batch
            column = tables.setdefault(name, torch.zeros(len(dataset), dtype=torch.float32, device=device))
            if keep:
                column[batch["index"]] = values.float()
    return sum_over_workers(tables, sharded)


def sum_over_workers(tables: dict[str, torch.Tensor], sharded: bool) -> dict[str, torch.Tensor]:
    """Per-pair tables in which each worker filled only its own pairs (zeros elsewhere): the full tables."""
    if sharded:
        for table in tables.values():
            dist.all_reduce(table)
    return tables


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This worker's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts of a sharded model (a collective: every rank calls it; rank 0
    gets the tensors on its CPU, the other ranks empty dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load full state dicts (as `full_state` returns them, or from an unsharded run) into a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    names = [name for name, p in model.named_parameters() if p.requires_grad]  # the optimizer's order
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict=by_parameter_name(optimizer_state, names),
                   options=StateDictOptions(full_state_dict=True))


def by_parameter_name(optimizer_state: dict, names: list[str]) -> dict:
    """An optimizer state dict keyed by parameter names, as the sharded loader wants it. A plain
    `optimizer.state_dict()` numbers the parameters 0, 1, … in the order they were given to the optimizer."""
    groups = optimizer_state["param_groups"]
    if all(isinstance(key, str) for group in groups for key in group["params"]):
        return optimizer_state
    return {"state": {names[key]: value for key, value in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [names[key] for key in group["params"]]} for group in groups]}
