"""Preference losses against their MISSION §2 formulas, their gradients, SPO's penalty and the validation.

The reference values are re-derived per pair in float64 with `math` on Python floats, independently of
`spo_ray.losses`' helpers, so a slip in a helper cannot hide behind the same slip in the test.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import rounding_tolerance
from spo_ray.losses import BASE_LOSSES, preference_loss

REFERENCE_FREE = ("simpo", "cpo")


# ------------------------------------------------------------------------------ independent formulas


def log_sigmoid(x: float) -> float:
    """log σ(x) = −log(1 + e^{−x}), written to stay finite for large |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def base_loss_formula(name: str, pc: float, pr: float, rc: float, rr: float, beta: float, options: dict) -> float:
    """One pair's loss, straight from the MISSION §2 table."""
    delta = (pc - rc) - (pr - rr)
    h = beta * delta
    if name == "dpo":
        return -log_sigmoid(h)
    if name == "cdpo":
        eps = options.get("label_smoothing", 0.1)
        return -(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h)
    if name == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return max(0.0, 1 - h)
    if name == "dpop":
        kappa = options.get("dpop_kappa", 5.0)
        return -log_sigmoid(h - beta * kappa * max(0.0, rc - pc))
    if name == "simpo":
        gamma = options.get("gamma", 0.5)
        return -log_sigmoid(beta * (pc - pr) - gamma)
    if name == "cpo":
        return -log_sigmoid(beta * (pc - pr))
    raise AssertionError(name)


def loss_formula(name: str, pc, pr, rc, rr, beta: float, options: dict) -> list[float]:
    """Per-pair losses for a whole batch of Python floats, SPO and the NLL term included."""
    out = []
    for i in range(len(pc)):
        rci = None if rc is None else rc[i]
        rri = None if rr is None else rr[i]
        base = options.get("base", "dpo") if name == "spo" else name
        if base in REFERENCE_FREE:
            rci_base, rri_base = 0.0, 0.0  # unused by the formula
        else:
            rci_base, rri_base = rci, rri
        value = base_loss_formula(base, pc[i], pr[i], rci_base, rri_base, beta, options)
        if name == "spo":
            lam = options.get("spo_lambda", 1.0)
            eps = options.get("spo_epsilon", 0.0)
            value += lam * max(0.0, rci - pc[i] - eps)
        if options.get("nll_weight"):
            value += options["nll_weight"] * (-pc[i] / options["chosen_lengths"][i])
        out.append(value)
    return out


def random_batch(seed: int, size: int = 16) -> dict[str, list[float]]:
    """Summed log-probs of plausible magnitude, with the reference within a few nats of the policy."""
    rng = random.Random(seed)
    pc = [-rng.uniform(2.0, 40.0) for _ in range(size)]
    pr = [-rng.uniform(2.0, 40.0) for _ in range(size)]
    rc = [x + rng.uniform(-4.0, 4.0) for x in pc]
    rr = [x + rng.uniform(-4.0, 4.0) for x in pr]
    lengths = [float(rng.randint(1, 30)) for _ in range(size)]
    return {"pc": pc, "pr": pr, "rc": rc, "rr": rr, "lengths": lengths}


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


