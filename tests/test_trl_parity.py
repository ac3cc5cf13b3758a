"""Our DPO (tokenize_pairs → collate_pairs → concatenated_forward → preference_loss) against TRL's DPOTrainer.

Same tiny Llama, same reference (a differently seeded init, so the loss is not log 2), same pairs, same β.
How TRL 1.16 tokenizes a non-conversational pair (trl/trainer/dpo_trainer.py, `_prepare_dataset`): it appends
the tokenizer's EOS *string* to chosen and rejected, encodes prompt and prompt+completion with the tokenizer's
defaults (so a BOS comes only from the tokenizer's post-processor), and splits the completion off at the
common prefix. Our `tokenize_pairs` encodes the prompt with special tokens and the responses without, then
appends the EOS id — the same ids, which the first test pins before the numbers are compared.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, decoders, models, processors  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from conftest import assert_as_accurate_as_float32  # noqa: E402
from spo_ray.data import PairDataset, TokenizedPair, collate_pairs, tokenize_pairs  # noqa: E402
from spo_ray.logprobs import concatenated_forward  # noqa: E402
from spo_ray.losses import preference_loss  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' renames, inside TRL

BETA = 0.5
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+-=?QA: \n")

PAIRS = [
    {"prompt": "Q: 12+7=?\nA:", "chosen": " 91", "rejected": " 81"},
    {"prompt": "Q: 3+4=?\nA:", "chosen": " 7", "rejected": " 71"},
    {"prompt": "Q: 45+38=?\nA:", "chosen": " 38", "rejected": " 37"},
    {"prompt": "Q: 9-2=?\nA:", "chosen": " 7", "rejected": " 6"},
]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One id per character, a BOS before every encoded text, <pad>/<s>/</s> as special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: single characters
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.3)  # a wide init: far-apart policy and reference
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    """A DPOTrainer over PAIRS, plus untouched copies of its policy and reference for our side."""
    policy, reference = tiny_llama(seed=0), tiny_llama(seed=1)
    ours = (copy.deepcopy(policy).eval(), copy.deepcopy(reference).eval())
    args = trl.DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, beta=BETA,
        loss_type=["sigmoid"], per_device_train_batch_size=len(PAIRS), max_length=None,
        precompute_ref_log_probs=False, dataset_num_proc=None, logging_strategy="no", save_strategy="no",
        # TRL's DPOConfig defaults to bf16=True, and `accelerator.prepare_model` then runs the reference under
        # bf16 autocast even on a CPU: log-probs off by ~0.05 nats. Compare in float32.
        bf16=False,
    )
    logging.getLogger("trl").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=char_tokenizer())
    return trainer, ours


def trl_batch_metrics(trainer, rows: list[int]) -> dict[str, float]:
    """TRL's batch loss and the metrics its `_compute_loss` records, for the given dataset rows in order."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    for values in trainer._metrics["train"].values():
        values.clear()
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items() if values}
    metrics["loss"] = loss.item()
    return metrics


def our_batch_metrics(policy, reference, pairs: list[TokenizedPair]) -> dict[str, float]:
    batch = collate_pairs(list(PairDataset(pairs)), pad_token_id=0, padding_side="right")
    with torch.no_grad():
        pol = concatenated_forward(policy, batch)
        ref = concatenated_forward(reference, batch)
        losses, m = preference_loss("dpo", pol["chosen_logps"], pol["rejected_logps"],
                                    ref["chosen_logps"], ref["rejected_logps"], beta=BETA)
    return {"loss": losses.mean().item(), **{k: v.item() for k, v in m.items()}}


