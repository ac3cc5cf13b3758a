"""The optimizer (`train.optim`) and two ways to hold less memory around it: the step in the backward, and
activation offloading.

Which AdamW, by transformers' `TrainingArguments.optim` names (`transformers.training_args.OptimizerNames`):

- `adamw_torch_fused`: torch's AdamW, each parameter updated in one kernel (TRL's default);
- `adamw_torch`: torch's AdamW with its default loop (over the tensors on a CPU, foreach on a GPU);
- `adamw_bnb_8bit`: bitsandbytes' `AdamW8bit` (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
  Quantization"): both moments stored as one byte per value, in blocks of 256 values that share one float32
  scale (their largest magnitude), on the library's dynamic code map; each step dequantizes a parameter's
  moments, does AdamW in float32 and quantizes them again. Tensors under 4,096 values (biases, norms) keep
  float32 moments. The same class runs on a GPU (CUDA kernels) and on a CPU (the library's CPU backend),
  so the CPU tests exercise the arithmetic a GPU run uses. Install with `pip install 'spo-ray[lowmem]'`.

The step in the backward (torchtune's `optimizer_in_bwd`): `OptimizerInBackward` gives every trainable
parameter its own optimizer and steps it as soon as its gradient is complete, then frees that gradient, so
the full set of gradients never exists at once (at 135M float32 parameters: 0.5 GiB not held). It looks like
one optimizer to the LR schedule and the checkpoints; its state dict is that of a plain optimizer over the
same parameters, so either kind resumes from the other's checkpoint.

Activation offloading (`activation_offload`): the tensors a forward saves for its backward wait in pinned
host memory instead of on the GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping
from typing import Callable, Iterable

import torch

from spo_ray.config import ConfigError, step_in_backward_refusal

FUSED, EIGHT_BIT = "adamw_torch_fused", "adamw_bnb_8bit"
OPTIMIZERS = (FUSED, "adamw_torch", EIGHT_BIT)

# bitsandbytes' 8-bit states: one float32 scale (absmax) per block of this many values
# (`bitsandbytes.optim.optimizer.Optimizer2State.init_state`, the same on every device) …
EIGHT_BIT_BLOCK = 256
# … for tensors of at least this many values (`AdamW8bit(min_8bit_size=4096)`); smaller ones keep float32 moments
EIGHT_BIT_MIN_VALUES = 4096


def optimizer_kernels(optim: str) -> dict[str, bool | None]:
    """torch AdamW's `fused`/`foreach` arguments for `optim` (keys its param groups carry): fused updates each
    parameter in one kernel, with no temporaries the size of a parameter; None is torch's default. The 8-bit
    optimizer has no such keys (it ignores them, but a checkpoint should not carry what does nothing)."""
    if optim == "adamw_torch_fused":
        return {"fused": True, "foreach": False}
    if optim == "adamw_torch":
        return {"fused": None, "foreach": None}
    return {}


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: str, lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """The AdamW that `train.optim` names, over `params`, with torch's betas (0.9, 0.999) and eps 1e-8 (also
    bitsandbytes' defaults). Weight decay is decoupled in all three: θ ← θ·(1 − lr·λ) before the Adam step."""
    if optim not in OPTIMIZERS:
        raise ConfigError(f"train.optim: {optim!r} is not one of {', '.join(OPTIMIZERS)}")
    if optim == EIGHT_BIT:
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError(f"train.optim: {EIGHT_BIT} needs the bitsandbytes package "
                              "(pip install 'spo-ray[lowmem]')") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **optimizer_kernels(optim))


def eight_bit_installed() -> bool:
    """Whether `adamw_bnb_8bit` can run here (bitsandbytes importable), for `train.optim: auto`."""
    import importlib.util
    return importlib.util.find_spec("bitsandbytes") is not None


def state_optim(state_dict: dict) -> str | None:
    """Which kind of optimizer wrote this state dict: `adamw_bnb_8bit` where its entries hold bitsandbytes'
    quantized state, None for torch's AdamW (either kernel: their states are the same). A resumed run must load
    its state into the kind that wrote it, whatever `train.optim: auto` would pick on this machine."""
    entries = state_dict.get("state", {}).values()
    return EIGHT_BIT if any("__bnb_optimizer_quant_state__" in entry for entry in entries) else None


