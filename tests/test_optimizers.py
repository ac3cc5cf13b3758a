"""The optimizers (spo_ray.optimizers): the 8-bit AdamW against its own arithmetic and against float32 AdamW,
the step in the backward against a plain step, resumes bit for bit, and activation offloading's refusal."""

import functools
import io
import math
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.training_args import OptimizerNames

from spo_ray.config import ConfigError
from spo_ray.optimizers import (EIGHT_BIT, EIGHT_BIT_BLOCK, EIGHT_BIT_MIN_VALUES, OPTIMIZERS, OptimizerInBackward, accumulating,
                                activation_offload, attach_step_in_backward, build_optimizer,
                                optimizer_state_bytes, step_in_backward_refusal)

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
except ImportError:  # the lowmem extra (in dev): only the 8-bit tests need it
    bnb = None
needs_bitsandbytes = pytest.mark.skipif(bnb is None, reason="8-bit AdamW: pip install 'spo-ray[lowmem]'")

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch's and bitsandbytes' AdamW defaults


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small gain nothing from torch's thread pool, and on two busy cores its waiting threads
    made this file nine times slower (55 s, against 6 s on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resume(run: tuple, into: tuple) -> None:
    """Checkpoint a (model, optimizer, scheduler) run and load it into another, as a resumed trial does:
    `torch.save`, then `torch.load(weights_only=True)` (spo_ray.distributed)."""
    buffer = io.BytesIO()
    torch.save([part.state_dict() for part in run], buffer)
    buffer.seek(0)
    for part, state in zip(into, torch.load(buffer, weights_only=True)):
        part.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# Names and sizes

@needs_bitsandbytes
def test_optimizer_names_are_transformers_names():
    assert set(OPTIMIZERS) <= {name.value for name in OptimizerNames}
    fused = build_optimizer([torch.nn.Parameter(torch.zeros(3))], "adamw_torch_fused", 1e-3, 0.1)
    plain = build_optimizer([torch.nn.Parameter(torch.zeros(3))], "adamw_torch", 1e-3, 0.1)
    eight = build_optimizer([torch.nn.Parameter(torch.zeros(3))], EIGHT_BIT, 1e-3, 0.1)
    assert (type(fused), fused.defaults["fused"], type(plain), plain.defaults["fused"]) == (
        torch.optim.AdamW, True, torch.optim.AdamW, None)
    assert type(eight) is bnb.optim.AdamW8bit and eight.defaults["weight_decay"] == 0.1
    with pytest.raises(ConfigError, match="train.optim: 'sgd' is not one of"):
        build_optimizer([torch.nn.Parameter(torch.zeros(3))], "sgd", 1e-3, 0.1)


def test_8bit_without_bitsandbytes_is_one_error_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an install without the lowmem extra sees
    with pytest.raises(ConfigError, match=r"^train.optim: adamw_bnb_8bit needs the bitsandbytes package"):
        build_optimizer([torch.nn.Parameter(torch.zeros(3))], EIGHT_BIT, 1e-3, 0.1)


@needs_bitsandbytes
def test_state_bytes_are_those_the_optimizers_allocate():
    """One step on a 40,000-value tensor (157 blocks, the last one partial): AdamW holds two float32 moments;
    8-bit AdamW two one-byte codes a value and a float32 scale per 256-value block of each."""
    n = 40_000
    for optim in ("adamw_torch", EIGHT_BIT):
        weight = torch.nn.Parameter(torch.randn(n))
        optimizer = build_optimizer([weight], optim, 1e-3, 0.0)
        weight.grad = torch.randn(n)
        optimizer.step()
        state = optimizer.state[weight]
        held = sum(v.numel() * v.element_size() for k, v in state.items()
                   if k in ("exp_avg", "exp_avg_sq", "state1", "state2", "absmax1", "absmax2"))
        assert held == optimizer_state_bytes(n, optim)
    assert optimizer_state_bytes(n, "adamw_torch") == 8 * n
    assert optimizer_state_bytes(n, EIGHT_BIT) == 2 * n + 2 * 4 * 157
    assert (state["state1"].dtype, state["state2"].dtype, state["absmax1"].shape) == (
        torch.uint8, torch.uint8, (math.ceil(n / EIGHT_BIT_BLOCK),))


# ---------------------------------------------------------------------------------------------------
# 8-bit AdamW

@needs_bitsandbytes
def test_8bit_step_is_adamw_on_the_dequantized_moments():
    """Each step, from the library's stored state: dequantize (code map entry × block scale), AdamW in float32
    — m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², θ ← θ(1 − lr·λ) − lr/(1−β₁ᵏ) · m / (√v/√(1−β₂ᵏ) + ε) — and store
    m and v again as the nearest codes of their block. Blocks of different magnitudes (the scales are per
    block). The parameters agree to 4 ulps of θ and of its update (measured: exactly with
    ATEN_CPU_CAPABILITY=default, 1.2 ulps with avx2). The stored codes are the nearest ones up to 1e-4 of the
    block's scale: the library's CPU quantizer is not exactly round-to-nearest (it picks a farther code for
    30% of values spread over six decades, at most 3.0e-5 of the scale farther, measured)."""
    lr, weight_decay, blocks = 1e-2, 0.1, 24
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 1, blocks).repeat_interleave(EIGHT_BIT_BLOCK)
    weight = torch.nn.Parameter(torch.randn(blocks * EIGHT_BIT_BLOCK, generator=generator))
    optimizer = build_optimizer([weight], EIGHT_BIT, lr, weight_decay)

    def dequantized(codes, absmax, code_map):
        return (code_map[codes.long()].reshape(blocks, -1) * absmax[:, None]).reshape(-1)

    def check_stored(codes, absmax, code_map, exact):
        by_block = exact.reshape(blocks, -1)
        torch.testing.assert_close(absmax, by_block.abs().amax(1), rtol=1e-6, atol=0)
        scaled = (by_block / absmax[:, None]).reshape(-1)
        nearest = torch.bucketize(scaled, (code_map[:-1] + code_map[1:]) / 2)
        extra = (scaled - code_map[codes.long()]).abs() - (scaled - code_map[nearest]).abs()
        assert float(extra.max()) <= 1e-4

    m = v = torch.zeros_like(weight)
    for k in range(1, 5):
        grad = torch.randn(weight.shape, generator=generator) * scales
        before = weight.detach().clone()
        weight.grad = grad
        optimizer.step()
        m, v = BETA1 * m + (1 - BETA1) * grad, BETA2 * v + (1 - BETA2) * grad * grad
        expected = (before * (1 - lr * weight_decay)
                    - lr / (1 - BETA1 ** k) * m / (v.sqrt() / math.sqrt(1 - BETA2 ** k) + EPS))
        rounding = 4 * torch.finfo(torch.float32).eps * (expected.abs() + (expected - before).abs())
        assert bool(((weight.detach() - expected).abs() <= rounding).all())  # 4 ulps of θ and of its update
        state = optimizer.state[weight]
        check_stored(state["state1"], state["absmax1"], state["qmap1"], m)
        check_stored(state["state2"], state["absmax2"], state["qmap2"], v)
        m = dequantized(state["state1"], state["absmax1"], state["qmap1"])   # the next step starts from these
        v = dequantized(state["state2"], state["absmax2"], state["qmap2"])


