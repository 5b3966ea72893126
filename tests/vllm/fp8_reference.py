"""Test-only: lets vLLM 0.32's CPU build load block-FP8 checkpoints on a CPU without AMX.

vLLM's only CPU FP8 block kernels (CPUFp8BlockScaledMMKernel, CPUFp8W8A8BlockScaledMMKernel for
linears, CPUExpertsFp8 for routed experts) need AMX tiles; elsewhere an FP8 checkpoint does not
load.  This module, imported in the worker through the worker extension
`fp8_reference.Fp8ReferenceSwapExtension` (tests/vllm on PYTHONPATH), adds reference paths when
the CPU has no AMX:

- linears: a block-scaled kernel that keeps vLLM's FP8 weight and `weight_scale_inv` parameters
  as loaded and computes `x @ dequant(W)^T` in the activation dtype (dequant = code × scale of
  its 128×128 block) at every call;
- routed experts: an FP8 MoE method that loads the FP8 experts and their block scales through
  vLLM's own loaders, dequantizes them once in `process_weights_after_loading` and hands them to
  vLLM's unquantized CPU experts (so it inherits their reload behaviour, prepack included).

Everything else (Fp8Config, the checkpoint loader, the layerwise reload) is vLLM's.  The
numbers differ from AMX FP8 kernels; mounted-vs-written and swapped-vs-fresh comparisons stay
meaningful, and exercise vLLM's FP8 loading and reload path.
"""
from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))

import torch  # noqa: E402

from aoe_vllm import SwapExtension  # noqa: E402

BLOCK = 128


def _dequant(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """code × block scale over the last two dims (leading dims, e.g. experts, kept)."""
    bn, bk = block
    n, k = w.shape[-2], w.shape[-1]
    full = s.to(torch.float32).repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)
    return w.to(torch.float32) * full[..., :n, :k]


def _install() -> None:
    if torch.cpu._is_amx_tile_supported():  # vLLM's own kernels work
        return
    from vllm.model_executor.kernels import linear as linear_kernels
    from vllm.model_executor.kernels.linear.scaled_mm.BlockScaledMMLinearKernel import (
        Fp8BlockScaledMMLinearKernel,
    )
    from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )
    from vllm.model_executor.layers.quantization import fp8 as fp8_mod
    from vllm.model_executor.utils import replace_parameter, set_weight_attrs
    from vllm.platforms import PlatformEnum, current_platform

    class ReferenceCPUFp8BlockKernel(Fp8BlockScaledMMLinearKernel):
        """x @ dequant(W)^T in the activation dtype; weights stay as loaded."""

        apply_input_quant = False

        @classmethod
        def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
            return (True, None) if current_platform.is_cpu() else (False, "CPU only")

        @classmethod
        def can_implement(cls, config: Any) -> tuple[bool, str | None]:
            gs = config.weight_quant_key.scale.group_shape
            if gs.row <= 0 or gs.col <= 0:
                return False, "block quantization only"
            return True, None

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            return None

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                          bias: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
            p = self._get_layer_params(layer)
            scale = p.weight_scale_inv if p.weight_scale_inv is not None else p.weight_scale
            gs = self.weight_group_shape
            w = _dequant(p.weight, scale, (gs.row, gs.col)).to(x.dtype)
            return torch.nn.functional.linear(x, w, bias)

        def apply_block_scaled_mm(self, A: Any, B: Any, As: Any, Bs: Any) -> torch.Tensor:
            raise NotImplementedError

    kernels = linear_kernels._POSSIBLE_FP8_BLOCK_KERNELS[PlatformEnum.CPU]
    if ReferenceCPUFp8BlockKernel.__name__ not in [k.__name__ for k in kernels]:
        kernels.append(ReferenceCPUFp8BlockKernel)

    class ReferenceFp8MoEMethod(UnquantizedFusedMoEMethod):
        """FP8 block-quantized experts, dequantized at load into vLLM's unquantized CPU experts."""

        def __init__(self, quant_config: Any, layer: Any) -> None:
            super().__init__(layer.moe_config)
            self.block = tuple(quant_config.weight_block_size)

        def create_weights(self, layer: Any, num_experts: int, hidden_size: int,
                           intermediate_size_per_partition: int, params_dtype: torch.dtype,
                           **extra: Any) -> None:
            super().create_weights(layer, num_experts, hidden_size,
                                   intermediate_size_per_partition, torch.float8_e4m3fn, **extra)
            bn, bk = self.block
            w13_rows = layer.w13_weight.shape[1]
            for name, rows, cols in [("w13_weight_scale_inv", w13_rows, hidden_size),
                                     ("w2_weight_scale_inv", hidden_size,
                                      intermediate_size_per_partition)]:
                s = torch.nn.Parameter(
                    torch.ones(num_experts, -(-rows // bn), -(-cols // bk), dtype=torch.float32),
                    requires_grad=False)
                layer.register_parameter(name, s)
                set_weight_attrs(s, extra)
                set_weight_attrs(s, {"quant_method": FusedMoeWeightScaleSupported.BLOCK.value})

        def process_weights_after_loading(self, layer: Any) -> None:
            for w, s in [("w13_weight", "w13_weight_scale_inv"), ("w2_weight", "w2_weight_scale_inv")]:
                weight = getattr(layer, w)
                if weight.dtype == torch.float8_e4m3fn:
                    deq = _dequant(weight.data, getattr(layer, s).data, self.block)
                    replace_parameter(layer, w, deq.to(torch.bfloat16))
            super().process_weights_after_loading(layer)

    original = fp8_mod.Fp8Config.get_quant_method
    if getattr(original, "_aoe_reference", False):
        return

    def get_quant_method(self: Any, layer: torch.nn.Module, prefix: str) -> Any:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

        method = None
        if isinstance(layer, RoutedExperts) and self.weight_block_size is not None:
            method = ReferenceFp8MoEMethod(self, layer)
        return method if method is not None else original(self, layer, prefix)

    get_quant_method._aoe_reference = True  # type: ignore[attr-defined]
    fp8_mod.Fp8Config.get_quant_method = get_quant_method


_install()


class Fp8ReferenceSwapExtension(SwapExtension):
    """aoe_vllm.SwapExtension, with the reference FP8 paths installed in the worker."""
