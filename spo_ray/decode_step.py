"""One decoding step of a Llama-family model (Llama, Mistral, Qwen2) written out on its own weights: what the
sampler and the greedy evaluators run for every token after the prompts.

transformers' forward is general (any cache, any mask, hooks, outputs); one new token per row on a
`spo_ray.decoding.RowCache` needs little of it, and on a CPU what it costs beyond the matrix products is a
quarter of a step (benchmarks/decoding_step.py). Here:

- every linear layer is applied as W·hᵀ, on hidden states kept as columns (features × rows): the same products
  as transformers' h·Wᵀ, which MKL streams faster that way round (the output matrix alone: 1.5-1.7×);
- attention groups the queries that share a key/value head (grouped-query attention) and multiplies them with
  the cached keys and values in place, instead of repeating the keys and values for every query head
  (`repeat_kv`) or going through SDPA's CPU kernel for one query;
- the mask is built once a step, not once a layer, and nothing else runs between the products.

The arithmetic is the model's own — RMSNorm in float32 as transformers computes it, the model's rotary module
(so scaled and dynamic rotary embeddings stay the model's), its attention scale and biases — so the logits
equal transformers' to rounding (tests/test_decode_step.py: as close to a float64 forward as transformers' own
float32 forward is; the same greedy and sampled tokens). Used only where that holds: a float32 (or float64)
`LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM` whose layers are the plain ones (no adapters,
no quantized layers, SiLU, no FSDP shards: a sharded layer's weights exist whole only inside its own
forward) decoding on a RowCache (which rules out a sliding window shorter than its rows);
everything else decodes through transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spo_ray.sharding import is_sharded

FAMILIES = ("llama", "mistral", "qwen2")


def plain(*modules) -> bool:
    """Every module exactly `nn.Linear`: not peft's LoRA layer nor bitsandbytes' 8-bit one (subclasses that
    add to or replace W·h)."""
    return all(type(module) is nn.Linear for module in modules)


def llama_step(model) -> "LlamaStep | None":
    """The written-out step for `model`, or None where it would not be the model's own arithmetic (see the
    module's docstring). A sliding window is the caller's to rule out: `spo_ray.decoding.Decoder` uses a
    RowCache, and so this step, only where no window is shorter than its rows."""
    config = getattr(model, "config", None)
    body = getattr(model, "model", None)
    if (config is None or getattr(config, "model_type", None) not in FAMILIES or body is None
            or not all(hasattr(body, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))
            or is_sharded(model)):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    full_precision = isinstance(head, nn.Linear) and head.weight.dtype in (torch.float32, torch.float64)
    if (not full_precision or head.bias is not None
            or getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1):
        return None
    for layer in body.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if not (plain(attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
                and plain(mlp.gate_proj, mlp.up_proj, mlp.down_proj) and hasattr(attention, "scaling")
                and all(hasattr(norm, "variance_epsilon") for norm in (layer.input_layernorm,
                                                                        layer.post_attention_layernorm))):
            return None
    return LlamaStep(model)


def rms_norm(hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' Llama/Qwen2 RMSNorm on columns (features × rows): in float32, over the features."""
    variance = hidden.float().pow(2).mean(0, keepdim=True)
    return norm.weight[:, None] * (hidden.float() * torch.rsqrt(variance + norm.variance_epsilon)).to(hidden.dtype)


def linear_columns(layer: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """`layer` on columns: W·h (+ b), features out × rows."""
    out = torch.mm(layer.weight, hidden)
    return out if layer.bias is None else out.add_(layer.bias[:, None])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` on (rows × heads × head size), cos/sin (rows × 1 × head size)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LlamaStep:
    def __init__(self, model):
        self.model = model
        config = model.config
        self.query_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_size = model.model.layers[0].self_attn.head_dim

    @torch.no_grad()
    def __call__(self, cache, token_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Next-token logits (rows × vocabulary, float32) after one token per row (`token_ids`) at `positions`,
        its key and value appended to `cache` (a RowCache: at its next column, `valid.shape[1] - 1`); `valid`:
        the columns each row attends to, that one included."""
        body, rows = self.model.model, len(token_ids)
        groups, size = self.query_heads // self.kv_heads, self.head_size
        hidden = body.embed_tokens.weight[token_ids].t()
        cos, sin = body.rotary_emb(hidden, positions[:, None])  # rows × 1 × head size
        additive = torch.zeros(valid.shape, dtype=hidden.dtype, device=valid.device).masked_fill_(
            ~valid, float("-inf"))[:, None, None, :]
        for index, layer in enumerate(body.layers):
            attention = layer.self_attn
            normed = rms_norm(hidden, layer.input_layernorm)
            queries = rotate(linear_columns(attention.q_proj, normed).t().reshape(rows, self.query_heads, size),
                             cos, sin)
            keys = rotate(linear_columns(attention.k_proj, normed).t().reshape(rows, self.kv_heads, size), cos, sin)
            values = linear_columns(attention.v_proj, normed).t().reshape(rows, self.kv_heads, size)
            cached_keys, cached_values = cache.update(keys[:, :, None], values[:, :, None], index)
            scores = torch.matmul(queries.view(rows, self.kv_heads, groups, size), cached_keys.transpose(-1, -2))
            weights = torch.softmax(scores.mul_(attention.scaling).add_(additive), dim=-1)
            mixed = torch.matmul(weights, cached_values).reshape(rows, self.query_heads * size)
            hidden = hidden + linear_columns(attention.o_proj, mixed.t())
            mlp, normed = layer.mlp, rms_norm(hidden, layer.post_attention_layernorm)
            gated = F.silu(linear_columns(mlp.gate_proj, normed)).mul_(linear_columns(mlp.up_proj, normed))
            hidden = hidden + linear_columns(mlp.down_proj, gated)
        return torch.mm(self.model.get_output_embeddings().weight, rms_norm(hidden, body.norm)).t().float()
