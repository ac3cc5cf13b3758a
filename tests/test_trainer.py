"""The single-run trainer, without Ray."""

import copy
import math

import pytest
import torch

from conftest import FORWARD_ROUNDINGS, assert_as_accurate_as_float32, rounding_tolerance, tiny_run
from spo_ray.config import validate_run
from spo_ray.data import TokenizedPair, collate_pairs
from spo_ray.logprobs import concatenated_forward
from spo_ray.trainer import batch_loss, gradient_terms, one_step_penalty, spo_lambda_at, train

# MISSION §2 "What every run measures".
REQUIRED_METRICS = [
    "train/loss", "train/chosen_logps", "train/rejected_logps", "train/chosen_logp_delta",
    "train/rejected_logp_delta", "train/chosen_reward", "train/rejected_reward", "train/reward_margin",
    "train/reward_accuracy", "train/spo_penalty", "train/safe_region_violation", "train/learning_rate",
    "train/grad_norm", "train/tokens_per_s", "probe/chosen_grad_norm", "probe/rejected_grad_norm",
    "probe/grad_cosine", "eval/loss", "eval/chosen_logp_delta", "eval/rejected_logp_delta",
    "eval/reward_accuracy", "eval/accuracy", "eval/mass_correct", "eval/mass_mistake", "eval/mass_other",
    "eval/mass_malformed",
]


def run(raw, cache_dir, **kwargs):
    rows = []
    final = train(validate_run(raw), cache_dir=cache_dir, report=lambda row, ckpt: rows.append(row), **kwargs)
    return final, rows


def dpo_loss_tolerance(row: dict, prefix: str, beta: float) -> float:
    """How far the DPO loss of a policy that *is* its reference can be from log 2: each log-ratio is 0 up to
    the rounding of two float32 forwards of the same rows, batched differently (the reference pass and this
    one), and −log σ(βΔ) moves by β/2 per nat of Δ near 0; plus the loss's own roundings."""
    log_ratios = sum(rounding_tolerance(row[f"{prefix}/{side}_logps"], 2 * FORWARD_ROUNDINGS)
                     for side in ("chosen", "rejected"))
    return beta / 2 * log_ratios + rounding_tolerance(math.log(2), 4)


def test_every_mission_metric_appears_in_the_history(init_cache):
    final, rows = run(tiny_run(loss={"name": "spo"}), init_cache)
    seen = set().union(*rows)
    assert [m for m in REQUIRED_METRICS if m not in seen] == []
    assert [r["step"] for r in rows] == [3, 6]
    masses = sum(final[f"eval/mass_{k}"] for k in ("correct", "mistake", "other", "malformed"))
    assert masses == pytest.approx(1.0, abs=rounding_tolerance(1.0, 6, torch.float64))  # malformed: 1 − the rest


def test_same_seed_gives_identical_metrics_twice(init_cache):
    _, first = run(tiny_run(), init_cache)
    _, second = run(tiny_run(), init_cache)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("train/tokens_per_s", "wall_time_s")}
                          for r in rows]
    assert strip(first) == strip(second)
    _, other_seed = run(tiny_run(train={"seed": 1}), init_cache)
    assert strip(other_seed) != strip(first)


def test_eval_on_start_reports_the_initial_weights_as_step_0_and_leaves_training_alone(init_cache):
    _, plain = run(tiny_run(), init_cache)
    _, rows = run(tiny_run(train={"eval_on_start": True}), init_cache)
    start = rows[0]
    assert [r["step"] for r in rows] == [0, 3, 6]
    assert not any(k.startswith("train/") for k in start)  # nothing has trained yet
    # Before training the policy is the reference: log-ratios 0 (up to the rounding of two float32 forwards of
    # the same rows), so the DPO loss is log 2 and no margin.
    assert abs(start["eval/loss"] - math.log(2)) <= dpo_loss_tolerance(start, "eval", beta=0.1)
    for side in ("chosen", "rejected"):
        assert abs(start[f"eval/{side}_logp_delta"]) <= rounding_tolerance(start[f"eval/{side}_logps"],
                                                                          2 * FORWARD_ROUNDINGS), side
    assert {"eval/accuracy", "eval/mass_correct", "probe/grad_cosine"} <= set(start)
    strip = lambda row: {k: v for k, v in row.items() if k not in ("train/tokens_per_s", "wall_time_s")}
    assert [strip(r) for r in rows[1:]] == [strip(r) for r in plain]  # the same training, step for step


