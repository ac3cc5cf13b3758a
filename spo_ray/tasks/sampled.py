"""`data.sampled_pairs` on any source that can check answers: the source's prompts, sampled by a model
(default: `model.init`), verified by the source's checker and paired (`spo_ray.sampling`).

A source that can check answers puts a `SamplingSource` on its Task (training and held-out prompts with
their answers, the checker, how a reply renders): the built-in arithmetic task, chat arithmetic and GSM8K
do; files and hub datasets do when their rows carry an `answer` column. Asking another source for sampled
pairs is bad input (exit 2).

The samples of one (sampler weights, prompts, sampling settings, seed) are one table (`SamplingJob.key`),
stored in the shared cache beside the inits (`spo_ray.sampling.samples_dir`). A sweep's driver samples every table before its first trial
(`spo_ray.sweep.prepare_samples`, spread over the cluster by `spo_ray.distributed.sample_on_cluster`);
a trial, or `python -m spo_ray.train`, reads it — or samples it in-process where it is missing, under the
build lock, so one process samples each table. The pairs are built from the table each time (cheap): the
same table serves any `pairs_per_prompt` and `gold_fallback`.

`model.sft_steps > 0` adds a second kind of init: `model.init` after a short SFT on its own correct samples
of the training prompts (`sft_on_samples`; built once into the init cache, under the build lock).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spo_ray import storage
from spo_ray.config import ConfigError, ModelConfig, RunConfig, to_plain
from spo_ray.decoding import encode_prompts
from spo_ray.engines import VllmEngine, resolve_engine, vllm_rows
from spo_ray.models import cached_init, load_causal_lm, save_to_cache, train_on_responses
from spo_ray.reference import model_identity
from spo_ray.results import write_csv
from spo_ray.sampling import (SamplePrompt, Sampling, build_pairs, cached_samples, generation_figures, no_pairs_message,
                              sample_rows, sampler_figures, samples_key, table_path)
from spo_ray.tasks.pairs import PairReport, cap, finish_splits
from spo_ray.tasks.task import Task

SFT_VERSION = 1  # bump when sft_on_samples changes what it writes


@dataclass
class SamplingJob:
    """One table to sample: everything a process (here or a Ray worker) needs to generate it."""
    key: str
    sampler_path: str
    model: ModelConfig            # dtype and attention of the sampler; no LoRA, no checkpointing
    tokenizer: object
    prompts: list[SamplePrompt]   # the training prompts, then the held-out ones
    train_prompts: int
    sampling: Sampling
    stop_ids: set[int]

    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    def load_sampler(self, device: torch.device | str = "cpu"):
        return load_causal_lm(self.sampler_path, self.model, device=device)

    def generate(self, progress: bool = False, batch_numbers: list[int] | None = None) -> tuple[list[dict], dict]:
        """Sample (all batches, or those numbered) in this process, on a GPU where there is one."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        started = time.perf_counter()
        sampler = JobSampler(self, device)
        try:
            rows = sampler.rows(batch_numbers, progress)
        finally:
            sampler.close()
        return rows, generation_figures(rows, time.perf_counter() - started, workers=1, engine=self.sampling.engine)


class JobSampler:
    """A job's engine started once on a device (`spo_ray.engines`): spo-ray's decoder on the sampler model
    loaded here, or a vLLM engine on the sampler's folder; `rows(batch numbers)` gives their table rows."""

    def __init__(self, job: SamplingJob, device: torch.device):
        self.job = job
        self.engine = self.model = None
        if job.sampling.engine == "vllm":
            self.prompt_ids = encode_prompts(job.tokenizer, job.texts())  # once: a Ray sampler asks batch by batch
            self.engine = VllmEngine(job.sampler_path, job.model.dtype, job.sampling.seed,
                                     max(map(len, self.prompt_ids)) + job.sampling.max_new_tokens, device.type)
        else:
            self.model = job.load_sampler(device)

    def rows(self, batch_numbers: list[int] | None = None, progress: bool = False) -> list[dict]:
        job = self.job
        if self.engine is not None:
            return vllm_rows(self.engine, job.tokenizer, self.prompt_ids, job.sampling, job.stop_ids, batch_numbers)
        return sample_rows(self.model, job.tokenizer, job.texts(), job.sampling, job.stop_ids, batch_numbers,
                           progress=progress)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def sampling_settings(config: RunConfig) -> Sampling:
    spec = config.data.sampled_pairs
    return Sampling(samples_per_prompt=spec.samples_per_prompt, temperature=spec.temperature, top_p=spec.top_p,
                    max_new_tokens=spec.max_new_tokens, seed=spec.seed, batch_tokens=spec.batch_tokens,
                    engine=resolve_engine(spec.engine, torch.cuda.is_available()))


