"""Self-training in rounds (spo_ray.rounds) on the built-in task: each round samples the policy the last one
left, the reference follows it under `previous`, and a killed trial resumes in its round without sampling again."""

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import assert_as_accurate_as_float32, tiny_run
from spo_ray import rounds
from spo_ray.config import ConfigError, validate_run
from spo_ray.data import PairDataset, collate_pairs, tokenize_pairs
from spo_ray.logprobs import concatenated_forward
from spo_ray.models import load_causal_lm
from spo_ray.reference import dataset_fingerprint, fingerprint, model_identity, read_table, table_path
from spo_ray.rounds import START_KEY, STOPPED_KEY, train_in_rounds, weights_key
from spo_ray.sampling import build_pairs, read_samples, sample_rows, samples_dir, samples_key
from spo_ray.tasks import load_task
from spo_ray.tasks import sampled as sampled_module

STEPS = 3  # per round


def rounds_run(**sampled):
    sampled = {"samples_per_prompt": 4, "prompts": 24, "eval_prompts": 8, "temperature": 1.0, "max_new_tokens": 4,
               "rounds": 2, "steps_per_round": STEPS, "reference_update": "previous", **sampled}
    return validate_run(tiny_run(data={"sampled_pairs": sampled},
                                 train={"checkpoint_every": 1, "eval_every": STEPS, "probe_every": STEPS}))


def run(config, cache, reference_dir, resume=None, stop_after=None):
    """(rows, checkpoint states) of a run; `stop_after` raises after reporting that step (a killed trial)."""
    rows, states = [], []

    def report(row, state):
        rows.append(row)
        if state is not None:
            states.append(copy.deepcopy(state))
        if stop_after is not None and row["step"] == stop_after:
            raise KeyboardInterrupt("killed")
    try:
        train_in_rounds(config, cache_dir=str(cache), reference_dir=str(reference_dir), report=report, resume=resume)
    except KeyboardInterrupt:
        pass
    return rows, states


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """One uninterrupted 2-round run (reference_update: previous), its cache and rows."""
    base = tmp_path_factory.mktemp("rounds")
    cache = base / "cache"
    config = rounds_run()
    rows, states = run(config, cache, base / "ref")
    return config, cache, base / "ref", rows, states


def round_two_table(config, cache, state):
    """Round 2's sample table, found by the key of the weights round 1 ended with."""
    folder = Path(cache) / "rounds" / f"round-{weights_key(state['model'])}"
    task = load_task(config, str(cache), samples_dir=samples_dir(str(cache)))
    job = sampled_module.round_sampling_job(task, config, str(folder), 2)
    assert job.key == samples_key(model_identity(str(folder)), task.sampling.train[:24],
                                  job.sampling, task.sampling.stop_ids)
    return folder, task, job, read_samples(sampled_module.table_path(samples_dir(str(cache)), job.key))


def test_rows_carry_their_round_and_steps_run_on_from_round_to_round(two_rounds):
    _, _, _, rows, states = two_rounds
    assert [(r["step"], r["round"]) for r in rows] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert [s["step"] for s in states] == [1, 2, 3, 4, 5, 6]
    walls = [r["wall_time_s"] for r in rows]
    assert walls == sorted(walls)  # the trial's time, not the round's: it runs on across the round boundary
    assert [s[START_KEY] for s in states[:3]] == ["", "", ""]  # round 1 starts from the init
    assert all(s[START_KEY] == f"round-{weights_key(states[2]['model'])}" for s in states[3:])
    assert rows[5]["sampler/samples"] == 24 * 4 and "eval/chosen_logp_delta" in rows[5]


def test_round_two_is_sampled_from_round_ones_final_weights_not_the_init(two_rounds):
    config, cache, _, rows, states = two_rounds
    folder, task, job, table = round_two_table(config, cache, states[2])
    assert table is not None, "round 2's table is not stored under the key of round 1's final weights"
    # round 2's rows report that table's figures
    pairs, counts = build_pairs(job.prompts, table[0], task.sampling.check, task.sampling.response_text, 4, True)
    assert rows[5]["sampler/pairs"] == len(pairs) == sum(c["pairs"] for c in counts)
    assert rows[5]["sampler/sample_accuracy"] == sum(c["correct"] for c in counts) / 96
    assert job.sampling.seed == config.data.sampled_pairs.seed + 1
    # Sampling again from the checkpoint's weights reproduces the stored table; the init's weights do not.
    policy = load_causal_lm(task.policy_path, config.model)
    policy.load_state_dict(states[2]["model"])
    again = sample_rows(policy, task.tokenizer, job.texts(), job.sampling, job.stop_ids)
    assert [r["completion"] for r in again] == [r["completion"] for r in table[0]]
    init = load_causal_lm(task.policy_path, config.model)
    from_init = sample_rows(init, task.tokenizer, job.texts(), job.sampling, job.stop_ids)
    assert [r["completion"] for r in from_init] != [r["completion"] for r in table[0]]


