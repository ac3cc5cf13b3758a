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
from spo_ray.losses import BASE_LOSSES, NOT_WRAPPABLE, SPO_BASES, preference_loss

REFERENCE_FREE = ("simpo", "cpo", "sft")
#: Every base loss SPO wraps (a combination is tested on its own).
WRAPPABLE = tuple(base for base in SPO_BASES if base != "combine")
#: Losses computed across the batch (sorting, a batch-wide token count), not pair by pair.
BATCH_LOSSES = ("sft", "aot", "aot_unpaired")


# ------------------------------------------------------------------------------ independent formulas


def log_sigmoid(x: float) -> float:
    """log σ(x) = −log(1 + e^{−x}), written to stay finite for large |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def f_divergence_score(logratio: float, options: dict) -> float:
    """f′(π/π_ref) from f-DPO's Table 1 (Wang et al. 2023, arXiv:2309.16240), α-divergence as (1 − u^{−α})/α."""
    kind = options.get("f_divergence_type", "reverse_kl")
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1 - math.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2 * math.exp(logratio) / (1 + math.exp(logratio)))
    alpha = options.get("f_alpha_divergence_coef", 0.5)
    return (1 - math.exp(logratio) ** -alpha) / alpha


def base_loss_formula(name: str, pc: float, pr: float, rc: float, rr: float, beta: float, options: dict,
                      lc: float = 1.0, lr: float = 1.0) -> float:
    """One pair's loss, straight from the MISSION §2 table and the papers cited in spo_ray.losses."""
    rho_w, rho_l = pc - rc, pr - rr
    s_w, s_l = f_divergence_score(rho_w, options), f_divergence_score(rho_l, options)
    delta = s_w - s_l
    h = beta * delta
    r_w, r_l = beta * rho_w, beta * rho_l
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
    if name == "exo_pair":  # KL((σ(h), σ(−h)) ‖ (1−ε, ε))
        eps = options.get("label_smoothing", 1e-3)
        return sigmoid(h) * math.log(sigmoid(h) / (1 - eps)) + sigmoid(-h) * math.log(sigmoid(-h) / eps)
    if name == "nca_pair":
        return -log_sigmoid(r_w) - 0.5 * log_sigmoid(-r_w) - 0.5 * log_sigmoid(-r_l)
    if name == "robust":
        eps = options.get("label_smoothing", 0.1)
        return ((1 - eps) * -log_sigmoid(h) - eps * -log_sigmoid(-h)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -log_sigmoid(r_w) - log_sigmoid(-r_l)
    if name == "sppo_hard":
        return (rho_w - 1 / (2 * beta)) ** 2 + (rho_l + 1 / (2 * beta)) ** 2
    if name == "apo_zero":
        return 1 - sigmoid(r_w) + sigmoid(r_l)
    if name == "apo_down":
        return sigmoid(r_w) + 1 - sigmoid(beta * (rho_w - rho_l))
    if name == "discopop":
        tau = options.get("discopop_tau", 0.05)
        return (1 - sigmoid(h / tau)) * -log_sigmoid(h) + sigmoid(h / tau) * math.exp(-h)
    if name == "sigmoid_norm":
        return -log_sigmoid(beta * (s_w / lc - s_l / lr))
    raise AssertionError(name)


def batch_loss_formula(name: str, pc, pr, rc, rr, beta: float, options: dict) -> list[float]:
    """The losses computed across the batch: one term per rank (aot) or per pair of a batch-wide mean (sft)."""
    if name == "sft":  # mean NLL per chosen token over the batch, spread evenly: −ℓ_i / mean_j |y_j|
        mean_length = sum(options["chosen_lengths"]) / len(pc)
        return [-x / mean_length for x in pc]
    eps = options.get("label_smoothing", 0.0)
    if name == "aot":
        d = [a - b for a, b in zip(sorted(w - l for w, l in zip(pc, pr)), sorted(w - l for w, l in zip(rc, rr)))]
    else:  # aot_unpaired
        d = [a - b for a, b in zip(sorted(w - r for w, r in zip(pc, rc)), sorted(l - r for l, r in zip(pr, rr)))]
    return [-(1 - eps) * log_sigmoid(beta * x) - eps * log_sigmoid(-beta * x) for x in d]


def member_formula(name: str, pc, pr, rc, rr, beta: float, options: dict) -> list[float]:
    """Per-pair losses of one base loss (reference-free ones ignore rc, rr)."""
    if name in BATCH_LOSSES:
        return batch_loss_formula(name, pc, pr, rc, rr, beta, options)
    lengths = zip(options.get("chosen_lengths") or [1.0] * len(pc), options.get("rejected_lengths") or [1.0] * len(pc))
    if rc is None:
        rc, rr = [0.0] * len(pc), [0.0] * len(pc)  # unused by the reference-free formulas
    return [base_loss_formula(name, pc[i], pr[i], rc[i], rr[i], beta, options, lc, lr)
            for i, (lc, lr) in enumerate(lengths)]


def loss_formula(name: str, pc, pr, rc, rr, beta: float, options: dict) -> list[float]:
    """Per-pair losses for a whole batch of Python floats, combinations, SPO and the NLL term included."""
    base = options.get("base", "dpo") if name == "spo" else name
    weights = options["combine"] if base == "combine" else {base: 1.0}
    out = [0.0] * len(pc)
    for member, weight in weights.items():
        refs = (None, None) if member in REFERENCE_FREE else (rc, rr)
        for i, value in enumerate(member_formula(member, pc, pr, *refs, beta, options)):
            out[i] += weight * value
    for i in range(len(pc)):
        if name == "spo":
            lam = options.get("spo_lambda", 1.0)
            eps = options.get("spo_epsilon", 0.0)
            out[i] += lam * max(0.0, rc[i] - pc[i] - eps)
        if options.get("nll_weight"):
            out[i] += options["nll_weight"] * (-pc[i] / options["chosen_lengths"][i])
    return out


def random_batch(seed: int, size: int = 16) -> dict[str, list[float]]:
    """Summed log-probs of plausible magnitude, with the reference within a few nats of the policy."""
    rng = random.Random(seed)
    pc = [-rng.uniform(2.0, 40.0) for _ in range(size)]
    pr = [-rng.uniform(2.0, 40.0) for _ in range(size)]
    rc = [x + rng.uniform(-4.0, 4.0) for x in pc]
    rr = [x + rng.uniform(-4.0, 4.0) for x in pr]
    lengths = [float(rng.randint(1, 30)) for _ in range(size)]
    rejected_lengths = [float(rng.randint(1, 30)) for _ in range(size)]
    return {"pc": pc, "pr": pr, "rc": rc, "rr": rr, "lengths": lengths, "rejected_lengths": rejected_lengths}


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


F_DIVERGENCES = [{"f_divergence_type": "forward_kl"}, {"f_divergence_type": "js_divergence"},
                 {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}]
MPO = {"combine": {"bco_pair": 0.8, "sft": 0.2, "dpo": 1.0}}  # MPO's recipe shape: three losses, three weights

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
    ("exo_pair", {}),
    ("exo_pair", {"label_smoothing": 0.2}),
    ("nca_pair", {}),
    ("robust", {}),
    ("robust", {"label_smoothing": 0.4}),
    ("bco_pair", {}),
    ("sppo_hard", {}),
    ("aot", {}),
    ("aot", {"label_smoothing": 0.2}),
    ("aot_unpaired", {"label_smoothing": 0.1}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {}),
    ("discopop", {"discopop_tau": 0.5}),
    ("sft", {}),
    ("sigmoid_norm", {}),
    ("combine", {"combine": {"dpo": 1.0, "sft": 1.0}}),
    ("combine", MPO),
    ("combine", {"combine": {"robust": 0.5, "exo_pair": 2.0}, "label_smoothing": 0.25}),  # one ε for both
] + [
    (name, f_divergence) for name in ("dpo", "cdpo", "ipo", "hinge", "exo_pair", "robust", "discopop", "sigmoid_norm")
    for f_divergence in F_DIVERGENCES
] + [
    ("combine", {"combine": {"sigmoid_norm": 1.0, "sft": 0.5}, **F_DIVERGENCES[1]}),
] + [
    ("spo", {"base": base, "spo_lambda": 0.8, "spo_epsilon": 0.5}) for base in WRAPPABLE
] + [
    ("spo", {"base": "dpo"}),  # the defaults: λ = 1, ε = 0
    ("spo", {"base": "cdpo", "label_smoothing": 0.2, "spo_lambda": 3.0, "nll_weight": 0.5}),
    ("spo", {"base": "dpop", "dpop_kappa": 1.0, "spo_lambda": 0.1, "spo_epsilon": 1.0}),
    ("spo", {"base": "simpo", "gamma": 0.25, "spo_lambda": 2.0, "nll_weight": 0.3}),
    ("spo", {"base": "discopop", "discopop_tau": 0.2, **F_DIVERGENCES[2]}),
    ("spo", {"base": "combine", "combine": {"dpo": 1.0, "nca_pair": 0.5}, "spo_lambda": 2.0}),
]


