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
