"""Preference losses as pure functions of per-sequence log-probabilities.

Everything here is tensor math: no models, no batching, no Ray. The contract is MISSION §2:

    losses, metrics = preference_loss(name, policy_chosen_logps, policy_rejected_logps,
                                      ref_chosen_logps, ref_rejected_logps, beta=0.1, **options)

`losses` has shape (B,) — one loss per pair; the batch loss is its mean. `metrics` holds detached
scalars (0-dim tensors) describing the batch: implicit rewards, margin, reward accuracy, log-prob
deltas against the reference and, for SPO, the penalty and the share of pairs outside the safe region.

Notation (per pair i): ℓ_θ(y) is the policy's log-prob of response y given the prompt (summed over
response tokens, or their mean when the caller passes length-averaged log-probs), ℓ_ref(y) the same
under the frozen reference, Δ = (ℓ_θ(y_w) − ℓ_ref(y_w)) − (ℓ_θ(y_l) − ℓ_ref(y_l)) and h = βΔ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: Losses that compare the policy with a frozen reference model.
REFERENCE_LOSSES = ("dpo", "cdpo", "ipo", "hinge", "dpop")
#: Losses that use the policy's log-probs alone.
REFERENCE_FREE_LOSSES = ("simpo", "cpo")
BASE_LOSSES = REFERENCE_LOSSES + REFERENCE_FREE_LOSSES
LOSSES = BASE_LOSSES + ("spo",)
SPO_ESTIMATORS = ("reference", "one_step")

# Options each loss understands, with their defaults. Anything else is a caller's typo.
_BASE_OPTIONS = {"nll_weight": 0.0, "chosen_lengths": None}
_LOSS_OPTIONS = {
    "dpo": {},
    "cdpo": {"label_smoothing": 0.1},
    "ipo": {},
    "hinge": {},
    "dpop": {"dpop_kappa": 5.0},
    "simpo": {"gamma": 0.5},
    "cpo": {},
}
_SPO_OPTIONS = {"base": "dpo", "spo_lambda": 1.0, "spo_epsilon": 0.0, "spo_estimator": "reference"}


def dpo_loss(h: Tensor) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): −log σ(h)."""
    return -F.logsigmoid(h)


def cdpo_loss(h: Tensor, label_smoothing: float) -> Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):
    −(1−ε) log σ(h) − ε log σ(−h), i.e. DPO with labels flipped with probability ε."""
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(delta: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036): (Δ − 1/(2β))², regress the log-ratio gap to a target."""
    return (delta - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(h: Tensor) -> Tensor:
    """SLiC hinge (Zhao et al. 2023, arXiv:2305.10425): max(0, 1 − h)."""
    return torch.relu(1.0 - h)


def dpop_loss(h: Tensor, chosen_logp_drop: Tensor, beta: float, dpop_kappa: float) -> Tensor:
    """DPO-Positive / Smaug (Pal et al. 2024, arXiv:2402.13228):
    −log σ(h − β·κ·max(0, ℓ_ref(y_w) − ℓ_θ(y_w))) — penalise a chosen response that became less likely."""
    return -F.logsigmoid(h - beta * dpop_kappa * torch.relu(chosen_logp_drop))


def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734): −log σ(β(ℓ̄_θ(y_w) − ℓ̄_θ(y_l)) − γ).
    ℓ̄ is the length-averaged log-prob: the caller passes averaged log-probs; no reference."""
    return -F.logsigmoid(beta * (policy_chosen - policy_rejected) - gamma)


def cpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, beta: float) -> Tensor:
    """CPO's preference term (Xu et al. 2024, arXiv:2401.08417): −log σ(β(ℓ_θ(y_w) − ℓ_θ(y_l))), no reference."""
    return -F.logsigmoid(beta * (policy_chosen - policy_rejected))