def is_reference_free(name: str, options: dict) -> bool:
    members = options["combine"] if name == "combine" else [name]
    return all(member in REFERENCE_FREE for member in members)


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{sorted(o.items())}" for n, o in CASES])
def test_every_loss_matches_its_formula_in_float64(name, options, beta):
    for seed in range(3):
        batch = random_batch(seed)
        opts = {**options, "chosen_lengths": batch["lengths"], "rejected_lengths": batch["rejected_lengths"]}
        reference_free = is_reference_free(name, options)
        rc = None if reference_free else batch["rc"]
        rr = None if reference_free else batch["rr"]
        expected = loss_formula(name, batch["pc"], batch["pr"], rc, rr, beta, opts)

        call_opts = {**opts, "chosen_lengths": t64(opts["chosen_lengths"]),
                     "rejected_lengths": t64(opts["rejected_lengths"])}
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


_LENGTHS = {"chosen_lengths": t64([3.0, 5.0, 1.0, 7.0, 2.0, 4.0]),
            "rejected_lengths": t64([2.0, 6.0, 4.0, 1.0, 3.0, 9.0])}
#: The combination the SPO tests wrap: three wrappable losses of different shapes.
_COMBINATION = {"combine": {"dpo": 1.0, "nca_pair": 0.5, "sigmoid_norm": 0.25}}