def sampling_job(task: Task, config: RunConfig, sampler_path: str) -> SamplingJob:
    """The table `config` asks of `task`'s prompts (bad input where the source cannot check answers)."""
    spec = config.data.sampled_pairs
    if task.sampling is None:
        raise ConfigError(f"data.sampled_pairs: data.source {config.data.source} has no answers to check samples "
                          f"against (chat_arithmetic, arithmetic and gsm8k have; files and hub need an answer column)")
    train = task.sampling.train[:spec.prompts] if spec.prompts else task.sampling.train
    prompts = train + task.sampling.eval[:spec.eval_prompts]
    sampling = sampling_settings(config)
    key = samples_key(model_identity(sampler_path), prompts, sampling, task.sampling.stop_ids)
    model = config.model.model_copy(update={"lora": None, "gradient_checkpointing": False})
    return SamplingJob(key=key, sampler_path=sampler_path, model=model, tokenizer=task.tokenizer, prompts=prompts,
                       train_prompts=len(train), sampling=sampling, stop_ids=set(task.sampling.stop_ids))


def round_sampling_job(task: Task, config: RunConfig, sampler_path: str, round_number: int) -> SamplingJob:
    """The table round `round_number` > 1 of self-training (`spo_ray.rounds`) samples from `sampler_path`, the
    policy as the round before left it: the training prompts only (the held-out pairs stay round 1's, one
    yardstick for every round) — round 1's prompts again, or with `fresh_prompts` the next slice of the pool —
    at the round's own seed (`seed` + round − 1), keyed by those weights like any table."""
    spec = config.data.sampled_pairs
    pool = task.sampling.train
    count = spec.prompts or len(pool)
    first = (round_number - 1) * count if spec.fresh_prompts else 0
    prompts = pool[first:first + count]
    if spec.fresh_prompts and len(prompts) < count:  # without fresh prompts, round 1's (as many as there are)
        raise ConfigError(f"data.sampled_pairs.fresh_prompts: {spec.rounds} rounds of {count} new prompts need "
                          f"{spec.rounds * count} training prompts; the source has {len(pool)} (lower "
                          f"data.sampled_pairs.prompts or rounds, or turn fresh_prompts off)")
    sampling = dataclasses.replace(sampling_settings(config), seed=spec.seed + round_number - 1)
    key = samples_key(model_identity(sampler_path), prompts, sampling, task.sampling.stop_ids)
    model = config.model.model_copy(update={"lora": None, "gradient_checkpointing": False})
    return SamplingJob(key=key, sampler_path=sampler_path, model=model, tokenizer=task.tokenizer, prompts=prompts,
                       train_prompts=len(prompts), sampling=sampling, stop_ids=set(task.sampling.stop_ids))


def round_pairs(task: Task, config: RunConfig, job: SamplingJob, samples_dir: str, progress: bool = False
                ) -> tuple[list[dict], dict[str, float], list[dict]]:
    """(training pairs, `sampler/*` figures, per-prompt counts) of a round's table: read from `samples_dir`, or
    sampled here under the build lock (a resumed trial never samples a round twice). No pairs is not an error
    here: the round layer ends the trial's rounds with the counts as its reason."""
    spec, source = config.data.sampled_pairs, task.sampling
    rows, generation, hit = cached_samples(samples_dir, job.key, lambda: job.generate(progress))
    print(f"round samples ({len(job.prompts)} prompts × {job.sampling.samples_per_prompt} samples): "
          f"{'read from' if hit else 'sampled into'} {table_path(samples_dir, job.key)}")
    pairs, counts = build_pairs(job.prompts, rows, source.check, source.response_text, spec.pairs_per_prompt,
                                spec.gold_fallback)
    keep_prompt_counts(samples_dir, job, config, {"train": (pairs, counts)})
    metrics = {**sampler_figures(counts, generation), "sampler/eval_pairs": task.metrics.get("sampler/eval_pairs",
                                                                                             math.nan)}
    return cap(pairs, config.data.max_train_pairs), metrics, counts