def nll_term(policy_chosen: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-pair NLL of the chosen response, −ℓ_θ(y_w)/|y_w| (RPO, Pang et al. 2024, arXiv:2404.19733)."""
    return -policy_chosen / chosen_lengths.clamp(min=1)


def safe_region_violation(policy_chosen: Tensor, ref_chosen: Tensor, spo_epsilon: float) -> Tensor:
    """SPO's per-pair value-function penalty with the `reference` estimator:
    max(0, ℓ_ref(y_w) − ℓ_θ(y_w) − ε).

    SPO (Jian et al. 2025, arXiv:2507.07723) treats preference optimisation as a bilevel program whose
    lower level is SFT on the preferred responses. Taking the reference as the lower level's solution,
    a pair lies inside the safe alignment region while its preferred response is at least as likely as
    under the reference (up to the tolerance ε); outside it, the penalty grows linearly with the drop.
    """
    return torch.relu(ref_chosen - policy_chosen - spo_epsilon)


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float = 0.1,
    **options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair preference losses and batch metrics.

    name: one of `LOSSES`. "spo" wraps a base loss (`base=`, default "dpo"):
        L_SPO = L_base + λ · max(0, ℓ_ref(y_w) − ℓ_θ(y_w) − ε)   per pair,
    with λ = `spo_lambda` (λ = 0 is exactly the base loss) and ε = `spo_epsilon`. The `one_step`
    estimator needs the model and batch, so the trainer adds its penalty (this function refuses it).
    Every loss may add `nll_weight · (−ℓ_θ(y_w)/|y_w|)`, which needs `chosen_lengths`.

    Raises ValueError naming the offending option for unknown names, unknown options and invalid values.
    """
    if name not in LOSSES:
        raise ValueError(f"loss: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    allowed = dict(_BASE_OPTIONS)
    if name == "spo":
        allowed.update(_SPO_OPTIONS)
        base = options.get("base", _SPO_OPTIONS["base"])
        if base not in BASE_LOSSES:
            raise ValueError(f"base: unknown base loss {base!r} for spo; expected one of {', '.join(BASE_LOSSES)}")
        allowed.update(_LOSS_OPTIONS[base])
    else:
        base = name
        allowed.update(_LOSS_OPTIONS[name])
    for key in options:
        if key not in allowed:
            raise ValueError(f"{key}: not an option of loss {name!r}; valid options are {', '.join(sorted(allowed))}")
    opts = {**allowed, **options}

    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    uses_reference = base in REFERENCE_LOSSES or name == "spo"
    if uses_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"ref_chosen_logps: loss {name!r} needs the reference log-probs")
    if policy_chosen_logps.shape != policy_rejected_logps.shape or policy_chosen_logps.dim() != 1:
        raise ValueError("policy_chosen_logps: chosen and rejected log-probs must both have shape (B,)")

    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        chosen_delta = chosen - ref_chosen_logps
        rejected_delta = rejected - ref_rejected_logps
    else:  # reference-free: the implicit reward is β·ℓ_θ itself
        chosen_delta, rejected_delta = chosen, rejected
    delta = chosen_delta - rejected_delta
    h = beta * delta

    if base == "dpo":
        losses = dpo_loss(h)
    elif base == "cdpo":
        eps = opts["label_smoothing"]
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {eps}")
        losses = cdpo_loss(h, eps)
    elif base == "ipo":
        losses = ipo_loss(delta, beta)
    elif base == "hinge":
        losses = hinge_loss(h)
    elif base == "dpop":
        if opts["dpop_kappa"] < 0:
            raise ValueError(f"dpop_kappa: must be >= 0, got {opts['dpop_kappa']}")
        losses = dpop_loss(h, ref_chosen_logps - chosen, beta, opts["dpop_kappa"])
    elif base == "simpo":
        losses = simpo_loss(chosen, rejected, beta, opts["gamma"])
    else:  # cpo
        losses = cpo_loss(chosen, rejected, beta)

    metrics: dict[str, Tensor] = {}
    if name == "spo":
        spo_lambda, spo_epsilon = opts["spo_lambda"], opts["spo_epsilon"]
        if spo_lambda < 0:
            raise ValueError(f"spo_lambda: must be >= 0, got {spo_lambda}")
        if spo_epsilon < 0:
            raise ValueError(f"spo_epsilon: must be >= 0, got {spo_epsilon}")
        if opts["spo_estimator"] not in SPO_ESTIMATORS:
            raise ValueError(f"spo_estimator: unknown estimator {opts['spo_estimator']!r}; "
                             f"expected one of {', '.join(SPO_ESTIMATORS)}")
        if opts["spo_estimator"] == "one_step":
            raise ValueError("spo_estimator: 'one_step' needs the model and batch; the trainer computes it "
                             "(call preference_loss with the base loss and add spo_ray.trainer's penalty)")
        penalty = safe_region_violation(chosen, ref_chosen_logps, spo_epsilon)
        if spo_lambda != 0:  # keep λ = 0 *exactly* the base loss, even where the penalty is inf
            losses = losses + spo_lambda * penalty
        metrics["spo_penalty"] = penalty.mean().detach()
        metrics["safe_region_violation"] = (penalty > 0).float().mean().detach()

    if opts["nll_weight"]:
        if opts["chosen_lengths"] is None:
            raise ValueError("chosen_lengths: nll_weight needs the chosen responses' token counts")
        nll = nll_term(chosen, opts["chosen_lengths"])
        losses = losses + opts["nll_weight"] * nll
        metrics["nll"] = nll.mean().detach()

    metrics.update(reward_metrics(chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta))
    return losses, metrics


def reward_metrics(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None,
                   beta: float) -> dict[str, Tensor]:
    """DPO's implicit rewards β(ℓ_θ − ℓ_ref) (β·ℓ_θ without a reference) and the log-prob trajectories."""
    with torch.no_grad():
        metrics = {"chosen_logps": chosen.mean(), "rejected_logps": rejected.mean()}
        if ref_chosen is not None and ref_rejected is not None:
            chosen_delta, rejected_delta = chosen - ref_chosen, rejected - ref_rejected
            metrics["chosen_logp_delta"] = chosen_delta.mean()
            metrics["rejected_logp_delta"] = rejected_delta.mean()
        else:
            chosen_delta, rejected_delta = chosen, rejected
        chosen_rewards, rejected_rewards = beta * chosen_delta, beta * rejected_delta
        metrics["chosen_reward"] = chosen_rewards.mean()
        metrics["rejected_reward"] = rejected_rewards.mean()
        metrics["reward_margin"] = (chosen_rewards - rejected_rewards).mean()
        metrics["reward_accuracy"] = (chosen_rewards > rejected_rewards).float().mean()
    return metrics
