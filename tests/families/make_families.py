#!/usr/bin/env python3
"""Writes tiny sibling checkpoints of real MoE model families for aoe's family tests.

Usage: make_families.py OUT [--family NAME]... [--list]

For each family: a tiny config, a seeded random-init "ancestor" (transformers, torch), and two
siblings derived from it by independent seeded perturbations of every floating tensor: OUT/NAME/base
and OUT/NAME/parent, each saved with save_pretrained (BF16) and a small max_shard_size, so they are
real sharded checkpoints (>= 2 shards + model.safetensors.index.json).  gpt-oss-mxfp4 is built
from gpt-oss's two BF16 siblings by quantizing the routed-expert weights with the reference
encoder (tests/reference/aoe_ref.py) into the Hub's layout (X_blocks U8 [E, rows, cols/32, 16],
X_scales U8 [E, rows, cols/32], with rows the output dim) and the Hub's quantization_config.

It prints, and writes to OUT/NAME/names.json, every tensor name pattern (digits -> N) with its
group under the reference's group table, count, dtypes and shapes.
Needs torch + transformers (the vLLM venv) and numpy, ml_dtypes, safetensors.
"""

import argparse
import json
import os
import re
import shutil
import sys

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import aoe_ref  # noqa: E402  (group table and MXFP4 encoder)

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False)

FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=32)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                       num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0],
                       qkv_bias=True)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                       decoder_sparse_step=1, mlp_only_layers=[0], head_dim=32)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=32,
                     sliding_window=16, layer_types=["sliding_attention", "full_attention"])),
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                         num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                         q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                         v_head_dim=16)),
    "glm4-moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                      num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                      use_qk_norm=True, attention_bias=True, head_dim=32)),
}
MXFP4 = "gpt-oss-mxfp4"
ALL = list(FAMILIES) + [MXFP4]

# The Hub's openai/gpt-oss-* quantization_config
HUB_MXFP4_QCONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                               "model.embed_tokens", "lm_head"],
    "quant_method": "mxfp4",
}


def pattern(name):
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "N", name)


def make_model(fam, seed):
    cfg_name, cls_name, extra = FAMILIES[fam]
    cfg = getattr(transformers, cfg_name)(**COMMON, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg)
    return model


def perturb(model, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(model.state_dict().items()):
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * scale)


