"""aoe_vllm: swap the weights of a running vLLM for another checkpoint of the same architecture.

`SwapExtension` is a vLLM worker extension.  Start vLLM with
`--worker-extension-cls aoe_vllm.SwapExtension` (or `LLM(worker_extension_cls=...)`); its methods
then run inside every worker through `collective_rpc`, with `self.model_runner` at hand:

    llm.collective_rpc("aoe_describe")
    llm.collective_rpc("aoe_reload", args=("/mnt/aoe/lambda=0.6",))
    llm.reset_prefix_cache()

or over HTTP (`VLLM_SERVER_DEV_MODE=1`):

    POST /pause?mode=wait
    POST /collective_rpc {"method": "aoe_reload", "args": ["/mnt/aoe/lambda=0.6"]}
    POST /reset_prefix_cache
    POST /resume

Why not vLLM's own `reload_weights(weights_path=...)`: on vLLM 0.32's CPU build it leaves a MoE
model with wrong tokens.  The layerwise reload (vllm/model_executor/model_loader/reload/
layerwise.py, `_layerwise_process`) rebuilds each layer in checkpoint format, loads it and runs
its quant method's `process_weights_after_loading`, then copies the result into the serving
tensors.  For routed experts without quantization that is
`UnquantizedFusedMoEMethod.process_weights_after_loading` → `_setup_kernel`, which treats a
second call as an RL weight update (`is_weight_update = self.moe_kernel is not None`) and skips
`moe_kernel.fused_experts.process_weights_after_loading(layer)`: on CPU that is the grouped-GEMM
prepack (`CPUUnquantizedExperts.process_weights_after_loading` → `cpu_prepack_moe_weight`).  The
serving tensors then hold the new weights in checkpoint layout while the kernel reads them as
prepacked.  `aoe_reload` redoes that prepack for every such layer, and rebuilds the FP8 MoE
kernel's quant config over the layer's own scale tensors (the reload built it over the layer's
temporary copies), so the model is in the state a fresh start on the directory gives.

Block-FP8 models: the routed experts go through `Fp8MoEMethod`, whose
`process_weights_after_loading` re-runs its whole conversion on a reload and rebuilds the MoE
kernel (`_setup_kernel` → `_init_moe_kernel`), so vLLM's reload already gives fresh weights;
the kernel's quant config is then built over the reload's temporary scale tensors (the same
values as the serving ones), which `aoe_reload` points back at the layer's own.  vLLM 0.32's CPU
FP8 kernels need AMX; swapped == fresh was verified on FP8 only through the reference kernels
of the tests (tests/vllm/fp8_reference.py), in-process and through a server.

The prefix cache lives in the scheduler, not in the worker: reset it after a reload
(`LLM.reset_prefix_cache()` / `POST /reset_prefix_cache`), or cached KV blocks computed with the
old weights are reused by prompts that share a prefix.
"""
from __future__ import annotations

import json
import os
import struct
import time
from typing import Any

__all__ = ["SwapExtension", "checkpoint_tensors", "describe_checkpoint"]

_MAX_HEADER = 100 * 1024 * 1024