def test_the_initial_evaluation_is_computed_once_and_read_by_the_trials_that_start_there(tmp_path, capsys):
    shared = str(tmp_path / "cache")  # the untrained init costs nothing to build
    _, dpo = run(tiny_run(train={"eval_on_start": True}), shared)
    assert "evaluation of the initial weights: computed into" in capsys.readouterr().out
    _, spo = run(tiny_run(loss={"name": "spo"}, train={"eval_on_start": True, "seed": 3}), shared)
    assert "evaluation of the initial weights: read from" in capsys.readouterr().out
    task_metrics = ("eval/accuracy", "eval/mass_correct", "eval/mass_mistake", "eval/mass_other")
    assert [spo[0][k] for k in task_metrics] == [dpo[0][k] for k in task_metrics]
    # Other evaluation questions are another evaluation: computed, not read.
    fewer = tiny_run(train={"eval_on_start": True})
    fewer["data"]["arithmetic"] = {**fewer["data"]["arithmetic"], "eval_problems": 8}
    run(fewer, shared)
    assert "evaluation of the initial weights: computed into" in capsys.readouterr().out


def test_trainer_lowers_the_dpo_loss_on_a_fixed_batch(init_cache):
    # 16 training pairs and a batch of 16: every step sees the same batch.
    raw = tiny_run(train={"max_steps": 30, "log_every": 1, "eval_every": 30, "probe_every": 30,
                          "batch_size": 16, "learning_rate": 3e-3, "lr_schedule": "constant"},
                   loss={"beta": 0.5})
    raw["data"]["arithmetic"] = {**raw["data"]["arithmetic"], "train_pairs": 16}
    _, rows = run(raw, init_cache)
    losses = [r["train/loss"] for r in rows]
    assert abs(losses[0] - math.log(2)) <= dpo_loss_tolerance(rows[0], "train", beta=0.5)  # policy == reference
    assert losses[-1] < 0.5 * losses[0]


def test_spo_lambda_warmup_is_linear():
    cfg = validate_run({"loss": {"name": "spo", "spo_lambda": 2.0, "spo_lambda_warmup_steps": 10}}).loss
    assert [spo_lambda_at(cfg, s) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]


def _one_step_fixture():
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32))
    items = [(0, TokenizedPair([1, 2, 3], [4, 5, 2], [6, 2])), (1, TokenizedPair([1, 7], [8, 9, 9, 2], [3, 2]))]
    return model, collate_pairs(items, 0)


def _manual_inner_values(model, batch, alphas):
    """g(θ) and g(θ − α∇g(θ)) for each α, each step taken on a fresh copy of the model (no functional_call)."""
    from transformers import LlamaForCausalLM
    g = -concatenated_forward(model, batch)["chosen_avg_logps"].mean()
    grads = torch.autograd.grad(g, list(model.parameters()))
    after = []
    for alpha in alphas:
        stepped = LlamaForCausalLM(model.config).to(model.dtype)
        stepped.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p, grad in zip(stepped.parameters(), grads):
                p -= alpha * grad
            after.append(-concatenated_forward(stepped, batch)["chosen_avg_logps"].mean().item())
    return g.item(), after