CASES = [
    ("dpo", {}),
    ("dpo", {"nll_weight": 0.7}),
    ("cdpo", {}),
    ("cdpo", {"label_smoothing": 0.3}),
    ("ipo", {}),
    ("hinge", {}),
    ("dpop", {}),
    ("dpop", {"dpop_kappa": 2.5, "nll_weight": 0.2}),
    ("simpo", {}),
    ("simpo", {"gamma": 1.5}),
    ("cpo", {"nll_weight": 1.0}),
] + [
    ("spo", {"base": base, "spo_lambda": 0.8, "spo_epsilon": 0.5}) for base in BASE_LOSSES
] + [
    ("spo", {"base": "dpo"}),  # the defaults: λ = 1, ε = 0
    ("spo", {"base": "cdpo", "label_smoothing": 0.2, "spo_lambda": 3.0, "nll_weight": 0.5}),
    ("spo", {"base": "dpop", "dpop_kappa": 1.0, "spo_lambda": 0.1, "spo_epsilon": 1.0}),
    ("spo", {"base": "simpo", "gamma": 0.25, "spo_lambda": 2.0, "nll_weight": 0.3}),
]


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{sorted(o.items())}" for n, o in CASES])
def test_every_loss_matches_its_formula_in_float64(name, options, beta):
    for seed in range(3):
        batch = random_batch(seed)
        opts = dict(options)
        if opts.get("nll_weight"):
            opts["chosen_lengths"] = batch["lengths"]
        reference_free = name in REFERENCE_FREE
        rc = None if reference_free else batch["rc"]
        rr = None if reference_free else batch["rr"]
        expected = loss_formula(name, batch["pc"], batch["pr"], rc, rr, beta, opts)

        call_opts = dict(opts)
        if "chosen_lengths" in call_opts:
            call_opts["chosen_lengths"] = t64(call_opts["chosen_lengths"])
        losses, _ = preference_loss(
            name, t64(batch["pc"]), t64(batch["pr"]),
            None if rc is None else t64(rc), None if rr is None else t64(rr), beta=beta, **call_opts)

        assert losses.shape == (len(expected),)
        assert losses.dtype == torch.float64
        # Both sides in float64, rounding differently: a few eps of the largest value in play, the log-ratio
        # sums (up to twice the largest log-prob) or the loss itself (IPO's square reaches thousands).
        inputs = max(map(abs, batch["pc"] + batch["pr"] + batch["rc"] + batch["rr"]))
        for got, want in zip(losses.tolist(), expected):
            assert abs(got - want) <= rounding_tolerance(max(abs(want), 2 * inputs), 16, torch.float64)


def test_float32_inputs_match_the_formula_to_single_precision():
    batch = random_batch(7)
    expected = loss_formula("spo", batch["pc"], batch["pr"], batch["rc"], batch["rr"], 0.1, {"spo_lambda": 0.5})
    f32 = {k: torch.tensor(v, dtype=torch.float32) for k, v in batch.items()}
    losses, _ = preference_loss("spo", f32["pc"], f32["pr"], f32["rc"], f32["rr"], beta=0.1, spo_lambda=0.5)
    assert losses.dtype == torch.float32
    # 10 roundings on values up to the largest log-prob: the 4 inputs, the 3 subtractions of the log-ratio and
    # the 2 of the penalty, the sum; each reaches the loss with a derivative of at most 1 (β = 0.1, λ = 0.5, σ ≤ 1).
    scale = max(map(abs, batch["pc"] + batch["pr"] + batch["rc"] + batch["rr"]))
    assert (losses.double() - t64(expected)).abs().max() <= rounding_tolerance(scale, roundings=10)


# ------------------------------------------------------------------------------------------ gradients


def _gradcheck(name: str, inputs: tuple[torch.Tensor, ...], beta: float = 0.3, **options) -> None:
    def fn(pc, pr, rc, rr):
        losses, _ = preference_loss(name, pc, pr, rc, rr, beta=beta, **options)
        return losses

    def fn_reference_free(pc, pr):
        losses, _ = preference_loss(name, pc, pr, None, None, beta=beta, **options)
        return losses

    leaves = tuple(x.detach().clone().double().requires_grad_(True) for x in inputs)
    if name in REFERENCE_FREE:
        assert torch.autograd.gradcheck(fn_reference_free, leaves[:2])
    else:
        assert torch.autograd.gradcheck(fn, leaves)


def _smooth_inputs(seed: int = 0, size: int = 6):
    g = torch.Generator().manual_seed(seed)
    pc = -torch.rand(size, generator=g, dtype=torch.float64) * 10 - 1
    pr = -torch.rand(size, generator=g, dtype=torch.float64) * 10 - 1
    rc = pc + torch.randn(size, generator=g, dtype=torch.float64)
    rr = pr + torch.randn(size, generator=g, dtype=torch.float64)
    return pc, pr, rc, rr


