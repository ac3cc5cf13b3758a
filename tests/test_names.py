"""Every name a user types names something that exists (issue 45, part 6): a metric, a key to schedule or
mutate, a searched key, a built-in init. Each is one line naming the key, the value and the nearest valid
names, before any trial starts; a metric the config alone cannot judge stops the sweep at its first report."""

from __future__ import annotations

import signal

import pytest
import torch

from spo_ray.config import (EVALUATOR_METRICS, LOSS_METRICS, ConfigError, missing_metric, validate_run,
                            validate_sweep)
from spo_ray.losses import BASE_LOSSES, NOT_WRAPPABLE, preference_loss


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_sweep(raw)
    return str(caught.value)


@pytest.mark.parametrize("metric, message", [
    ("eval/acuracy", "tune.metric: 'eval/acuracy' is not a metric the trials report (did you mean 'eval/accuracy'"),
    ("accuracy", "tune.metric: 'accuracy' is not a metric the trials report (did you mean 'eval/accuracy'?)"),
    ("probe/grad_cosin", "(did you mean 'probe/grad_cosine'"),
])
def test_a_mistyped_tune_metric_is_refused_with_the_nearest_names(metric, message):
    assert message in error_of({"tune": {"metric": metric}})


@pytest.mark.parametrize("raw, message", [
    ({"tune": {"metric": "eval/mass_correct"}, "data": {"source": "gsm8k"}},
     "tune.metric: 'eval/mass_correct' is reported only with data.source arithmetic, not by every trial"),
    ({"tune": {"metric": "sampler/pairs"}}, "tune.metric: 'sampler/pairs' is reported only with data.sampled_pairs"),
    ({"tune": {"metric": "eval/accuracy"}, "data": {"source": "files", "path": "pairs.jsonl"}},
     "only with data.source arithmetic or chat_arithmetic or gsm8k, not by every trial of this sweep (did you "
     "mean 'eval/reward_accuracy'?)"),
    ({"tune": {"metric": "eval/accuracy_flexible"}, "data": {"source": {"grid": ["gsm8k", "arithmetic"]}}},
     "'eval/accuracy_flexible' is reported only with data.source gsm8k"),
])
def test_a_metric_only_other_sources_report_is_refused_before_any_trial(raw, message):
    assert message in error_of(raw)


def test_known_metrics_pass_and_an_unknown_unlike_any_waits_for_the_first_report():
    for metric in ("eval/mass_correct", "eval/reward_accuracy", "train/loss", "probe/grad_cosine", "eval/brand_new"):
        validate_sweep({"tune": {"metric": metric}})
    validate_sweep({"tune": {"metric": "sampler/sample_accuracy"}, "data": {"sampled_pairs": {}}})
    # Pair files keep the default eval/accuracy where nothing reads it (FIFO: it only labels Tune's best)...
    validate_sweep({"data": {"source": "files", "path": "pairs.jsonl"}})
    # ...but not where ASHA would stop trials by it.
    assert "'eval/accuracy' is reported only" in error_of(
        {"data": {"source": "files", "path": "pairs.jsonl"}, "tune": {"scheduler": "asha"}})


def _loss_metrics(name: str, **options) -> set[str]:
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    lengths = torch.tensor([3.0, 4.0])
    _, metrics = preference_loss(name, chosen, rejected, chosen + 0.5, rejected - 0.5, beta=0.1,
                                 chosen_lengths=lengths, rejected_lengths=lengths, **options)
    return set(metrics)


def test_every_loss_reports_only_metrics_the_config_knows():
    reported = set()
    for name in BASE_LOSSES:
        reported |= _loss_metrics(name, nll_weight=0.5)
        if name not in NOT_WRAPPABLE:
            reported |= _loss_metrics("spo", base=name)
    reported |= _loss_metrics("combine", combine={"dpo": 1.0, "sft": 1.0})
    reported |= _loss_metrics("dpo", wpo_chosen_logps=torch.tensor([-0.1, 0.2]),
                              wpo_rejected_logps=torch.tensor([-0.3, 0.0]))
    assert reported <= set(LOSS_METRICS), reported - set(LOSS_METRICS)
    assert {"nll", "spo_penalty", "dpo_loss", "sft_loss", "reward_accuracy", "wpo_weight"} <= reported
    assert set(EVALUATOR_METRICS) == {"arithmetic", "chat_arithmetic", "gsm8k", "files", "hub"}


