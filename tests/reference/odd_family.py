"""Writes two tiny models with odd layouts for tests: a BF16 weight with an F32 `_scale_inv`
companion, an FP8 weight without block scales in m1 whose m2 copy has them, and a scale of a
scale (a tensor outside every unit).  Usage: odd_family.py DIR SEED  (writes DIR/m1, DIR/m2)."""
import sys, os, json, numpy as np, ml_dtypes
from safetensors.numpy import save_file
rng = np.random.default_rng(int(sys.argv[2]))
def fp8(shape): return rng.normal(0, 30, shape).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
def model(d, with_v_scale, noise):
    os.makedirs(d, exist_ok=True)
    t = {
        "a.weight": (rng.normal(0, 1, (4, 130)) * noise).astype(ml_dtypes.bfloat16),
        "a.weight_scale_inv": rng.uniform(0.5, 2, (1, 2)).astype(np.float32),
        "v.weight": fp8((130, 7)),
        "w.weight": fp8((131, 129)),
        "w.weight_scale_inv": rng.uniform(0.001, 0.01, (2, 2)).astype(np.float32),
        "w.weight_scale_inv_scale_inv": rng.uniform(0, 1, (3,)).astype(np.float32),
    }
    if with_v_scale:
        t["v.weight_scale_inv"] = rng.uniform(0.001, 0.01, (2, 1)).astype(np.float32)
    save_file(t, os.path.join(d, "model.safetensors"))
    json.dump({"model_type": "toy"}, open(os.path.join(d, "config.json"), "w"))
model(sys.argv[1] + "/m1", False, 1.0)
model(sys.argv[1] + "/m2", True, 2.0)