@pytest.mark.parametrize("epsilon", [0.0, 0.01, 10.0])
def test_one_step_penalty_equals_a_manual_inner_step(epsilon):
    model, batch = _one_step_fixture()
    out = concatenated_forward(model, batch)
    alpha = 0.5
    penalty, used = one_step_penalty(model, batch, out["chosen_avg_logps"], alpha, epsilon)

    g, (g_after,) = _manual_inner_values(model, batch, [alpha])
    model64 = copy.deepcopy(model).double()
    g64, (g_after64,) = _manual_inner_values(model64, batch, [alpha])  # the float64 oracle
    assert g_after < g and used == alpha  # a descent step: taken as it is
    # A difference of two NLLs of ~log 16 nats: its rounding is relative to g, not to the (smaller) gap.
    assert_as_accurate_as_float32(penalty.item(), max(0.0, g - g_after - epsilon),
                                  max(0.0, g64 - g_after64 - epsilon), "penalty", scale=g64)
    # Its gradient is ∇g while active (the inner value is a stop-gradient), zero once ε exceeds the gap.
    (grad_penalty,) = torch.autograd.grad(penalty, [model.lm_head.weight], retain_graph=True, allow_unused=True)
    (grad_g,) = torch.autograd.grad(-out["chosen_avg_logps"].mean(), [model.lm_head.weight])
    (grad_g64,) = torch.autograd.grad(-concatenated_forward(model64, batch)["chosen_avg_logps"].mean(),
                                      [model64.lm_head.weight])
    active = g - g_after > epsilon
    assert active == (g64 - g_after64 > epsilon)
    expected, exact = (grad_g, grad_g64) if active else (torch.zeros_like(grad_g), torch.zeros_like(grad_g64))
    got = grad_penalty if grad_penalty is not None else torch.zeros_like(grad_g)
    assert_as_accurate_as_float32(got, expected, exact, "gradient")


def test_one_step_penalty_halves_a_step_that_raises_the_nll():
    # A step so large that θ − α∇g is worse than θ: the estimate of the lower-level value would be above
    # g(θ), so max(0, ·) would switch the penalty off. The estimator halves α until the step lowers g.
    model, batch = _one_step_fixture()
    out = concatenated_forward(model, batch)
    alphas = [200.0 / 2**k for k in range(12)]
    g, after = _manual_inner_values(model, batch, alphas)
    g64, after64 = _manual_inner_values(copy.deepcopy(model).double(), batch, alphas)  # the float64 oracle
    first_descent = next(k for k, value in enumerate(after) if value < g)
    assert first_descent > 0  # the premise: the first step overshoots
    penalty, used = one_step_penalty(model, batch, out["chosen_avg_logps"], alphas[0], 0.0)
    assert used == alphas[first_descent]
    assert_as_accurate_as_float32(penalty.item(), g - after[first_descent], g64 - after64[first_descent],
                                  "penalty", scale=g64)
    # With too few halvings allowed, no descent step is found and the penalty is 0.
    penalty, used = one_step_penalty(model, batch, out["chosen_avg_logps"], alphas[0], 0.0,
                                     max_halvings=first_descent - 1)
    assert penalty.item() == 0.0 and used == 0.0


def test_active_one_step_spo_has_the_gradient_of_rpo_at_weight_lambda():
    # While the penalty is active its gradient is λ∇g, g = mean_i(−ℓ_θ(y_w^i)/|y_w^i|): RPO's NLL term.
    model, batch = _one_step_fixture()
    with torch.no_grad():
        ref = concatenated_forward(model, batch)
    ref = {k: v + 0.3 * torch.arange(v.numel()).reshape(v.shape) for k, v in ref.items()}  # policy ≠ reference

    def gradient(loss_section, model=model, ref=ref):
        cfg = validate_run({"loss": {"beta": 0.1, **loss_section}}).loss
        loss, metrics = batch_loss(cfg, concatenated_forward(model, batch), ref, step=1, model=model, batch=batch)
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]), metrics

    one_step, metrics = gradient({"name": "spo", "spo_estimator": "one_step", "spo_lambda": 0.7,
                                  "spo_inner_lr": 0.5})
    rpo, _ = gradient({"name": "dpo", "nll_weight": 0.7})
    rpo64, _ = gradient({"name": "dpo", "nll_weight": 0.7}, copy.deepcopy(model).double(),
                        {k: v.double() for k, v in ref.items()})  # the float64 oracle
    dpo, _ = gradient({"name": "dpo"})
    assert metrics["safe_region_violation"].item() == 1.0 and metrics["spo_inner_step"].item() == 0.5
    assert_as_accurate_as_float32(one_step, rpo, rpo64, "one_step vs RPO gradient")
    assert not torch.allclose(one_step, dpo, atol=1e-3)  # the penalty does move the gradient