def total_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def write_family(fam, out, fam_index):
    d = os.path.join(out, fam)
    shutil.rmtree(d, ignore_errors=True)
    ancestor_seed = 1000 + 17 * fam_index
    for role, pseed in (("base", 1), ("parent", 2)):
        m = make_model(fam, ancestor_seed)  # the same ancestor for both siblings
        m = m.to(torch.bfloat16)
        # as in the Hub's DeepSeek-V3 / Kimi-K2 / GLM-4.5: the router's score bias stays F32
        for mod in m.modules():
            b = getattr(mod, "e_score_correction_bias", None)
            if isinstance(b, torch.Tensor):
                mod.e_score_correction_bias = b.to(torch.float32)
        perturb(m, ancestor_seed * 10 + pseed)
        shard = max(total_bytes(m) // 3, 16 * 1024)
        m.save_pretrained(os.path.join(d, role), max_shard_size=shard)
    return d


def write_mxfp4(out):
    """gpt-oss-mxfp4/{base,parent} from gpt-oss/{base,parent}: experts' weights -> MXFP4."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    import ml_dtypes

    src_fam = os.path.join(out, "gpt-oss")
    d = os.path.join(out, MXFP4)
    shutil.rmtree(d, ignore_errors=True)
    # parent-bf16: the parent with its experts as plain BF16 of the blocks' value shape (the
    # Hub's [E, out, in] order), for "a BF16 parent mixed with an MXFP4 base".
    for role, src_role in (("base", "base"), ("parent", "parent"), ("parent-bf16", "parent")):
        src, dst = os.path.join(src_fam, src_role), os.path.join(d, role)
        os.makedirs(dst)
        with open(os.path.join(src, "model.safetensors.index.json")) as f:
            index = json.load(f)
        wm = {}
        for shard in sorted(set(index["weight_map"].values())):
            tensors = {}
            with safe_open(os.path.join(src, shard), framework="pt") as f:
                meta = f.metadata()
                for n in f.keys():
                    t = f.get_tensor(n)
                    if re.search(r"\.mlp\.experts\.(gate_up_proj|down_proj)$", n):
                        # transformers keeps [E, in, out]; the Hub stores [E, out, in/32, 16]
                        x = t.to(torch.float32).transpose(1, 2).contiguous().numpy()
                        if role == "parent-bf16":
                            tensors[n] = x.astype(ml_dtypes.bfloat16)
                            continue
                        blocks, scales = aoe_ref.mxfp4_encode(x)
                        tensors[n + "_blocks"] = blocks
                        tensors[n + "_scales"] = scales
                    elif t.dtype == torch.bfloat16:
                        tensors[n] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                    else:
                        tensors[n] = t.numpy()
            save_file(tensors, os.path.join(dst, shard), metadata=meta)
            for n in tensors:
                wm[n] = shard
        size = sum(os.path.getsize(os.path.join(dst, s)) for s in set(wm.values()))
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": size}, "weight_map": dict(sorted(wm.items()))}, f, indent=2)
        for fn in os.listdir(src):
            if fn.endswith(".json") and fn not in ("model.safetensors.index.json", "config.json"):
                shutil.copyfile(os.path.join(src, fn), os.path.join(dst, fn))
        with open(os.path.join(src, "config.json")) as f:
            cfg = json.load(f)
        cfg["quantization_config"] = HUB_MXFP4_QCONFIG
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    return d


def names_summary(d):
    ck = aoe_ref.Checkpoint(os.path.join(d, "base"))
    rows = {}
    for n in sorted(ck.tensors):
        p = pattern(n)
        # companions follow their weight
        w = n
        if n.endswith("_scales") and ck.has(n[: -len("_scales")] + "_blocks"):
            w = n[: -len("_scales")] + "_blocks"
        elif n.endswith("_scale_inv") and ck.has(n[: -len("_scale_inv")]):
            w = n[: -len("_scale_inv")]
        r = rows.setdefault(p, {"pattern": p, "group": aoe_ref.group_of(w), "count": 0,
                                "dtypes": set(), "shapes": set()})
        r["count"] += 1
        r["dtypes"].add(ck.dtype(n))
        r["shapes"].add(str(list(ck.shape(n))))
    out = []
    for r in rows.values():
        r["dtypes"] = sorted(r["dtypes"])
        r["shapes"] = sorted(r["shapes"])
        out.append(r)
    return {"shards": sorted(ck.shards), "tensors": len(ck.tensors), "patterns": out}


def load_check(path):
    """-> (missing, unexpected, mismatched) keys of from_pretrained on CPU, or None when the
    checkpoint is MXFP4 and accelerate (which transformers' MXFP4 path needs) is missing."""
    with open(os.path.join(path, "config.json")) as f:
        quant = json.load(f).get("quantization_config", {}).get("quant_method")
    if quant == "mxfp4":
        try:
            import accelerate  # noqa: F401
        except ImportError:
            return None
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    if quant == "mxfp4":
        check_mxfp4_dequant(path, model)
    return info.get("missing_keys", []), info.get("unexpected_keys", []), info.get("mismatched_keys", [])


def check_mxfp4_dequant(path, model):
    """transformers dequantizes MXFP4 on CPU: its values must be the reference decoder's."""
    ck = aoe_ref.Checkpoint(path)
    sd = model.state_dict()
    for n in sorted(ck.tensors):
        if not n.endswith("_blocks"):
            continue
        x = n[: -len("_blocks")]
        ref = aoe_ref.mxfp4_decode(ck.array(n), ck.array(x + "_scales"))  # [E, out, in]
        got = sd[x].to(torch.float32).transpose(1, 2).numpy()
        if not np.array_equal(ref, got):
            raise SystemExit(f"{path}: {x}: transformers' dequantized values differ from the reference decoder")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--family", action="append", choices=ALL)
    ap.add_argument("--no-load-check", action="store_true")
    a = ap.parse_args()
    fams = a.family or ALL
    if MXFP4 in fams and "gpt-oss" not in fams and not os.path.isdir(os.path.join(a.out, "gpt-oss", "base")):
        fams = ["gpt-oss"] + fams
    os.makedirs(a.out, exist_ok=True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for fam in fams:
        d = write_mxfp4(a.out) if fam == MXFP4 else write_family(fam, a.out, ALL.index(fam))
        s = names_summary(d)
        with open(os.path.join(d, "names.json"), "w") as f:
            json.dump(s, f, indent=1)
        print(f"== {fam}: {s['tensors']} tensors in {len(s['shards'])} shards")
        for r in s["patterns"]:
            print(f"  {r['group']:<15} {r['count']:>3}  {r['pattern']}  {'/'.join(r['dtypes'])} {r['shapes'][0]}")
        if not a.no_load_check:
            for role in ("base", "parent"):
                res = load_check(os.path.join(d, role))
                if res is None:
                    print(f"  load {role}: skipped (MXFP4 needs accelerate, not installed)")
                    continue
                miss, unexp, mism = res
                print(f"  load {role}: missing {len(miss)} unexpected {len(unexp)} mismatched {len(mism)}"
                      + (f" {miss[:3]} {unexp[:3]} {mism[:3]}" if miss or unexp or mism else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
