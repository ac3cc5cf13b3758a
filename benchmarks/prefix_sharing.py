"""Prefix sharing against separate chosen and rejected rows: a training step's time and saved activations on the
real model and real chat pairs, on this CPU.

    .venv/bin/python benchmarks/prefix_sharing.py [--pairs 24] [--batch-size 4] [--rounds 2] [--cache DIR]

SmolLM2-135M-Instruct (`model.init: smollm2-135m-instruct`, float32) on GSM8K chat pairs (`data.source: gsm8k`,
as part 3 of `benchmarks/vs_trl.py`), batches of `--batch-size` pairs as the trainer's length-grouped sampler makes
them. Each variant runs the trainer's step on every batch — `concatenated_forward` over the batch, the DPO loss
against a fixed reference, backward — with torch on `--threads` threads; activation checkpointing off, then on
(every layer); the variants alternate within each round and each one's best round counts:

  plain   `collate_pairs`: prompt+chosen and prompt+rejected rows, padded to the batch's longest row;
  shared  `collate_shared_prompts`: one row a pair, prompt + chosen + rejected, its mask and positions.

Also per variant: the padded tokens a step, and the bytes autograd saves for the backward (each tensor counted
once, by storage, through `torch.autograd.graph.saved_tensors_hooks`): the activations' share of a step's peak,
free of the allocator's noise. A check first compares the two variants' log-probs on the first batch.
Last line: `prefix_sharing speedup=… checkpointed_speedup=… saved_ratio=… max_logp_diff=…`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from spo_ray.config import RunConfig  # noqa: E402
from spo_ray.data import (LengthGroupedSampler, PairDataset, batch_padded_tokens, collate_pairs,  # noqa: E402
                          collate_shared_prompts, tokenize_pairs)
from spo_ray.logprobs import concatenated_forward  # noqa: E402
from spo_ray.losses import preference_loss  # noqa: E402
from spo_ray.models import enable_activation_checkpointing, load_causal_lm  # noqa: E402
from spo_ray.tasks import load_task  # noqa: E402

COLLATE = {"plain": collate_pairs, "shared": collate_shared_prompts}


class SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward while the block runs."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def step(model, batch: dict, beta: float) -> torch.Tensor:
    """The trainer's step on one batch, less the optimizer: forward, DPO loss (reference: the policy's own
    first log-probs, given), backward."""
    out = concatenated_forward(model, batch)
    losses, _ = preference_loss("dpo", out["chosen_logps"], out["rejected_logps"], batch["ref_chosen"],
                                batch["ref_rejected"], beta=beta)
    losses.mean().backward()
    return torch.cat([out["chosen_logps"], out["rejected_logps"]]).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", help="the init cache (keeps the converted model between runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RunConfig(**{"model": {"init": "smollm2-135m-instruct"},
                          "data": {"source": "gsm8k", "max_length": args.max_length, "max_train_pairs": args.pairs},
                          "wandb": {"mode": "disabled"}})
    task = load_task(config, cache_dir=args.cache or tempfile.mkdtemp(prefix="prefix_sharing_"))
    pairs, _ = tokenize_pairs(task.train_pairs, task.tokenizer, config.data.max_length)
    pad = task.tokenizer.pad_token_id if task.tokenizer.pad_token_id is not None else task.tokenizer.eos_token_id
    data = PairDataset(pairs)
    batches = LengthGroupedSampler([p.length for p in pairs], args.batch_size).batches()
    model = load_causal_lm(task.policy_path, config.model)
    model.train()
    collated = {}
    for name, collate in COLLATE.items():
        collated[name] = [collate([data[i] for i in b], pad) for b in batches]
    tokens = {name: sum(batch_padded_tokens([pairs[i] for i in b], name == "shared") for b in batches)
              for name in COLLATE}
    with torch.no_grad():  # the fixed reference, and the check
        first = {name: torch.cat(list(concatenated_forward(model, collated[name][0]).values())[:2]) for name in COLLATE}
        for name in COLLATE:
            for batch in collated[name]:
                out = concatenated_forward(model, batch)
                batch["ref_chosen"], batch["ref_rejected"] = out["chosen_logps"] - 1.0, out["rejected_logps"] + 1.0
    max_diff = float((first["plain"] - first["shared"]).abs().max())
    print(f"{len(pairs)} GSM8K chat pairs in {len(batches)} batches of {args.batch_size}; mean tokens a pair: prompt "
          f"{sum(len(p.prompt_ids) for p in pairs) / len(pairs):.0f}, chosen "
          f"{sum(len(p.chosen_ids) for p in pairs) / len(pairs):.0f}, rejected "
          f"{sum(len(p.rejected_ids) for p in pairs) / len(pairs):.0f}; padded tokens a step: plain "
          f"{tokens['plain'] / len(batches):.0f}, shared {tokens['shared'] / len(batches):.0f}; first batch's "
          f"log-probs differ by at most {max_diff:.2e} nats", flush=True)

    results = {}
    for checkpointed in (False, True):
        if checkpointed:
            enable_activation_checkpointing(model)
            model.train()
        best, saved = {}, {}
        for round_ in range(args.rounds):
            for name in COLLATE:
                meter = SavedBytes()
                start = time.perf_counter()
                for i, batch in enumerate(collated[name]):
                    with meter() if i == 0 else torch.enable_grad():
                        step(model, batch, beta=0.1)
                    model.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - start
                best[name] = min(best.get(name, float("inf")), elapsed)
                saved[name] = meter.mib
                print(f"  checkpointing {'on ' if checkpointed else 'off'} round {round_ + 1} {name:6s}: "
                      f"{len(pairs) / elapsed:.3f} pairs/s; saved for the backward (first batch) {meter.mib:,.0f} MiB",
                      flush=True)
        results[checkpointed] = (best["plain"] / best["shared"], saved["shared"] / saved["plain"])
        print(f"checkpointing {'on' if checkpointed else 'off'}: shared {len(pairs) / best['shared']:.3f} pairs/s, "
              f"plain {len(pairs) / best['plain']:.3f} (best rounds): {results[checkpointed][0]:.2f}×; saved "
              f"activations {saved['shared']:,.0f} / {saved['plain']:,.0f} MiB", flush=True)
    print(f"prefix_sharing speedup={results[False][0]:.2f} checkpointed_speedup={results[True][0]:.2f} "
          f"saved_ratio={results[False][1]:.2f} max_logp_diff={max_diff:.2e}")


if __name__ == "__main__":
    main()
