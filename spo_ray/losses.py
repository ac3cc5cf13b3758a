"""Preference losses as pure functions of per-sequence log-probabilities.

Everything here is tensor math: no models, no batching, no Ray. The contract is MISSION §2:

    losses, metrics = preference_loss(name, policy_chosen_logps, policy_rejected_logps,
                                      ref_chosen_logps, ref_rejected_logps, beta=0.1, **options)

`losses` has shape (B,) — one loss per pair; the batch loss is its mean. `metrics` holds detached
scalars (0-dim tensors) describing the batch: implicit rewards, margin, reward accuracy, log-prob
deltas against the reference and, for SPO, the penalty and the share of pairs outside the safe region.

Notation (per pair i): ℓ_θ(y) is the policy's log-prob of response y given the prompt (summed over
response tokens, or their mean when the caller passes length-averaged log-probs), ℓ_ref(y) the same
under the frozen reference, |y| the response's token count, ρ(y) = ℓ_θ(y) − ℓ_ref(y) the log-ratio,
Δ = ρ(y_w) − ρ(y_l) and h = βΔ. With an f-divergence (`f_divergence_type`, f-DPO), the losses built on
the reward difference use the scores s(y) = f′(π_θ/π_ref)(y) in place of ρ(y), and Δ = s(y_w) − s(y_l).

The family is TRL 1.16's `DPOConfig.loss_type` (`TRL_LOSS_TYPES` maps its names to ours; tests/
test_trl_parity.py feeds the same log-probs to TRL's own `DPOTrainer._compute_loss` and to these functions),
plus cdpo, dpop, simpo and cpo. docs/losses.md has the table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: Losses that compare the policy with a frozen reference model.
REFERENCE_LOSSES = ("dpo", "cdpo", "ipo", "hinge", "dpop", "exo_pair", "nca_pair", "robust", "bco_pair",
                    "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
#: Losses that use the policy's log-probs alone.
REFERENCE_FREE_LOSSES = ("simpo", "cpo", "sft")
BASE_LOSSES = REFERENCE_LOSSES + REFERENCE_FREE_LOSSES
#: A weighted sum of base losses (`combine={name: weight}`; TRL's list of `loss_type`s with `loss_weights`).
COMBINE = "combine"
LOSSES = BASE_LOSSES + (COMBINE, "spo")
SPO_ESTIMATORS = ("reference", "one_step")

#: The base losses SPO cannot wrap, and why. SPO's penalty is added pair by pair to a loss whose objective is a
#: function of each pair's log-probs; these are not.
NOT_WRAPPABLE = {
    "sft": "SFT on the chosen responses is SPO's lower level itself",
    "aot": "aot sorts the log-ratios across the batch, so its terms are not a pair's own",
    "aot_unpaired": "aot_unpaired sorts the chosen and rejected log-ratios separately, pairing nothing",
}
#: What `spo` accepts as `base`: every base loss above except NOT_WRAPPABLE, or a combination of such losses.
SPO_BASES = tuple(name for name in BASE_LOSSES if name not in NOT_WRAPPABLE) + (COMBINE,)

#: TRL 1.16 `DPOConfig.loss_type` → our `loss.name` (ours where we had one, TRL's otherwise).
TRL_LOSS_TYPES = {"sigmoid": "dpo", "hinge": "hinge", "ipo": "ipo", **{name: name for name in (
    "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
    "discopop", "sft", "sigmoid_norm")}}

#: f-divergences between policy and reference (f-DPO, Wang et al. 2023, arXiv:2309.16240).
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: The losses built on the chosen-minus-rejected reward difference, where f-DPO's β·log Z(x) cancels: only
#: these generalise to another f-divergence (TRL's set, plus our cdpo). `sft` may sit beside them in a
#: combination (it has no reference to diverge from).
F_DIVERGENCE_LOSSES = ("dpo", "cdpo", "ipo", "hinge", "exo_pair", "robust", "discopop", "sigmoid_norm")


def f_divergence_unfit(members) -> list[str]:
    """The losses among `members` that cannot take a non-default f-divergence (`sft` may sit beside them)."""
    return [m for m in members if m not in F_DIVERGENCE_LOSSES and m != "sft"]

# Options each loss understands, with their defaults. Anything else is a caller's typo.
# wpo_chosen_logps, wpo_rejected_logps: WPO's per-token mean aligned log-probs (`wpo_weights`); given, they weight
# each pair's loss.
_BASE_OPTIONS = {"nll_weight": 0.0, "chosen_lengths": None, "rejected_lengths": None,
                 "wpo_chosen_logps": None, "wpo_rejected_logps": None}
_F_DIVERGENCE_OPTIONS = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5}
_LOSS_OPTIONS = {
    "dpo": {**_F_DIVERGENCE_OPTIONS},
    "cdpo": {"label_smoothing": 0.1, **_F_DIVERGENCE_OPTIONS},
    "ipo": {**_F_DIVERGENCE_OPTIONS},
    "hinge": {**_F_DIVERGENCE_OPTIONS},
    "dpop": {"dpop_kappa": 5.0},
    "simpo": {"gamma": 0.5},
    "cpo": {},
    "exo_pair": {"label_smoothing": 1e-3, **_F_DIVERGENCE_OPTIONS},  # the EXO paper's ε
    "nca_pair": {},
    "robust": {"label_smoothing": 0.1, **_F_DIVERGENCE_OPTIONS},     # the robust-DPO paper's typical ε
    "bco_pair": {},
    "sppo_hard": {},
    "aot": {"label_smoothing": 0.0},
    "aot_unpaired": {"label_smoothing": 0.0},
    "apo_zero": {},
    "apo_down": {},
    "discopop": {"discopop_tau": 0.05, **_F_DIVERGENCE_OPTIONS},     # the DiscoPOP paper's τ
    "sft": {},
    "sigmoid_norm": {**_F_DIVERGENCE_OPTIONS},
}
# spo_chosen_logps, spo_ref_chosen_logps: what the safe region is measured on where the loss's own inputs are
# another view (LD-DPO's down-weighted tails; TR-DPO's drifting reference): default, the loss's inputs.
_SPO_OPTIONS = {"base": "dpo", "spo_lambda": 1.0, "spo_epsilon": 0.0, "spo_estimator": "reference",
                "spo_chosen_logps": None, "spo_ref_chosen_logps": None}
#: Losses that read the response lengths (`chosen_lengths`, `rejected_lengths`) themselves.
LENGTH_LOSSES = ("sft", "sigmoid_norm")
#: Losses WPO's per-pair weights cannot apply to, and why (TRL refuses the same two).
NOT_WEIGHTABLE = {
    "aot": "aot sorts the log-ratios across the batch, so its terms belong to no pair",
    "aot_unpaired": "aot_unpaired sorts the chosen and rejected log-ratios separately, pairing nothing",
}


def loss_options(name: str, combine: dict[str, float] | None = None) -> tuple[str, ...]:
    """The options a base loss takes besides `beta`, `nll_weight` and the lengths; for `combine`, the weights
    (`combine`) and every option of its members."""
    if name != COMBINE:
        return tuple(_LOSS_OPTIONS[name])
    members = [member for member in (combine or {}) if member in _LOSS_OPTIONS]
    return ("combine", *dict.fromkeys(key for member in members for key in _LOSS_OPTIONS[member]))


# ------------------------------------------------------------------------------------------- f-divergences

# exp(·) of α-divergence scores stays finite in these dtypes below these exponents (TRL's clamp; float64's is
# ours: TRL's table has no float64 entry).
_ALPHA_EXPONENT_MAX = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 700.0}


def f_divergence_scores(logratios: Tensor, f_divergence_type: str, alpha: float) -> Tensor:
    """f′(u) at u = π_θ(y)/π_ref(y) = exp(ρ): the reward f-DPO (Wang et al. 2023, arXiv:2309.16240,
    Table 1) puts where DPO has ρ = log u.

        reverse_kl        log u = ρ                                   (DPO)
        forward_kl        1 − 1/u = 1 − e^{−ρ}
        js_divergence     log(2u/(1+u)) = log 2 + log σ(ρ)
        alpha_divergence  (1 − u^{−α})/α = −expm1(−αρ)/α,  α ∈ (0, 1); α → 0 is reverse KL, α = 1 forward KL

    α-divergence: the paper's f′(u) = (1 − u^{−α})/α, which TRL 1.16's docstring names ("the u^-α
    regularizer") but its code computes as (u^{α−1} − 1)/(α − 1), i.e. the paper's with 1 − α in place of α
    (the two agree at TRL's default α = 0.5; at α = 1 TRL's code falls back to reverse KL, the paper's α → 0
    limit). We follow the paper: our α is TRL's 1 − α. Like TRL, the exponent −αρ is clamped where exp would
    overflow (80 in float32/bfloat16, 11 in float16, computed in float32 for the half types; 700 in float64).
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if alpha == 0:  # the limit α → 0
            return logratios
        dtype = logratios.dtype
        exponent = (-alpha * logratios).float() if dtype in (torch.float16, torch.bfloat16) else -alpha * logratios
        exponent = exponent.clamp(max=_ALPHA_EXPONENT_MAX[dtype])
        return (-torch.expm1(exponent) / alpha).to(dtype)
    raise ValueError(f"f_divergence_type: unknown f-divergence {f_divergence_type!r}; expected one of "
                     f"{', '.join(F_DIVERGENCES)}")


# ------------------------------------------------------------------------------------------------- losses

def dpo_loss(h: Tensor) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): −log σ(h). TRL: `sigmoid`."""
    return -F.logsigmoid(h)


def cdpo_loss(h: Tensor, label_smoothing: float) -> Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):
    −(1−ε) log σ(h) − ε log σ(−h), i.e. DPO with labels flipped with probability ε.
    (TRL 1.16's `sigmoid` no longer reads `label_smoothing`; `robust` is the unbiased version.)"""
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(delta: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17 with τ = β): (Δ − 1/(2β))², regress the log-ratio gap
    to a target. Δ is taken from the log-probs given: TRL's `ipo` divides each log-ratio by its response's
    length first (a choice confirmed with the IPO authors), which is this loss on length-averaged log-probs
    (`loss.average_logps: true`)."""
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


def exo_pair_loss(h: Tensor, label_smoothing: float) -> Tensor:
    """EXO-pref for a pair (Ji et al. 2024, arXiv:2402.00856, Eq. 16 with K = 2 and β_π = β_r = β):
    KL(p_θ ‖ p_ε) = σ(h)(log σ(h) − log(1−ε)) + σ(−h)(log σ(−h) − log ε), where p_θ = softmax of the implicit
    rewards over {y_w, y_l} and p_ε = (1−ε, ε) the smoothed labels; needs ε > 0 (the paper uses 1e-3)."""
    log_q_chosen, log_q_rejected = F.logsigmoid(h), F.logsigmoid(-h)
    return (torch.sigmoid(h) * (log_q_chosen - math.log1p(-label_smoothing))
            + torch.sigmoid(-h) * (log_q_rejected - math.log(label_smoothing)))


def nca_pair_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """NCA for a pair (Chen et al. 2024, arXiv:2402.05369, "Noise Contrastive Alignment"), r = βρ:
    −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l) — absolute rewards, so ℓ_θ(y_w) is pushed up, not only the gap."""
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def robust_loss(h: Tensor, label_smoothing: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409): with the flip rate ε ∈ [0, 0.5),
    [−(1−ε) log σ(h) + ε log σ(−h)] / (1 − 2ε), an unbiased estimate of DPO's loss under label noise."""
    return (-(1 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / (1 - 2 * label_smoothing)


def bco_pair_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """BCO on pairs (Jung et al. 2024, arXiv:2404.04656), r = βρ: −log σ(r_w) − log σ(−r_l), a binary
    classifier with the chosen response as class 1 and the rejected as class 0. The paper shifts both rewards by
    δ, a running mean of the rewards over training; TRL 1.16's `bco_pair` has no δ, and neither has this pure
    function (it would need state across steps)."""
    return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 with P(y_w ≻ π) = 1,
    P(y_l ≻ π) = 0 and η = 1/β): (ρ(y_w) − 1/(2β))² + (ρ(y_l) + 1/(2β))²."""
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def aot_loss(policy_logratios: Tensor, ref_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): first-order stochastic dominance of the policy's
    margins over the reference's, by optimal transport in one dimension — sort both across the batch, compare
    rank by rank. With the k-th smallest of ℓ_θ(y_w) − ℓ_θ(y_l) and of ℓ_ref(y_w) − ℓ_ref(y_l), d_k their
    difference: −(1−ε) log σ(βd_k) − ε log σ(−βd_k). Entry k is the k-th rank's term, not pair k's."""
    d = torch.sort(policy_logratios, dim=0).values - torch.sort(ref_logratios, dim=0).values
    return cdpo_loss(beta * d, label_smoothing)


def aot_unpaired_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float,
                      label_smoothing: float) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882): the distribution of ρ(y_w) should dominate that
    of ρ(y_l); sorting each across the batch pairs the k-th smallest of each, d_k = ρ_w,(k) − ρ_l,(k), and
    −(1−ε) log σ(βd_k) − ε log σ(−βd_k). Entry k is the k-th rank's term."""
    d = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values
    return cdpo_loss(beta * d, label_smoothing)