@pytest.mark.parametrize("max_tokens, tied", [(None, False), (6, False), (None, True)],
                         ids=["whole-side", "one-row-at-a-time", "tied-embeddings"])
def test_gradient_terms_equal_flattened_gradients_of_each_side(max_tokens, tied):
    """The probe's norms and cosine against autograd on each side's summed log-probs, computed by hand
    (also when a token budget splits each side into single rows whose gradients add up, and with tied
    input and output embeddings: one parameter that gets its gradient from two places, consumed once)."""
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32, tie_word_embeddings=tied))
    if not tied:
        model.model.embed_tokens.weight.requires_grad_(False)  # frozen parameters are left out of both
    items = [(0, TokenizedPair([1, 2, 3], [4, 5, 2], [6, 2])), (1, TokenizedPair([1, 7], [8, 9, 9, 2], [3, 2]))]
    batch = collate_pairs(items, 0)

    def side_logps(model, side):  # full logits, log-softmax, gather, masked sum: no spo_ray.logprobs
        rows = [p.prompt_ids + (p.chosen_ids if side == "chosen" else p.rejected_ids) for _, p in items]
        total = 0.0
        for (_, pair), row in zip(items, rows):
            logp = torch.log_softmax(model(torch.tensor([row])).logits[0, :-1], -1)
            targets = torch.tensor(row[1:])
            picked = logp.gather(1, targets[:, None])[:, 0]
            total = total + picked[len(pair.prompt_ids) - 1:].sum()
        return total / len(items)

    def probe_terms(model):  # norms and cosine of the flattened gradients, in float64
        params = [p for p in model.parameters() if p.requires_grad]
        flat = {side: torch.cat([g.flatten() for g in torch.autograd.grad(side_logps(model, side), params)]).double()
                for side in ("chosen", "rejected")}
        chosen, rejected = flat["chosen"].norm(), flat["rejected"].norm()
        return {"probe/chosen_grad_norm": chosen, "probe/rejected_grad_norm": rejected,
                "probe/grad_cosine": flat["chosen"] @ flat["rejected"] / (chosen * rejected)}

    plain, exact = probe_terms(model), probe_terms(copy.deepcopy(model).double())  # float32, the float64 oracle
    terms = gradient_terms(model, batch, max_tokens)
    for key in plain:
        assert_as_accurate_as_float32(terms[key], plain[key], exact[key], key)
    assert all(p.grad is None for p in model.parameters())  # a diagnostic leaves no gradients behind


def test_one_step_spo_trains_and_reports_its_penalty(init_cache):
    final, _ = run(tiny_run(loss={"name": "spo", "spo_estimator": "one_step", "spo_lambda": 1.0}), init_cache)
    assert final["train/spo_penalty"] >= 0 and math.isfinite(final["train/loss"])


@pytest.mark.parametrize("loss", ["cdpo", "ipo", "hinge", "dpop", "simpo", "cpo"])
def test_every_loss_trains_through_the_trainer(init_cache, loss):
    final, _ = run(tiny_run(loss={"name": loss}, train={"max_steps": 2, "eval_every": 2, "probe_every": 2}),
                   init_cache)
    assert math.isfinite(final["train/loss"]) and final["step"] == 2


