"""Pair datasets from files and the hub code path: formats, validation with counts, splits, chat templates."""

import json

import pandas as pd
import pytest

from spo_ray.config import ConfigError, DataConfig, RunConfig, validate_run
from spo_ray.data import tokenize_pairs
from spo_ray.models import create_small_lm
from spo_ray.tasks import load_task
from spo_ray.tasks.pairs import load_pairs, load_tokenizer, split_by_prompt
from spo_ray.tasks.gsm8k import train_bpe_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def pair(prompt="Q: 2+2?", chosen=" 4", rejected=" 5"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def many_pairs(n=20):
    return [pair(f"Q: {i}+1?", f" {i + 1}", f" {i + 2}") for i in range(n)]


def files_config(path, **data) -> DataConfig:
    return DataConfig(source="files", path=str(path), **data)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"Q: {i}+{j}? {i + j} user assistant" for i in range(30) for j in range(30)]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ------------------------------------------------------------------------------------------- formats

def test_jsonl_csv_and_parquet_give_the_same_pairs(tmp_path):
    rows = many_pairs()
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "pairs.parquet")
    loaded = [load_pairs(files_config(tmp_path / name)) for name in ("pairs.jsonl", "pairs.csv", "pairs.parquet")]
    for train, eval_pairs, report in loaded:
        assert (train, eval_pairs) == loaded[0][:2]
        assert report.rows == 20 and report.train + report.eval == 20
    assert loaded[0][0][0] == pair("Q: 0+1?", " 1", " 2")


def test_columns_map_user_names_onto_prompt_chosen_rejected(tmp_path):
    rows = [{"question": p["prompt"], "good": p["chosen"], "bad": p["rejected"]} for p in many_pairs()]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    train, _, _ = load_pairs(files_config(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"}))
    assert set(train[0]) == {"prompt", "chosen", "rejected"}
    with pytest.raises(ConfigError, match=r"data.columns.reward: unknown key"):
        load_pairs(files_config(path, columns={"reward": "good"}))


def test_hub_path_loads_a_dataset_folder_with_its_splits(tmp_path):
    # `datasets.load_dataset(<id>)` is the hub path; offline it is exercised on a local dataset folder.
    write_jsonl(tmp_path / "train.jsonl", many_pairs(20))
    write_jsonl(tmp_path / "test.jsonl", many_pairs(5))
    train, eval_pairs, report = load_pairs(DataConfig(source="hub", path=str(tmp_path), eval_split="test"))
    assert (len(train), len(eval_pairs)) == (20, 5)
    assert report.sources == [f"{tmp_path}:train", f"{tmp_path}:test"]
    with pytest.raises(ConfigError, match=r"missing column\(s\) 'answer'"):
        load_pairs(DataConfig(source="hub", path=str(tmp_path), columns={"chosen": "answer"}))


# ---------------------------------------------------------------------------------------- validation

def test_missing_columns_name_the_columns_and_the_file(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "answer": "A"}])
    with pytest.raises(ConfigError, match=r"pairs.jsonl line 1: missing column\(s\) 'chosen', 'rejected'"):
        load_pairs(files_config(path))
    pd.DataFrame([{"prompt": "Q", "chosen": "A"}]).to_csv(tmp_path / "pairs.csv", index=False)
    with pytest.raises(ConfigError, match=r"pairs.csv row 1: missing column\(s\) 'rejected'"):
        load_pairs(files_config(tmp_path / "pairs.csv"))