def test_a_policy_whose_outputs_we_control_is_what_round_two_samples(tmp_path, init_cache, monkeypatch):
    """Round 1 hands on weights whose final norm is zero: every next-token distribution is uniform over the
    vocabulary, so round 2's samples must be uniform characters, unlike anything the init says."""
    real_train = rounds.train

    def zeroing_train(config, report=None, **kwargs):
        def zeroed(row, state):
            if state is not None:
                state = {**state, "model": {**state["model"], "model.norm.weight":
                                            torch.zeros_like(state["model"]["model.norm.weight"])}}
            report(row, state)
        return real_train(config, report=zeroed, **kwargs)
    monkeypatch.setattr(rounds, "train", zeroing_train)
    config = rounds_run(max_new_tokens=8)
    rows, states = run(config, init_cache, tmp_path / "ref")
    assert rows[-1]["round"] == 2
    _, task, _, (table, _) = round_two_table(config, init_cache, states[2])
    vocab = len(task.tokenizer)
    tokens = [t for r in table for t in task.tokenizer(r["completion"], add_special_tokens=False)["input_ids"]]
    # Uniform draws: P(ended within 8 tokens) = 1 - (1 - s/V)^8 for s stop tokens; the mean id is (V - 1) / 2.
    stops = len(task.sampling.stop_ids)
    ended = sum(r["ended"] for r in table) / len(table)
    expected_ended = 1 - (1 - stops / vocab) ** 8
    assert abs(ended - expected_ended) < 4 * (expected_ended * (1 - expected_ended) / len(table)) ** 0.5 + 0.02
    distinct = len(set(tokens))
    assert distinct > 0.8 * vocab, f"{distinct} distinct tokens of {vocab}: not a uniform policy"


def test_previous_reference_is_round_ones_final_policy_to_float64_accuracy(two_rounds):
    config, cache, reference_dir, _, states = two_rounds
    folder, task, _, _ = round_two_table(config, cache, states[2])
    round_two, stopped = rounds.round_task(task, config, str(folder), 2, str(cache))
    assert stopped is None and round_two.reference_path == str(folder) == round_two.policy_path
    pairs, _ = tokenize_pairs(round_two.train_pairs, task.tokenizer, config.data.max_length)
    data = PairDataset(pairs)
    key = fingerprint(model_identity(str(folder)), dataset_fingerprint(data), "train")
    table = read_table(table_path(str(reference_dir), key), len(data))
    assert table is not None, "round 2's reference table is not keyed by round 1's final weights"
    plain = load_causal_lm(task.policy_path, config.model)
    plain.load_state_dict(states[2]["model"])
    model64 = copy.deepcopy(plain).double()
    pad = task.tokenizer.pad_token_id
    for i in range(0, len(data), 16):
        batch = collate_pairs([data[j] for j in range(i, min(i + 16, len(data)))], pad)
        with torch.no_grad():
            exact, own = concatenated_forward(model64, batch), concatenated_forward(plain, batch)
        for name in ("chosen_logps", "rejected_logps"):
            assert_as_accurate_as_float32(table[name][i:i + 16], own[name], exact[name], f"{name}[{i}:]")


def test_fixed_reference_keeps_the_init_for_every_round(two_rounds):
    config, cache, _, _, states = two_rounds
    fixed = config.model_copy(update={"data": config.data.model_copy(update={
        "sampled_pairs": config.data.sampled_pairs.model_copy(update={"reference_update": "fixed"})})})
    folder, task, _, _ = round_two_table(fixed, cache, states[2])
    round_two, _ = rounds.round_task(task, fixed, str(folder), 2, str(cache))
    assert round_two.policy_path == str(folder) and round_two.reference_path == task.reference_path != str(folder)


