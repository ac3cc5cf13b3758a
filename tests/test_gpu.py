"""GPU-only checks (bf16 autocast, SDPA attention, gradient checkpointing, a trainer run on CUDA).

Run by `scripts/gpu_check.sh` on an NVIDIA machine; skipped elsewhere.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spo_ray.data import TokenizedPair, collate_pairs
from spo_ray.logprobs import concatenated_forward
from spo_ray.losses import preference_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def _model(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                         intermediate_size=768, max_position_embeddings=256, attn_implementation=attn)
    return LlamaForCausalLM(config).cuda()


def _batch(pad_side="right"):
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 512, (n,), generator=g).tolist()
    items = [(i, TokenizedPair(ids(10 + 7 * i), ids(20 + 3 * i), ids(15 + 5 * i))) for i in range(6)]
    return {k: v.cuda() for k, v in collate_pairs(items, 0, pad_side).items()}


def test_sdpa_attention_matches_eager_logps():
    batch = _batch()
    eager, sdpa = _model("eager"), _model("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    with torch.no_grad():
        a, b = concatenated_forward(eager, batch), concatenated_forward(sdpa, batch)
    assert torch.allclose(a["chosen_logps"], b["chosen_logps"], atol=1e-3, rtol=1e-4)
    assert torch.allclose(a["rejected_logps"], b["rejected_logps"], atol=1e-3, rtol=1e-4)


def test_bf16_autocast_logps_close_to_float32():
    model, batch = _model(), _batch()
    with torch.no_grad():
        full = concatenated_forward(model, batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = concatenated_forward(model, batch)
    # bf16 has ~3 significant digits; summed over ~30 tokens the log-probs agree to a few tenths of a percent
    rel = ((half["chosen_logps"] - full["chosen_logps"]).abs() / full["chosen_logps"].abs()).max()
    assert half["chosen_logps"].dtype == torch.float32  # log-softmax is done in float32
    assert rel < 1e-2


def test_left_padding_equals_right_padding_on_gpu():
    model = _model()
    with torch.no_grad():
        right = concatenated_forward(model, _batch("right"))
        left = concatenated_forward(model, _batch("left"))
    assert torch.allclose(right["chosen_logps"], left["chosen_logps"], atol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = _batch()
    plain, ckpt = _model(), _model()
    ckpt.load_state_dict(plain.state_dict())
    (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)()
    ckpt.config.use_cache = False
    plain.train(), ckpt.train()
    grads = []
    for model in (plain, ckpt):
        out = concatenated_forward(model, batch)
        ref = {k: out[k].detach() - 1.0 for k in ("chosen_logps", "rejected_logps")}
        losses, _ = preference_loss("spo", out["chosen_logps"], out["rejected_logps"],
                                    ref["chosen_logps"] + 2.0, ref["rejected_logps"], beta=0.1, spo_lambda=1.0)
        losses.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-3)


def test_trainer_runs_on_cuda_with_bf16(tmp_path):
    from spo_ray.config import validate_run
    from spo_ray.trainer import WorkerContext, train

    config = validate_run({
        "loss": {"name": "spo", "beta": 0.1},
        "model": {"init": "base", "init_steps": {"base": 100}},
        "data": {"arithmetic": {"train_pairs": 256, "eval_pairs": 64, "eval_problems": 32,
                                "pretrain_examples": 3000, "sft_examples": 1000}},
        "train": {"max_steps": 10, "batch_size": 32, "eval_every": 10, "probe_every": 10, "log_every": 5},
    })
    rows = []
    final = train(config, cache_dir=str(tmp_path), context=WorkerContext(device=torch.device("cuda")),
                  report=lambda row, ckpt: rows.append(row))
    assert final["step"] == 10 and len(rows) == 2
    assert torch.isfinite(torch.tensor(final["train/loss"]))
    assert 0.0 <= final["eval/accuracy"] <= 1.0