def regression_model() -> torch.nn.Module:
    """Two 8,192-value weights (8-bit moments) and two biases (under 4,096 values: float32 moments)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))


def regression_batches(steps: int, micro: int = 1) -> list[list[tuple]]:
    """`steps` lists of `micro` (inputs, targets) micro-batches."""
    generator = torch.Generator().manual_seed(1)
    return [[(torch.randn(16, 64, generator=generator), torch.randn(16, 64, generator=generator))
             for _ in range(micro)] for _ in range(steps)]


def regression_loss(model, batch) -> torch.Tensor:
    inputs, targets = batch
    return ((model(inputs) - targets) ** 2).mean()


@needs_bitsandbytes
def test_8bit_adamw_follows_float32_adamw():
    """Ten steps of 8-bit and float32 AdamW from the same start: the 8-bit displacement Δθ₈ stays within
    r = ‖Δθ₈ − Δθ₃₂‖ / ‖Δθ₃₂‖ ≤ ρ_m/(1 − β₁) + K·ρ_v/2 of the float32 one, where ρ_m and ρ_v are the relative
    errors ‖Q(x) − x‖/‖x‖ of storing the float32 run's moments in the library's 8-bit blocks (about 1.1% and
    0.6% here). Why: an update m̂/(√v̂ + ε) is off by the relative error of m plus half that of v; m's stored
    errors decay by β₁ a step, so they add up to at most ρ_m/(1 − β₁); v's barely decay over K ≪ 1/(1 − β₂)
    steps, at most K·ρ_v. Worst cases aligned: measured r is ten times smaller (0.015 for 0.15). A zero update
    has r = 1 and SGD at the same lr r ≈ 1, so the bound (< 0.5, asserted) tells a working 8-bit Adam from
    them; the run's biases (float32 moments) follow within the same bound."""
    lr, steps = 1e-2, 10
    batches = regression_batches(steps)
    start = [p.detach().clone() for p in regression_model().parameters()]

    def trained(make_optimizer, record_errors: bool = False):
        """The parameters after the steps, and with `record_errors` (ρ_m, ρ_v) of each 8-bit-sized tensor
        at each step."""
        model = regression_model()
        optimizer = make_optimizer(model.parameters())
        errors = []
        for (batch,) in batches:
            regression_loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
            for p in model.parameters() if record_errors else ():
                if p.numel() >= EIGHT_BIT_MIN_VALUES:
                    state = optimizer.state[p]
                    errors.append((stored_error(state["exp_avg"], True), stored_error(state["exp_avg_sq"], False)))
        return [p.detach() for p in model.parameters()], errors

    def stored_error(moment, signed: bool) -> float:
        """‖Q(x) − x‖/‖x‖ for the library's blockwise quantization on its signed (m) or unsigned (v) map."""
        flat = moment.reshape(-1)
        code_map = bnb_functional.create_dynamic_map(signed=signed)
        codes, quant_state = bnb_functional.quantize_blockwise(flat, code=code_map, blocksize=EIGHT_BIT_BLOCK)
        return float((bnb_functional.dequantize_blockwise(codes, quant_state) - flat).norm() / flat.norm())

    def relative_deviation(params) -> float:
        return max(float((p - reference).norm() / (reference - p0).norm())
                   for p, reference, p0 in zip(params, float32, start))

    adamw = functools.partial(build_optimizer, lr=lr, weight_decay=0.01)
    float32, errors = trained(functools.partial(adamw, optim="adamw_torch"), record_errors=True)
    rho_m, rho_v = max(m for m, _ in errors), max(v for _, v in errors)
    bound = rho_m / (1 - BETA1) + steps * rho_v / 2
    eight_bit, _ = trained(functools.partial(adamw, optim=EIGHT_BIT))
    sgd, _ = trained(lambda params: torch.optim.SGD(params, lr=lr))
    assert 0.005 < rho_m < 0.05 and 0.002 < rho_v < 0.05 and bound < 0.5
    assert relative_deviation(eight_bit) < bound
    assert relative_deviation(sgd) > bound and relative_deviation(start) == 1.0 > bound