def sides(job: SamplingJob, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The table's rows of the training prompts and of the held-out ones (renumbered from 0)."""
    train = [r for r in rows if r["prompt"] < job.train_prompts]
    held = [{**r, "prompt": r["prompt"] - job.train_prompts} for r in rows if r["prompt"] >= job.train_prompts]
    return train, held


def with_sampled_pairs(task: Task, config: RunConfig, job: SamplingJob, samples_dir: str, cache_dir: str,
                       progress: bool = False) -> Task:
    """`task` with its pairs replaced by sampled ones (read from `samples_dir`, or sampled here), the
    `sampler/*` figures as its metrics, and the SFT-on-samples init where `model.sft_steps` asks."""
    spec, source = config.data.sampled_pairs, task.sampling
    rows, generation, hit = cached_samples(samples_dir, job.key, lambda: job.generate(progress))
    print(f"sampled pairs ({len(job.prompts)} prompts × {job.sampling.samples_per_prompt} samples): "
          f"{'read from' if hit else 'sampled into'} {table_path(samples_dir, job.key)}")
    train_rows, eval_rows = sides(job, rows)
    made = {}
    for side, prompts, side_rows in (("train", job.prompts[:job.train_prompts], train_rows),
                                     ("eval", job.prompts[job.train_prompts:], eval_rows)):
        pairs, counts = build_pairs(prompts, side_rows, source.check, source.response_text, spec.pairs_per_prompt,
                                    spec.gold_fallback)
        if not pairs:
            where = "data.sampled_pairs" if side == "train" else "data.sampled_pairs.eval_prompts (held-out prompts)"
            raise ConfigError(no_pairs_message(where, counts))
        made[side] = pairs, counts
    keep_prompt_counts(samples_dir, job, config, made)
    report = PairReport(sources=[f"samples-{job.key}"], rows=len(made["train"][0]) + len(made["eval"][0]))
    train_pairs, eval_pairs, report = finish_splits(made["train"][0], made["eval"][0], config.data, task.tokenizer,
                                                    report)
    metrics = {**sampler_figures(made["train"][1], generation), "sampler/eval_pairs": float(len(made["eval"][0]))}
    policy_path, reference_path = task.policy_path, task.reference_path
    if config.model.sft_steps:
        policy_path = str(sft_on_samples(task, config, job, train_rows, cache_dir, progress))
        reference_path = reference_path if config.model.reference else policy_path
    return dataclasses.replace(task, train_pairs=train_pairs, eval_pairs=eval_pairs, policy_path=policy_path,
                               reference_path=reference_path, metrics={**task.metrics, **metrics},
                               notes=task.notes + [report.summary()])


def keep_prompt_counts(samples_dir: str, job: SamplingJob, config: RunConfig, made: dict) -> None:
    """Each prompt's counts (samples, ended, correct, pairs, gold used) as a CSV beside the table, once per
    pairing rule."""
    spec = config.data.sampled_pairs
    location = storage.join(samples_dir, f"samples-{job.key}-k{spec.pairs_per_prompt}"
                                         f"{'-gold' if spec.gold_fallback else ''}.csv")
    if storage.exists(location):
        return
    import pandas as pd
    frame = pd.DataFrame([{"split": side, "answer": str(job.prompts[c["prompt"] + offset].answer), **c}
                          for side, offset in (("train", 0), ("eval", job.train_prompts)) if side in made
                          for c in made[side][1]])
    write_csv(frame, location)


def sft_examples(task: Task, job: SamplingJob, train_rows: list[dict]) -> list[dict]:
    """The sampler's distinct correct, finished answers to the training prompts, as SFT examples."""
    examples = {}
    for row in train_rows:
        prompt = job.prompts[row["prompt"]]
        if row["ended"] and task.sampling.check(row["completion"], prompt.answer):
            response = task.sampling.response_text(prompt, row["completion"])
            examples[(prompt.text, response)] = {"prompt": prompt.text, "response": response}
    return list(examples.values())


def sft_on_samples(task: Task, config: RunConfig, job: SamplingJob, train_rows: list[dict], cache_dir: str,
                   progress: bool = False) -> Path:
    """`model.init` after `model.sft_steps` of SFT on its own correct samples (`sft_examples`), built once
    into `cache_dir` under a key of the init's weights, the sample table and the SFT settings."""
    model_cfg = config.model
    settings = {"steps": model_cfg.sft_steps, "learning_rate": model_cfg.sft_learning_rate,
                "batch_size": model_cfg.sft_batch_size, "seed": config.data.sampled_pairs.seed}
    description = [model_identity(task.policy_path), job.key, settings, to_plain(model_cfg)["dtype"], SFT_VERSION]
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"{Path(str(task.policy_path)).name}-sft-{key}"
    with cached_init(target) as found:
        if found:
            return target
        examples = sft_examples(task, job, train_rows)
        if not examples:
            raise ConfigError(f"model.sft_steps: the sampler got none of the {job.train_prompts} training prompts "
                              f"right, so there is nothing to fine-tune on")
        started = time.perf_counter()
        model = load_causal_lm(task.policy_path, model_cfg.model_copy(update={"lora": None}))
        losses = train_on_responses(model, task.tokenizer, examples, model_cfg.sft_steps, seed=settings["seed"],
                                    progress=progress, description="sft on own samples",
                                    learning_rate=settings["learning_rate"], batch_size=settings["batch_size"])
        info = {"name": f"{config.model.init} + sft on own samples", "base": str(task.policy_path),
                "samples": job.key, **settings, "examples": len(examples),
                "final_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
                "train_seconds": round(time.perf_counter() - started, 1), "version": SFT_VERSION}
        print(f"init {target.name}: {len(examples)} correct samples, {model_cfg.sft_steps} SFT steps")
        return save_to_cache(model, task.tokenizer, info, target)