def test_batch_loss_measures_summed_deltas_even_for_averaged_losses():
    cfg = validate_run({"loss": {"name": "simpo", "beta": 2.0, "gamma": 0.5}}).loss
    policy = {"chosen_logps": torch.tensor([-4.0]), "rejected_logps": torch.tensor([-6.0]),
              "chosen_avg_logps": torch.tensor([-2.0]), "rejected_avg_logps": torch.tensor([-2.0]),
              "chosen_lengths": torch.tensor([2.0]), "rejected_lengths": torch.tensor([3.0])}
    reference = {"chosen_logps": torch.tensor([-5.0]), "rejected_logps": torch.tensor([-5.0]),
                 "chosen_avg_logps": torch.tensor([-2.5]), "rejected_avg_logps": torch.tensor([-1.0])}
    loss, metrics = batch_loss(cfg, policy, reference, step=0)
    # SimPO on averaged log-probs, no reference: −log σ(2·(−2 − −2) − 0.5); the argument is exact in float32,
    # so only log σ's own roundings (its exp and log1p, an ulp or so each) and the mean's.
    expected = -math.log(1 / (1 + math.exp(0.5)))
    assert abs(loss.item() - expected) <= rounding_tolerance(expected, 4)
    assert metrics["chosen_logp_delta"].item() == 1.0  # −4 − −5 and −6 − −5: exact in float32
    assert metrics["rejected_logp_delta"].item() == -1.0


def test_the_nll_term_of_an_averaged_loss_is_the_per_token_nll_once():
    """SimPO + NLL (and any loss with average_logps): the NLL is −ℓ(y_w)/|y_w| = −ℓ̄(y_w), not −ℓ̄(y_w)/|y_w|."""
    cfg = validate_run({"loss": {"name": "simpo", "beta": 2.0, "gamma": 0.5, "nll_weight": 1.0}}).loss
    policy = {"chosen_logps": torch.tensor([-4.0]), "rejected_logps": torch.tensor([-6.0]),
              "chosen_avg_logps": torch.tensor([-2.0]), "rejected_avg_logps": torch.tensor([-2.0]),
              "chosen_lengths": torch.tensor([2.0]), "rejected_lengths": torch.tensor([3.0])}
    reference = {key: value - 1 for key, value in policy.items() if key.endswith("logps")}
    loss, _ = batch_loss(cfg, policy, reference, step=0)
    expected = -math.log(1 / (1 + math.exp(0.5))) + 2.0  # SimPO's term as above, plus −(−4)/2
    assert abs(loss.item() - expected) <= rounding_tolerance(expected, 6)


def test_a_single_run_uses_every_cpu_unless_the_config_names_a_number():
    import os
    from spo_ray.config import validate_sweep
    from spo_ray.train import single_run_cpus

    assert single_run_cpus(validate_sweep({"name": "one"})[0]) == len(os.sched_getaffinity(0))
    assert single_run_cpus(validate_sweep({"name": "one", "scaling": {"cpus_per_worker": 3}})[0]) == 3


def test_prefix_sharing_leaves_a_steps_log_probs_and_loss_as_they_are(init_cache, monkeypatch):
    """The trainer's shared rows (train.prefix_sharing, on by auto here) score the first step's pairs as the
    separate rows do: two float32 forwards of the same tokens, batched differently."""
    import spo_ray.data as data_module

    shared_batches = []
    collate = data_module.collate_shared_prompts
    monkeypatch.setattr(data_module, "collate_shared_prompts", lambda *a, **k: shared_batches.append(1) or collate(*a, **k))
    steps = {"max_steps": 1, "log_every": 1, "eval_every": 1, "probe_every": 1}
    rows, shared = {}, {}
    for setting in (False, "auto"):
        rows[setting] = run(tiny_run(train={**steps, "prefix_sharing": setting}), init_cache)[1][0]
        shared[setting] = len(shared_batches)
    # auto: the step and the evaluation (the reference tables are the first run's, read from the shared cache)
    assert shared[False] == 0 and shared["auto"] >= 2
    for side in ("chosen", "rejected"):
        key = f"train/{side}_logps"
        assert rows["auto"][key] == pytest.approx(rows[False][key],
                                                  abs=rounding_tolerance(rows[False][key], 2 * FORWARD_ROUNDINGS))
    assert abs(rows["auto"]["train/loss"] - rows[False]["train/loss"]) <= 2 * dpo_loss_tolerance(rows[False], "train", 0.1)


