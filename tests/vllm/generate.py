"""Greedy tokens from vLLM's CPU build, in-process, for token-id prompts.

Usage: generate.py MODEL --strategy lazy|eager [--prompts JSON] [--max-tokens N]
                   [--reload DIR ...] [--reload-method aoe|vllm] [--max-model-len N]

Prints one JSON object: {"model", "strategy", "start_seconds", "tokens": [[id, ...] per prompt],
"reloads": [{"dir", "seconds", "tokens"}]}.  `lazy` is vLLM's default loader (safetensors mmap);
`eager` is `safetensors_load_strategy="eager"` (whole files read with read()).  Each `--reload DIR`
swaps the weights in place and generates again: with `aoe` (default) through
`aoe_vllm.SwapExtension.aoe_reload` (exact), with `vllm` through vLLM's own `reload_weights`
(for comparison: wrong tokens on CPU MoE models).  The prefix cache is reset after each reload.

CPU settings (DESIGN §7): VLLM_MLA_DISABLE=1, custom_ops all,-rotary_embedding,
skip_tokenizer_init, enforce_eager, VLLM_CPU_KVCACHE_SPACE=1, engine and worker in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, distributed_executor_backend="uni").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_PROMPTS = [
    [5, 17, 33, 2, 99],
    [100, 200, 300],
    [7, 7, 7, 7, 7, 7, 7, 7],
    [400, 3, 250, 99, 12, 480, 61],
]


def set_cpu_env() -> None:
    os.environ.setdefault("VLLM_MLA_DISABLE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--strategy", choices=["lazy", "eager"], default="lazy")
    ap.add_argument("--prompts", help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--reload", nargs="*", default=[], metavar="DIR")
    ap.add_argument("--reload-method", choices=["aoe", "vllm"], default="aoe")
    ap.add_argument("--fp8-reference", action="store_true",
                    help="worker extension fp8_reference.Fp8ReferenceSwapExtension: reference FP8 "
                         "kernels on CPUs without AMX (test only; see fp8_reference.py)")
    ap.add_argument("--describe", action="store_true",
                    help="add aoe_describe's summary (without the tensor list) to the output")
    ap.add_argument("--refuse", nargs="*", default=[], metavar="DIR",
                    help="check that aoe_reload refuses each DIR (another architecture)")
    args = ap.parse_args()
    prompts = json.loads(args.prompts) if args.prompts else DEFAULT_PROMPTS

    set_cpu_env()
    # vLLM logs to stdout: keep the real stdout for the JSON and send everything else to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # The extension lives in python/ of this repository; an installed aoe_vllm works too.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "..", "python"))
    sys.path.insert(0, here)
    extension = ("fp8_reference.Fp8ReferenceSwapExtension" if args.fp8_reference
                 else "aoe_vllm.SwapExtension")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {}
    if args.strategy == "eager":
        kwargs["safetensors_load_strategy"] = "eager"
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        dtype="bfloat16",
        compilation_config={"custom_ops": ["all", "-rotary_embedding"]},
        distributed_executor_backend="uni",
        worker_extension_cls=extension,
        seed=0,
        **kwargs,
    )
    start = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                            detokenize=False)

    def generate() -> list[list[int]]:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    result = {"model": args.model, "strategy": args.strategy, "start_seconds": round(start, 3),
              "tokens": generate(), "reloads": []}
    if args.describe:
        d = llm.collective_rpc("aoe_describe")[0]
        d["tensors"] = len(d["tensors"])
        result["describe"] = d
    for d in args.refuse:
        try:
            llm.collective_rpc("aoe_reload", args=(d,))
            result.setdefault("refused", []).append({"dir": d, "error": None})
        except Exception as e:  # noqa: BLE001 - reported to the caller
            result.setdefault("refused", []).append({"dir": d, "error": str(e)[:300]})
    for d in args.reload:
        t = time.perf_counter()
        if args.reload_method == "aoe":
            llm.collective_rpc("aoe_reload", args=(d,))
        else:
            llm.collective_rpc("reload_weights", kwargs={"weights_path": d})
        llm.reset_prefix_cache()
        secs = time.perf_counter() - t
        result["reloads"].append({"dir": d, "seconds": round(secs, 4), "tokens": generate()})
    if args.refuse:
        result["tokens_after_refusals"] = generate()
    out.write(json.dumps(result) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