def optimizer_state_bytes(n_params: int, optim: str) -> int:
    """The least memory the optimizer's state takes for `n_params` trainable float32 values (a floor, for
    `spo_ray.memory`).

    torch AdamW: two moments in the parameters' dtype, 2 × 4 bytes a value. 8-bit AdamW: two moments of one
    byte a value, plus one float32 scale per block of 256 values for each: 2n + 2·4·⌈n / 256⌉. It is a floor
    because tensors under 4,096 values keep float32 moments, each tensor's last block is rounded up on its own,
    and each tensor holds two 256-entry code maps (2 KiB); the step counters are left out for all three.
    """
    if optim == EIGHT_BIT:
        return 2 * n_params + 2 * 4 * -(-n_params // EIGHT_BIT_BLOCK)
    return 2 * 4 * n_params


# ---------------------------------------------------------------------------------------------------
# The step in the backward

class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by a hook as soon as that parameter's gradient is accumulated,
    which then frees the gradient (torchtune's `optimizer_in_bwd`; torch's `register_post_accumulate_grad_hook`).

    Each parameter gets exactly the arithmetic a single optimizer over all of them would give it (AdamW's
    update of one tensor reads only that tensor's gradient and state), so the trajectory is the same as
    `loss.backward(); optimizer.step()` without clipping (`step_in_backward_refusal` says why no clipping).

    Seen from outside it is one optimizer with one param group, so the trainer's loop, LR schedule and
    checkpoints work unchanged, and a checkpoint (optimizer and schedule) resumes in either kind:
    - `param_groups`: one group that stands for the per-parameter optimizers' groups (`_SharedGroup`), so
      `LambdaLR` and `spo_ray.trainer.apply_optimizer_settings` set every parameter's learning rate and
      weight decay;
    - `state_dict()`: a plain optimizer's state dict over the same parameters, in their order, in one group;
      `load_state_dict()` takes such a state dict, this class's or a plain optimizer's;
    - `step()`: the steps already ran in the backward; it only checks that some did;
    - `zero_grad()`: frees the gradients still held (those accumulated under `accumulating`).

    Gradient accumulation: inside `accumulating()` a backward only accumulates into `.grad`, as without this
    class; the backward of the last micro-batch steps. All gradients are then alive between micro-batches,
    so with grad_accum_steps > 1 the accumulated gradients are the peak and nothing is saved. Any other
    backward into `.grad` (the gradient probe) must run inside `accumulating()` too, or it steps the optimizer.

    Not an `Optimizer` of its own parameters: it subclasses torch's only because `LambdaLR` accepts nothing
    else, and does not call its `__init__` (it owns no param groups or state; torch's optimizer hooks are
    not available on it).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter],
                 make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]):
        self.optimizers = {p: make_optimizer([p]) for p in params}
        self._group = _SharedGroup(self.optimizers)
        self.holding = False                       # True inside `accumulating()`
        self._norms: list[torch.Tensor] = []       # ‖g_p‖ of each parameter stepped since zero_grad()
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_parameter) for p in self.optimizers]

    def _step_parameter(self, param: torch.nn.Parameter) -> None:
        if self.holding:
            return
        self._norms.append(torch.linalg.vector_norm(param.grad))
        self.optimizers[param].step()
        param.grad = None

    @property
    def param_groups(self) -> list[MutableMapping]:
        return [self._group]

    @property
    def state(self) -> dict:
        return {p: optimizer.state[p] for p, optimizer in self.optimizers.items() if p in optimizer.state}

    @contextlib.contextmanager
    def accumulating(self, active: bool = True):
        """Inside (when `active`), a backward accumulates gradients into `.grad` without stepping."""
        before, self.holding = self.holding, active
        try:
            yield
        finally:
            self.holding = before

    def grad_norm(self) -> torch.Tensor:
        """‖g‖₂ of the (accumulated, unclipped) gradients the parameters stepped on since `zero_grad()`: the
        norm of the per-tensor norms, as `torch.nn.utils.clip_grad_norm_` returns it."""
        if not self._norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(self._norms))

    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("an optimizer stepping in the backward takes no closure")
        if not self._norms:
            raise RuntimeError("no parameter stepped in the backward since zero_grad(): was the backward of the "
                               "last micro-batch run inside accumulating()?")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)
        self._norms.clear()

    def state_dict(self) -> dict:
        """A plain optimizer's state dict over the same parameters (numbered in their order), in one group."""
        state = {}
        for index, optimizer in enumerate(self.optimizers.values()):
            own = optimizer.state_dict()["state"]
            if 0 in own:
                state[index] = own[0]
        params = list(range(len(self.optimizers)))
        return {"state": state, "param_groups": [{**_settings(self._group), "params": params}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a one-group state dict (this class's, or a plain optimizer's over the same parameters in the
        same order): each parameter's optimizer gets its state and the group's settings."""
        (group,) = state_dict["param_groups"]
        if len(group["params"]) != len(self.optimizers):
            raise ValueError(f"the state dict covers {len(group['params'])} parameters, this optimizer "
                             f"{len(self.optimizers)}")
        for optimizer, key in zip(self.optimizers.values(), group["params"]):
            state = {0: state_dict["state"][key]} if key in state_dict["state"] else {}
            optimizer.load_state_dict({"state": state, "param_groups": [{**_settings(group), "params": [0]}]})

    def remove_hooks(self) -> None:
        """Detach from the parameters: later backwards only accumulate gradients. Call it when the run ends:
        the hooks stay on the parameters otherwise, and a second optimizer over them (the next self-training
        round's) would step them twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class _SharedGroup(MutableMapping):
    """The per-parameter optimizers' param groups seen as one: a key reads the first group's value (all hold
    the same: they are only set through here), and setting it sets it in every group; "params" lists all."""

    def __init__(self, optimizers: dict):
        self._optimizers = optimizers

    def _groups(self) -> list[dict]:
        return [optimizer.param_groups[0] for optimizer in self._optimizers.values()]  # live: a load replaces them

    def __getitem__(self, key):
        return list(self._optimizers) if key == "params" else self._groups()[0][key]

    def __setitem__(self, key, value) -> None:
        if key == "params":
            raise KeyError("the parameters of an optimizer stepping in the backward are fixed")
        for group in self._groups():
            group[key] = value

    def __delitem__(self, key) -> None:
        for group in self._groups():
            del group[key]

    def __iter__(self):
        return iter(self._groups()[0])

    def __len__(self) -> int:
        return len(self._groups()[0])


def _settings(group) -> dict:
    return {key: value for key, value in group.items() if key != "params"}


def attach_step_in_backward(params: Iterable[torch.nn.Parameter],
                            make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                            max_grad_norm: float | None = None, world_size: int = 1) -> OptimizerInBackward:
    """`OptimizerInBackward` over `params`, with `make_optimizer([p])` for each parameter (e.g.
    `lambda one: build_optimizer(one, train.optim, train.learning_rate, train.weight_decay)`); a ConfigError
    (`step_in_backward_refusal`) for a run that clips gradients or has several workers."""
    refusal = step_in_backward_refusal(max_grad_norm, world_size)
    if refusal:
        raise ConfigError(refusal)
    return OptimizerInBackward(params, make_optimizer)


def accumulating(optimizer: torch.optim.Optimizer, active: bool = True):
    """A context in which a backward only accumulates gradients (`OptimizerInBackward.accumulating`); for an
    ordinary optimizer, which never steps in a backward, nothing. Lets the trainer's loop read the same for
    both: `with accumulating(optimizer, not last_micro_batch): loss.backward()`."""
    if isinstance(optimizer, OptimizerInBackward):
        return optimizer.accumulating(active)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------
# Activation offloading

def activation_offload(device: torch.device) -> contextlib.AbstractContextManager | str:
    """A context under which the forward keeps the tensors saved for the backward in pinned host memory
    (`torch.autograd.graph.save_on_cpu`), copied back as the backward needs them: on a GPU, activations then
    cost host memory and PCIe transfers instead of device memory. Elsewhere the reason it is refused (a
    string): on a CPU they already are in host memory, and a copy would only add a second one."""
    if device.type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    if device.type == "cpu":
        return ("activation offloading moves saved activations from a GPU to host memory; on a CPU they already "
                "are there, so it would only copy them")
    return f"activation offloading is for CUDA devices, not {device.type}"