def test_a_non_string_cell_names_its_line_and_column(tmp_path):
    rows = many_pairs(3) + [pair(chosen=4)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n" + json.dumps(rows[3]) + "\n")
    with pytest.raises(ConfigError, match=r"pairs.jsonl line 5 column chosen: expected text .* got int 4"):
        load_pairs(files_config(path))
    pd.DataFrame([pair(), pair(rejected=None)]).to_parquet(tmp_path / "pairs.parquet")
    with pytest.raises(ConfigError, match=r"pairs.parquet row 2 column rejected: .* got NoneType"):
        load_pairs(files_config(tmp_path / "pairs.parquet"))


def test_empty_and_identical_responses_are_dropped_and_counted(tmp_path):
    rows = many_pairs(10) + [pair(chosen=""), pair(rejected="  "), pair(chosen=" 4", rejected=" 4")]
    train, eval_pairs, report = load_pairs(files_config(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    assert (report.rows, report.empty_response, report.identical) == (13, 2, 1)
    assert report.train + report.eval == len(train) + len(eval_pairs) == 10
    assert "13 rows, dropped 2 with an empty response and 1 with chosen == rejected" in report.summary()


def test_a_csv_empty_cell_is_an_empty_response_not_a_bad_cell(tmp_path):
    pd.DataFrame(many_pairs(5) + [pair(chosen="")]).to_csv(tmp_path / "pairs.csv", index=False)
    *_, report = load_pairs(files_config(tmp_path / "pairs.csv"))
    assert report.empty_response == 1


def test_nothing_left_after_filtering_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair(chosen=" 4", rejected=" 4"), pair("Q2", "", " x")])
    with pytest.raises(ConfigError, match=r"pairs.jsonl: no training pairs left after filtering"):
        load_pairs(files_config(path, eval_path=str(path)))


def test_missing_unknown_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere.jsonl: no such file"):
        load_pairs(files_config(tmp_path / "nowhere.jsonl"))
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"pairs.txt: unknown file type '.txt'"):
        load_pairs(files_config(tmp_path / "pairs.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(pair()) + "\n{\"prompt\": \"Q\",\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2: malformed JSON"):
        load_pairs(files_config(bad))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match=r"broken.parquet: cannot read as parquet"):
        load_pairs(files_config(tmp_path / "broken.parquet"))
    with pytest.raises(ConfigError, match=r"data.path: required"):
        load_pairs(DataConfig(source="files"))


def test_truncation_is_counted_by_tokenize_pairs(tmp_path, tokenizer):
    rows = many_pairs(10) + [pair("Q: " + "1+1 " * 40 + "?", " 2", " 3")] * 3
    data_cfg = files_config(write_jsonl(tmp_path / "pairs.jsonl", rows), max_length=16)
    train, eval_pairs, report = load_pairs(data_cfg, tokenizer)
    expected = sum(tokenize_pairs(p, tokenizer, 16)[1].truncated for p in (train, eval_pairs))
    assert report.truncated == expected == 3
    assert "3 truncated to max_length" in report.summary()
    assert load_pairs(data_cfg)[2].truncated is None  # no tokenizer: not counted


# ---------------------------------------------------------------------------------------- splits, caps

def test_the_eval_split_is_seeded_and_by_prompt(tmp_path):
    rows = [pair(f"Q{i % 7}", f" a{i}", f" b{i}") for i in range(40)]  # 7 prompts, several pairs each
    train, eval_pairs = split_by_prompt(rows, 0.3)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in eval_pairs}
    assert len({p["prompt"] for p in eval_pairs}) == 3  # ceil(0.3 × 7)
    assert split_by_prompt(list(reversed(rows)), 0.3)[1] == list(reversed(eval_pairs))  # order-independent
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert load_pairs(files_config(path, eval_fraction=0.3))[:2] == (train, eval_pairs)
    with pytest.raises(ConfigError, match="at least 2 distinct prompts"):
        split_by_prompt([pair(), pair(chosen=" 3")], 0.5)


def test_eval_path_and_caps(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", many_pairs(30))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", many_pairs(12))
    train, eval_pairs, report = load_pairs(files_config(train_path, eval_path=str(eval_path),
                                                        max_train_pairs=10, max_eval_pairs=4))
    assert (len(train), len(eval_pairs)) == (10, 4) == (report.train, report.eval)
    assert train != many_pairs(30)[:10]  # a seeded sample, not the head of the file
    again = load_pairs(files_config(train_path, eval_path=str(eval_path), max_train_pairs=10, max_eval_pairs=4))
    assert again[:2] == (train, eval_pairs)
    with pytest.raises(ConfigError, match="data.eval_split: only for data.source hub"):
        load_pairs(files_config(train_path, eval_split="test"))


# ---------------------------------------------------------------------------------- conversational

def conversation(question, answer):
    return [{"role": "user", "content": question}], [{"role": "assistant", "content": answer}]