def base_options(base: str, size: int) -> dict:
    """What a base loss needs besides the log-probs: the lengths (every loss accepts them), the weights."""
    options = {key: value[:size] for key, value in _LENGTHS.items()}
    return {**options, **_COMBINATION} if base == "combine" else options


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
    ("dpo", {"nll_weight": 0.5, **_LENGTHS}),
    ("exo_pair", {"label_smoothing": 0.01}),
    ("nca_pair", {}),
    ("robust", {"label_smoothing": 0.2}),
    ("bco_pair", {}),
    ("sppo_hard", {}),
    ("aot", {"label_smoothing": 0.1}),  # sorting permutes; away from ties it is smooth
    ("aot_unpaired", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {"discopop_tau": 0.3}),
    ("sft", _LENGTHS),
    ("sigmoid_norm", _LENGTHS),
    ("combine", {"combine": {"dpo": 1.0, "sigmoid_norm": 0.5, "sft": 0.25}, **_LENGTHS,
                 "f_divergence_type": "js_divergence"}),
] + [("dpo", {"f_divergence_type": kind, "f_alpha_divergence_coef": 0.4})
     for kind in ("forward_kl", "js_divergence", "alpha_divergence")])
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


@pytest.mark.parametrize("base", [*WRAPPABLE, "combine"])
def test_spo_passes_gradcheck_away_from_the_safe_region_boundary(base):
    # ε = 0.5 moves the kink to a drop of 0.5; the drops are ±2.5 and −2.
    _gradcheck("spo", _KINK_FREE, base=base, spo_lambda=1.5, spo_epsilon=0.5, **base_options(base, 4))