def test_our_tokenization_gives_trls_token_ids(trl_trainer):
    trainer, _ = trl_trainer
    ours, _ = tokenize_pairs(PAIRS, char_tokenizer())
    tok = char_tokenizer()
    for i, pair in enumerate(ours):
        row = trainer.train_dataset[i]
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (
            row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
        # TRL adds the EOS to completions, and the BOS comes from the tokenizer, on the prompt only.
        assert pair.prompt_ids[0] == tok.bos_token_id and pair.chosen_ids[-1] == tok.eos_token_id
        assert tok.bos_token_id not in pair.chosen_ids + pair.rejected_ids


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [0], [1], [2], [3]], ids=["batch", "pair0", "pair1", "pair2", "pair3"])
def test_dpo_loss_and_rewards_match_trl_dpo_trainer(trl_trainer, rows):
    trainer, (policy, reference) = trl_trainer
    tokenized, _ = tokenize_pairs([PAIRS[i] for i in rows], char_tokenizer())
    ours = our_batch_metrics(policy, reference, tokenized)
    exact = our_batch_metrics(copy.deepcopy(policy).double(), copy.deepcopy(reference).double(), tokenized)
    theirs = trl_batch_metrics(trainer, rows)

    assert abs(ours["loss"] - math.log(2)) > 1e-2  # the differently seeded reference makes the test non-trivial
    # TRL's float32 numbers are as close to our float64 ones as our own float32 numbers are. Every metric is
    # computed from the log-probs, so their size is what the rounding is relative to.
    logps = max(abs(exact["chosen_logps"]), abs(exact["rejected_logps"]))
    for key, theirs_key in [("loss", "loss"), ("chosen_reward", "rewards/chosen"),
                            ("rejected_reward", "rewards/rejected"), ("reward_margin", "rewards/margins"),
                            ("chosen_logps", "logps/chosen"), ("rejected_logps", "logps/rejected")]:
        assert_as_accurate_as_float32(theirs[theirs_key], ours[key], exact[key], key, scale=logps)
    assert ours["reward_accuracy"] == theirs["rewards/accuracies"]  # a mean of 0/1 over ≤ 4 pairs: exact


# ---------------------------------------------------------------------------------------------------
# Every loss type of TRL 1.16 against TRL's own code, on the same log-probs.
#
# TRL 1.16 computes its losses inline in `DPOTrainer._compute_loss`, after the model's forward. We call that very
# method on a DPOTrainer instance whose model returns per-token log-probs built from our per-sequence ones (the
# whole log-prob on a response's first token, 0.0 on the others, so TRL's sum over tokens gives ours back exactly),
# with the reference log-probs "precomputed" in the inputs. The attributes are the ones `DPOTrainer.__init__` sets
# from a real `DPOConfig`. Both sides run in float64 and are compared value and gradient.

from collections import defaultdict  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from conftest import rounding_tolerance  # noqa: E402
from spo_ray.losses import TRL_LOSS_TYPES, loss_options  # noqa: E402


def parity_batch(seed: int, size: int = 6, unit_lengths: bool = False) -> dict[str, torch.Tensor]:
    """Summed log-probs of plausible size (2–40 nats), references within 4 nats, lengths 1–30 tokens."""
    g = torch.Generator().manual_seed(seed)

    def uniform(low, high):
        return low + (high - low) * torch.rand(size, generator=g, dtype=torch.float64)

    pc, pr = -uniform(2.0, 40.0), -uniform(2.0, 40.0)
    lengths = (torch.ones(2, size, dtype=torch.float64) if unit_lengths
               else torch.randint(1, 31, (2, size), generator=g).double())
    return {"pc": pc, "pr": pr, "rc": pc + uniform(-4.0, 4.0), "rr": pr + uniform(-4.0, 4.0),
            "chosen_lengths": lengths[0], "rejected_lengths": lengths[1]}


def trl_instance(loss_types: list[str], beta: float, tmp_path, loss_weights=None, precompute=True, **config):
    """A DPOTrainer with the attributes `DPOTrainer.__init__` sets from a real `DPOConfig`, minus the model, data
    and optimizer set-up."""
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, beta=beta,
                         loss_type=loss_types, loss_weights=loss_weights, precompute_ref_log_probs=precompute,
                         **config)
    trainer = object.__new__(trl.DPOTrainer)
    trainer.args, trainer.beta, trainer.precompute_ref_logps = args, args.beta, args.precompute_ref_log_probs
    trainer.loss_types, trainer.loss_weights = args.loss_type, args.loss_weights or [1.0] * len(args.loss_type)
    trainer.ld_alpha, trainer.label_smoothing, trainer.use_weighting = args.ld_alpha, args.label_smoothing, args.use_weighting
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = args.f_divergence_type, args.f_alpha_divergence_coef
    trainer.aux_loss_enabled, trainer._tp_size, trainer._total_train_tokens = False, 1, 0
    trainer._metrics = defaultdict(lambda: defaultdict(list))
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                          gather_for_metrics=lambda t: t)
    trainer.model = torch.nn.Module().eval()  # TRL reads its mode, and (for a reference forward) its checkpointing
    trainer.model.is_gradient_checkpointing = False
    return trainer