@pytest.mark.parametrize("name, options", [
    ("dpo", {}),
    ("cdpo", {"label_smoothing": 0.2}),
    ("ipo", {}),
    ("simpo", {"gamma": 0.5}),
    ("cpo", {}),
    ("dpo", {"nll_weight": 0.5, "chosen_lengths": torch.tensor([3.0, 5.0, 1.0, 7.0, 2.0, 4.0], dtype=torch.float64)}),
])
def test_smooth_losses_pass_gradcheck(name, options):
    _gradcheck(name, _smooth_inputs(), **options)


# Pairs whose chosen log-prob dropped by 2–3 nats under the reference (penalty active) or rose by 2–3
# nats (inactive): every max(0, ·) argument is at least 1.5 away from its kink at 0.
_KINK_FREE = (
    torch.tensor([-5.0, -8.0, -3.0, -12.0], dtype=torch.float64),   # policy chosen
    torch.tensor([-6.0, -7.0, -9.0, -10.0], dtype=torch.float64),   # policy rejected
    torch.tensor([-2.5, -10.5, -0.5, -14.0], dtype=torch.float64),  # ref chosen: drops +2.5, −2.5, +2.5, −2
    torch.tensor([-6.5, -7.5, -8.0, -11.0], dtype=torch.float64),   # ref rejected
)


def test_dpop_passes_gradcheck_away_from_its_kink():
    _gradcheck("dpop", _KINK_FREE, dpop_kappa=3.0)


def test_hinge_passes_gradcheck_away_from_its_kink():
    # h = βΔ with β = 0.3 stays well away from 1 on these pairs (Δ = 3, −5.5, 4.5, −1).
    _gradcheck("hinge", _KINK_FREE)


@pytest.mark.parametrize("base", BASE_LOSSES)
def test_spo_passes_gradcheck_away_from_the_safe_region_boundary(base):
    # ε = 0.5 moves the kink to a drop of 0.5; the drops are ±2.5 and −2.
    _gradcheck("spo", _KINK_FREE, base=base, spo_lambda=1.5, spo_epsilon=0.5)


# ------------------------------------------------------------------------------------------------ SPO


@pytest.mark.parametrize("base", BASE_LOSSES)
def test_spo_with_zero_lambda_equals_its_base_exactly(base):
    batch = random_batch(3)
    pc, pr, rc, rr = (t64(batch[k]) for k in ("pc", "pr", "rc", "rr"))
    base_refs = (None, None) if base in REFERENCE_FREE else (rc, rr)
    base_losses, _ = preference_loss(base, pc, pr, *base_refs, beta=0.2)
    spo_losses, metrics = preference_loss("spo", pc, pr, rc, rr, beta=0.2, base=base, spo_lambda=0.0)
    assert torch.equal(spo_losses, base_losses)
    assert metrics["spo_penalty"] > 0  # the batch does leave the safe region; λ = 0 just ignores it


def test_spo_with_zero_lambda_is_the_base_even_where_the_penalty_is_infinite():
    pc = torch.tensor([-float("inf"), -2.0], dtype=torch.float64)
    pr, rc, rr = t64([-3.0, -3.0]), t64([-1.0, -1.0]), t64([-2.0, -2.0])
    base_losses, _ = preference_loss("hinge", pc, pr, rc, rr, beta=0.1)
    spo_losses, _ = preference_loss("spo", pc, pr, rc, rr, beta=0.1, base="hinge", spo_lambda=0.0)
    assert torch.equal(spo_losses, base_losses)


# Drops ℓ_ref(y_w) − ℓ_θ(y_w) per pair: 1.0, 0.3, −2.0, 3.0, 0.5 (exactly ε), −0.25.
_SPO_POLICY_CHOSEN = [-11.0, -4.3, -6.0, -13.0, -10.5, -1.0]
_SPO_REF_CHOSEN = [-10.0, -4.0, -8.0, -10.0, -10.0, -1.25]
_SPO_EPSILON = 0.5
_OUTSIDE = [True, False, False, True, False, False]  # drop > ε, strictly


