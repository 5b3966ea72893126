"""Writes a tiny DeepSeek-V3 family that vLLM's CPU build serves: two siblings of one ancestor.

Usage: make_family.py OUT --dtype bf16|fp8 [--seed N]

Writes OUT/base and OUT/parent, each a real checkpoint: config.json, two safetensors shards and
model.safetensors.index.json (a few MB).  Architecture (`DeepseekV3ForCausalLM`, random init by
transformers under `torch.manual_seed(seed)`, initializer_range 0.1 so the layers matter):

- hidden 256, 3 layers: layer 0 dense MLP (intermediate 256), layers 1-2 MoE with 4 routed
  experts (top 2, moe_intermediate 128) + 1 shared expert, router `gate.weight` +
  `gate.e_score_correction_bias`; MLA dims q_lora 128, kv_lora 128, rope 128, nope 128, v 128,
  2 heads; vocab 512.  With these dims every FP8 linear has in and out dims that are multiples of
  128, which the CPU FP8 block GEMM requires (DESIGN §7).
- config.json carries `topk_method: noaux_tc` and `scoring_func: sigmoid`, so vLLM needs no
  hf_overrides.

Siblings: base = ancestor + N1, parent = ancestor + N2, with N1, N2 independent Gaussian noise
(numpy, seeds derived from --seed) whose standard deviation per tensor is
`rel × std(ancestor tensor)` (norms, whose ancestor is all ones: `rel × 0.1`; router bias:
`rel × 0.01`), with rel by group and layer:

    experts 0.6 · (layer), shared-experts 0.3, attention 0.15 · (1 + layer), dense-mlp 0.2,
    router 0.3, embeddings 0.05, norms 0.2

so the normalized Frobenius difference ‖base − parent‖/√numel ≈ √2 · rel · std differs across
tensors by more than 10×.  Measured with `aoe diff` (seed 0): BF16 from ~0.004 (router bias)
and ~0.007 (embeddings) over ~0.02-0.06 (norms, attention, dense MLP, shared experts) to ~0.085
(layer-1 experts) and ~0.17 (layer-2 experts), so `--delta 0.05` mixes 29 of 67 tensors; FP8
on the default "stored" metric (codes without scales): BF16 tensors as above, FP8 linears
~20-125 code units, so `--delta 60` mixes 58 of 115.

dtype bf16: every floating tensor BF16 except the router bias (F32).
dtype fp8: every linear weight (attention, dense MLP, experts, shared experts) F8_E4M3 with a
`<name>_scale_inv` F32 of shape [ceil(rows/128), ceil(cols/128)] (dequantized = code × scale of
its 128×128 block; scale = amax/448, 1 for an all-zero block), and `quantization_config
{quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128], activation_scheme: dynamic}`;
norms, embeddings, lm_head and router weight BF16, router bias F32.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

BLOCK = 128
FP8_MAX = 448.0

CONFIG = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=2,
    n_shared_experts=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_rope_head_dim=128,
    qk_nope_head_dim=128,
    v_head_dim=128,
    max_position_embeddings=1024,
    initializer_range=0.1,
    tie_word_embeddings=False,
)

# Linear weights that are FP8 in an FP8 checkpoint (the router gate and lm_head are not).
FP8_LINEAR = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up|down)_proj)\.weight$"
)


def layer_of(name: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def relative_scale(name: str) -> float:
    """The noise level of a tensor, relative to its ancestor's standard deviation."""
    layer = layer_of(name)
    if re.search(r"\.mlp\.experts\.\d+\.", name):
        return 0.6 * layer
    if ".mlp.shared_experts." in name:
        return 0.3
    if re.search(r"\.mlp\.gate\.(weight|e_score_correction_bias)$", name):
        return 0.3
    if name.endswith("norm.weight"):
        return 0.2
    if ".self_attn." in name:
        return 0.15 * (1 + layer)
    if re.search(r"\.mlp\.(gate|up|down)_proj\.", name):
        return 0.2
    return 0.05  # embeddings, lm_head