def apo_zero_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7, plus TRL's constant 1 so it is ≥ 0),
    r = βρ: 1 − σ(r_w) + σ(r_l) — for chosen responses better than the model's own: ℓ_θ(y_w) up, ℓ_θ(y_l) down."""
    return 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)


def apo_down_loss(chosen_rewards: Tensor, h: Tensor) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8, plus TRL's constant 1), r = βρ:
    σ(r_w) + 1 − σ(h) — for chosen responses worse than the model's own: ℓ_θ(y_w) down, ℓ_θ(y_l) down more."""
    return torch.sigmoid(chosen_rewards) + (1 - torch.sigmoid(h))


def discopop_loss(h: Tensor, discopop_tau: float) -> Tensor:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, arXiv:2406.08414, Eq. 5), with τ the
    temperature: (1 − σ(h/τ))·(−log σ(h)) + σ(h/τ)·e^{−h} — logistic for negative margins, exponential for
    positive ones."""
    modulation = torch.sigmoid(h / discopop_tau)
    return -F.logsigmoid(h) * (1 - modulation) + torch.exp(-h) * modulation


def sft_loss(policy_chosen: Tensor, chosen_lengths: Tensor) -> Tensor:
    """SFT on the chosen responses, TRL's `sft` (the NLL term of RPO, Pang et al. 2024, arXiv:2404.19733, and
    MPO's quality loss): the mean NLL per chosen token over the batch, −Σ_i ℓ_θ(y_w^i) / Σ_i |y_w^i|. As a
    per-pair vector whose mean is that: −ℓ_θ(y_w^i) / mean_j |y_w^j|. (`nll_term` is the per-sequence mean.)"""
    return -policy_chosen / chosen_lengths.clamp(min=1).mean()


def sigmoid_norm_loss(chosen_scores: Tensor, rejected_scores: Tensor, chosen_lengths: Tensor,
                      rejected_lengths: Tensor, beta: float) -> Tensor:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024, arXiv:2411.15124; TRL's `sigmoid_norm`):
    −log σ(β(s(y_w)/|y_w| − s(y_l)/|y_l|)), each score (ρ, or f′ under an f-divergence) divided by its
    response's token count."""
    return -F.logsigmoid(beta * (chosen_scores / chosen_lengths.clamp(min=1)
                                 - rejected_scores / rejected_lengths.clamp(min=1)))