@pytest.mark.parametrize("base", BASE_LOSSES)
def test_spo_penalty_gradient_is_nonzero_only_outside_the_safe_region(base):
    spo_lambda = 2.0
    pr = t64([-7.0, -5.0, -6.5, -9.0, -12.0, -2.0])
    rr = t64([-7.5, -4.0, -6.0, -9.5, -11.0, -2.5])
    rc = t64(_SPO_REF_CHOSEN)

    def chosen_grad(name, **options):
        pc = t64(_SPO_POLICY_CHOSEN).requires_grad_(True)
        refs = (None, None) if name in REFERENCE_FREE else (rc, rr)
        losses, _ = preference_loss(name, pc, pr, *refs, beta=0.1, **options)
        (grad,) = torch.autograd.grad(losses.sum(), pc)
        return grad

    penalty_grad = chosen_grad("spo", base=base, spo_lambda=spo_lambda, spo_epsilon=_SPO_EPSILON) - chosen_grad(base)
    for outside, g in zip(_OUTSIDE, penalty_grad.tolist()):
        if outside:  # d/dℓ_θ of λ·(ℓ_ref − ℓ_θ − ε) = −λ
            assert g == pytest.approx(-spo_lambda, abs=1e-12)
        else:
            assert g == 0.0


def test_spo_metrics_count_the_pairs_outside_the_safe_region():
    pc, rc = t64(_SPO_POLICY_CHOSEN), t64(_SPO_REF_CHOSEN)
    pr = rr = t64([-3.0] * 6)
    _, metrics = preference_loss("spo", pc, pr, rc, rr, beta=0.1, spo_epsilon=_SPO_EPSILON)
    # Outside by more than ε: pairs 0 (1.0 − 0.5 = 0.5) and 3 (3.0 − 0.5 = 2.5); pair 4 sits exactly on ε.
    assert metrics["safe_region_violation"].item() == pytest.approx(2 / 6)
    assert metrics["spo_penalty"].item() == pytest.approx((0.5 + 2.5) / 6)

    _, strict = preference_loss("spo", pc, pr, rc, rr, beta=0.1)  # ε = 0: any drop counts
    assert strict["safe_region_violation"].item() == pytest.approx(4 / 6)
    assert strict["spo_penalty"].item() == pytest.approx((1.0 + 0.3 + 3.0 + 0.5) / 6)


def test_spo_adds_lambda_times_the_mean_penalty_to_the_batch_loss():
    pc, rc = t64(_SPO_POLICY_CHOSEN), t64(_SPO_REF_CHOSEN)
    pr, rr = t64([-3.0] * 6), t64([-3.5] * 6)
    base, _ = preference_loss("dpo", pc, pr, rc, rr, beta=0.1)
    spo, metrics = preference_loss("spo", pc, pr, rc, rr, beta=0.1, spo_lambda=4.0, spo_epsilon=_SPO_EPSILON)
    assert (spo.mean() - base.mean()).item() == pytest.approx(4.0 * metrics["spo_penalty"].item(), abs=1e-12)


# -------------------------------------------------------------------------------------------- metrics


def test_reward_metrics_on_a_literal_example():
    beta = 0.5
    pc, pr = t64([-1.0, -4.0]), t64([-3.0, -2.0])
    rc, rr = t64([-2.0, -3.0]), t64([-2.0, -2.0])
    # chosen deltas (1, −1), rejected deltas (−1, 0); rewards β·delta: chosen (0.5, −0.5), rejected (−0.5, 0).
    _, m = preference_loss("dpo", pc, pr, rc, rr, beta=beta)
    expected = {
        "chosen_logps": -2.5, "rejected_logps": -2.5,
        "chosen_logp_delta": 0.0, "rejected_logp_delta": -0.5,
        "chosen_reward": 0.0, "rejected_reward": -0.25,
        "reward_margin": 0.25,  # mean of (1.0, −0.5)
        "reward_accuracy": 0.5,  # 0.5 > −0.5 yes; −0.5 > 0 no
    }
    for key, value in expected.items():
        assert m[key].item() == pytest.approx(value, abs=1e-12), key
    for key, value in m.items():
        assert not value.requires_grad, key
    assert "spo_penalty" not in m and "nll" not in m