def test_the_fused_adamw_takes_the_steps_of_torchs_loop_to_float32_rounding():
    """train.optim: adamw_torch_fused (the default) against adamw_torch, both float32, judged by a float64
    run of the loop on the same gradients: weights of very different sizes (an embedding-like matrix, a
    vector), gradients that change scale between steps, weight decay on; the fused steps must be as close to
    the oracle as the loop's. A checkpoint of the loop's optimizer resumes with the configured kernels."""
    from spo_ray.trainer import apply_optimizer_settings, build_optimizer, lr_lambda

    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 48, generator=generator) * 0.02, torch.randn(48, generator=generator)]
    grads = [[torch.randn(p.shape, generator=generator) * scale for p in start] for scale in (1e-3, 1.0, 1e-5, 3e-2)]
    cfg = {optim: validate_run(tiny_run(train={"optim": optim, "learning_rate": 1e-2, "weight_decay": 0.1})).train
           for optim in ("adamw_torch_fused", "adamw_torch")}

    def steps(optim: str, dtype=torch.float32):
        params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in start]
        optimizer = build_optimizer(params, cfg[optim])
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(dtype)
            optimizer.step()
        return params, optimizer

    (fused, fused_optimizer), (loop, loop_optimizer) = steps("adamw_torch_fused"), steps("adamw_torch")
    exact, _ = steps("adamw_torch", torch.float64)
    assert fused_optimizer.param_groups[0]["fused"] and not loop_optimizer.param_groups[0]["fused"]
    for name, got, plain, oracle in zip(("matrix", "vector"), fused, loop, exact):
        assert (got - start[name == "vector"]).abs().max() > 1e-3  # the steps moved the weights
        assert_as_accurate_as_float32(got.detach(), plain.detach(), oracle.detach(), name)

    resumed = build_optimizer(fused, cfg["adamw_torch_fused"])
    resumed.load_state_dict(loop_optimizer.state_dict())  # param groups come back with the loop's kernels
    assert not resumed.param_groups[0]["fused"]
    apply_optimizer_settings(resumed, torch.optim.lr_scheduler.LambdaLR(resumed, lr_lambda("constant", 0, 4)),
                             cfg["adamw_torch_fused"])
    assert resumed.param_groups[0]["fused"] and resumed.param_groups[0]["foreach"] is False


# ---------------------------------------------------------------------------------------------------
# LD-DPO, WPO and TR-DPO's synced reference in the trainer