def test_messages_are_rendered_with_the_chat_template(tmp_path, tokenizer):
    rows = []
    for i in range(6):
        prompt, chosen = conversation(f"{i}+1?", f"{i + 1}")
        _, rejected = conversation(f"{i}+1?", f"{i + 2}")
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    train, eval_pairs, _ = load_pairs(files_config(path, eval_path=str(path)), tokenizer)
    assert train[0] == {"prompt": "<|user|>0+1?<eos><|assistant|>", "chosen": "1<eos>", "rejected": "2<eos>"}
    # TRL's other layout: chosen and rejected hold the whole conversation, prompt included.
    whole = [{"prompt": r["prompt"], "chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
             for r in rows]
    path = write_jsonl(tmp_path / "whole.jsonl", whole)
    assert load_pairs(files_config(path, eval_path=str(path)), tokenizer)[0] == train
    parquet = tmp_path / "chat.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    assert load_pairs(files_config(parquet, eval_path=str(parquet)), tokenizer)[0] == train


def test_messages_need_a_chat_template_and_consistent_columns(tmp_path, tokenizer):
    prompt, chosen = conversation("1+1?", "2")
    _, rejected = conversation("1+1?", "3")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}] * 2)
    with pytest.raises(ConfigError, match="chat.jsonl line 1: holds chat messages, but the tokenizer has no chat"):
        load_pairs(files_config(path))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "1+1?", "chosen": chosen, "rejected": " 3"}])
    with pytest.raises(ConfigError, match="mixed.jsonl line 1: prompt, chosen and rejected must all be text or"):
        load_pairs(files_config(mixed), tokenizer)
    _, blank = conversation("1+1?", " ")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": blank}])
    with pytest.raises(ConfigError, match=r"empty.jsonl: no training pairs left after filtering \(2 rows, dropped 2 with an empty response"):
        load_pairs(files_config(empty, eval_path=str(empty)), tokenizer)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [{"role": "user"}], "chosen": chosen, "rejected": chosen}])
    with pytest.raises(ConfigError, match="bad.jsonl line 1 column prompt: expected text or a list of"):
        load_pairs(files_config(bad), tokenizer)


# ------------------------------------------------------------------------------------------- the task

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    """A config-created model saved with `save_pretrained`, next to its tokenizer, without a pad token."""
    folder = tmp_path_factory.mktemp("local_model")
    model = create_small_lm(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2,
                            eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    settings = json.loads(config_path.read_text())
    settings.pop("pad_token", None)
    config_path.write_text(json.dumps(settings))
    return folder


def test_load_pair_task_on_local_files_and_a_local_model(tmp_path, saved_model, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", many_pairs(20))
    config = validate_run({"model": {"init": str(saved_model)},
                           "data": {"source": "files", "path": str(path), "eval_fraction": 0.25}}, RunConfig)
    task = load_task(config, cache_dir=str(tmp_path / "cache"))
    assert (len(task.train_pairs), len(task.eval_pairs)) == (15, 5)
    assert task.policy_path == task.reference_path == str(saved_model)
    assert task.evaluate is None and task.name == "files"
    assert task.tokenizer.pad_token == task.tokenizer.eos_token == "<eos>"
    assert "20 rows" in capsys.readouterr().out


def test_load_pair_task_names_bad_model_settings(tmp_path, saved_model):
    path = write_jsonl(tmp_path / "pairs.jsonl", many_pairs(20))
    run = lambda model: load_task(validate_run({"model": model, "data": {"source": "files", "path": str(path)}},
                                                    RunConfig), cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="model.init: 'sft_short' is a built-in init of the arithmetic task"):
        run({})
    with pytest.raises(ConfigError, match=r"model.init: cannot load a tokenizer from '.*no_model'"):
        run({"init": str(tmp_path / "no_model")})
    task = run({"init": str(saved_model), "reference": str(tmp_path)})
    assert task.reference_path == str(tmp_path)


def test_load_tokenizer_sets_pad_to_eos(saved_model):
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(saved_model).pad_token is None
    tokenizer = load_tokenizer(str(saved_model), trust_remote_code=False, key="model.init")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_every_data_source_has_one_task_module():
    from typing import get_args

    from spo_ray.config import DataConfig
    from spo_ray.tasks import SOURCES
    assert set(SOURCES) == set(get_args(DataConfig.model_fields["source"].annotation))
    assert all(callable(module.load_task) for module in SOURCES.values())


def test_retention_answers_are_validated_like_pairs(tmp_path, tokenizer):
    from spo_ray.tasks.pairs import read_retention_examples

    prompt, response = conversation("1+1?", "2")
    rows = [{"prompt": "2+2=", "response": " 4"}, {"prompt": prompt, "response": response}]
    path = write_jsonl(tmp_path / "answers.jsonl", rows)
    text, chat = sorted(read_retention_examples(path, tokenizer, 10), key=lambda e: e["prompt"] != "2+2=")
    assert text == {"prompt": "2+2=", "response": " 4"}
    assert chat["prompt"] + chat["response"] == tokenizer.apply_chat_template(prompt + response, tokenize=False)
    assert len(read_retention_examples(path, tokenizer, 1)) == 1
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "2+2=", "answer": " 4"}])
    with pytest.raises(ConfigError, match="missing.jsonl line 1: missing column"):
        read_retention_examples(missing, tokenizer, 10)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "1+1?", "response": response}])
    with pytest.raises(ConfigError, match="mixed.jsonl line 1: prompt and response must both be text or both"):
        read_retention_examples(mixed, tokenizer, 10)
