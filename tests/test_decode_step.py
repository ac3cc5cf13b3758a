"""The Llama family's decoding step written out (spo_ray.decode_step) against transformers' own forward: as
close to a float64 forward as transformers' float32 forward is, on Llama, Mistral and Qwen2 (biases) with
grouped-query attention; the same greedy and sampled tokens through continuous batching; and left alone
wherever it would not be the model's own arithmetic."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import spo_ray.decoding as decoding
from spo_ray.decode_step import LlamaStep, llama_step
from spo_ray.decoding import Decoder, encode_prompts, greedy_decode
from spo_ray.models import create_small_lm
from spo_ray.sampling import Sampling, sample_rows
from spo_ray.tasks.arithmetic import make_tokenizer

TOKENIZER = make_tokenizer()
PROMPTS = [f"Q: 1+2=?\nA:3\nQ: {question}=?\nA:" for question in ("4+5", "12+34", "7-3", "99+1", "5", "123-45")]
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny(family: str, seed: int = 3, **extra):
    """A random float32 model: 4 query heads sharing 2 key/value heads (Qwen2 adds its q/k/v biases); weights
    large enough that what it says depends on the prompt."""
    config_class, model_class = FAMILIES[family]
    ids = {key: getattr(TOKENIZER, key) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = config_class(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          initializer_range=0.3, attn_implementation="sdpa", **ids, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
        if family == "qwen2":  # its biases start at zero: make them matter
            for layer in model.model.layers:
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(projection.bias, std=0.3)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_written_out_step_is_as_close_to_float64_as_transformers_own_float32_forward(family):
    """Three decoders in lockstep on the same rows and tokens: the written-out step in float32, transformers'
    forward in float32, and transformers' forward in float64 as the reference. Both float32 paths round the
    same products in different orders, so their errors against float64 are of one size; a slip in the
    arithmetic (a rotation, a head's grouping, a bias, the mask) would be of the logits' own size."""
    model = tiny(family)
    reference_model = copy.deepcopy(model).double()
    prompt_ids = encode_prompts(TOKENIZER, PROMPTS)
    decoders = []
    with torch.no_grad():
        for which, owner in (("step", model), ("transformers", model), ("float64", reference_model)):
            decoder = Decoder(owner, prompt_ids, TOKENIZER.pad_token_id, max_new_tokens=6)
            assert isinstance(decoder.step, LlamaStep)
            if which != "step":
                decoder.step = None
            decoder.repeat(2)
            decoder.keep_rows(torch.tensor([0, 11, 2, 3, 4, 5, 6, 7, 8, 9]))  # rows leave, the last moves up
            decoders.append(decoder)
        generator = torch.Generator().manual_seed(0)
        for _ in range(6):
            tokens = torch.randint(4, len(TOKENIZER), (10,), generator=generator)
            for decoder in decoders:
                decoder.append(tokens)
            step, transformers, exact = (decoder.next_logits.double() for decoder in decoders)
            scale = float(exact.abs().max())
            assert scale > 1  # logits that differ between tokens, not a flat distribution
            floor = torch.finfo(torch.float32).eps * scale
            # 4: the ratio was at most 1.75 under ATEN_CPU_CAPABILITY default and avx2 here (AMD EPYC)
            assert float((step - exact).abs().max()) <= 4 * max(float((transformers - exact).abs().max()), floor)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_and_sampled_tokens_are_the_same_with_and_without_the_written_out_step(family, monkeypatch):
    """Continuous batching at 3 rows (prompts join running batches, rows are packed): every greedy and every
    sampled token the same as through transformers' forward. (Exact here, where no uniform number falls within
    rounding of a boundary of the cumulative distribution; on SmolLM2 a few samples in a few thousand go the
    other way, as a change of thread count would make them: docs/benchmarks.md.)"""
    model = tiny(family)
    prompts = PROMPTS + ["Q: 1+2=?\nA:3\nQ: 1+2+3+4+5+6+7+8+9+10+11+12+13=?\nA:", "Q: 2=?\nA:"]
    setting = Sampling(samples_per_prompt=3, temperature=1.0, max_new_tokens=10, seed=5, batch_tokens=3 * 40)
    stop = {TOKENIZER.eos_token_id}
    used = []
    monkeypatch.setattr(LlamaStep, "__call__", lambda self, *args, _call=LlamaStep.__call__: used.append(1)
                        or _call(self, *args))
    with_step = (greedy_decode(model, TOKENIZER, prompts, 10, batch_size=3, stop_ids=stop),
                 sample_rows(model, TOKENIZER, prompts, setting, stop))
    assert used
    monkeypatch.setattr(decoding, "llama_step", lambda model: None)
    without = (greedy_decode(model, TOKENIZER, prompts, 10, batch_size=3, stop_ids=stop),
               sample_rows(model, TOKENIZER, prompts, setting, stop))
    assert with_step == without
    assert len({tuple(ids) for ids in with_step[0]}) > 2  # the continuations differ between prompts


def test_the_step_is_left_alone_where_it_would_not_be_the_models_arithmetic():
    assert isinstance(llama_step(tiny("llama")), LlamaStep)
    assert llama_step(tiny("llama").to(torch.bfloat16)) is None  # its norms and softmax round in bfloat16
    assert llama_step(tiny("llama", hidden_act="gelu")) is None
    assert llama_step(create_small_lm(len(TOKENIZER), arch="gpt2", hidden_size=32, num_layers=2)) is None
    adapted = get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert llama_step(adapted) is None and llama_step(adapted.get_base_model()) is None  # LoRA layers
    assert Decoder(adapted, encode_prompts(TOKENIZER, PROMPTS[:2]), TOKENIZER.pad_token_id, 4).step is None