def test_ld_dpo_weights_the_loss_but_spo_measures_the_summed_log_probs_against_the_initial_reference():
    cfg = validate_run({"loss": {"name": "spo", "beta": 1.0, "spo_lambda": 1.0, "ld_alpha": 0.5}}).loss
    t = lambda value: torch.tensor([value], dtype=torch.float64)
    policy = {"chosen_logps": t(-4.0), "chosen_shared_logps": t(-3.0), "rejected_logps": t(-6.0),
              "rejected_shared_logps": t(-5.0), "chosen_lengths": t(4.0), "rejected_lengths": t(3.0)}
    reference = {"chosen_logps": t(-3.5), "chosen_shared_logps": t(-3.0), "rejected_logps": t(-5.0),
                 "rejected_shared_logps": t(-4.5)}
    for view in (policy, reference):
        view.update({key.replace("_logps", "_avg_logps"): view[key] for key in ("chosen_logps", "rejected_logps")})
    # LD-DPO at α = ½: chosen −3 + ½(−1) = −3.5 against −3 + ½(−½) = −3.25; rejected −5.5 against −4.75; Δ = ½.
    dpo = -math.log(1 / (1 + math.exp(-0.5)))
    loss, metrics = batch_loss(cfg, policy, reference, step=0)
    assert abs(loss.item() - (dpo + 0.5)) <= rounding_tolerance(dpo, 8, torch.float64)  # penalty −3.5 − (−4), summed
    # TR-DPO: the same reference drifted; the initial one (the anchor) holds the safe region and the deltas.
    anchored = {**reference, **{f"anchor_{k}": v - 0.5 for k, v in reference.items()}}
    loss, metrics = batch_loss(cfg, policy, anchored, step=0)
    assert abs(loss.item() - (dpo + 0.0)) <= rounding_tolerance(dpo, 8, torch.float64)  # −4 − (−4): inside
    assert metrics["chosen_logp_delta"].item() == 0.0 and metrics["rejected_logp_delta"].item() == -0.5


def test_ld_dpo_and_wpo_train_through_the_trainer_on_shared_prompt_rows(init_cache):
    final, _ = run(tiny_run(loss={"name": "spo", "ld_alpha": 0.5, "use_weighting": True},
                            train={"max_steps": 2, "eval_every": 2, "probe_every": 2}), init_cache)
    assert math.isfinite(final["train/loss"]) and final["step"] == 2
    # exp of per-token means of log π(y_t) − log Σ_v π(v)², whose ratio averages 1 on the policy's own samples.
    assert all(0 < final[f"{split}/wpo_weight"] < 10 and final[f"{split}/wpo_weight"] != 1 for split in ("train", "eval"))


def test_a_reference_synced_by_copy_makes_the_loss_log_2_after_each_sync_while_deltas_keep_the_initial_one(init_cache):
    """TR-DPO's hard update (α = 1) every 3 steps: right after each sync, evaluated at steps 3 and 6, the
    reference *is* the policy, so every log-ratio is 0 and DPO's loss log 2 — while the deltas, measured against
    the initial reference, have moved."""
    _, rows = run(tiny_run(reference={"sync": True, "sync_steps": 3, "mixup_alpha": 1.0}), init_cache)
    assert [row["step"] for row in rows] == [3, 6]
    for row in rows:
        assert abs(row["eval/loss"] - math.log(2)) <= dpo_loss_tolerance(row, "eval", 0.1)
        assert abs(row["eval/chosen_logp_delta"]) > 0.05
    _, fixed = run(tiny_run(), init_cache)  # the fixed reference: the same steps, a loss away from log 2
    assert abs(fixed[-1]["eval/loss"] - math.log(2)) > 100 * dpo_loss_tolerance(fixed[-1], "eval", 0.1)


def test_a_resumed_run_continues_from_the_reference_it_had_drifted_to(init_cache):
    raw = tiny_run(reference={"sync": True, "sync_steps": 2, "mixup_alpha": 0.5}, train={"checkpoint_every": 2})
    states, rows = {}, []

    def report(row, state):
        rows.append(row)
        if state:
            states[row["step"]] = copy.deepcopy(state)

    full = train(validate_run(raw), cache_dir=init_cache, report=report)
    assert "reference" in states[4]
    resumed = train(validate_run(raw), cache_dir=init_cache, resume=states[4])
    stale = train(validate_run(raw), cache_dir=init_cache,
                  resume={k: v for k, v in states[4].items() if k != "reference"})
    measured = [k for k in full if k.startswith(("eval/", "train/")) and k != "train/tokens_per_s"]
    assert {k: resumed[k] for k in measured} == {k: full[k] for k in measured}
    assert stale["eval/loss"] != full["eval/loss"]  # without its reference a resumed run would train on another