def ld_logps(logps: Tensor, shared_logps: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's length-desensitised log-prob (Liu et al. 2024, arXiv:2409.06411; TRL's `ld_alpha`):

        ℓ̂(y) = ℓ_p(y) + α · (ℓ(y) − ℓ_p(y))

    where ℓ_p(y) sums the log-probs of the reply's first min(|y_w|, |y_l|) tokens (the pair's "public" length,
    `spo_ray.logprobs.shared_prefix`) and ℓ(y) − ℓ_p(y) those of the longer reply's excess tokens. α = 1 is the
    plain sum (DPO); α < 1 shrinks the excess, so a reply's length moves the loss less; α = 0 drops it. The
    same weighting applies to the policy and the reference (both views of each reply)."""
    return shared_logps + ld_alpha * (logps - shared_logps)


def wpo_weights(wpo_chosen_logps: Tensor, wpo_rejected_logps: Tensor) -> Tensor:
    """WPO's per-pair weight (Zhou et al. 2024, arXiv:2406.11827, Eq. 2 as TRL 1.16's `use_weighting` computes
    it): w = exp(ā(y_w) + ā(y_l)), where ā(y) = (1/|y|) Σ_t [log π_θ(y_t | ·) − log Σ_v π_θ(v | ·)²] is the
    per-token mean of the policy's aligned log-probs (`spo_ray.logprobs.wpo_aligned_logps`), without gradient.
    The token ratio π(y_t)/Σ_v π(v)² has expectation 1 when y_t is sampled from the policy itself, so replies
    the current policy would have sampled weigh about 1 (a greedy-like one a little more) and off-policy ones
    less: the loss of off-policy preference data is reweighted toward on-policy data. TRL 1.16 raises on
    `sft` with `use_weighting` (it multiplies in place into its expanded batch loss); here each pair's share of
    the SFT term is weighted like any other loss."""
    return torch.exp(wpo_chosen_logps + wpo_rejected_logps).detach()


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


class _Pair:
    """The per-pair quantities the losses are written in, computed once per call."""

    def __init__(self, chosen, rejected, ref_chosen, ref_rejected, beta, f_divergence_type, f_alpha, lengths):
        self.chosen, self.rejected, self.ref_chosen, self.ref_rejected = chosen, rejected, ref_chosen, ref_rejected
        self.beta = beta
        self.chosen_lengths, self.rejected_lengths = lengths
        if ref_chosen is not None and ref_rejected is not None:
            self.chosen_logratios, self.rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
        else:  # reference-free: the implicit reward is β·ℓ_θ itself
            self.chosen_logratios, self.rejected_logratios = chosen, rejected
        self.chosen_scores = f_divergence_scores(self.chosen_logratios, f_divergence_type, f_alpha)
        self.rejected_scores = f_divergence_scores(self.rejected_logratios, f_divergence_type, f_alpha)
        self.delta = self.chosen_scores - self.rejected_scores
        self.h = beta * self.delta
        self.chosen_rewards, self.rejected_rewards = beta * self.chosen_logratios, beta * self.rejected_logratios


#: Each base loss from a pair's quantities `q` and its options `o` (defaults filled in).
_PAIR_LOSSES = {
    "dpo": lambda q, o: dpo_loss(q.h),
    "cdpo": lambda q, o: cdpo_loss(q.h, o["label_smoothing"]),
    "ipo": lambda q, o: ipo_loss(q.delta, q.beta),
    "hinge": lambda q, o: hinge_loss(q.h),
    "dpop": lambda q, o: dpop_loss(q.h, q.ref_chosen - q.chosen, q.beta, o["dpop_kappa"]),
    "simpo": lambda q, o: simpo_loss(q.chosen, q.rejected, q.beta, o["gamma"]),
    "cpo": lambda q, o: cpo_loss(q.chosen, q.rejected, q.beta),
    "exo_pair": lambda q, o: exo_pair_loss(q.h, o["label_smoothing"]),
    "nca_pair": lambda q, o: nca_pair_loss(q.chosen_rewards, q.rejected_rewards),
    "robust": lambda q, o: robust_loss(q.h, o["label_smoothing"]),
    "bco_pair": lambda q, o: bco_pair_loss(q.chosen_rewards, q.rejected_rewards),
    "sppo_hard": lambda q, o: sppo_hard_loss(q.chosen_logratios, q.rejected_logratios, q.beta),
    "aot": lambda q, o: aot_loss(q.chosen - q.rejected, q.ref_chosen - q.ref_rejected, q.beta, o["label_smoothing"]),
    "aot_unpaired": lambda q, o: aot_unpaired_loss(q.chosen_logratios, q.rejected_logratios, q.beta,
                                                   o["label_smoothing"]),
    "apo_zero": lambda q, o: apo_zero_loss(q.chosen_rewards, q.rejected_rewards),
    "apo_down": lambda q, o: apo_down_loss(q.chosen_rewards, q.h),
    "discopop": lambda q, o: discopop_loss(q.h, o["discopop_tau"]),
    "sft": lambda q, o: sft_loss(q.chosen, q.chosen_lengths),
    "sigmoid_norm": lambda q, o: sigmoid_norm_loss(q.chosen_scores, q.rejected_scores, q.chosen_lengths,
                                                   q.rejected_lengths, q.beta),
}


def _check_member_options(name: str, opts: dict) -> None:
    """ValueError naming the option when a base loss's option is out of its range."""
    eps = opts.get("label_smoothing")
    if name == "exo_pair" and not 0.0 < eps < 0.5:
        raise ValueError(f"label_smoothing: exo_pair needs ε in (0, 0.5) (it takes log ε; the EXO paper uses "
                         f"1e-3), got {eps}")
    if eps is not None and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing: must be in [0, 0.5), got {eps}")
    if opts.get("dpop_kappa", 0.0) < 0:
        raise ValueError(f"dpop_kappa: must be >= 0, got {opts['dpop_kappa']}")
    if "discopop_tau" in opts and not opts["discopop_tau"] > 0:
        raise ValueError(f"discopop_tau: must be > 0, got {opts['discopop_tau']}")
    if "f_divergence_type" in opts:
        if opts["f_divergence_type"] not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type: unknown f-divergence {opts['f_divergence_type']!r}; expected one "
                             f"of {', '.join(F_DIVERGENCES)}")
        if not 0.0 <= opts["f_alpha_divergence_coef"] <= 1.0:
            raise ValueError(f"f_alpha_divergence_coef: must be in [0, 1], got {opts['f_alpha_divergence_coef']}")
    lengths = ("chosen_lengths",) if name == "sft" else ("chosen_lengths", "rejected_lengths")
    if name in LENGTH_LOSSES and any(opts.get(key) is None for key in lengths):
        raise ValueError(f"{' and '.join(lengths)}: loss {name!r} needs the responses' token counts")