def test_a_trial_killed_in_round_two_resumes_there_without_sampling_again(two_rounds, tmp_path, monkeypatch):
    config, cache, _, rows, states = two_rounds
    # The uninterrupted run's cache already holds both rounds' tables; a resumed trial must read them.
    killed_rows, killed_states = run(config, cache, tmp_path / "ref", stop_after=4)
    assert killed_states[-1]["step"] == 4 and killed_rows[-1]["round"] == 2
    monkeypatch.setattr(sampled_module.SamplingJob, "generate",
                        lambda self, *a, **k: pytest.fail("a resumed trial sampled a round again"))
    resumed_rows, _ = run(config, cache, tmp_path / "ref", resume=killed_states[-1])
    assert [(r["step"], r["round"]) for r in resumed_rows] == [(5, 2), (6, 2)]
    for resumed, uninterrupted in zip(resumed_rows, rows[4:]):
        for key, value in uninterrupted.items():
            if key.startswith(("eval/", "train/loss", "sampler/pairs")):
                assert resumed[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # Killed right at the round boundary: the next round starts from the checkpoint, its table read back.
    boundary_rows, _ = run(config, cache, tmp_path / "ref", resume=states[2])
    assert [(r["step"], r["round"]) for r in boundary_rows] == [(4, 2), (5, 2), (6, 2)]
    assert boundary_rows[-1]["eval/chosen_logp_delta"] == pytest.approx(rows[-1]["eval/chosen_logp_delta"], rel=1e-5)


def test_the_same_seed_gives_the_same_rounds(two_rounds, tmp_path, init_cache):
    config, cache, _, rows, states = two_rounds
    again_cache = tmp_path / "cache"
    again_rows, again_states = run(config, again_cache, tmp_path / "ref")
    assert weights_key(again_states[2]["model"]) == weights_key(states[2]["model"])
    first, second = round_two_table(config, cache, states[2])[3], round_two_table(config, again_cache, states[2])[3]
    assert first[0] == second[0]
    assert [r["eval/chosen_logp_delta"] for r in again_rows if "eval/chosen_logp_delta" in r] == \
        [r["eval/chosen_logp_delta"] for r in rows if "eval/chosen_logp_delta" in r]


def learning_rates(tmp_path, init_cache, keep: bool) -> list[float]:
    config = validate_run(tiny_run(
        data={"sampled_pairs": {"samples_per_prompt": 4, "prompts": 24, "eval_prompts": 8, "max_new_tokens": 4,
                                "rounds": 2, "steps_per_round": 4,
                                "optimizer_per_round": "keep" if keep else "reset"}},
        train={"log_every": 1, "eval_every": 4, "probe_every": 4, "warmup_steps": 2, "lr_schedule": "linear",
               "learning_rate": 1e-3}))
    rows, states = run(config, init_cache, tmp_path / ("keep" if keep else "reset"))
    return [r["train/learning_rate"] for r in rows if "train/learning_rate" in r], states


def test_reset_restarts_adamw_and_the_warm_up_each_round_keep_carries_them_over(tmp_path, init_cache):
    reset, reset_states = learning_rates(tmp_path, init_cache, keep=False)
    # warm-up 2 then linear decay to 0 over each round's 4 steps: factors 1/2, 1, (1 - 0/2), (1 - 1/2)
    assert reset == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4] * 2)
    keep, keep_states = learning_rates(tmp_path, init_cache, keep=True)
    # one schedule over all 8 steps: 1/2, 1, then 1 - k/6 for k = 0..5
    assert keep == pytest.approx([5e-4, 1e-3] + [1e-3 * (1 - k / 6) for k in range(6)])
    # AdamW's step count at the end of round 2: its 4 steps under reset, all 8 under keep
    assert [int(s["optimizer"]["state"][0]["step"]) for s in reset_states] == [4, 4]
    assert [int(s["optimizer"]["state"][0]["step"]) for s in keep_states] == [4, 8]


def test_a_round_without_pairs_ends_the_rounds_with_its_reason(tmp_path, init_cache, monkeypatch):
    counts = [{"prompt": i, "samples": 4, "correct": 4, "ended": 4, "pairs": 0, "gold": False} for i in range(24)]
    monkeypatch.setattr(rounds, "round_pairs", lambda *a, **k: ([], {"sampler/pairs": 0.0}, counts))
    config = rounds_run(rounds=3)
    rows, _ = run(config, init_cache, tmp_path / "ref")
    assert [r["step"] for r in rows] == [1, 2, 3, 3]  # round 1's last row again, with the reason
    assert rows[-1][STOPPED_KEY] == ("round 2: the sampler gave no pairs: 96 of 96 samples correct over 24 prompts "
                                     "(24 prompts always right, 0 never right); a pair needs a right and a wrong "
                                     "answer to one prompt (change the sampler, temperature or prompts, or turn on "
                                     "gold_fallback)")
    assert rows[-1]["round"] == 1 and rows[-1]["eval/chosen_logp_delta"] == rows[-2]["eval/chosen_logp_delta"]