# ---------------------------------------------------------------------------------------------------
# Memory levers in the loop (spo_ray.optimizers, spo_ray.memory.choose_levers)

def test_the_step_in_the_backward_trains_exactly_as_the_plain_step(init_cache):
    """Without clipping (which it cannot do), each parameter's fused AdamW step in the backward is the step the
    plain optimizer takes after it: every metric the same, the probe's backward included; only the gradient
    norm is summed in another order (the hooks fire last layer first)."""
    raw = lambda in_backward: tiny_run(train={"max_grad_norm": None, "optim": "adamw_torch_fused",
                                              "optimizer_in_backward": in_backward})
    plain, plain_rows = run(raw(False), init_cache)
    hooked, hooked_rows = run(raw(True), init_cache)
    for before, after in zip(plain_rows, hooked_rows):
        for key, value in before.items():
            if key in ("train/tokens_per_s", "wall_time_s"):
                continue
            if key == "train/grad_norm":  # a sum of as many squares as tensors, in another order
                assert abs(after[key] - value) <= rounding_tolerance(value, 64), key
            else:
                assert after[key] == value, key


def test_8_bit_states_train_and_stay_near_the_float32_run(init_cache):
    # hidden 64: the MLP's matrices reach bitsandbytes' 4,096 values (smaller tensors keep float32 moments)
    model = {"init": "scratch", "hidden_size": 64, "num_layers": 2, "num_heads": 2}
    fp32, _ = run(tiny_run(model=model, train={"optim": "adamw_torch_fused"}), init_cache)
    eight, _ = run(tiny_run(model=model, train={"optim": "adamw_bnb_8bit"}), init_cache)
    assert math.isfinite(eight["train/loss"]) and eight["train/loss"] != fp32["train/loss"]
    # 6 steps from the same start: the moments' quantization moves the loss little (tests/test_optimizers.py
    # bounds the parameters' drift); a broken optimizer (no step) would leave the initial loss, log 2-ish.
    assert abs(eight["eval/loss"] - fp32["eval/loss"]) < 0.1 * abs(fp32["eval/loss"] - math.log(2))


def test_a_run_with_auto_optim_resumes_in_the_kind_of_optimizer_its_checkpoint_was_written_by(init_cache):
    """A checkpoint of 8-bit states, resumed where train.optim: auto would pick the fused float32 AdamW (memory to
    spare): the run goes on in 8-bit, exactly as the uninterrupted one."""
    model = {"init": "scratch", "hidden_size": 64, "num_layers": 2, "num_heads": 2}
    states = {}

    def report(row, state):
        if state:
            states[row["step"]] = copy.deepcopy(state)

    full = train(validate_run(tiny_run(model=model, train={"optim": "adamw_bnb_8bit", "checkpoint_every": 2})),
                 cache_dir=init_cache, report=report)
    resumed = train(validate_run(tiny_run(model=model, train={"optim": "auto", "checkpoint_every": 2})),
                    cache_dir=init_cache, resume=states[4])
    measured = [k for k in full if k.startswith(("eval/", "train/")) and k != "train/tokens_per_s"]
    assert {k: resumed[k] for k in measured} == {k: full[k] for k in measured}


def test_the_step_in_the_backward_on_lora_adapters_trains_as_the_plain_step(init_cache):
    """With LoRA only the adapters are trainable: the hooks sit on them alone, and the run is the plain one's."""
    raw = lambda in_backward: tiny_run(model={"lora": {"r": 4, "alpha": 8}},
                                       train={"max_grad_norm": None, "optim": "adamw_torch_fused",
                                              "optimizer_in_backward": in_backward})
    plain, _ = run(raw(False), init_cache)
    hooked, _ = run(raw(True), init_cache)
    assert plain["eval/loss"] != math.log(2)  # the adapters moved
    for key in ("train/loss", "eval/loss", "eval/chosen_logp_delta", "eval/accuracy", "probe/grad_cosine"):
        assert hooked[key] == plain[key], key