def ancestor(seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """The ancestor's tensors (f32) from transformers' random init, and its config as a dict."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(**CONFIG)
    model = DeepseekV3ForCausalLM(config)
    tensors = {}
    for name, t in model.state_dict().items():
        if "rotary_emb" in name:
            continue
        a = t.detach().to(torch.float32).numpy().copy()
        # transformers 5 fuses the routed experts ([E, 2I, H] gate+up, [E, H, I] down); the
        # checkpoint format (and vLLM's loader) has one tensor per expert and projection.
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], a.shape[1] // 2
            for j in range(a.shape[0]):
                tensors[f"{prefix}{j}.gate_proj.weight"] = a[j, :inter].copy()
                tensors[f"{prefix}{j}.up_proj.weight"] = a[j, inter:].copy()
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for j in range(a.shape[0]):
                tensors[f"{prefix}{j}.down_proj.weight"] = a[j].copy()
        else:
            tensors[name] = a
    # The router bias starts at zero in transformers; give it values so it is a real tensor.
    rng = np.random.default_rng(seed)
    for name in tensors:
        if name.endswith("e_score_correction_bias"):
            tensors[name] = rng.normal(0, 0.01, tensors[name].shape).astype(np.float32)
    return tensors, config.to_dict()


def perturb(tensors: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(tensors):
        a = tensors[name]
        if name.endswith("norm.weight"):
            std = 0.1
        elif name.endswith("e_score_correction_bias"):
            std = 0.01
        else:
            std = float(a.std())
        noise = rng.normal(0, relative_scale(name) * std, a.shape).astype(np.float32)
        out[name] = (a + noise).astype(np.float32)
    return out


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per 128×128 block: scale = amax / 448 (1 where amax = 0), code = e4m3fn(w / scale)."""
    rows, cols = w.shape
    br, bc = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    scale = np.ones((br, bc), dtype=np.float32)
    codes = np.empty((rows, cols), dtype=ml_dtypes.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            amax = np.float32(np.abs(blk).max())
            s = np.float32(amax / np.float32(FP8_MAX)) if amax > 0 else np.float32(1.0)
            scale[i, j] = s
            codes[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (
                (blk / s).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
            )
    return codes, scale


def stored(tensors: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The checkpoint's tensors in their stored dtypes."""
    out = {}
    for name, a in tensors.items():
        if name.endswith("e_score_correction_bias"):
            out[name] = a.astype(np.float32)
        elif dtype == "fp8" and FP8_LINEAR.search(name):
            codes, scale = quantize_fp8(a)
            out[name] = codes
            out[name + "_scale_inv"] = scale
        else:
            out[name] = a.astype(ml_dtypes.bfloat16)
    return out


def write_checkpoint(d: str, tensors: dict[str, np.ndarray], config: dict) -> None:
    os.makedirs(d, exist_ok=True)
    # Two shards: embeddings and the first two layers, then the rest.
    shards: dict[str, dict[str, np.ndarray]] = {}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name in sorted(tensors):
        first = name.startswith("model.embed_tokens.") or layer_of(name) < 2 and ".layers." in name
        shards.setdefault(names[0] if first else names[1], {})[name] = tensors[name]
    weight_map = {}
    total = 0
    for fname, ts in shards.items():
        save_file(ts, os.path.join(d, fname), metadata={"format": "pt"})
        for n, t in ts.items():
            weight_map[n] = fname
            total += t.nbytes
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def checkpoint_config(config: dict, dtype: str) -> dict:
    c = {k: v for k, v in config.items() if not k.startswith("_")}
    c["architectures"] = ["DeepseekV3ForCausalLM"]
    c["model_type"] = "deepseek_v3"
    c["topk_method"] = "noaux_tc"
    c["scoring_func"] = "sigmoid"
    c["num_nextn_predict_layers"] = 0
    c["torch_dtype"] = "bfloat16"
    c["dtype"] = "bfloat16"
    c["bos_token_id"] = 0
    c["eos_token_id"] = 1
    if dtype == "fp8":
        c["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": [BLOCK, BLOCK],
            "activation_scheme": "dynamic",
        }
    else:
        c.pop("quantization_config", None)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["bf16", "fp8"], required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    anc, config = ancestor(args.seed)
    config = checkpoint_config(config, args.dtype)
    for i, sibling in enumerate(["base", "parent"]):
        t = perturb(anc, 1000 * args.seed + 1 + i)
        write_checkpoint(os.path.join(args.out, sibling), stored(t, args.dtype), config)


if __name__ == "__main__":
    main()