def test_reference_free_rewards_are_beta_times_the_policy_logps():
    pc, pr = t64([-1.0, -4.0]), t64([-3.0, -2.0])
    _, m = preference_loss("cpo", pc, pr, None, None, beta=0.5, nll_weight=1.0, chosen_lengths=t64([2.0, 4.0]))
    assert m["chosen_reward"].item() == pytest.approx(-1.25)
    assert m["rejected_reward"].item() == pytest.approx(-1.25)
    assert m["reward_margin"].item() == pytest.approx(0.0)
    assert m["reward_accuracy"].item() == pytest.approx(0.5)  # −0.5 > −1.5 yes; −2 > −1 no
    assert m["nll"].item() == pytest.approx((0.5 + 1.0) / 2)
    assert "chosen_logp_delta" not in m


def test_metrics_detach_while_losses_keep_the_graph():
    pc = t64([-1.0, -4.0]).requires_grad_(True)
    losses, m = preference_loss("spo", pc, t64([-3.0, -2.0]), t64([-2.0, -3.0]), t64([-2.0, -2.0]), beta=0.5)
    assert losses.requires_grad
    assert all(not v.requires_grad for v in m.values())


# ----------------------------------------------------------------------------------------- validation


def _call(name="dpo", beta=0.1, refs=True, **options):
    pc, pr, rc, rr = t64([-1.0, -2.0]), t64([-3.0, -1.0]), t64([-1.5, -2.0]), t64([-2.0, -2.0])
    if not refs:
        rc = rr = None
    return preference_loss(name, pc, pr, rc, rr, beta=beta, **options)


@pytest.mark.parametrize("kwargs, key", [
    ({"name": "dpoo"}, "dpoo"),
    ({"spo_lamda": 1.0, "name": "spo"}, "spo_lamda"),
    ({"spo_lambda": 1.0}, "spo_lambda"),  # an SPO option is a typo-class error on plain dpo
    ({"gamma": 0.5}, "gamma"),  # a SimPO option on dpo
    ({"beta": 0.0}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"beta": float("nan")}, "beta"),
    ({"name": "spo", "spo_lambda": -0.1}, "spo_lambda"),
    ({"name": "spo", "spo_epsilon": -1.0}, "spo_epsilon"),
    ({"name": "cdpo", "label_smoothing": 0.5}, "label_smoothing"),
    ({"name": "cdpo", "label_smoothing": -0.01}, "label_smoothing"),
    ({"name": "spo", "base": "cdpo", "label_smoothing": 0.7}, "label_smoothing"),
    ({"name": "dpop", "dpop_kappa": -1.0}, "dpop_kappa"),
    ({"refs": False}, "ref_chosen_logps"),
    ({"name": "dpop", "refs": False}, "ref_chosen_logps"),
    ({"name": "spo", "base": "simpo", "refs": False}, "ref_chosen_logps"),  # SPO's penalty needs ℓ_ref(y_w)
    ({"name": "spo", "base": "bogus"}, "base"),
    ({"name": "spo", "spo_estimator": "one_step"}, "spo_estimator"),
    ({"name": "spo", "spo_estimator": "two_step"}, "spo_estimator"),
    ({"nll_weight": 1.0}, "chosen_lengths"),
])
def test_invalid_options_raise_value_error_naming_the_option(kwargs, key):
    with pytest.raises(ValueError) as info:
        _call(**kwargs)
    assert key in str(info.value)


def test_bogus_base_message_names_the_bad_value():
    with pytest.raises(ValueError, match="bogus"):
        _call(name="spo", base="bogus")


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        preference_loss("cpo", t64([-1.0, -2.0]), t64([-1.0]), None, None)


def test_reference_free_losses_accept_missing_references():
    for name in REFERENCE_FREE:
        losses, _ = _call(name=name, refs=False)
        assert losses.shape == (2,)