def trl_loss_and_gradient(trainer, model, inputs: dict, leaf: torch.Tensor):
    """`DPOTrainer._compute_loss` on `inputs` with `model`, and its gradient with respect to `leaf`."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(leaf.dtype)  # TRL makes `torch.tensor(label_smoothing)` (exo_pair) in the default dtype
    try:
        loss = trl.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    finally:
        torch.set_default_dtype(default_dtype)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def trl_compute_loss(batch: dict, loss_types: list[str], beta: float, tmp_path, loss_weights=None, **config):
    """TRL's batch loss for `batch`, and its gradient with respect to the policy's log-probs."""
    trainer = trl_instance(loss_types, beta, tmp_path, loss_weights, **config)
    policy = torch.cat([batch["pc"], batch["pr"]]).detach().requires_grad_(True)
    lengths = torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]]).long()
    rows, width = len(lengths), int(lengths.max()) + 1  # position 0: a prompt token
    positions = torch.arange(width).unsqueeze(0)
    completion_mask = (positions >= 1) & (positions <= lengths.unsqueeze(1))
    first_tokens = (torch.arange(rows), torch.zeros(rows, dtype=torch.long))
    per_token = torch.zeros(rows, width - 1, dtype=policy.dtype).index_put(first_tokens, policy)

    def model(**kwargs):
        zeros = torch.zeros(rows, width - 1, dtype=policy.dtype)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    inputs = {"input_ids": torch.zeros(rows, width, dtype=torch.long), "attention_mask": torch.ones(rows, width),
              "completion_mask": completion_mask.long(), "ref_chosen_logps": batch["rc"],
              "ref_rejected_logps": batch["rr"]}
    return trl_loss_and_gradient(trainer, model, inputs, policy)


def our_loss(batch: dict, loss_types: list[str], beta: float, loss_weights=None, **config):
    """Our batch loss for the same TRL settings, and its gradient with respect to the policy's log-probs."""
    pc, pr = (batch[k].detach().clone().requires_grad_(True) for k in ("pc", "pr"))
    names = [TRL_LOSS_TYPES[t] for t in loss_types]
    options = {"chosen_lengths": batch["chosen_lengths"], "rejected_lengths": batch["rejected_lengths"]}
    if len(names) > 1:
        options["combine"] = dict(zip(names, loss_weights or [1.0] * len(names)))
        name = "combine"
    else:
        (name,) = names
    takes = set().union(*(loss_options(n) for n in names))
    for key, value in config.items():
        if key in takes:
            options[key] = 1.0 - value if key == "f_alpha_divergence_coef" else value  # the paper's α: TRL's 1 − α
    chosen, rejected, ref_chosen, ref_rejected = pc, pr, batch["rc"], batch["rr"]
    if name == "ipo":  # TRL's ipo divides each log-ratio by its length: our ipo on length-averaged log-probs
        chosen, ref_chosen = chosen / batch["chosen_lengths"], ref_chosen / batch["chosen_lengths"]
        rejected, ref_rejected = rejected / batch["rejected_lengths"], ref_rejected / batch["rejected_lengths"]
    losses, _ = preference_loss(name, chosen, rejected, ref_chosen, ref_rejected, beta=beta, **options)
    loss = losses.mean()
    grads = torch.autograd.grad(loss, [pc, pr], allow_unused=True)  # sft: the rejected side is unused
    return loss.detach(), torch.cat([torch.zeros_like(x) if g is None else g for x, g in zip((pc, pr), grads)])