@pytest.mark.parametrize("override, message", [
    ({"data": {"sampled_pairs": {"rounds": 2, "optimizer_per_round": "keep"}}, "model": {"lora": {"r": 4}}},
     "data.sampled_pairs.optimizer_per_round: keep cannot carry LoRA's optimizer state"),
    ({"data": {"sampled_pairs": {"rounds": 2}}, "scaling": {"num_workers": 2, "strategy": "fsdp"}},
     "data.sampled_pairs.rounds: rounds cannot run with scaling.strategy: fsdp"),
    ({"data": {"sampled_pairs": {"rounds": 2}}, "tune": {"scheduler": "pbt", "perturbation_interval": 2,
                                                         "mutations": {"loss.beta": {"uniform": [0.1, 0.2]}}}},
     "data.sampled_pairs.rounds: rounds cannot run under tune.scheduler: pbt"),
    ({"data": {"sampled_pairs": {"steps_per_round": 3}}}, "data.sampled_pairs.steps_per_round: needs "),
    ({"data": {"sampled_pairs": {"rounds": 0}}}, "data.sampled_pairs.rounds: input should be greater than or equal"),
    ({"data": {"sampled_pairs": {"reference_update": "last"}}}, "data.sampled_pairs.reference_update: input should be"),
])
def test_rounds_that_cannot_run_are_one_line_naming_the_key(override, message):
    raw = tiny_run(**override)
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        validate_run(raw)