# ------------------------------------------------------------------------------------------------ SPO


@pytest.mark.parametrize("base", [*WRAPPABLE, "combine"])
def test_spo_with_zero_lambda_equals_its_base_exactly(base):
    batch = random_batch(3, size=6)
    pc, pr, rc, rr = (t64(batch[k]) for k in ("pc", "pr", "rc", "rr"))
    base_refs = (None, None) if base in REFERENCE_FREE else (rc, rr)
    options = base_options(base, 6)
    base_losses, _ = preference_loss(base, pc, pr, *base_refs, beta=0.2, **options)
    spo_losses, metrics = preference_loss("spo", pc, pr, rc, rr, beta=0.2, base=base, spo_lambda=0.0, **options)
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


@pytest.mark.parametrize("base", [*WRAPPABLE, "combine"])
def test_spo_penalty_gradient_is_nonzero_only_outside_the_safe_region(base):
    spo_lambda = 2.0
    pr = t64([-7.0, -5.0, -6.5, -9.0, -12.0, -2.0])
    rr = t64([-7.5, -4.0, -6.0, -9.5, -11.0, -2.5])
    rc = t64(_SPO_REF_CHOSEN)

    def chosen_grad(name, **options):
        pc = t64(_SPO_POLICY_CHOSEN).requires_grad_(True)
        refs = (None, None) if name in REFERENCE_FREE else (rc, rr)
        losses, _ = preference_loss(name, pc, pr, *refs, beta=0.1, **options, **base_options(base, 6))
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
    ({"name": "exo_pair", "label_smoothing": 0.0}, "label_smoothing"),  # log ε
    ({"name": "robust", "label_smoothing": 0.5}, "label_smoothing"),    # 1/(1 − 2ε)
    ({"name": "aot", "label_smoothing": -0.1}, "label_smoothing"),
    ({"name": "discopop", "discopop_tau": 0.0}, "discopop_tau"),
    ({"name": "dpo", "label_smoothing": 0.1}, "label_smoothing"),       # TRL 1.16's sigmoid ignores it; we refuse
    ({"name": "dpo", "f_divergence_type": "kl"}, "f_divergence_type"),
    ({"name": "dpo", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5},
     "f_alpha_divergence_coef"),
    ({"name": "nca_pair", "f_divergence_type": "forward_kl"}, "f_divergence_type"),  # no reward difference
    ({"name": "combine", "combine": {"dpo": 1.0, "nca_pair": 1.0}, "f_divergence_type": "forward_kl"},
     "f_divergence_type"),
    ({"name": "sigmoid_norm"}, "chosen_lengths"),
    ({"name": "sft", "refs": False}, "chosen_lengths"),
    ({"name": "combine"}, "combine"),
    ({"name": "combine", "combine": {}}, "combine"),
    ({"name": "combine", "combine": {"dpoo": 1.0}}, "dpoo"),
    ({"name": "combine", "combine": {"spo": 1.0}}, "spo"),
    ({"name": "combine", "combine": {"dpo": -1.0}}, "combine"),
    ({"name": "combine", "combine": {"dpo": float("nan")}}, "combine"),
    ({"combine": {"dpo": 1.0}}, "combine"),                             # weights, but nothing combined
    ({"name": "combine", "combine": {"dpo": 1.0}, "gamma": 0.5}, "gamma"),  # no member takes it
    ({"name": "spo", "base": "sft"}, "base"),
    ({"name": "spo", "base": "aot"}, "base"),
    ({"name": "spo", "base": "aot_unpaired"}, "base"),
    ({"name": "spo", "base": "combine", "combine": {"dpo": 1.0, "sft": 1.0}}, "combine"),
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
        losses, _ = _call(name=name, refs=False, chosen_lengths=t64([2.0, 3.0]))
        assert losses.shape == (2,)


def test_spo_refuses_each_loss_it_cannot_wrap_saying_why():
    for base, reason in NOT_WRAPPABLE.items():
        with pytest.raises(ValueError, match=f"^base: spo cannot wrap '{base}': ") as info:
            _call(name="spo", base=base)
        assert reason in str(info.value)