def test_a_report_without_the_metric_names_it_and_its_nearest_and_other_reports_pass():
    evaluation = {"eval/loss": 0.6, "eval/reward_accuracy": 0.7, "eval/mass_mistake": 0.5, "step": 50}
    assert missing_metric("eval/acuracy", evaluation) == (
        "tune.metric: 'eval/acuracy' is not a metric the trials report (did you mean 'eval/reward_accuracy'?)")
    assert missing_metric("eval/spo_penalty", evaluation).startswith("tune.metric: 'eval/spo_penalty' is not")
    assert missing_metric("eval/acuracy", {"train/loss": 0.6, "step": 10}) is None  # no evaluation in this row
    assert missing_metric("eval/mass_mistake", evaluation) is None


def test_the_metric_callback_stops_the_sweep_at_the_first_report_that_lacks_it(monkeypatch):
    from spo_ray.sweep import metric_callback

    raised = []
    monkeypatch.setattr(signal, "raise_signal", raised.append)
    found: list[str] = []
    callback = metric_callback("eval/spo_penalty", found)
    callback.on_trial_result(0, [], None, {"train/loss": 0.7, "step": 10})
    assert (found, raised) == ([], [])
    callback.on_trial_result(1, [], None, {"eval/loss": 0.6, "step": 50})
    callback.on_trial_result(2, [], None, {"eval/loss": 0.5, "step": 100})
    assert found == ["tune.metric: 'eval/spo_penalty' is not a metric the trials report (expected one of eval/loss)"]
    assert raised == [signal.SIGINT]  # once: stopped as Ctrl+C stops it, the line raised by main (exit 2)


def test_a_mistyped_schedule_mutation_or_searched_key_names_the_nearest_key():
    assert error_of({"schedule": {"loss.spo_lamda": [[0, 1.0]]}}).startswith(
        "schedule: loss.spo_lamda: unknown key (did you mean 'loss.spo_lambda'?); a schedule takes loss.beta")
    assert error_of({"schedule": {"loss.name": [[0, 1.0]]}}).startswith("schedule: loss.name cannot change")
    assert error_of({"tune": {"scheduler": "pbt", "perturbation_interval": 10,
                              "mutations": {"loss.bta": {"uniform": [0.1, 1]}}}}).startswith(
        "tune.mutations.loss.bta: unknown key (did you mean 'loss.beta'?)")
    assert error_of({"tune": {"search": "optuna", "points_to_evaluate": [{"loss.bta": 0.2}]},
                     "loss": {"beta": {"loguniform": [0.01, 1]}}}) == (
        "tune.points_to_evaluate[0]: loss.bta is not a searched key (did you mean 'loss.beta'?)")


def test_a_near_miss_of_a_built_in_init_is_refused_and_hub_ids_and_paths_pass(tmp_path):
    from spo_ray.tasks import check_init_steps, check_not_a_typo

    with pytest.raises(ConfigError, match=r"^model\.init: 'sft_shrot' is neither a built-in model nor a local "
                                          r"path \(did you mean 'sft_short'\?\)$"):
        check_not_a_typo("sft_shrot", "model.init")
    with pytest.raises(ConfigError, match=r"^model\.reference: 'gsm8k-local-smal' .*'gsm8k-local-small'"):
        check_not_a_typo("gsm8k-local-smal", "model.reference")
    folder = tmp_path / "sft_shorts"
    folder.mkdir()
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M", str(folder), "s3://bucket/sft_short"):
        check_not_a_typo(name, "model.init")  # hub ids cannot be checked offline; paths exist
    with pytest.raises(ConfigError, match=r"^model\.init_steps\.bse: not a built-in init \(did you mean 'base'\?\)$"):
        check_init_steps(validate_run({"model": {"init_steps": {"bse": 300}}}))
    check_init_steps(validate_run({"model": {"init_steps": {"base": 300, "gsm8k-local-small": 10}}}))
