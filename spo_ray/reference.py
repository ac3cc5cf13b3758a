"""Reference log-probs: computed once per (reference model, data, tokenization), shared by every trial.

The reference policy is frozen, so ℓ_ref(y_w) and ℓ_ref(y_l) are a pure function of the reference weights,
the pairs and how they are tokenized. Peer frameworks recompute them in every trial (or keep a second model
in memory for it); we compute them once, store them as a Parquet table under a key hashed from those three
inputs, and every trial of a sweep reads the table. A changed input gives a new key; a file that does not
read back completely is rebuilt. Concurrent trials serialise on a lock (a lock file; in a Ray sweep the
driver's lease, which holds across nodes), so one computes, the rest read. The tables live in the experiment
directory, a local folder or a storage URI (`spo_ray.storage`).

`reference.cache: false` keeps TRL's default behaviour instead: the trial loads the reference model and
runs it on every batch (`ModelReference`).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spo_ray import storage
from spo_ray.data import PairDataset
from spo_ray.logprobs import concatenated_forward
from spo_ray.config import ConfigError
from spo_ray.models import file_identity, merged_state_dict
from spo_ray.sharding import is_sharded, per_pair_tables

COLUMNS = ("chosen_logps", "rejected_logps", "chosen_avg_logps", "rejected_avg_logps", "chosen_shared_logps",
           "rejected_shared_logps")
CACHE_FORMAT = 2  # 2: the shared-prefix sums (LD-DPO) added; a table of format 1 is rebuilt


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(path: str) -> str:
    """Identity of reference weights: a local folder's weight files (`file_identity`: the same for every
    node's copy of an init, so a sweep's trials share one table on any node), else the hub id. A folder that
    names the hash of its whole weights in init.json (a self-training round's start, `spo_ray.rounds`: two
    rounds of a LoRA run differ in layers the first and last MiB may not reach) is that hash."""
    folder = Path(path)
    info = folder / "init.json"
    if info.is_file():
        weights = json.loads(info.read_text()).get("weights_sha256")
        if weights:
            return f"weights-{weights}"
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
        return fingerprint([file_identity(p) for p in files])
    return path


def dataset_fingerprint(dataset: PairDataset) -> str:
    digest = hashlib.sha256()
    for pair in dataset.pairs:
        digest.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def compute_reference_logps(model, dataset: PairDataset, pad_token_id: int, batch_size: int = 128,
                            device: str | torch.device = "cpu", progress: bool = False,
                            max_tokens: int | None = None, shared_prompts: bool = False) -> dict[str, torch.Tensor]:
    """ℓ_ref of every pair in `dataset`, in dataset order: a dict of (N,) float tensors, one per COLUMNS
    (`per_pair_tables`: length-sorted batches, split over the workers of a sharded model)."""
    was_training = model.training
    model.eval()

    def forward(batch):
        out = concatenated_forward(model, batch)
        return {name: out[name] for name in COLUMNS}

    tables = per_pair_tables(dataset, batch_size, pad_token_id, device, forward, sharded=is_sharded(model),
                             max_tokens=max_tokens, progress="reference log-probs" if progress else None,
                             shared_prompts=shared_prompts)
    model.train(was_training)
    return {name: tables.get(name, torch.zeros(len(dataset))).cpu() for name in COLUMNS}


def read_table(location: str | Path, expected_rows: int) -> dict[str, torch.Tensor] | None:
    """The cached table, or None when it is missing, unreadable, partial or of another format."""
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(location)))
        meta = table.schema.metadata or {}
        if int(meta.get(b"format", b"0")) != CACHE_FORMAT or table.num_rows != expected_rows:
            return None
        if int(meta.get(b"rows", b"-1")) != expected_rows:
            return None
        return {name: torch.from_numpy(table.column(name).to_numpy().copy()) for name in COLUMNS}
    except Exception:  # a missing, corrupt or truncated file of any kind means: rebuild
        return None


def write_table(location: str | Path, logps: dict[str, torch.Tensor]) -> None:
    """Written whole (a local file renamed into place, an object uploaded in one PUT): readers see the old
    table or the whole new one."""
    rows = len(logps[COLUMNS[0]])
    table = pa.table({name: logps[name].numpy() for name in COLUMNS})
    table = table.replace_schema_metadata({"format": str(CACHE_FORMAT), "rows": str(rows)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(location, buffer.getvalue())


def table_path(cache_dir: str | Path, key: str) -> str:
    """Where the table of `key` lives: a local folder or a storage URI (`spo_ray.storage`)."""
    return storage.join(cache_dir, f"reflogps-{key}.parquet")


def cached_reference_logps(cache_dir: str | Path, key: str, dataset: PairDataset, compute) -> tuple[dict, bool]:
    """Load the table for `key`, or build it with `compute()` under a lock. Returns (logps, was_hit)."""
    path = table_path(cache_dir, key)

    def build() -> dict:
        logps = compute()
        write_table(path, logps)
        return logps
    return storage.built_once(f"reflogps-{key}", cache_dir, lambda: read_table(path, len(dataset)), build)


def cached_reference_logps_together(cache_dir: str | Path, key: str, dataset: PairDataset, compute, *,
                                    rank: int, device: torch.device) -> tuple[dict, bool]:
    """`cached_reference_logps` for a reference sharded over the workers (FSDP), whose forward needs all of
    them: every worker reads the table; if any worker lacks it, all compute it together and rank 0 writes it.
    No lock (a lock held by one worker would stall the others' collectives); the write is atomic, so a trial
    computing the same table concurrently costs time, never a torn file."""
    import torch.distributed as dist

    path = table_path(cache_dir, key)
    logps = read_table(path, len(dataset))
    missing = torch.tensor([0 if logps is not None else 1], device=device)
    dist.all_reduce(missing, op=dist.ReduceOp.MAX)
    if not missing.item():
        return logps, True
    logps = compute()
    if rank == 0:
        write_table(path, logps)
    dist.barrier()
    return logps, False


class PrecomputedReference:
    """Reference log-probs looked up by pair index."""

    def __init__(self, logps: dict[str, torch.Tensor]):
        self.logps = logps

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        index = batch["index"].cpu()
        device = batch["input_ids"].device
        return {name: self.logps[name][index].to(device) for name in COLUMNS}


class ModelReference:
    """Reference log-probs from a frozen model, batch by batch (the uncached path)."""

    def __init__(self, model):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        out = concatenated_forward(self.model, batch)
        return {name: out[name].float() for name in COLUMNS}


class SyncedReference:
    """TR-DPO's reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment",
    arXiv:2404.09656; TRL's `sync_ref_model`): a model run on every batch that every `sync_steps` optimizer steps
    moves toward the policy,

        π_ref ← α · π_θ + (1 − α) · π_ref      (weights; α = `mixup_alpha`, the paper's soft update; α = 1 its hard one)

    A drifting reference is a function of the run, not of (reference weights, data), so the shared cache cannot
    serve it. The initial reference's cached table still can, and it is kept beside the model as the `anchor_*`
    columns: SPO's safe region is defined by the initial (SFT) model, the lower level's solution, so its
    penalty — and the chosen/rejected log-prob deltas every report shows — stay measured against it, while the
    preference loss itself sees the drifting reference. (Anchored to the drifting one instead, a hard update
    would reset the safe region every τ steps and let the chosen log-prob fall a little further after each.)

    `model`'s weights are part of the run's state: checkpoints carry them (`state_dict`), and a resumed or PBT-
    exploited trial continues from the reference it had. Under DDP every worker holds its own copy and mixes in
    the same (all-reduced) policy, so the copies stay equal."""

    def __init__(self, model, anchor: dict[str, torch.Tensor], sync_steps: int, mixup_alpha: float, policy):
        self.model = ModelReference(model)
        self.anchor = PrecomputedReference(anchor)
        self.sync_steps, self.mixup_alpha = sync_steps, mixup_alpha
        mine, weights = {name: p.shape for name, p in model.named_parameters()}, merged_state_dict(policy)
        theirs = {name: weights[name].shape for name in mine if name in weights}
        if mine != theirs:
            raise ConfigError("reference.sync: the reference's weights are not the policy's (another architecture "
                              "or size in model.reference); TR-DPO mixes the policy into the reference, weight by weight")

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        return {**self.model(batch), **{f"anchor_{name}": value for name, value in self.anchor(batch).items()}}

    @torch.no_grad()
    def step_done(self, policy, step: int) -> None:
        """After optimizer step `step`: mix `policy` (a LoRA policy with its adapters merged in) into the reference
        when the step is a multiple of `sync_steps` (TRL's `SyncRefModelCallback` at `on_step_end`)."""
        if step % self.sync_steps:
            return
        weights = merged_state_dict(policy)
        for name, param in self.model.model.named_parameters():
            param.mul_(1 - self.mixup_alpha).add_(weights[name].to(param.dtype), alpha=self.mixup_alpha)

    def state_dict(self) -> dict:
        return self.model.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.model.load_state_dict(state)