# ----------------------------------------------------------------------------------- combinations


def test_a_combination_is_the_weighted_sum_of_its_members_and_reports_each():
    batch = random_batch(5, size=8)
    pc, pr, rc, rr, lengths = (t64(batch[k]) for k in ("pc", "pr", "rc", "rr", "lengths"))
    weights = {"robust": 0.8, "sft": 0.2, "apo_zero": 1.5}
    members = {
        "robust": preference_loss("robust", pc, pr, rc, rr, beta=0.3, label_smoothing=0.2)[0],
        "sft": preference_loss("sft", pc, pr, None, None, beta=0.3, chosen_lengths=lengths)[0],
        "apo_zero": preference_loss("apo_zero", pc, pr, rc, rr, beta=0.3)[0]}
    combined, metrics = preference_loss("combine", pc, pr, rc, rr, beta=0.3, combine=weights, label_smoothing=0.2,
                                        chosen_lengths=lengths)
    assert torch.equal(combined, 0.8 * members["robust"] + 0.2 * members["sft"] + 1.5 * members["apo_zero"])
    for name, losses in members.items():
        assert metrics[f"{name}_loss"] == losses.mean()


def test_each_member_of_a_combination_keeps_its_own_default_options():
    # exo_pair's ε defaults to 1e-3 and cdpo's to 0.1, in one combination as alone.
    pc, pr, rc, rr = _smooth_inputs()
    alone = {name: preference_loss(name, pc, pr, rc, rr)[0] for name in ("exo_pair", "cdpo")}
    combined, _ = preference_loss("combine", pc, pr, rc, rr, combine={"exo_pair": 1.0, "cdpo": 1.0})
    assert torch.equal(combined, 1.0 * alone["exo_pair"] + 1.0 * alone["cdpo"])


# ----------------------------------------------------------------------------------- f-divergences


def test_reverse_kl_is_the_default_and_leaves_every_loss_unchanged():
    pc, pr, rc, rr = _smooth_inputs()
    for name in ("dpo", "ipo", "hinge", "robust", "discopop", "exo_pair"):
        plain, _ = preference_loss(name, pc, pr, rc, rr, beta=0.3)
        explicit, _ = preference_loss(name, pc, pr, rc, rr, beta=0.3, f_divergence_type="reverse_kl",
                                      f_alpha_divergence_coef=0.9)
        assert torch.equal(plain, explicit), name


def test_alpha_divergence_meets_its_limits_reverse_kl_at_zero_and_forward_kl_at_one():
    pc, pr, rc, rr = _smooth_inputs()

    def dpo(**options):
        return preference_loss("dpo", pc, pr, rc, rr, beta=0.3, **options)[0]

    assert torch.equal(dpo(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0), dpo())
    forward = dpo(f_divergence_type="forward_kl")
    # (1 − e^{−ρ}) by expm1 and by exp: a few roundings of the log-ratios' size (≤ 4 nats here).
    close = dpo(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    assert (close - forward).abs().max() <= rounding_tolerance(50.0, 8, torch.float64)
    # Near α = 0 the scores approach ρ (expm1 keeps −expm1(−αρ)/α accurate there): DPO to O(α).
    tiny = dpo(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1e-9)
    assert (tiny - dpo()).abs().max() <= 1e-8


def test_alpha_divergence_stays_finite_in_float32_where_exp_would_overflow():
    # ρ(y_w) = −400 nats: e^{αρ·(−1)} = e^{200} overflows float32; the exponent is clamped at 80 as in TRL.
    pc, pr = torch.tensor([-420.0]), torch.tensor([-30.0])
    rc, rr = torch.tensor([-20.0]), torch.tensor([-31.0])
    losses, _ = preference_loss("dpo", pc, pr, rc, rr, beta=0.1, f_divergence_type="alpha_divergence",
                                f_alpha_divergence_coef=0.5)
    assert torch.isfinite(losses).all()
