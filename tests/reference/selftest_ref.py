#!/usr/bin/env python3
"""Self-test of aoe_ref.py on tiny hand-made checkpoints (run: python selftest_ref.py).

Expected values are computed here by hand / with independent formulations, not by calling
aoe_ref's internals.
"""

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import ml_dtypes

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, "aoe_ref.py")
PY = sys.executable

BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn
DT = {"BF16": BF16, "F8_E4M3": E4M3, "F32": np.float32, "F16": np.float16, "I64": np.int64,
      "BOOL": np.bool_}


def write_st(path, tensors, metadata=None):
    """tensors: list of (name, dtype_str, np.ndarray) in file order."""
    hdr = {}
    if metadata:
        hdr["__metadata__"] = metadata
    off = 0
    blobs = []
    for name, dt, arr in tensors:
        b = np.ascontiguousarray(arr.astype(DT[dt])).tobytes()
        hdr[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(hdr).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_ckpt(d, shards, extra_files=None):
    """shards: {file: [(name, dtype, arr)]}; one file named model.safetensors -> no index."""
    os.makedirs(d, exist_ok=True)
    wm = {}
    for fn, ts in shards.items():
        write_st(os.path.join(d, fn), ts, metadata={"format": "pt"})
        for n, _, _ in ts:
            wm[n] = fn
    if list(shards) != ["model.safetensors"]:
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
    for fn, txt in (extra_files or {}).items():
        with open(os.path.join(d, fn), "w") as f:
            f.write(txt)


def read_tensors(d):
    """-> {name: (dtype, shape, raw bytes)} by our own parsing (all *.safetensors in d)."""
    out = {}
    for fn in sorted(os.listdir(d)):
        if not fn.endswith(".safetensors"):
            continue
        data = open(os.path.join(d, fn), "rb").read()
        (n,) = struct.unpack("<Q", data[:8])
        hdr = json.loads(data[8:8 + n])
        for name, info in hdr.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            out[name] = (info["dtype"], tuple(info["shape"]), data[8 + n + a:8 + n + b])
    return out


def arr(t):
    dt, shape, raw = t
    return np.frombuffer(raw, dtype=DT[dt]).reshape(shape)


def run(*args):
    r = subprocess.run([PY, REF, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"aoe_ref {args} failed: {r.stderr}")
    return r.stdout


def synth(tmp, name, recipe):
    rp = os.path.join(tmp, name + ".json")
    with open(rp, "w") as f:
        json.dump(recipe, f)
    out = os.path.join(tmp, name)
    run("write", rp, out)
    return read_tensors(out), out, rp


def recipe(base, parents, weights, **kw):
    r = {"aoe_version": "0.1.0", "base": base, "parents": parents, "weights": weights,
         "delta": 0.0, "subset": ["full"], "rules": [], "metric": "stored",
         "allow_extrapolation": False, "lambda": 0.5}
    r.update(kw)
    return r


CHECKS = 0


def check(cond, msg):
    global CHECKS
    CHECKS += 1
    if not cond:
        raise AssertionError(msg)


def same_bytes(a, b, msg):
    check(a[2] == b[2], msg)


def main():
    rng = np.random.default_rng(1234)
    tmp = tempfile.mkdtemp(prefix="aoe_ref_test_")
    M1, M2, M3 = (os.path.join(tmp, m) for m in ("M1", "M2", "M3"))

    E = "model.layers.3.mlp.experts.0.down_proj.weight"      # FP8 expert, 2 blocks x 2 blocks
    E1 = "model.layers.3.mlp.experts.1.up_proj.weight"       # FP8 expert, identical in all models
    Q = "model.layers.0.self_attn.q_a_proj.weight"           # FP8 attention
    N = "model.layers.0.input_layernorm.weight"              # BF16 norm
    G = "model.layers.3.mlp.gate.weight"                     # BF16 router
    B = "model.layers.3.mlp.gate.e_score_correction_bias"    # F32 router bias
    H = "model.layers.0.mlp.down_proj.weight"                # F16 dense mlp (not DeepSeek, test only)
    I = "model.layers.0.some_int_buffer"                     # I64
    EMB = "model.embed_tokens.weight"                        # BF16 embeddings

    def fp8(shape, scale_range=(1e-3, 1e-2)):
        codes = rng.normal(0, 100, size=shape).clip(-448, 448).astype(np.float32).astype(E4M3)
        sc = rng.uniform(*scale_range, size=(-(-shape[0] // 128), -(-shape[1] // 128))).astype(np.float32)
        return codes, sc

    models = {}
    for m in ("M1", "M2", "M3"):
        e, es = fp8((130, 200))
        q, qs = fp8((256, 64))
        models[m] = {
            E: e, E + "_scale_inv": es, Q: q, Q + "_scale_inv": qs,
            N: rng.normal(1, 0.1, size=(64,)).astype(np.float32),
            G: rng.normal(0, 0.02, size=(8, 64)).astype(np.float32),
            B: rng.normal(0, 1, size=(8,)).astype(np.float32),
            H: rng.normal(0, 1, size=(16, 64)).astype(np.float32),
            I: np.arange(5, dtype=np.int64) + (0 if m == "M1" else 7),
            EMB: rng.normal(0, 1, size=(32, 64)).astype(np.float32),
        }
    e1, e1s = fp8((128, 128))
    for m in models.values():
        m[E1], m[E1 + "_scale_inv"] = e1, e1s
    dts = {E: "F8_E4M3", E1: "F8_E4M3", Q: "F8_E4M3", N: "BF16", G: "BF16", B: "F32", H: "F16",
           I: "I64", EMB: "BF16"}
    for k in list(dts):
        if dts[k] == "F8_E4M3":
            dts[k + "_scale_inv"] = "F32"

    def t(m, n):
        return (n, dts[n], models[m][n])

    # base: 2 shards, E's companion in a different shard than E
    write_ckpt(M1, {
        "model-00001-of-00002.safetensors": [t("M1", n) for n in (EMB, N, E, Q, Q + "_scale_inv", I)],
        "model-00002-of-00002.safetensors": [t("M1", n) for n in (E + "_scale_inv", E1, E1 + "_scale_inv", G, B, H)],
    }, extra_files={"config.json": '{"model_type": "deepseek_v3"}\n', "tokenizer.json": "{}\n"})
    # M2: 3 shards, different split and order
    names = sorted(dts)
    write_ckpt(M2, {
        "a.safetensors": [t("M2", n) for n in names[:3]],
        "b.safetensors": [t("M2", n) for n in names[3:7]],
        "c.safetensors": [t("M2", n) for n in names[7:]],
    }, extra_files={"config.json": '{"other": 1}\n'})
    # M3: single file
    write_ckpt(M3, {"model.safetensors": [t("M3", n) for n in reversed(names)]})

    base = read_tensors(M1)
    p2 = read_tensors(M2)
    p3 = read_tensors(M3)

    def deq(ts, n):
        a = arr(ts[n]).astype(np.float32)
        if n + "_scale_inv" in ts:
            s = arr(ts[n + "_scale_inv"])
            r, c = a.shape
            full = np.kron(s, np.ones((128, 128), np.float32)).astype(np.float32)[:r, :c]
            a = a * full
        return a

    def requant_loop(acc):
        """per-block loop formulation, for comparison with aoe_ref's vectorized one."""
        r, c = acc.shape
        R, C = -(-r // 128), -(-c // 128)
        codes = np.zeros_like(acc)
        scales = np.zeros((R, C), np.float32)
        for i in range(R):
            for j in range(C):
                blk = acc[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                amax = np.max(np.abs(blk))
                s = np.float32(1) if amax == 0 else np.float32(np.float32(amax) / np.float32(448))
                scales[i, j] = s
                codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = blk / s
        return codes.astype(E4M3).tobytes(), scales.tobytes()

    # ---- 1. Chimera: experts, lambda (0, 1): experts are M2's bytes, the rest is M1's -------
    ch, out, _ = synth(tmp, "chimera", recipe(M1, [M2], [0.0, 1.0], subset=["experts"]))
    for n in base:
        if n in (E, E + "_scale_inv"):
            same_bytes(ch[n], p2[n], f"chimera {n} should be M2's bytes")
            check(ch[n][2] != base[n][2], f"chimera {n} should differ from base")
        else:  # E1 identical everywhere -> base (delta 0, stat 0), others not selected
            same_bytes(ch[n], base[n], f"chimera {n} should be base bytes")
    for fn in os.listdir(M1):
        if fn.endswith(".safetensors"):
            a = open(os.path.join(M1, fn), "rb").read()
            b = open(os.path.join(out, fn), "rb").read()
            n = struct.unpack("<Q", a[:8])[0]
            check(a[:8 + n] == b[:8 + n] and len(a) == len(b), f"{fn}: header/size differ")
    check(sorted(os.listdir(out)) == sorted(os.listdir(M1)), f"file set {os.listdir(out)}")
    for fn in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        check(open(os.path.join(out, fn), "rb").read() == open(os.path.join(M1, fn), "rb").read(), fn)

    # ---- 2. delta exclusion ------------------------------------------------------------------
    st = json.loads(run("stats", os.path.join(tmp, "chimera.json")))
    check(st[E1]["stored"] == 0.0 and st[E1]["dequantized"] == 0.0, "identical tensor stat 0")
    a = arr(base[E]).astype(np.float64)
    b = arr(p2[E]).astype(np.float64)
    want = np.sqrt(np.sum((a - b) ** 2)) / np.sqrt(a.size)
    check(abs(st[E]["stored"] - want) <= 1e-12 * want, f"stored stat {st[E]['stored']} vs {want}")
    a = deq(base, E).astype(np.float64)
    b = deq(p2, E).astype(np.float64)
    want = np.sqrt(np.sum((a - b) ** 2)) / np.sqrt(a.size)
    check(abs(st[E]["dequantized"] - want) <= 1e-12 * want, "dequantized stat")
    check(st[I]["stored"] is None, "int tensor has no stat")
    # delta just above E's stat -> E excluded; delta just below -> included
    dE = st[E]["stored"]
    dx, _, _ = synth(tmp, "delta_hi", recipe(M1, [M2], [0.0, 1.0], subset=["experts"], delta=dE))
    same_bytes(dx[E], base[E], "stat == delta -> base")
    same_bytes(dx[E + "_scale_inv"], base[E + "_scale_inv"], "stat == delta -> base scales")
    dx, _, _ = synth(tmp, "delta_lo", recipe(M1, [M2], [0.0, 1.0], subset=["experts"],
                                             delta=float(np.nextafter(dE, 0))))
    same_bytes(dx[E], p2[E], "stat > delta -> donor")
    # full subset with a large delta -> everything is base
    dx, out_big, _ = synth(tmp, "delta_big", recipe(M1, [M2], [0.5, 0.5], delta=1e9))
    for n in base:
        same_bytes(dx[n], base[n], f"delta 1e9 {n}")

    # ---- 3. three models, global weights + a rule, every dtype -------------------------------
    w = [np.float32(x) for x in (0.2, 0.3, 0.5)]
    rw = [np.float32(x) for x in (0.7, 0.2, 0.1)]
    r3 = recipe(M1, [M2, M3], [0.2, 0.3, 0.5],
                rules=[{"pattern": r"layernorm", "weights": [0.7, 0.2, 0.1]}])
    c3, _, _ = synth(tmp, "three", r3)
    for n in (E, Q, N, G, B, H, EMB):
        ws = rw if n == N else w
        acc = ws[0] * deq(base, n)
        acc = acc + ws[1] * deq(p2, n)
        acc = acc + ws[2] * deq(p3, n)
        check(acc.dtype == np.float32, "f32 acc")
        if dts[n] == "F8_E4M3":
            codes, scales = requant_loop(acc)
            check(c3[n][2] == codes, f"3-model {n} codes")
            check(c3[n + "_scale_inv"][2] == scales, f"3-model {n} scales")
        else:
            check(c3[n][2] == acc.astype(DT[dts[n]]).tobytes(), f"3-model {n}")
    same_bytes(c3[I], base[I], "int passthrough")
    same_bytes(c3[E1], base[E1], "identical -> base")

    # ---- 4. FP8 requantization of a block with known values ----------------------------------
    K1 = os.path.join(tmp, "K1")
    K2 = os.path.join(tmp, "K2")
    KW = "model.layers.5.mlp.experts.3.gate_proj.weight"
    # (130, 140): blocks (0,0) 128x128, (0,1) 128x12, (1,0) 2x128, (1,1) 2x12
    x1 = np.zeros((130, 140), np.float32)
    x2 = np.zeros((130, 140), np.float32)
    # block (0,0): average = 224 * [0..]; max |avg| = 448*... choose values so results are exact
    x1[0, 0], x2[0, 0] = 448.0, 448.0   # avg 448*s1 with s1=2 -> 896
    x1[1, 1], x2[1, 1] = -224.0, -224.0  # avg -448 -> code -224 after scale 2
    x1[2, 2], x2[2, 2] = 1.0, 3.0        # avg 2*2=4 -> code 2
    # block (0,1) left all zero in both -> scale 1, codes 0
    # block (1,0): differing values -> amax = 3, scale = 3/448
    x1[129, 5], x2[129, 5] = 2.0, 4.0    # avg 3 (scale 1 both) -> code 448
    x1[128, 7], x2[128, 7] = 1.0, 0.0    # avg 0.5 -> 0.5 / (3/448) = 74.666 -> RNE e4m3 72 or 80
    # block (1,1): base scale inf -> dequantized 0*inf = NaN -> amax NaN -> scale NaN, codes NaN
    # (stored metric: the codes are finite, so the stat is finite and the unit is computed)
    x1[129, 139] = 1.0
    s1 = np.array([[2.0, 1.0], [1.0, np.inf]], np.float32)
    s2 = np.array([[2.0, 1.0], [1.0, 1.0]], np.float32)
    write_ckpt(K1, {"model.safetensors": [(KW, "F8_E4M3", x1), (KW + "_scale_inv", "F32", s1)]})
    write_ckpt(K2, {"model.safetensors": [(KW + "_scale_inv", "F32", s2), (KW, "F8_E4M3", x2)]})
    kk, _, _ = synth(tmp, "known", recipe(K1, [K2], [0.5, 0.5]))
    sc = arr(kk[KW + "_scale_inv"])
    codes = arr(kk[KW]).astype(np.float32)
    check(sc[0, 0] == 2.0, f"scale00 {sc[0, 0]}")   # amax 896 / 448
    check(sc[0, 1] == 1.0, f"zero block scale {sc[0, 1]}")
    check(sc[1, 0] == np.float32(np.float32(3.0) / np.float32(448.0)), f"scale10 {sc[1, 0]}")
    check(np.isnan(sc[1, 1]), "NaN block scale")
    check(codes[0, 0] == 448 and codes[1, 1] == -224 and codes[2, 2] == 2, "block00 codes")
    check(np.all(codes[:128, 128:] == 0), "zero block codes")
    check(codes[129, 5] == 448, f"block10 max code {codes[129, 5]}")
    q = np.float32(0.5) / np.float32(np.float32(3.0) / np.float32(448.0))
    check(codes[128, 7] == np.float32(q).astype(E4M3).astype(np.float32), "block10 rounding")
    check(codes[128, 7] == 72.0, f"74.67 -> 72 in e4m3 (step 8), got {codes[128, 7]}")
    check(np.all(np.isnan(codes[128:, 128:])), "NaN block codes")

    # ---- 5. metric: same codes, different scales ---------------------------------------------
    S1 = os.path.join(tmp, "S1")
    S2 = os.path.join(tmp, "S2")
    c, s = fp8((128, 256))
    write_ckpt(S1, {"model.safetensors": [(KW, "F8_E4M3", c.astype(np.float32)), (KW + "_scale_inv", "F32", s)]})
    write_ckpt(S2, {"model.safetensors": [(KW, "F8_E4M3", c.astype(np.float32)), (KW + "_scale_inv", "F32", s * 2)]})
    b1 = read_tensors(S1)
    m1, _, _ = synth(tmp, "met_stored", recipe(S1, [S2], [0.0, 1.0], metric="stored"))
    same_bytes(m1[KW], b1[KW], "stored metric: identical codes -> base")
    same_bytes(m1[KW + "_scale_inv"], b1[KW + "_scale_inv"], "stored metric: base scales")
    m2, _, _ = synth(tmp, "met_deq", recipe(S1, [S2], [0.0, 1.0], metric="dequantized"))
    check(arr(m2[KW + "_scale_inv"]).tobytes() == (s * 2).astype(np.float32).tobytes(),
          "dequantized metric: donor scales copied")

    # ---- 6. one-hot donor with another dtype -> computed; one-hot on the base -> base ----------
    D1 = os.path.join(tmp, "D1")
    D2 = os.path.join(tmp, "D2")
    c, s = fp8((128, 128))
    vals = rng.normal(0, 0.01, size=(128, 128)).astype(np.float32)
    write_ckpt(D1, {"model.safetensors": [(KW, "F8_E4M3", c.astype(np.float32)), (KW + "_scale_inv", "F32", s)]})
    write_ckpt(D2, {"model.safetensors": [(KW, "BF16", vals)]})
    d, _, _ = synth(tmp, "dtype_donor", recipe(D1, [D2], [0.0, 1.0]))
    dv = vals.astype(BF16).astype(np.float32)
    acc = np.float32(0) * deq(read_tensors(D1), KW)
    acc = acc + np.float32(1) * dv
    codes, scales = requant_loop(acc)
    check(d[KW][2] == codes and d[KW + "_scale_inv"][2] == scales, "BF16 donor into FP8 base")
    d, _, _ = synth(tmp, "onehot_base", recipe(D1, [D2], [1.0, 0.0]))
    same_bytes(d[KW], read_tensors(D1)[KW], "weights (1,0) -> base bytes")

    # ---- 7. 0 * inf = NaN takes part ---------------------------------------------------------
    F1 = os.path.join(tmp, "F1")
    F2 = os.path.join(tmp, "F2")
    NW = "model.norm.weight"
    write_ckpt(F1, {"model.safetensors": [(NW, "BF16", np.array([1.0, np.inf, 2.0], np.float32))]})
    write_ckpt(F2, {"model.safetensors": [(NW, "BF16", np.array([3.0, 1.0, 2.0], np.float32))]})
    # stat: inf - 1 = inf -> inf > 0 -> interpolate; (0.25, 0.75) not one-hot
    f, _, _ = synth(tmp, "inf", recipe(F1, [F2], [0.25, 0.75], subset=["norms"]))
    fv = arr(f[NW]).astype(np.float32)
    check(fv[0] == 2.5 and np.isinf(fv[1]) and fv[2] == 2.0, f"inf case {fv}")
    f, _, _ = synth(tmp, "inf0", recipe(F1, [F2], [0.0, 0.5], subset=["norms"]))
    fv = arr(f[NW]).astype(np.float32)
    check(fv[0] == 1.5 and np.isnan(fv[1]) and fv[2] == 1.0, f"0*inf case {fv}")

    # ---- 8. subsets: groups, regex, union -----------------------------------------------------
    g, _, _ = synth(tmp, "groups", recipe(M1, [M2], [0.0, 1.0], subset=["router", "re:embed"]))
    for n in base:
        want = p2 if n in (G, B, EMB) else base
        same_bytes(g[n], want[n], f"subset router+re:embed {n}")

    # ---- 9. dump via safe_open == dump via own header parsing --------------------------------
    for dname, dd in (("chimera", os.path.join(tmp, "chimera")), ("three", os.path.join(tmp, "three")),
                      ("known", os.path.join(tmp, "known"))):
        o1 = os.path.join(tmp, dname + "_dump.json")
        o2 = os.path.join(tmp, dname + "_dump_raw.json")
        run("dump", dd, o1)
        run("dump", dd, o2, "--raw")
        j1, j2 = json.load(open(o1)), json.load(open(o2))
        check(j1 == j2, f"dump {dname}: safe_open and raw differ")
        ts = read_tensors(dd)
        check(set(j1) == set(ts), "dump names")
        for n, (dt, shape, raw) in ts.items():
            check(j1[n] == {"dtype": dt, "shape": list(shape), "sha256": hashlib.sha256(raw).hexdigest()},
                  f"dump {n}")

    print(f"OK: {CHECKS} checks passed ({tmp})")


if __name__ == "__main__":
    main()
