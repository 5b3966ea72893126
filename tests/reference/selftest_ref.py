#!/usr/bin/env python3
"""Self-test of aoe_ref.py on tiny hand-made checkpoints (run: python selftest_ref.py).

Expected values are computed here by hand / with independent formulations, not by calling
aoe_ref's internals.
"""

import hashlib
import json
import math
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
      "BOOL": np.bool_, "U8": np.uint8}


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

    mxfp4_checks(tmp, rng)
    group_checks()

    print(f"OK: {CHECKS} checks passed ({tmp})")


# ---------------------------------------------------------------------------------------------
# MXFP4.  Expected values are written out by hand; the scalar codec below is a second,
# per-element formulation (Python floats and struct, no lookup tables shared with aoe_ref).


def f32_bits(v):
    return struct.unpack("<I", struct.pack("<f", v))[0]


def bits_f32(b):
    return struct.unpack("<f", struct.pack("<I", b))[0]


def scalar_e2m1(c):
    mag = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)[c & 7]
    return -mag if c & 8 else mag


def scalar_decode(blocks, scales):
    """blocks: bytes of 16 per block, scales: list of ints -> list of f32 bit patterns."""
    out = []
    for g, s in enumerate(scales):
        for j in range(32):
            byte = blocks[g * 16 + j // 2]
            c = (byte >> 4) if j % 2 else (byte & 15)
            if s == 255:
                out.append(0x7FC00000)
                continue
            v = scalar_e2m1(c) * 2.0 ** (s - 127)  # exact in double; then rounded once to f32
            out.append(f32_bits(np.float32(v)))
    return out


def scalar_encode_block(xs):
    """32 f32 values (Python floats holding f32 values) -> (16 bytes, scale byte)."""
    if any(x != x for x in xs) or max(abs(x) for x in xs) == float("inf"):
        return bytes(16), 255
    amax = max(abs(x) for x in xs)
    if amax == 0:
        e = -127
    else:
        m, ex = math.frexp(amax)  # amax = m * 2^ex, 0.5 <= m < 1 -> floor(log2) = ex - 1
        e = max(ex - 1 - 2, -127)
    codes = []
    for x in xs:
        q = abs(x) / 2.0 ** e  # exact (power of two); f32 division only differs below 0.25
        # nearest grid value, ties to the even code
        grid = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
        best = 0
        for k in range(8):
            d, db = abs(q - grid[k]), abs(q - grid[best])
            if d < db or (d == db and k % 2 == 0):
                best = k
        if q > 6:
            best = 7
        neg = math.copysign(1.0, x) < 0
        codes.append((8 if neg else 0) | best)
    return bytes(codes[2 * i] | (codes[2 * i + 1] << 4) for i in range(16)), e + 127


def mxfp4_checks(tmp, rng):
    sys.path.insert(0, HERE)
    import aoe_ref as R

    def dec(blk16, s):
        b = np.frombuffer(bytes(blk16), np.uint8).reshape(1, 16)
        return R.mxfp4_decode(b, np.array([s], np.uint8)).view(np.uint32).tolist()

    def enc(vals):
        x = np.zeros(32, np.float32)
        x[: len(vals)] = np.array(vals, np.float32)
        b, s = R.mxfp4_encode(x)
        return bytes(b.reshape(-1)), int(s.reshape(-1)[0])

    # ---- decode: nibble order, E2M1 table, E8M0 scale -----------------------------------------
    blk = [0x21, 0x8F, 0x73, 0x54, 0x06] + [0] * 11
    v = dec(blk, 127)  # scale 1
    want = [0.5, 1.0, -6.0, -0.0, 1.5, 6.0, 2.0, 3.0, 4.0, 0.0]
    check(v[:10] == [f32_bits(w) for w in want], f"decode nibbles {[bits_f32(x) for x in v[:10]]}")
    check(v[3] == 0x80000000, "code 8 is -0.0")
    v = dec(blk, 128)  # scale 2
    check([bits_f32(x) for x in v[:3]] == [1.0, 2.0, -12.0], "scale 2")
    v = dec(blk, 0)  # scale 2^-127 (subnormal): 0.5 * 2^-127 = 2^-128 = bits 0x00200000
    check(v[0] == 0x00200000 and v[1] == 0x00400000, f"subnormal scale {[hex(x) for x in v[:3]]}")
    check(v[2] == 0x81400000, f"-6 * 2^-127 = -1.5 * 2^-125 {hex(v[2])}")
    v = dec([0x37] + [0] * 15, 254)  # 6 * 2^127 overflows; 1.5 * 2^127 does not
    check(v[0] == 0x7F800000, f"6 * 2^127 = +inf {hex(v[0])}")
    check(v[1] == f32_bits(1.5 * 2.0 ** 127) == 0x7F400000, "1.5 * 2^127")
    v = dec([0xF8] + [0x11] * 15, 255)
    check(v == [0x7FC00000] * 32, "scale 255: every value +qNaN 0x7fc00000")
    v = dec(list(range(0, 256, 17)), 127)  # byte k*17 = codes (k, k): 0,0,0.5,0.5,...
    check([bits_f32(x) for x in v[::2]] == [scalar_e2m1(k) for k in range(16)], "all 16 codes")
    # multi-dim layout: [E, R, G, 16] -> [E, R, G*32]
    b = rng.integers(0, 256, (2, 3, 2, 16), dtype=np.uint8)
    s = rng.integers(100, 150, (2, 3, 2), dtype=np.uint8)
    d = R.mxfp4_decode(b, s)
    check(d.shape == (2, 3, 64), f"decoded shape {d.shape}")
    check(d.view(np.uint32).reshape(-1).tolist() == scalar_decode(b.tobytes(), s.reshape(-1).tolist()),
          "decode = scalar decode, row-major blocks")

    # ---- encode: every tie, saturation, signs ---------------------------------------------------
    # amax 6 -> floor(log2 6) = 2 -> e = 0 -> scale byte 127, q = x
    b, s = enc([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.0, 0.0, 0.26, 5.01, 0.7,
                2.6, -3.5, 4.5, 1.5, -6.0, 0.5])
    check(s == 127, f"amax 6 scale {s}")
    codes = [b[i // 2] >> 4 if i % 2 else b[i // 2] & 15 for i in range(32)]
    check(codes[:20] == [7, 0, 2, 2, 4, 4, 6, 6, 8, 8, 0, 1, 7, 1, 5, 14, 6, 3, 15, 1],
          f"ties / signs {codes[:20]}")
    check(codes[20:] == [0] * 12, "zeros")
    check(b[0] == 0x07 and b[1] == 0x22, f"packing: even j low nibble {b[:2].hex()}")
    # saturation: amax 7.9 -> e = 0, 7.9 -> 6 (code 7); -7 -> code 15
    b, s = enc([7.9, -7.0, 5.5])
    check(s == 127 and b[0] == 0xF7 and b[1] == 0x07, f"saturation {s} {b[:2].hex()}")
    # amax 1 -> e = -2 -> byte 125; q = 4x: 1 -> 4 (6), 0.125 -> 0.5 (1), 0.0625 -> 0.25 tie (0)
    b, s = enc([1.0, 0.125, 0.0625, -0.1875])  # -0.1875 -> q -0.75 tie -> 1 (code 2|8)
    check(s == 125 and b[0] == 0x16 and b[1] == 0xA0, f"amax 1 {s} {b[:2].hex()}")
    # amax just below 4: floor(log2) = 1 exactly from the bits (a float log2 says 2) -> byte 126
    below4 = float(np.nextafter(np.float32(4.0), np.float32(0)))
    b, s = enc([below4, 1.0])
    check(s == 126 and b[0] == 0x47, f"amax nextbelow(4) {s} {b[:1].hex()}")
    # amax 0: scale byte 0, codes by the element rule (-0.0 -> 8)
    b, s = enc([0.0, -0.0, 0.0, -0.0])
    check(s == 0 and b[0] == 0x80 and b[1] == 0x80 and b[2:] == bytes(14), f"amax 0 {s} {b.hex()}")
    # NaN anywhere / +-inf anywhere -> scale 255, all codes 0
    for bad in ([1.0, float("nan")], [float("inf"), 1.0], [2.0, -float("inf")], [float("nan")] * 32):
        b, s = enc(bad)
        check(s == 255 and b == bytes(16), f"NaN/inf block {bad[:2]}: {s} {b.hex()}")
    # subnormal amax 2^-127 (bits 0x00400000): e = -129 clamped to -127 -> byte 0, q = x * 2^127
    sub = [bits_f32(0x00400000), bits_f32(0x00200000), bits_f32(0x00300000), -bits_f32(0x00600000),
           bits_f32(1)]
    b, s = enc(sub)  # q: 1 (2), 0.5 (1), 0.75 tie -> 1 (2), -1.5 (8|3), 2^-22 -> 0
    check(s == 0 and b[0] == 0x12 and b[1] == 0xB2 and b[2] == 0x00, f"subnormal amax {s} {b[:3].hex()}")
    # normal amax 2^-126: e = -128 clamped to -127 -> q = 2 (code 4), not 4 (code 6)
    b, s = enc([2.0 ** -126, -(2.0 ** -127)])
    check(s == 0 and b[0] == 0xA4, f"clamp e >= -127 {s} {b[:1].hex()}")
    # amax 2^-125: e = -127 exactly (no clamp) -> q = 4 -> code 6
    b, s = enc([2.0 ** -125])
    check(s == 0 and b[0] == 0x06, f"amax 2^-125 {s} {b[:1].hex()}")
    # huge amax 1.5 * 2^127 -> e = 125 -> byte 252, q = 6 -> code 7
    b, s = enc([1.5 * 2.0 ** 127, 2.0 ** 125])
    check(s == 252 and b[0] == 0x27, f"huge amax {s} {b[:1].hex()}")

    # ---- encode = scalar encode on random data (incl. varied magnitudes, zeros, -0) -------------
    x = (rng.normal(0, 1, (6, 8, 32)) * np.exp2(rng.integers(-20, 20, (6, 8, 1)))).astype(np.float32)
    x[0, 0] = 0.0
    x[0, 1] = -0.0
    x[1, 1, 3] = np.nan
    x[2, 2, 7] = np.inf
    b, s = R.mxfp4_encode(x.reshape(6, 256))
    check(b.shape == (6, 8, 16) and s.shape == (6, 8) and b.dtype == np.uint8, f"enc shapes {b.shape}")
    ok = True
    for i in range(6):
        for g in range(8):
            bb, ss = scalar_encode_block([float(v) for v in x[i, g]])
            ok = ok and bytes(b[i, g]) == bb and int(s[i, g]) == ss
    check(ok, "encode = scalar encode")

    # ---- round trip: blocks whose max magnitude index is 6 or 7 re-encode to themselves ---------
    codes = rng.integers(0, 16, (4, 5, 32), dtype=np.uint8)
    codes[..., 0] = (codes[..., 0] & 8) | rng.integers(6, 8, (4, 5), dtype=np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = rng.integers(1, 252, (4, 5), dtype=np.uint8)
    scales[0, 0] = 0  # subnormal scale: its values are subnormal or 2^-126.. and still exact
    b2, s2 = R.mxfp4_encode(R.mxfp4_decode(blocks, scales))
    check(np.array_equal(b2, blocks) and np.array_equal(s2, scales), "decode -> encode round trip")

    # ---- a checkpoint: Chimera copy, lambda mix, BF16 parent, unpaired U8 ------------------------
    X1, X2, X3 = (os.path.join(tmp, m) for m in ("X1", "X2", "X3"))
    GU = "model.layers.0.mlp.experts.gate_up_proj"
    RW = "model.layers.0.mlp.router.weight"
    SK = "model.layers.0.self_attn.sinks"
    UB = "model.layers.0.odd_blocks"  # U8 without _scales: not a unit, never interpolated
    mx = {}
    for m in ("X1", "X2"):
        c = rng.integers(0, 256, (2, 4, 2, 16), dtype=np.uint8)
        sc = rng.integers(120, 130, (2, 4, 2), dtype=np.uint8)
        mx[m] = (c, sc)
        write_ckpt(os.path.join(tmp, m), {
            "model-00001-of-00002.safetensors": [(GU + "_blocks", "U8", c), (RW, "BF16", rng.normal(0, 1, (2, 8)))],
            "model-00002-of-00002.safetensors": [(SK, "BF16", rng.normal(0, 1, (4,))),
                                                 (GU + "_scales", "U8", sc),
                                                 (UB, "U8", rng.integers(0, 256, (3,), dtype=np.uint8))],
        }, extra_files={"config.json": "{}\n"})
    bfv = rng.normal(0, 3, (2, 4, 64)).astype(np.float32)
    write_ckpt(X3, {"model.safetensors": [(GU, "BF16", bfv), (RW, "BF16", rng.normal(0, 1, (2, 8))),
                                          (SK, "BF16", rng.normal(0, 1, (4,))),
                                          (UB, "U8", rng.integers(0, 256, (3,), dtype=np.uint8))]})
    t1, t2, t3 = read_tensors(X1), read_tensors(X2), read_tensors(X3)

    def dec_np(m):
        c, sc = mx[m]
        return np.array(scalar_decode(c.tobytes(), sc.reshape(-1).tolist()), np.uint32).view(np.float32)

    def enc_np(acc):
        acc = acc.reshape(-1, 32)
        bs, ss = b"", []
        for row in acc:
            bb, s_ = scalar_encode_block([float(v) for v in row])
            bs += bb
            ss.append(s_)
        return bs, bytes(ss)

    c, _, _ = synth(tmp, "mx_chimera", recipe(X1, [X2], [0.0, 1.0], subset=["experts"]))
    same_bytes(c[GU + "_blocks"], t2[GU + "_blocks"], "MXFP4 chimera: donor blocks")
    same_bytes(c[GU + "_scales"], t2[GU + "_scales"], "MXFP4 chimera: donor scales")
    for n in (RW, SK, UB):
        same_bytes(c[n], t1[n], f"MXFP4 chimera: {n} base")
    c, _, _ = synth(tmp, "mx_full_onehot", recipe(X1, [X2], [0.0, 1.0]))
    same_bytes(c[UB], t1[UB], "unpaired U8 stays the base's bytes")
    same_bytes(c[RW], t2[RW], "router selected by full")
    lam = [np.float32(0.7), np.float32(0.3)]
    c, _, _ = synth(tmp, "mx_mix", recipe(X1, [X2], [0.7, 0.3], subset=["experts"]))
    acc = lam[0] * dec_np("X1")
    acc = acc + lam[1] * dec_np("X2")
    wb, wsc = enc_np(acc)
    check(c[GU + "_blocks"][2] == wb and c[GU + "_scales"][2] == wsc, "MXFP4 lambda mix")
    check(c[GU + "_blocks"][1] == (2, 4, 2, 16), "blocks shape kept")
    # three parents, the third stores the unit as BF16 [2, 4, 64]
    w3 = [np.float32(v) for v in (0.2, 0.3, 0.5)]
    c, _, _ = synth(tmp, "mx_three", recipe(X1, [X2, X3], [0.2, 0.3, 0.5], subset=["experts"]))
    acc = w3[0] * dec_np("X1")
    acc = acc + w3[1] * dec_np("X2")
    acc = acc + w3[2] * bfv.astype(BF16).astype(np.float32).reshape(-1)
    wb, wsc = enc_np(acc)
    check(c[GU + "_blocks"][2] == wb and c[GU + "_scales"][2] == wsc, "MXFP4 base, BF16 parent")
    # one-hot on a parent with another form -> computed (encode of its BF16 values)
    c, _, _ = synth(tmp, "mx_onehot_bf16", recipe(X1, [X3], [0.0, 1.0], subset=["experts"]))
    acc = np.float32(0) * dec_np("X1")
    acc = acc + np.float32(1) * bfv.astype(BF16).astype(np.float32).reshape(-1)
    wb, wsc = enc_np(acc)
    check(c[GU + "_blocks"][2] == wb and c[GU + "_scales"][2] == wsc, "one-hot BF16 donor re-encoded")
    # BF16 base, MXFP4 parent -> BF16
    c, _, _ = synth(tmp, "bf16_from_mx", recipe(X3, [X1], [0.5, 0.5], subset=["experts"]))
    acc = np.float32(0.5) * bfv.astype(BF16).astype(np.float32).reshape(-1)
    acc = acc + np.float32(0.5) * dec_np("X1")
    check(c[GU][2] == acc.astype(BF16).tobytes(), "BF16 base from MXFP4 parent")
    # stats: stored = E2M1 values without scales; dequantized = decoded values
    st = json.loads(run("stats", os.path.join(tmp, "mx_mix.json")))
    e1 = np.array([scalar_e2m1(int(k)) for k in np.stack([mx["X1"][0] & 15, mx["X1"][0] >> 4], -1).reshape(-1)])
    e2 = np.array([scalar_e2m1(int(k)) for k in np.stack([mx["X2"][0] & 15, mx["X2"][0] >> 4], -1).reshape(-1)])
    want = math.sqrt(float(np.sum((e1 - e2) ** 2))) / math.sqrt(e1.size)
    check(abs(st[GU + "_blocks"]["stored"] - want) <= 1e-12 * want, "MXFP4 stored stat")
    d1, d2 = dec_np("X1").astype(np.float64), dec_np("X2").astype(np.float64)
    want = math.sqrt(float(np.sum((d1 - d2) ** 2))) / math.sqrt(d1.size)
    check(abs(st[GU + "_blocks"]["dequantized"] - want) <= 1e-12 * want, "MXFP4 dequantized stat")
    check(GU + "_scales" not in st and st[UB]["stored"] is None, "scales follow; U8 has no stat")


def group_checks():
    sys.path.insert(0, HERE)
    import aoe_ref as R
    table = {
        "model.layers.1.block_sparse_moe.experts.7.w1.weight": "experts",
        "model.layers.0.mlp.experts.gate_up_proj": "experts",
        "model.layers.0.mlp.experts.gate_up_proj_bias": "experts",
        "model.layers.0.mlp.experts.down_proj_blocks": "experts",
        "model.layers.3.mlp.experts.12.down_proj.weight": "experts",
        "model.layers.3.mlp.shared_experts.up_proj.weight": "shared-experts",
        "model.layers.0.mlp.shared_expert.gate_proj.weight": "shared-experts",
        "model.layers.0.mlp.shared_expert_gate.weight": "shared-experts",
        "model.layers.0.mlp.gate.weight": "router",
        "model.layers.0.block_sparse_moe.gate.weight": "router",
        "model.layers.0.mlp.router.weight": "router",
        "model.layers.0.mlp.router.bias": "router",
        "model.layers.3.mlp.gate.e_score_correction_bias": "router",
        "model.layers.0.self_attn.q_norm.weight": "norms",
        "model.layers.0.self_attn.q_a_layernorm.weight": "norms",
        "model.layers.0.input_layernorm.weight": "norms",
        "model.norm.bias": "norms",
        "model.layers.0.self_attn.sinks": "attention",
        "model.layers.0.self_attn.q_proj.bias": "attention",
        "model.layers.0.mlp.gate_proj.weight": "dense-mlp",
        "model.layers.0.mlp.gate_up_proj.weight": "dense-mlp",
        "model.embed_tokens.weight": "embeddings",
        "lm_head.weight": "embeddings",
        "model.layers.61.shared_head.head.weight": "embeddings",
        "model.layers.61.eh_proj.weight": "other",
        "model.layers.0.mlp.gate.bias_extra": "other",
    }
    for n, g in table.items():
        check(R.group_of(n) == g, f"group_of({n}) = {R.group_of(n)}, want {g}")


if __name__ == "__main__":
    main()