F_DIVERGENCE_TYPES = ["forward_kl", "js_divergence"]
PARITY_CASES = [
    (["sigmoid"], {}),
    (["hinge"], {}),
    (["ipo"], {}),
    (["exo_pair"], {"label_smoothing": 1e-3}),
    (["exo_pair"], {"label_smoothing": 0.2}),
    (["nca_pair"], {}),
    (["robust"], {"label_smoothing": 0.0}),
    (["robust"], {"label_smoothing": 0.3}),
    (["bco_pair"], {}),
    (["sppo_hard"], {}),
    (["aot"], {}),
    (["aot"], {"label_smoothing": 0.2}),
    (["aot_unpaired"], {}),
    (["aot_unpaired"], {"label_smoothing": 0.1}),
    (["apo_zero"], {}),
    (["apo_down"], {}),
    (["discopop"], {}),
    (["discopop"], {"discopop_tau": 0.5}),
    (["sft"], {}),
    (["sigmoid_norm"], {}),
    (["sigmoid", "sft"], {}),                                          # RPO-style, equal weights
    (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}),  # MPO's recipe
    (["robust", "exo_pair", "apo_zero"], {"loss_weights": [1.0, 0.5, 2.0], "label_smoothing": 0.1}),
    (["sigmoid_norm", "sft"], {"loss_weights": [1.0, 0.3], "f_divergence_type": "js_divergence"}),
] + [
    ([loss_type], {"f_divergence_type": kind, "label_smoothing": 0.1} if loss_type in ("exo_pair", "robust")
     else {"f_divergence_type": kind})
    for loss_type in ("sigmoid", "hinge", "exo_pair", "robust", "discopop", "sigmoid_norm")
    for kind in F_DIVERGENCE_TYPES
]


def _case_id(case) -> str:
    loss_types, config = case
    return "+".join(loss_types) + "".join(f"-{k}={v}" for k, v in config.items())


def assert_equal_to_float64_rounding(ours, theirs, batch, what: str) -> None:
    """Equal up to the roundings by which the two orders of operations may differ: 16 roundings (4 suffice today)
    of values no larger than the log-ratio sums (twice the largest log-prob) or the result itself."""
    inputs = max(batch[k].abs().max().item() for k in ("pc", "pr", "rc", "rr"))
    scale = max(2 * inputs, ours.abs().max().item(), theirs.abs().max().item())
    error = (ours - theirs).abs().max().item()
    assert error <= rounding_tolerance(scale, 16, torch.float64), f"{what}: ours {ours}, TRL's {theirs}"


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("case", PARITY_CASES, ids=[_case_id(c) for c in PARITY_CASES])
def test_every_trl_loss_type_equals_trls_own_code_in_float64(case, beta, tmp_path):
    loss_types, config = case
    for seed in range(2):
        batch = parity_batch(seed)
        theirs, their_grad = trl_compute_loss(batch, loss_types, beta, tmp_path, **config)
        ours, our_grad = our_loss(batch, loss_types, beta, **config)
        assert_equal_to_float64_rounding(ours, theirs, batch, "loss")
        assert_equal_to_float64_rounding(our_grad, their_grad, batch, "gradient")
        assert our_grad.abs().max() > 0


