"""Generation engines (spo_ray.engines): which one `auto` picks, bad input where vLLM is missing, the vLLM
worker's protocol against a stand-in engine, and — where vLLM is installed — the same answers from both
engines on the real model (sample accuracy within sampling noise, greedy replies token for token)."""

import json
import math
import os
import sys
import textwrap

import pytest

import spo_ray.engines as engines
from spo_ray.config import ConfigError
from spo_ray.engines import VllmEngine, resolve_engine, vllm_python, vllm_rows
from spo_ray.sampling import Sampling, plan_batches
from spo_ray.tasks.arithmetic import make_tokenizer


def test_auto_picks_vllm_only_on_a_gpu_where_it_is_installed(monkeypatch):
    monkeypatch.setattr(engines, "vllm_python", lambda: "/opt/vllm/bin/python")
    assert resolve_engine("auto", gpu=True) == "vllm"
    assert resolve_engine("auto", gpu=False) == "spo_ray"  # ours is the faster one on a CPU (docs/benchmarks.md)
    assert resolve_engine("vllm", gpu=False) == "vllm"     # asked for by name: used
    assert resolve_engine("spo_ray", gpu=True) == "spo_ray"
    monkeypatch.setattr(engines, "vllm_python", lambda: None)
    assert resolve_engine("auto", gpu=True) == "spo_ray"
    with pytest.raises(ConfigError, match=r"^data\.sampled_pairs\.engine: vllm is not installed here \(make vllm"):
        resolve_engine("vllm", gpu=True)


def test_a_sweep_pins_auto_for_its_workers_so_driver_and_trials_key_tables_alike(monkeypatch):
    """The driver (maybe a CPU head node) samples round 1 on the workers, the trials (maybe on GPUs) sample
    later rounds: `auto` is resolved once by the sweep, by `scaling.use_gpu`, not by each process's device."""
    from spo_ray.sweep import pin_engine
    monkeypatch.setattr(engines, "vllm_python", lambda: "/opt/vllm/bin/python")
    raw = {"data": {"sampled_pairs": {"prompts": 8}}}
    assert pin_engine(raw, use_gpu=True) and raw["data"]["sampled_pairs"]["engine"] == "vllm"
    raw = {"data": {"sampled_pairs": {"engine": "auto"}}}
    assert pin_engine(raw, use_gpu=False) and raw["data"]["sampled_pairs"]["engine"] == "spo_ray"
    explicit = {"data": {"source": "gsm8k", "sampled_pairs": {"engine": "spo_ray"}, "eval_engine": "spo_ray"}}
    assert not pin_engine(explicit, use_gpu=True) and explicit["data"]["sampled_pairs"]["engine"] == "spo_ray"
    # The evaluator's engine the same way, where the source has greedy answers to decode; elsewhere ours.
    for source, gpu, engine in [("gsm8k", True, "vllm"), ("chat_arithmetic", False, "spo_ray"),
                                ("arithmetic", True, "spo_ray"), ("files", True, "spo_ray")]:
        raw = {"data": {"source": source}}
        assert pin_engine(raw, use_gpu=gpu) and raw["data"]["eval_engine"] == engine, source
    monkeypatch.setattr(engines, "vllm_python", lambda: None)  # asked for by name where it is missing: bad input
    with pytest.raises(ConfigError, match=r"^data\.eval_engine: vllm is not installed here .* use eval_engine: spo_ray"):
        pin_engine({"data": {"source": "gsm8k", "eval_engine": "vllm"}}, use_gpu=True)


