"""Where SmolLM2-135M-Instruct's arithmetic accuracy can move both ways: greedy accuracy and samples per band.

    python scripts/arith_bands.py [--questions 200] [--samples 8] [--sample-prompts 32] [--threads 2]

For each candidate band of `data.chat_arithmetic` (operations × operand range, the sweep's question template,
rendered with the model's chat template), prints: how many problems it has, greedy accuracy on up to
`--questions` of them (a seeded sample; every problem where there are fewer), the share of replies that ended
within 48 tokens, and for `--sample-prompts` of them `--samples` samples at temperature 0.8: the samples'
accuracy and the share of prompts that got both a right and a wrong answer (the prompts that give pairs).
Answers are judged as the evaluator judges them (`spo_ray.answers.matches` on a reply that ended).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from spo_ray.answers import matches  # noqa: E402
from spo_ray.config import ChatArithmeticConfig  # noqa: E402
from spo_ray.decoding import greedy_decode  # noqa: E402
from spo_ray.models import gguf_init, load_init  # noqa: E402
from spo_ray.sampling import Sampling, sample_rows  # noqa: E402
from spo_ray.tasks.chat_arithmetic import all_problems, question, solve  # noqa: E402
from spo_ray.tasks.pairs import chat_prompt, end_of_turn_id  # noqa: E402

BANDS = [(["+"], (0, 9)), (["+"], (0, 20)), (["+"], (10, 99)), (["-"], (0, 20)), (["*"], (0, 9)), (["*"], (0, 12))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--sample-prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_init(gguf_init("smollm2-135m-instruct", "float32",
                                           args.cache or tempfile.mkdtemp(prefix="bands-")))
    stop = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    print("| operations | operands | problems | greedy accuracy (questions) | replies ended | samples right "
          "| prompts with a right and a wrong sample | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for operations, operands in BANDS:
        started = time.perf_counter()
        cfg = ChatArithmeticConfig(operations=operations, operands=operands)
        problems = all_problems(cfg)
        judged = random.Random(0).sample(problems, min(args.questions, len(problems)))
        replies = greedy_decode(model, tokenizer, [chat_prompt(tokenizer, question(cfg, p)) for p in judged], 48, 64,
                                stop_ids=stop)
        ended = [bool(r) and r[-1] in stop for r in replies]
        right = [e and matches(tokenizer.decode(r[:-1], skip_special_tokens=True), solve(*p))
                 for r, e, p in zip(replies, ended, judged)]
        sampled = judged[:args.sample_prompts]
        rows = sample_rows(model, tokenizer, [chat_prompt(tokenizer, question(cfg, p)) for p in sampled],
                           Sampling(samples_per_prompt=args.samples, temperature=0.8, max_new_tokens=48), stop)
        outcome: dict[int, list[bool]] = {}
        for row in rows:
            outcome.setdefault(row["prompt"], []).append(row["ended"] and matches(row["completion"],
                                                                                  solve(*sampled[row["prompt"]])))
        both = sum(any(v) and not all(v) for v in outcome.values())
        print(f"| {' '.join(operations)} | {operands[0]}–{operands[1]} | {len(problems)} "
              f"| {sum(right) / len(right):.3f} ({len(right)}) | {sum(ended) / len(ended):.2f} "
              f"| {sum(map(sum, outcome.values())) / len(rows):.3f} | {both}/{len(outcome)} "
              f"| {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