def checkpoint_tensors(path: str) -> dict[str, dict[str, Any]]:
    """Every tensor of the safetensors checkpoint in directory `path`: name → {dtype, shape}.

    Reads only the shard headers (vLLM loads every `*.safetensors` of the directory, so all of
    them are read; the index is not needed)."""
    out: dict[str, dict[str, Any]] = {}
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not shards:
        raise ValueError(f"{path}: no *.safetensors file")
    for shard in shards:
        with open(os.path.join(path, shard), "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}/{shard}: too short for a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ValueError(f"{path}/{shard}: header of {n} bytes")
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in out:
                raise ValueError(f"{path}: tensor {name} in two shards")
            out[name] = {"dtype": info["dtype"], "shape": list(info["shape"])}
    return out


def describe_checkpoint(path: str) -> dict[str, Any]:
    """What a checkpoint directory is: the config fields that fix the architecture, and its
    tensors with dtypes and shapes."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    quant = config.get("quantization_config") or {}
    return {
        "path": path,
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "quantization": quant.get("quant_method"),
        "tensors": checkpoint_tensors(path),
    }


def _mismatch(served: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why `new` cannot be loaded in place of `served`, or None."""
    for key in ("architectures", "model_type", "quantization"):
        if served[key] != new[key]:
            return f"{key} {new[key]!r} differs from the served model's {served[key]!r}"
    a, b = served["tensors"], new["tensors"]
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    if missing or extra:
        return f"tensors differ: missing {missing[:5]}, extra {extra[:5]}"
    for name in sorted(a):
        if a[name] != b[name]:
            return f"tensor {name}: {b[name]} differs from the served {a[name]}"
    return None


class SwapExtension:
    """vLLM worker extension: exact in-place weight swaps.  Mixed into vLLM's worker class, so
    `self` is the worker (`self.model_runner` is its model runner)."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def _served_path(self) -> str:
        return str(self.model_runner.vllm_config.model_config.model)

    def aoe_describe(self) -> dict[str, Any]:
        """The served model as plain JSON data: path, architectures, model_type, quantization
        method, and the checkpoint tensors (name → dtype, shape) of the directory it was loaded
        from.  A client compares these with a candidate directory before swapping to it (aoe_reload
        does so itself), plus the vLLM kernel classes in use, for diagnosis."""
        d = describe_checkpoint(self._served_path())
        kernels: dict[str, int] = {}
        for m in self.model_runner.get_model().modules():
            qm = getattr(m, "quant_method", None)
            if qm is None:
                continue
            k = type(qm).__name__
            lin = getattr(qm, "fp8_linear", None)
            if lin is not None:
                k += "/" + type(lin).__name__
            mk = getattr(qm, "moe_kernel", None)
            if mk is not None and getattr(mk, "fused_experts", None) is not None:
                k += "/" + type(mk.fused_experts).__name__
            kernels[k] = kernels.get(k, 0) + 1
        d["kernels"] = kernels
        return d

    def aoe_reload(self, weights_path: str) -> dict[str, Any]:
        """Reload every weight in place from the checkpoint directory `weights_path` and redo the
        post-load processing vLLM skips on reload, so that generation equals a fresh start on
        `weights_path`.  Refuses (ValueError, nothing changed) a directory whose architecture,
        quantization or tensor names, dtypes and shapes differ from the served model's.  The
        served model path becomes `weights_path`.  Reset the prefix cache afterwards.

        Returns {"weights_path", "seconds", "moe_prepacked", "fp8_moe_rebuilt"}."""
        t0 = time.perf_counter()
        why = _mismatch(describe_checkpoint(self._served_path()), describe_checkpoint(weights_path))
        if why is not None:
            raise ValueError(f"aoe_reload: refusing {weights_path}: {why}")
        self.model_runner.reload_weights(weights_path=weights_path)
        prepacked, rebuilt = self._redo_skipped_processing()
        return {
            "weights_path": weights_path,
            "seconds": time.perf_counter() - t0,
            "moe_prepacked": prepacked,
            "fp8_moe_rebuilt": rebuilt,
        }

    def _redo_skipped_processing(self) -> tuple[int, int]:
        import torch

        from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
            UnquantizedFusedMoEMethod,
        )

        prepacked = rebuilt = 0
        with torch.no_grad():
            for layer in self.model_runner.get_model().modules():
                qm = getattr(layer, "quant_method", None)
                kernel = getattr(qm, "moe_kernel", None)
                if kernel is None:
                    continue
                if isinstance(qm, UnquantizedFusedMoEMethod):
                    # The step `_setup_kernel` skips when `moe_kernel` is already set: the
                    # experts' own layout conversion (CPU: grouped-GEMM prepack).
                    kernel.fused_experts.process_weights_after_loading(layer)
                    prepacked += 1
                elif type(qm).__name__ == "Fp8MoEMethod" and hasattr(qm, "_init_moe_kernel"):
                    # The reload built the kernel's quant config over the layer's temporary
                    # (materialized) scale tensors; point it at the serving tensors again.
                    qm._init_moe_kernel(layer)
                    rebuilt += 1
        return prepacked, rebuilt