def test_the_vllm_python_comes_from_the_environment_variable_first(monkeypatch, tmp_path):
    monkeypatch.setenv(engines.VLLM_PYTHON_ENV, "/somewhere/python")
    assert vllm_python() == "/somewhere/python"
    monkeypatch.delenv(engines.VLLM_PYTHON_ENV)
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(engines, "REPO_ROOT", tmp_path)
    assert vllm_python() is None
    (tmp_path / ".venv-vllm" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-vllm" / "bin" / "python").write_text("")
    assert vllm_python() == str(tmp_path / ".venv-vllm" / "bin" / "python")


def test_a_sample_table_of_one_engine_is_not_the_others():
    from spo_ray.sampling import SamplePrompt, samples_key
    prompts = [SamplePrompt("Q: 1+1=?\nA:", 2)]
    assert (samples_key("w", prompts, Sampling(engine="vllm"), {0})
            != samples_key("w", prompts, Sampling(engine="spo_ray"), {0}))


FAKE_VLLM = textwrap.dedent('''
    """A stand-in for vLLM's Python API, as much of it as spo_ray.vllm_worker uses: each sample of a prompt
    is the prompt's last token + 1, + 2, ... up to max_tokens, stopping at a stop token id."""
    import json, sys

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class Completion:
        def __init__(self, token_ids, finish_reason):
            self.token_ids, self.finish_reason = token_ids, finish_reason

    class Output:
        def __init__(self, outputs):
            self.outputs = outputs

    def weights_offset(folder):
        """0 without weights; else a number from 1 to 7 that depends on the safetensors' values."""
        import glob
        files = sorted(glob.glob(f"{folder}/*.safetensors"))
        if not files:
            return 0
        from safetensors.numpy import load_file
        total = sum(float(abs(a.astype("float64")).sum()) for f in files for a in load_file(f).values())
        return int(total * 1000) % 7 + 1

    class LLM:
        def __init__(self, **kwargs):
            print("engine starting with", json.dumps(kwargs))  # vLLM prints too: must not reach the replies
            self.seed = kwargs["seed"]
            self.offset = weights_offset(kwargs["model"])
            self.prefix_cache = {}  # like vLLM's: a prompt seen before answers from it until it is reset

        def collective_rpc(self, method, kwargs):
            assert method == "reload_weights"
            self.offset = weights_offset(kwargs["weights_path"])

        def reset_prefix_cache(self):
            self.prefix_cache.clear()

        def generate(self, prompts, params, use_tqdm=False):
            outputs = []
            for prompt, p in zip(prompts, params):
                offset = self.prefix_cache.setdefault(tuple(prompt["prompt_token_ids"]), self.offset)
                samples = []
                for s in range(p.n):
                    ids, finish = [], "length"
                    for t in range(p.max_tokens):
                        ids.append(prompt["prompt_token_ids"][-1] + s + t + 1 + (p.seed or 0) % 2 + offset)
                        if ids[-1] in p.stop_token_ids:
                            finish = "stop"
                            break
                    samples.append(Completion(ids, finish))
                outputs.append(Output(samples))
            return outputs
''')


@pytest.fixture()
def fake_vllm(tmp_path, monkeypatch):
    """This interpreter, with a stand-in `vllm` package first on its path."""
    package = tmp_path / "fake" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_VLLM)
    (package / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    return sys.executable


def test_the_vllm_worker_answers_requests_and_table_rows_come_out_as_ours(fake_vllm):
    tokenizer = make_tokenizer()
    prompt_ids = [[5, 6], [7], [9, 9, 10]]
    sampling = Sampling(samples_per_prompt=2, max_new_tokens=3, batch_tokens=5, engine="vllm")
    stop = {12}
    with VllmEngine("/models/x", "float32", 3, 64, "cpu", python=fake_vllm) as engine:
        assert engine.started_s >= 0
        # Prompt [9, 9, 10]: sample 0 is 11, 12 and sample 1 is 12 at once; 12 is a stop token: both ended,
        # and the stop token is not kept.
        assert engine.generate(prompt_ids, 2, 0.8, 1.0, 3, stop) == [
            [([7, 8, 9], False), ([8, 9, 10], False)],
            [([8, 9, 10], False), ([9, 10, 11], False)],
            [([11], True), ([], True)]]
        rows = vllm_rows(engine, tokenizer, prompt_ids, sampling, stop)
    assert len(plan_batches([2, 1, 3], sampling)) > 1  # several requests, rows numbered as one table
    assert [(r["prompt"], r["sample"], r["tokens"], r["ended"]) for r in rows] == [
        (0, 0, 3, False), (0, 1, 3, False), (1, 0, 3, False), (1, 1, 3, False), (2, 0, 1, True), (2, 1, 0, True)]
    assert rows[0]["completion"] == tokenizer.decode([7, 8, 9], skip_special_tokens=True)


def test_the_evaluator_engine_decodes_the_policys_current_weights_with_one_engine(fake_vllm, monkeypatch):
    """`data.eval_engine: vllm`: each evaluation writes the policy's weights and reloads them into the engine
    started at the first; the stand-in answers by those weights, and from its prefix cache unless emptied."""
    import torch
    from spo_ray.engines import PolicyEngine
    from spo_ray.models import create_small_lm
    monkeypatch.setenv(engines.VLLM_PYTHON_ENV, fake_vllm)
    tokenizer = make_tokenizer()
    model = create_small_lm(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2)
    fake = {}
    exec(FAKE_VLLM, fake)  # the stand-in's own reading of a weights folder
    prompts = ["1+2=", "30+4="]
    last = [tokenizer(p, add_special_tokens=False)["input_ids"][-1] for p in prompts]
    stop = {last[0] + 2 + 2}  # ends the first prompt's reply on its second token when the offset is 2
    policy = PolicyEngine("float32")
    try:
        offsets = []
        for change in (0.0, 0.25, 0.5):
            with torch.no_grad():
                model.model.norm.weight.add_(change)
            replies = policy.greedy(model, tokenizer, prompts, 3, stop)
            offsets.append(fake["weights_offset"](policy.folder))
            expected = []
            for token in last:
                ids = []
                for t in range(3):
                    ids.append(token + t + 1 + offsets[-1])
                    if ids[-1] in stop:
                        break
                expected.append(ids)
            assert replies == expected  # the stop token is kept, as spo_ray.decoding.greedy_decode keeps it
        assert len(set(offsets)) > 1  # the weights changed what the engine answers
        assert policy.started_s >= 0 and len(policy.reloaded_s) == 2  # one start, then reloads
    finally:
        folder = policy.folder
        policy.close()
    assert not folder.exists()


def test_a_lora_policys_weights_are_written_merged_and_the_live_model_is_untouched(tmp_path):
    """What the vLLM evaluator loads: W + scaling · B A per adapted layer, the same function as the peft model
    (float64: the two compute x(W + BA·s) and xW + xA·B·s, equal to ~1e-13), the adapters left unmerged."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from spo_ray.models import create_small_lm, save_weights
    tokenizer = make_tokenizer()
    model = create_small_lm(len(tokenizer), hidden_size=16, num_layers=2, num_heads=2).double()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the merge would add nothing
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    before = {n: p.clone() for n, p in model.named_parameters()}
    save_weights(model, tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float64)
    ids = torch.tensor([tokenizer("12+34=46", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        theirs, ours = merged(ids).logits, model(input_ids=ids).logits
        plain = model.get_base_model()
        with model.disable_adapter():
            without = plain(ids).logits
    assert (theirs - without).abs().max() > 1e-3  # the adapters matter here
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-10)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any("lora" in key for key in merged.state_dict())


def test_eval_engine_vllm_is_refused_where_there_is_nothing_to_decode_or_no_whole_model():
    from spo_ray.config import validate_run
    with pytest.raises(ConfigError, match=r"^data\.eval_engine: vllm decodes the greedy answers of gsm8k and "
                                          r"chat_arithmetic; data\.source arithmetic has none"):
        validate_run({"data": {"eval_engine": "vllm"}})
    with pytest.raises(ConfigError, match=r"^data\.eval_engine: vllm cannot run with scaling\.strategy: fsdp"):
        validate_run({"data": {"source": "chat_arithmetic", "eval_engine": "vllm"},
                      "scaling": {"strategy": "fsdp", "num_workers": 2}})
    assert validate_run({"data": {"source": "gsm8k", "eval_engine": "vllm"}}).data.eval_engine == "vllm"


def test_a_vllm_worker_that_dies_is_one_error_naming_it(tmp_path, monkeypatch):
    package = tmp_path / "fake" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    with pytest.raises(RuntimeError, match="the vLLM worker exited with code 3"):
        VllmEngine("/models/x", "float32", 0, 64, "cpu", python=sys.executable)


def test_a_sampling_job_with_engine_vllm_samples_its_table_through_the_worker(fake_vllm, monkeypatch):
    from spo_ray.config import ModelConfig
    from spo_ray.sampling import SamplePrompt
    from spo_ray.tasks.sampled import SamplingJob
    monkeypatch.setenv(engines.VLLM_PYTHON_ENV, fake_vllm)
    tokenizer = make_tokenizer()
    prompts = [SamplePrompt("Q: 1+1=?\nA:", 2), SamplePrompt("Q: 2+5=?\nA:", 7)]
    job = SamplingJob(key="k", sampler_path="/models/x", model=ModelConfig(), tokenizer=tokenizer, prompts=prompts,
                      train_prompts=1, sampling=Sampling(samples_per_prompt=2, max_new_tokens=2, engine="vllm"),
                      stop_ids=set())
    rows, generation = job.generate()
    last = [tokenizer(p.text, add_special_tokens=False)["input_ids"][-1] for p in prompts]
    assert [(r["prompt"], r["sample"], r["tokens"]) for r in rows] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    assert rows[1]["completion"] == tokenizer.decode([last[0] + 2, last[0] + 3], skip_special_tokens=True)
    assert generation["engine"] == "vllm" and generation["tokens"] == 8


def test_engine_vllm_where_it_is_missing_is_bad_input_before_any_sampling(monkeypatch):
    from spo_ray.config import validate_run
    from spo_ray.tasks.sampled import sampling_settings
    monkeypatch.setattr(engines, "vllm_python", lambda: None)
    config = validate_run({"data": {"source": "chat_arithmetic", "sampled_pairs": {"engine": "vllm"}}})
    with pytest.raises(ConfigError, match=r"^data\.sampled_pairs\.engine: vllm is not installed here"):
        sampling_settings(config)
    assert sampling_settings(validate_run({"data": {"sampled_pairs": {}}})).engine == "spo_ray"  # auto, no GPU here


# ---------------------------------------------------------------------------------------------------
# The real engine, where it is installed

@pytest.mark.slow
@pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed (make vllm, or SPO_RAY_VLLM_PYTHON)")
def test_vllm_and_spo_ray_sample_the_same_distribution_and_greedy_text_on_the_real_model(tmp_path):
    import torch

    from spo_ray.decoding import encode_prompts, greedy_decode
    from spo_ray.answers import matches
    from spo_ray.config import ChatArithmeticConfig
    from spo_ray.models import gguf_init, load_init
    from spo_ray.sampling import sample_rows
    from spo_ray.tasks.chat_arithmetic import question, solve
    from spo_ray.tasks.pairs import chat_prompt, end_of_turn_id

    folder = gguf_init("smollm2-135m-instruct", "float32", str(tmp_path))
    model, tokenizer = load_init(folder)
    cfg = ChatArithmeticConfig()
    problems = [(a, b, "+") for a in range(0, 21, 3) for b in range(0, 21, 5)][:24]
    prompts = [chat_prompt(tokenizer, question(cfg, p)) for p in problems]
    answers = [solve(*p) for p in problems]
    stop = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    sampling = Sampling(samples_per_prompt=8, temperature=0.8, max_new_tokens=32, seed=0)
    prompt_ids = encode_prompts(tokenizer, prompts)
    with VllmEngine(folder, "float32", 0, max(map(len, prompt_ids)) + 32, "cpu") as engine:
        theirs = vllm_rows(engine, tokenizer, prompt_ids, Sampling(**{**sampling.key_fields(), "engine": "vllm"}),
                           stop)
        greedy_theirs = engine.generate(prompt_ids, 1, 0.0, 1.0, 32, stop)
    with torch.no_grad():
        ours = sample_rows(model, tokenizer, prompts, sampling, stop)
        greedy_ours = greedy_decode(model, tokenizer, prompts, 32, stop_ids=stop)

    def right(rows):
        return sum(r["ended"] and matches(r["completion"], answers[r["prompt"]]) for r in rows) / len(rows)

    def ended(rows):
        return sum(r["ended"] for r in rows) / len(rows)
    n = len(ours)
    for share in (right, ended):  # within 3 standard errors of a difference of two binomial shares
        p = (share(ours) + share(theirs)) / 2
        assert abs(share(ours) - share(theirs)) <= 3 * math.sqrt(2 * p * (1 - p) / n), share.__name__
    same = sum((a[:-1] if a and a[-1] in stop else a) == ids for a, [(ids, _)] in zip(greedy_ours, greedy_theirs))
    # float32 on one CPU, two sets of kernels: a reply may part ways where two tokens' logits are within rounding
    assert same >= len(prompts) - 2, f"{same} of {len(prompts)} greedy replies the same"


@pytest.mark.slow
@pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed (make vllm, or SPO_RAY_VLLM_PYTHON)")
def test_the_vllm_evaluator_follows_the_policy_through_a_weight_change_on_the_real_model(tmp_path):
    """`data.eval_engine: vllm` on SmolLM2: greedy replies equal ours before and after the policy's weights
    change (reloaded in place, the prefix cache emptied: the same prompts would otherwise answer from the old
    keys and values)."""
    import torch

    from spo_ray.config import ChatArithmeticConfig
    from spo_ray.decoding import greedy_decode
    from spo_ray.engines import PolicyEngine
    from spo_ray.models import gguf_init, load_init
    from spo_ray.tasks.chat_arithmetic import question
    from spo_ray.tasks.pairs import chat_prompt, end_of_turn_id

    model, tokenizer = load_init(gguf_init("smollm2-135m-instruct", "float32", str(tmp_path)))
    cfg = ChatArithmeticConfig()
    prompts = [chat_prompt(tokenizer, question(cfg, (a, b, "*"))) for a in range(2, 10, 2) for b in (3, 7, 11, 13)]
    stop = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    policy = PolicyEngine("float32")
    ours, theirs = [], []
    try:
        for change in (False, True):
            if change:  # a different policy: the final norm rescaled, unevenly
                with torch.no_grad():
                    model.model.norm.weight.mul_(torch.linspace(0.6, 1.6, model.model.norm.weight.numel()))
            with torch.no_grad():
                ours.append(greedy_decode(model, tokenizer, prompts, 24, stop_ids=stop))
            theirs.append(policy.greedy(model, tokenizer, prompts, 24, stop))
        print(f"vLLM evaluator: started in {policy.started_s:.1f} s, reloaded in {policy.reloaded_s[0]:.2f} s")
    finally:
        policy.close()
    assert sum(a != b for a, b in zip(*ours)) >= len(prompts) // 2  # the change moved most of our replies
    for mine, its in zip(ours, theirs):  # float32 on one CPU, two sets of kernels: at most 2 part ways
        assert sum(a == b for a, b in zip(mine, its)) >= len(prompts) - 2
