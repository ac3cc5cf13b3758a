"""What SPO's `one_step` estimator costs per training step against the `reference` estimator.

    python benchmarks/one_step_cost.py [--cache-dir results/.cache] [--init base] [--rounds 20] [--threads 1]

One process, one model (the built-in init, as sweeps/sft_free.yaml trains it), the same batches of 32
pairs: each round times one training step (forward, loss, backward; no optimizer step, so every round sees
the same weights) under each estimator, interleaved, so both meet the same machine load. `reference`
reads the reference log-probs as a trial does from the shared cache (here: computed once up front), so its
step is the policy's forward and backward; `one_step` adds ∇g, and one forward over the chosen rows per
inner step it tries. Prints the median seconds per step of each and their ratio, and the α one_step used.
"""

import argparse
import statistics
import time

import torch
import yaml

from spo_ray.config import first_point, validate_run
from spo_ray.data import collate_pairs, tokenize_pairs
from spo_ray.logprobs import concatenated_forward
from spo_ray.models import load_causal_lm
from spo_ray.tasks import load_task
from spo_ray.trainer import batch_loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", default="results/.cache")
    parser.add_argument("--init", default="base")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    raw = first_point(yaml.safe_load(open("sweeps/sft_free.yaml")))
    raw["model"]["init"] = args.init
    config = validate_run(raw).run_config()
    task = load_task(config, cache_dir=args.cache_dir)
    model = load_causal_lm(task.policy_path, config.model, device=torch.device("cpu"))
    pairs, _ = tokenize_pairs(task.train_pairs, task.tokenizer)
    batches = [collate_pairs([(i, pairs[i]) for i in range(32 * b, 32 * b + 32)], task.tokenizer.pad_token_id)
               for b in range(args.rounds)]
    with torch.no_grad():
        references = [concatenated_forward(model, batch) for batch in batches]

    losses = {name: config.loss.model_copy(update={"spo_estimator": name}) for name in ("reference", "one_step")}
    seconds = {name: [] for name in losses}
    steps_used = []
    for batch, reference in zip(batches, references):
        for name, loss_cfg in losses.items():
            start = time.perf_counter()
            loss, metrics = batch_loss(loss_cfg, concatenated_forward(model, batch), reference, 1, model, batch)
            loss.backward()
            seconds[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
            if name == "one_step":
                steps_used.append(float(metrics["spo_inner_step"]))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"init {args.init}, {args.rounds} rounds of batch 32, {args.threads} thread(s)")
    for name, m in median.items():
        print(f"  {name}: median {m * 1000:.1f} ms per step (min {min(seconds[name]) * 1000:.1f} ms)")
    print(f"  one_step / reference: {median['one_step'] / median['reference']:.2f}× "
          f"(α used: {', '.join(f'{a:g}' for a in sorted(set(steps_used)))}; first tried "
          f"{config.loss.spo_inner_lr:g})")


if __name__ == "__main__":
    main()