@needs_bitsandbytes
def test_8bit_resume_continues_bit_for_bit():
    """Six steps straight, or three, a checkpoint (weights_only load) into a fresh model, optimizer and
    schedule, and three more: the same parameters, bit for bit. The learning rate changes every step."""
    batches = regression_batches(6)

    def new_run():
        model = regression_model()
        optimizer = build_optimizer(model.parameters(), EIGHT_BIT, 1e-2, 0.01)
        return model, optimizer, schedule(optimizer)

    straight, first, resumed = new_run(), new_run(), new_run()
    run_steps(*straight, batches, regression_loss)
    run_steps(*first, batches[:3], regression_loss)
    resume(first, into=resumed)
    run_steps(*resumed, batches[3:], regression_loss)
    assert all(torch.equal(a, b) for a, b in zip(straight[0].parameters(), resumed[0].parameters()))
    assert resumed[1].param_groups[0]["lr"] == straight[1].param_groups[0]["lr"] == 1e-2 * (1 / 7)


# ---------------------------------------------------------------------------------------------------
# The step in the backward

def tiny_llama() -> LlamaForCausalLM:
    """float64, tied input and output embeddings (one parameter used twice: its hook must fire once)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).double()


def token_batches(steps: int, micro: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [[torch.randint(0, 64, (2, 12), generator=generator) for _ in range(micro)] for _ in range(steps)]


def language_model_loss(model, tokens) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def plain_adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)


def run_steps(model, optimizer, scheduler, batches, loss=language_model_loss) -> list[float]:
    """The trainer's loop: zero_grad; a backward per micro-batch (loss / micro-batches), the last one stepping
    in the backward; the gradient norm; step; zero_grad; the schedule. Returns the gradient norms."""
    norms = []
    for micro_batches in batches:
        optimizer.zero_grad()
        for index, micro_batch in enumerate(micro_batches):
            with accumulating(optimizer, index < len(micro_batches) - 1):
                (loss(model, micro_batch) / len(micro_batches)).backward()
        if isinstance(optimizer, OptimizerInBackward):
            norms.append(float(optimizer.grad_norm()))
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)))
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return norms


def schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))


@pytest.mark.parametrize("micro", [1, 2])
def test_step_in_backward_equals_a_plain_step(micro):
    """Five float64 steps of AdamW (lr falling 1, 1/2, … 1/5), with one or two micro-batches a step: the same
    parameters exactly (each tensor's update is the same arithmetic on the same numbers), and the same global
    gradient norm as clip_grad_norm_ measures (to float64 rounding: the per-tensor norms come in another order)."""
    batches = token_batches(5, micro)
    plain_model, in_backward_model = tiny_llama(), tiny_llama()
    plain = plain_adamw(plain_model.parameters())
    plain_norms = run_steps(plain_model, plain, schedule(plain), batches)
    in_backward = attach_step_in_backward(in_backward_model.parameters(), plain_adamw)
    norms = run_steps(in_backward_model, in_backward, schedule(in_backward), batches)
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), in_backward_model.parameters()))
    assert norms == pytest.approx(plain_norms, rel=1e-12)
    # one param group, standing for every parameter's: the schedule set them all
    assert len(in_backward.param_groups) == 1 and in_backward.param_groups[0]["lr"] == 1e-2 * (1 / 6)
    assert {optimizer.param_groups[0]["lr"] for optimizer in in_backward.optimizers.values()} == {1e-2 * (1 / 6)}


def test_step_in_backward_holds_one_gradient_at_a_time():
    """Counted by a hook that runs just before each parameter's step: only that parameter has a gradient (a
    plain backward ends with all of them); after the backward none is left. A backward inside accumulating()
    (the gradient probe's, a micro-batch before the last) keeps them all and steps nothing, and so does one
    after remove_hooks()."""
    model = tiny_llama()
    params = list(model.parameters())
    alive_at_hooks = []
    for p in params:  # registered first, so it runs before the step's hook
        p.register_post_accumulate_grad_hook(lambda _: alive_at_hooks.append(sum(q.grad is not None for q in params)))
    optimizer = attach_step_in_backward(params, plain_adamw)
    tokens = token_batches(1, 1)[0][0]
    before = [p.detach().clone() for p in params]
    with accumulating(optimizer):
        language_model_loss(model, tokens).backward()
    assert all(p.grad is not None for p in params) and all(torch.equal(p, b) for p, b in zip(params, before))
    optimizer.zero_grad()
    alive_at_hooks.clear()
    language_model_loss(model, tokens).backward()
    assert alive_at_hooks == [1] * len(params)  # every parameter once, the tied embedding too
    assert all(p.grad is None for p in params) and not any(torch.equal(p, b) for p, b in zip(params, before))
    optimizer.step()  # the steps already ran: nothing more happens
    optimizer.zero_grad()
    with pytest.raises(RuntimeError, match="no parameter stepped in the backward"):
        optimizer.step()
    optimizer.remove_hooks()  # detached: a backward leaves every gradient and steps nothing
    before = [p.detach().clone() for p in params]
    language_model_loss(model, tokens).backward()
    assert all(p.grad is not None for p in params) and all(torch.equal(p, b) for p, b in zip(params, before))


def test_step_in_backward_resumes_exactly_and_shares_the_plain_checkpoint_format():
    """Three steps, a checkpoint, three more: the same as six straight, resumed either by the step in the
    backward or by a plain AdamW (the state dicts have one format), and a plain run's checkpoint resumes in
    the backward too."""
    batches = token_batches(6, 1)

    def new_run(in_backward: bool):
        model = tiny_llama()
        optimizer = (attach_step_in_backward(model.parameters(), plain_adamw) if in_backward
                     else plain_adamw(model.parameters()))
        return model, optimizer, schedule(optimizer)

    straight = new_run(True)
    run_steps(*straight, batches)
    for first_kind, second_kind in [(True, True), (True, False), (False, True)]:
        first, resumed = new_run(first_kind), new_run(second_kind)
        run_steps(*first, batches[:3])
        resume(first, into=resumed)
        run_steps(*resumed, batches[3:])
        assert all(torch.equal(a, b) for a, b in zip(straight[0].parameters(), resumed[0].parameters()))
    plain_state = new_run(False)[1].state_dict()
    assert plain_state["param_groups"][0].keys() == straight[1].state_dict()["param_groups"][0].keys()


@needs_bitsandbytes
def test_step_in_backward_with_8bit_adamw_equals_plain_8bit_adamw():
    """The 8-bit optimizer per parameter: each tensor's moments and scales are its own, so three steps with
    two micro-batches give the same parameters as one 8-bit AdamW over all of them."""
    batches = regression_batches(3, micro=2)
    make = lambda params: build_optimizer(params, EIGHT_BIT, 1e-2, 0.01)  # noqa: E731
    plain_model, in_backward_model = regression_model(), regression_model()
    plain = make(plain_model.parameters())
    run_steps(plain_model, plain, schedule(plain), batches, regression_loss)
    in_backward = attach_step_in_backward(in_backward_model.parameters(), make)
    run_steps(in_backward_model, in_backward, schedule(in_backward), batches, regression_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), in_backward_model.parameters()))


def test_settings_written_to_the_one_param_group_reach_every_parameter():
    """What `spo_ray.trainer.apply_optimizer_settings` and `LambdaLR` do to param groups (update, set,
    setdefault) reaches each parameter's own optimizer; "params" lists them all, in order."""
    model = tiny_llama()
    optimizer = attach_step_in_backward(model.parameters(), plain_adamw)
    (group,) = optimizer.param_groups
    group.update({"fused": None, "foreach": False})
    group["weight_decay"] = 0.5
    assert group.setdefault("initial_lr", 0.02) == 0.02 and group.setdefault("initial_lr", 0.03) == 0.02
    own = [each.param_groups[0] for each in optimizer.optimizers.values()]
    assert all((g["foreach"], g["weight_decay"], g["initial_lr"]) == (False, 0.5, 0.02) for g in own)
    assert group["params"] == list(model.parameters()) and "params" in optimizer.state_dict()["param_groups"][0]


@needs_bitsandbytes
def test_8bit_ignores_torch_kernel_keys():
    """`fused`/`foreach` in its param groups (as a torch AdamW's checkpoint or settings would put there) change
    nothing: the same parameters after three steps."""
    results = []
    for keys in ({}, {"fused": True, "foreach": False}):
        model = regression_model()
        optimizer = build_optimizer(model.parameters(), EIGHT_BIT, 1e-2, 0.01)
        optimizer.param_groups[0].update(keys)
        for (batch,) in regression_batches(3):
            regression_loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_step_in_backward_refuses_clipping_and_several_workers():
    assert step_in_backward_refusal(None, 1) is None
    with pytest.raises(ConfigError, match=r"^train.max_grad_norm: 1.0 clips by the norm of all gradients"):
        attach_step_in_backward(tiny_llama().parameters(), plain_adamw, max_grad_norm=1.0)
    assert step_in_backward_refusal(None, 2).startswith("scaling: the optimizer steps in the backward on one worker")


# ---------------------------------------------------------------------------------------------------
# Activation offloading

def test_activation_offload_is_refused_on_a_cpu():
    reason = activation_offload(torch.device("cpu"))
    assert isinstance(reason, str) and "on a CPU they already are" in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="activation offloading needs a CUDA device")
def test_activation_offload_gives_the_same_gradients_on_a_gpu():
    device = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)).to(device)
    inputs = torch.randn(32, 64, device=device)
    model(inputs).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with activation_offload(device):
        output = model(inputs).sum()
    output.backward()
    assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected))