def test_fresh_prompts_take_the_next_slice_and_too_few_is_bad_input(init_cache):
    config = rounds_run(fresh_prompts=True, prompts=40, rounds=3)
    task = load_task(config, init_cache)
    first = sampled_module.round_sampling_job(task, config, task.policy_path, 2)
    assert [p.text for p in first.prompts] == [p.text for p in task.sampling.train[40:80]]
    pool = len(task.sampling.train)
    too_many = rounds_run(fresh_prompts=True, prompts=pool // 2 + 1, rounds=2)
    with pytest.raises(ConfigError, match=rf"^data\.sampled_pairs\.fresh_prompts: 2 rounds of {pool // 2 + 1} new "
                                          rf"prompts need {2 * (pool // 2 + 1)} training prompts; the source has {pool}"):
        rounds.check_prompt_pool(task, too_many)


def test_one_round_is_the_trainer_itself(tmp_path, init_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(rounds, "train", lambda config, **kwargs: calls.append(kwargs) or {"step": 6})
    config = validate_run(tiny_run())
    assert train_in_rounds(config, cache_dir=init_cache) == {"step": 6} and "task" not in calls[0]


def _ddp_worker(rank, world_size, raw, cache_dir, reference_dir, out_dir):
    """One DDP worker of a 2-round run: its rows and each checkpoint's round start, saved per rank."""
    import os

    from torch.nn.parallel import DistributedDataParallel

    from spo_ray.trainer import WorkerContext
    os.environ["WANDB_MODE"] = "disabled"
    rows, starts = [], []

    def report(row, state):
        rows.append({k: v for k, v in row.items() if isinstance(v, (int, float, str))})
        if state is not None:
            starts.append((row["step"], state[START_KEY], weights_key(state["model"])))
    train_in_rounds(validate_run(raw).run_config(), cache_dir=cache_dir, reference_dir=reference_dir,
                    report=report, context=WorkerContext(rank=rank, world_size=world_size),
                    wrap_model=DistributedDataParallel)
    torch.save({"rows": rows, "starts": starts}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_workers_start_each_round_from_the_same_weights_and_sample_it_once(tmp_path):
    from conftest import run_gloo_workers
    raw = tiny_run(data={"sampled_pairs": {"samples_per_prompt": 4, "prompts": 24, "eval_prompts": 8,
                                           "max_new_tokens": 4, "rounds": 2, "steps_per_round": 3,
                                           "reference_update": "previous"}},
                   train={"eval_every": 3, "probe_every": 3})
    cache = tmp_path / "cache"
    load_task(validate_run(raw), str(cache))  # the init, built before the workers start (as a sweep's driver does)
    run_gloo_workers(_ddp_worker, (raw, str(cache), str(tmp_path / "ref"), str(tmp_path)), tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["starts"] == ranks[1]["starts"]  # the replicas' weights hash alike at every checkpoint
    (_, _, end_of_round_one), (_, start_of_round_two, _) = ranks[0]["starts"]
    assert start_of_round_two == f"round-{end_of_round_one}"
    assert [p.name for p in (cache / "rounds").iterdir() if not p.name.startswith(".")] == [start_of_round_two]
    assert len(list((cache / "samples").glob("samples-*.parquet"))) == 2  # round 1's and round 2's, once each
    assert [(r["step"], r["round"]) for r in ranks[0]["rows"]] == [(3, 1), (6, 2)]


def test_lora_rounds_merge_the_adapters_into_the_next_rounds_start(tmp_path, init_cache):
    config = validate_run(tiny_run(model={"lora": {"r": 4, "alpha": 8}},
                                   data={"sampled_pairs": {"samples_per_prompt": 4, "prompts": 24, "eval_prompts": 8,
                                                           "max_new_tokens": 4, "rounds": 2, "steps_per_round": 3}},
                                   train={"eval_every": 3, "probe_every": 3, "learning_rate": 1e-2}))
    rows, states = run(config, init_cache, tmp_path / "ref")
    assert [r["round"] for r in rows] == [1, 2]
    folder = Path(init_cache) / "rounds" / states[1][START_KEY]
    task = load_task(config, init_cache)
    peft_model = load_causal_lm(task.policy_path, config.model)
    peft_model.load_state_dict(states[0]["model"])  # the policy as round 1 ended
    merged = load_causal_lm(folder, config.model.model_copy(update={"lora": None}))
    assert not hasattr(merged, "peft_config")
    ids = torch.tensor([task.tokenizer("Q: 12+34=?\nA:")["input_ids"]])
    with torch.no_grad():
        adapted, plain = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
        base = load_causal_lm(task.policy_path, config.model.model_copy(update={"lora": None}))(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3  # round 1 did move the adapters
    scale = adapted.abs().max()
    assert (adapted - plain).abs().max() <= 64 * torch.finfo(torch.float32).eps * scale  # merging is exact up to rounding


def test_a_run_in_rounds_takes_rounds_times_steps_per_round_steps_and_asha_counts_them_all(tmp_path):
    from spo_ray.config import total_steps
    assert total_steps(validate_run(tiny_run())) == 6
    assert total_steps(rounds_run(rounds=3)) == 9  # 3 rounds × steps_per_round 3
    assert total_steps(validate_run(tiny_run(data={"sampled_pairs": {"rounds": 2}}))) == 12  # default: max_steps each
    from spo_ray.sweep import build_tuner
    raw = tiny_run(data={"sampled_pairs": {"rounds": 2}}, tune={"scheduler": "asha"}, storage_path=str(tmp_path))
    sweep = validate_run(raw)
    tuner = build_tuner(raw, sweep, {}, str(tmp_path / "sweep"), resume=False)
    assert tuner._local_tuner._tune_config.scheduler._max_t == 12


def test_rounds_with_the_step_in_the_backward_train_as_the_plain_step(tmp_path):
    """Each round's trainer builds its own optimizer stepping in the backward, and round 2 takes over round 1's AdamW
    state (`optimizer_per_round: keep`) from a checkpoint in a plain optimizer's format: the rounds train exactly
    as the plain optimizer's do."""
    histories = []
    for in_backward in (False, True):
        sampled = {"samples_per_prompt": 4, "prompts": 24, "eval_prompts": 8, "temperature": 1.0, "max_new_tokens": 4,
                   "rounds": 2, "steps_per_round": STEPS, "reference_update": "previous", "optimizer_per_round": "keep"}
        config = validate_run(tiny_run(data={"sampled_pairs": sampled},
                                       train={"eval_every": STEPS, "probe_every": STEPS, "max_grad_norm": None,
                                              "optim": "adamw_torch_fused", "optimizer_in_backward": in_backward}))
        rows, _ = run(config, tmp_path / f"cache-{in_backward}", tmp_path / f"ref-{in_backward}")
        histories.append(rows)
    plain, hooked = histories
    assert [r["step"] for r in hooked] == [r["step"] for r in plain] == [3, 6]  # the end of each round
    for before, after in zip(plain, hooked):
        for key in ("train/loss", "train/chosen_logps", "eval/loss"):
            if key in before:
                assert after[key] == before[key], (before["step"], key)