@pytest.mark.parametrize("kind", F_DIVERGENCE_TYPES)
def test_ipo_under_an_f_divergence_equals_trls_on_one_token_responses(kind, tmp_path):
    # TRL's ipo divides f′(sequence ratio) by the length; ours applies f′ to the log-probs it is given (with
    # average_logps: the per-token ratio). The two agree where every response is one token long.
    batch = parity_batch(3, unit_lengths=True)
    theirs, their_grad = trl_compute_loss(batch, ["ipo"], 0.3, tmp_path, f_divergence_type=kind)
    ours, our_grad = our_loss(batch, ["ipo"], 0.3, f_divergence_type=kind)
    assert_equal_to_float64_rounding(ours, theirs, batch, "loss")
    assert_equal_to_float64_rounding(our_grad, their_grad, batch, "gradient")


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "sigmoid_norm"])
@pytest.mark.parametrize("trl_alpha", [0.2, 0.5, 0.9])
def test_alpha_divergence_is_trls_with_one_minus_alpha_in_float32(loss_type, trl_alpha, tmp_path):
    # TRL's α-divergence computes (u^{α−1} − 1)/(α − 1), the f-DPO paper's (1 − u^{−α})/α at 1 − α (see
    # spo_ray.losses.f_divergence_scores; test_losses checks ours against the paper's formula in float64). TRL's
    # clamp table has no float64 entry, so its α-divergence runs only in float32 and below: compare there.
    batch = {k: v.float() for k, v in parity_batch(4).items()}
    config = {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": trl_alpha, "label_smoothing": 0.2}
    theirs, their_grad = trl_compute_loss(batch, [loss_type], 0.2, tmp_path, **config)
    ours, our_grad = our_loss(batch, [loss_type], 0.2, **config)
    inputs = max(batch[k].abs().max().item() for k in ("pc", "pr", "rc", "rr"))
    for got, want in [(ours, theirs), (our_grad, their_grad)]:
        scale = max(2 * inputs, want.abs().max().item())
        assert (got - want).abs().max().item() <= rounding_tolerance(scale, 16)



# ---------------------------------------------------------------------------------------------------
# LD-DPO (`ld_alpha`) and WPO (`use_weighting`) read the log-probs token by token: TRL's `_compute_loss` gets
# per-token log-probs (and WPO's log Σ_v π(v)²) of replies of different lengths from a stand-in policy and
# reference model, ours the same tokens through `spo_ray.logprobs.pair_views` (what `concatenated_forward` returns
# from a real model) and `spo_ray.trainer.batch_loss`.

from spo_ray.config import validate_run  # noqa: E402
from spo_ray.logprobs import pair_views  # noqa: E402
from spo_ray.trainer import batch_loss  # noqa: E402


def token_batch(seed: int, pairs: int = 5) -> dict[str, torch.Tensor]:
    """Rows [0, pairs) chosen, [pairs, 2·pairs) rejected; column 0 a prompt token, then 1–8 reply tokens of
    0.05–3 nats each (zero past the reply, as TRL's model gives them), a reference within ±0.5 nats a token,
    and log Σ_v π(v)² between −3 and −0.05."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (2 * pairs,), generator=g)
    width = int(lengths.max()) + 1
    positions = torch.arange(width).unsqueeze(0)
    completion = (positions >= 1) & (positions <= lengths.unsqueeze(1))
    tokens = completion[:, 1:].double()

    def uniform(low, high):
        return low + (high - low) * torch.rand(2 * pairs, width - 1, generator=g, dtype=torch.float64)

    policy = -uniform(0.05, 3.0) * tokens
    return {"completion_mask": completion.long(), "policy": policy, "reference": (policy + uniform(-0.5, 0.5)) * tokens,
            "log_sum_sq": -uniform(0.05, 3.0) * tokens}


def trl_token_loss(tokens: dict, loss_types: list[str], beta: float, tmp_path, **config):
    trainer = trl_instance(loss_types, beta, tmp_path, precompute=False, **config)
    trainer.ref_model = lambda **kwargs: SimpleNamespace(log_probs=tokens["reference"])
    policy = tokens["policy"].clone().requires_grad_(True)
    zeros = torch.zeros_like(policy)

    def model(**kwargs):
        return SimpleNamespace(log_probs=policy, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                               log_sum_sq_probs=tokens["log_sum_sq"])

    rows, width = tokens["completion_mask"].shape
    inputs = {"input_ids": torch.zeros(rows, width, dtype=torch.long), "attention_mask": torch.ones(rows, width),
              "completion_mask": tokens["completion_mask"]}
    return trl_loss_and_gradient(trainer, model, inputs, policy)


def our_token_loss(tokens: dict, loss: dict):
    policy = tokens["policy"].clone().requires_grad_(True)
    scored = tokens["completion_mask"][:, 1:].bool()
    sequences, count = scored.nonzero(as_tuple=True)[0], scored.size(0)  # row-major: each reply's tokens in order
    ours = pair_views(policy[scored], sequences, count,
                      aligned=(policy.detach() - tokens["log_sum_sq"])[scored])
    reference = pair_views(tokens["reference"][scored], sequences, count)
    value, _ = batch_loss(validate_run({"loss": loss}).loss, ours, reference, step=0)
    (grad,) = torch.autograd.grad(value, policy)
    return value.detach(), grad


TOKEN_CASES = [
    (["sigmoid"], {"ld_alpha": 0.5}, {"name": "dpo", "ld_alpha": 0.5}),
    (["sigmoid"], {"ld_alpha": 0.0}, {"name": "dpo", "ld_alpha": 0.0}),
    (["sigmoid"], {"ld_alpha": 1.0}, {"name": "dpo", "ld_alpha": 1.0}),
    (["robust"], {"ld_alpha": 0.3, "label_smoothing": 0.2}, {"name": "robust", "ld_alpha": 0.3, "label_smoothing": 0.2}),
    (["sigmoid_norm"], {"ld_alpha": 0.5}, {"name": "sigmoid_norm", "ld_alpha": 0.5}),
    (["sigmoid"], {"use_weighting": True}, {"name": "dpo", "use_weighting": True}),
    (["apo_zero"], {"use_weighting": True}, {"name": "apo_zero", "use_weighting": True}),
    # (TRL 1.16 raises on sft with use_weighting: it multiplies in place into its expanded batch loss.)
    (["sigmoid", "bco_pair"], {"use_weighting": True, "loss_weights": [1.0, 0.5]},
     {"name": "combine", "combine": {"dpo": 1.0, "bco_pair": 0.5}, "use_weighting": True}),
    (["sigmoid"], {"use_weighting": True, "ld_alpha": 0.5, "f_divergence_type": "js_divergence"},
     {"name": "dpo", "use_weighting": True, "ld_alpha": 0.5, "f_divergence_type": "js_divergence"}),
]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("case", TOKEN_CASES, ids=[_case_id(c[:2]) for c in TOKEN_CASES])
def test_ld_dpo_and_wpo_equal_trls_own_code_in_float64(case, beta, tmp_path):
    loss_types, config, ours_config = case
    for seed in range(2):
        tokens = token_batch(seed)
        theirs, their_grad = trl_token_loss(tokens, loss_types, beta, tmp_path, **config)
        ours, our_grad = our_token_loss(tokens, {**ours_config, "beta": beta})
        batch = {"pc": tokens["policy"].sum(1), "pr": tokens["reference"].sum(1), "rc": tokens["reference"].sum(1),
                 "rr": tokens["log_sum_sq"].sum(1)}  # the sizes the roundings are relative to
        assert_equal_to_float64_rounding(ours, theirs, batch, "loss")
        # Past a reply's end TRL's per-token tensor holds the constant 0 a real model's fused head gives an
        # ignored label; its sums still take a gradient there, which reaches no weight. Compare the reply tokens.
        scored = tokens["completion_mask"][:, 1:].bool()
        assert_equal_to_float64_rounding(our_grad[scored], their_grad[scored], batch, "gradient")
        assert our_grad.abs().max() > 0


def test_ld_dpo_changes_the_loss_only_through_the_longer_replys_tail(tmp_path):
    # α = 1 is DPO exactly, and α < 1 moves the loss: a case the parity above could pass by ignoring ld_alpha.
    tokens = token_batch(7)
    plain, _ = our_token_loss(tokens, {"name": "dpo", "beta": 0.5})
    full, _ = our_token_loss(tokens, {"name": "dpo", "beta": 0.5, "ld_alpha": 1.0})
    half, _ = our_token_loss(tokens, {"name": "dpo", "beta": 0.5, "ld_alpha": 0.5})
    assert abs(full - plain) <= rounding_tolerance(plain, 16, torch.float64) and abs(half - plain) > 1e-3


def test_the_reference_sync_equals_trls_sync_ref_model_callback():
    """TR-DPO's mix: our `SyncedReference.step_done` against TRL's own `SyncRefModelCallback._sync_target_model`
    on copies of the same reference and policy, in float64: the same weights to the last bit (one multiply and
    one add per value on both sides)."""
    from trl.trainer.callbacks import SyncRefModelCallback

    from spo_ray.reference import SyncedReference

    policy = tiny_llama(seed=0).double()
    ours, theirs = tiny_llama(seed=1).double(), tiny_llama(seed=1).double()
    SyncedReference(ours, {}, sync_steps=4, mixup_alpha=0.6, policy=policy).step_done(policy, 8)
    SyncRefModelCallback._sync_target_model(policy, theirs, 0.6)
    pairs = list(zip(ours.named_parameters(), theirs.named_parameters()))
    assert all(torch.equal(a, b) for (_, a), (_, b) in pairs)
    assert not torch.equal(ours.model.embed_tokens.weight, tiny_llama(seed=1).double().model.embed_tokens.weight)