def _combined_weights(name: str, base: str, options: dict) -> dict[str, float]:
    """{base loss: weight} that `base` stands for: {base: 1} for one loss, the `combine` weights otherwise."""
    if base != COMBINE:
        return {base: 1.0}
    weights = options.get("combine")
    if not weights:
        raise ValueError("combine: needs the weights of the losses it combines, e.g. {'dpo': 1.0, 'sft': 1.0}")
    for member, weight in weights.items():
        if member not in BASE_LOSSES:
            raise ValueError(f"combine: unknown loss {member!r}; expected some of {', '.join(BASE_LOSSES)}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"combine: the weight of {member!r} must be finite and >= 0, got {weight}")
        if name == "spo" and member in NOT_WRAPPABLE:
            raise ValueError(f"combine: spo cannot wrap {member!r}: {NOT_WRAPPABLE[member]}")
    return dict(weights)


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

    name: one of `LOSSES`. "combine" is the weighted sum Σ_k w_k · L_k of base losses given as
    `combine={name: weight}` (TRL's `loss_type` list with `loss_weights`, e.g. MPO); the options of every
    member are accepted and each member reads those it takes. "spo" wraps a base loss or a combination
    (`base=`, default "dpo"; one of `SPO_BASES`):
        L_SPO = L_base + λ · max(0, ℓ_ref(y_w) − ℓ_θ(y_w) − ε)   per pair,
    with λ = `spo_lambda` (λ = 0 is exactly the base loss) and ε = `spo_epsilon`. The `one_step`
    estimator needs the model and batch, so the trainer adds its penalty (this function refuses it).
    Every loss may add `nll_weight · (−ℓ_θ(y_w)/|y_w|)`, which needs `chosen_lengths`; `sft` and
    `sigmoid_norm` need the lengths too (`chosen_lengths`, `rejected_lengths`: token counts, shape (B,)).
    With `wpo_chosen_logps` and `wpo_rejected_logps` (WPO, `wpo_weights`) each pair's base loss is multiplied by
    its weight; SPO's penalty and the NLL term are not (they are not terms of the preference data's likelihood).
    SPO's penalty is measured on `spo_chosen_logps` against `spo_ref_chosen_logps` where given (LD-DPO's
    inputs are down-weighted sums, TR-DPO's reference drifts: the safe region stays the summed log-prob's
    under the initial reference), else on the loss's own inputs.

    Raises ValueError naming the offending option for unknown names, unknown options and invalid values.
    """
    if name not in LOSSES:
        raise ValueError(f"loss: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    allowed = dict(_BASE_OPTIONS)
    if name == "spo":
        allowed.update(_SPO_OPTIONS)
        base = options.get("base", _SPO_OPTIONS["base"])
        if base in NOT_WRAPPABLE:
            raise ValueError(f"base: spo cannot wrap {base!r}: {NOT_WRAPPABLE[base]}")
        if base not in SPO_BASES:
            raise ValueError(f"base: unknown base loss {base!r} for spo; expected one of {', '.join(SPO_BASES)}")
    else:
        base = name
    if base == COMBINE:
        allowed["combine"] = None
    weights = _combined_weights(name, base, options)
    for member in weights:
        allowed.update(_LOSS_OPTIONS[member])
    for key in options:
        if key not in allowed:
            raise ValueError(f"{key}: not an option of loss {name!r}; valid options are {', '.join(sorted(allowed))}")
    opts = {**allowed, **options}
    # Each member reads its own options, at its own defaults where the caller gave none (exo_pair's ε is not cdpo's).
    member_options = {member: {**_LOSS_OPTIONS[member], **{k: opts[k] for k in _BASE_OPTIONS},
                               **{k: v for k, v in options.items() if k in _LOSS_OPTIONS[member]}}
                      for member in weights}
    for member, member_opts in member_options.items():
        _check_member_options(member, member_opts)
    f_divergence_type = options.get("f_divergence_type", "reverse_kl")
    if f_divergence_type != "reverse_kl":
        unfit = f_divergence_unfit(weights)
        if unfit:
            raise ValueError(f"f_divergence_type: {f_divergence_type} needs losses built on the chosen-minus-"
                             f"rejected reward difference ({', '.join(F_DIVERGENCE_LOSSES)}); not {', '.join(unfit)}")

    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    uses_reference = name == "spo" or any(member in REFERENCE_LOSSES for member in weights)
    if uses_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"ref_chosen_logps: loss {name!r} needs the reference log-probs")
    if policy_chosen_logps.shape != policy_rejected_logps.shape or policy_chosen_logps.dim() != 1:
        raise ValueError("policy_chosen_logps: chosen and rejected log-probs must both have shape (B,)")

    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    pair = _Pair(chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta, f_divergence_type,
                 options.get("f_alpha_divergence_coef", _F_DIVERGENCE_OPTIONS["f_alpha_divergence_coef"]),
                 (opts["chosen_lengths"], opts["rejected_lengths"]))
    metrics: dict[str, Tensor] = {}
    if base == COMBINE:
        losses = 0
        for member, weight in weights.items():
            part = _PAIR_LOSSES[member](pair, member_options[member])
            losses = losses + weight * part
            metrics[f"{member}_loss"] = part.mean().detach()
    else:
        losses = _PAIR_LOSSES[base](pair, member_options[base])
    if opts["wpo_chosen_logps"] is not None or opts["wpo_rejected_logps"] is not None:
        refused = [member for member in weights if member in NOT_WEIGHTABLE]
        if refused:
            raise ValueError(f"use_weighting: WPO weights a pair's loss; {NOT_WEIGHTABLE[refused[0]]}")
        pair_weights = wpo_weights(opts["wpo_chosen_logps"], opts["wpo_rejected_logps"])
        losses = losses * pair_weights
        metrics["wpo_weight"] = pair_weights.mean()

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
        measured = opts["spo_chosen_logps"] if opts["spo_chosen_logps"] is not None else chosen
        anchor = opts["spo_ref_chosen_logps"] if opts["spo_ref_chosen_logps"] is not None else ref_chosen_logps
        penalty = safe_region_violation(measured, anchor, spo_epsilon)
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
