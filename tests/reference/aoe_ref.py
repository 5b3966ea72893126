#!/usr/bin/env python3
"""Independent reference implementation of the Assembly-of-Experts child synthesis.

Written from the design text now in docs/semantics.md only (not from the Rust sources), so that
the Rust tool can be checked byte for byte against it.  numpy + ml_dtypes + safetensors.

CLI
    aoe_ref.py write RECIPE.json OUT_DIR   write the child checkpoint directory (no aoe_recipe.json)
    aoe_ref.py stats RECIPE.json           print {weight: {"stored": x, "dequantized": y}} as JSON
    aoe_ref.py dump DIR OUT.json [--raw]   {name: {dtype, shape, sha256}} of every tensor of DIR,
                                           read with safetensors.safe_open(framework="np")
                                           (--raw: parse the headers ourselves instead)

Semantics (docs/semantics.md, with the family rules: the group table below and MXFP4):
  unit = base weight W + its companion W_scale_inv when the base has one, or X_blocks + X_scales
  (MXFP4, weight name X_blocks); group, subset, delta and rules are decided on the weight's name.
  A parent may store an MXFP4 unit of the base as X (BF16/F16/F32, FP8 + X_scale_inv) of the
  decoded shape [..., G*32], and a plain unit X of the base as X_blocks + X_scales.  The "stored"
  delta metric of MXFP4 is its E2M1 values without the block scales (as FP8 codes without theirs).  Not selected / non-float base dtype / not (stat > delta)
  -> base bytes.  One weight exactly 1.0 and the others 0.0 and that model stores the unit in
  the base's dtypes -> that model's bytes.  Otherwise f32: dequantize, acc = w1*D1; acc = acc +
  w2*D2; ..., then back to the base dtype (FP8: per-128x128-block requantization; MXFP4: new
  blocks + E8M0 scales per 32 values).
"""

import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys

import numpy as np
import ml_dtypes

if sys.byteorder != "little":  # raw bytes below are produced with native-order tobytes()
    raise SystemExit("aoe_ref.py assumes a little-endian host")

# ---------------------------------------------------------------------------------------------
# dtypes

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E5M2 = np.dtype(ml_dtypes.float8_e5m2)

NP_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": BF16,
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": E4M3,
    "F8_E5M2": E5M2,
}
# base dtypes that are ever interpolated
INTERP_DTYPES = ("BF16", "F16", "F32", "F8_E4M3")
# dtypes whose values can be read as floats (for the delta statistic / stats command)
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2")

SCALE_SUFFIX = "_scale_inv"
BLOCK = 128
FP8_MAX = np.float32(448.0)

# The group table (docs/semantics.md, "Groups"), in order; first match wins
# (re.search on the weight's name; a companion follows its weight).
GROUPS = [
    ("experts", r"\.(mlp|block_sparse_moe)\.experts\."),
    ("shared-experts", r"\.mlp\.shared_experts?\.|\.mlp\.shared_expert_gate\."),
    ("router", r"\.(mlp|block_sparse_moe)\.(gate|router)\.(weight|bias|e_score_correction_bias)$"),
    ("norms", r"norm\.(weight|bias)$"),
    ("attention", r"\.self_attn\."),
    ("dense-mlp", r"\.mlp\.(gate|up|down|gate_up)_proj\."),
    ("embeddings", r"(embed_tokens|lm_head|shared_head\.head)\.weight$"),
]
GROUP_NAMES = [g for g, _ in GROUPS] + ["other"]


def group_of(name):
    for g, pat in GROUPS:
        if re.search(pat, name):
            return g
    return "other"


class RefError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# safetensors parsing (our own)


def parse_header(path):
    """-> (header_bytes incl. the 8-byte length, {name: (dtype, shape, abs_start, abs_end)})."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise RefError(f"{path}: file shorter than 8 bytes")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if 8 + n > size:
            raise RefError(f"{path}: header length {n} beyond file size {size}")
        hjson = f.read(n)
    try:
        hdr = json.loads(hjson.decode("utf-8"))
    except Exception as e:  # noqa: BLE001
        raise RefError(f"{path}: bad header JSON: {e}")
    if not isinstance(hdr, dict):
        raise RefError(f"{path}: header is not an object")
    tensors = {}
    for name, info in hdr.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        shape = tuple(int(x) for x in info["shape"])
        s, e = (int(x) for x in info["data_offsets"])
        if not (0 <= s <= e) or 8 + n + e > size:
            raise RefError(f"{path}: {name}: bad data_offsets {s},{e}")
        if dtype in NP_DTYPES:
            want = math.prod(shape) * NP_DTYPES[dtype].itemsize
            if e - s != want:
                raise RefError(f"{path}: {name}: {e - s} bytes for {dtype}{list(shape)}")
        tensors[name] = (dtype, shape, 8 + n + s, 8 + n + e)
    return head + hjson, tensors


class Checkpoint:
    """A checkpoint directory: model.safetensors.index.json (weight_map) or model.safetensors."""

    def __init__(self, d):
        self.dir = os.path.abspath(d)
        idx = os.path.join(self.dir, "model.safetensors.index.json")
        if os.path.isfile(idx):
            with open(idx) as f:
                wm = json.load(f)["weight_map"]
            self.index_file = "model.safetensors.index.json"
        elif os.path.isfile(os.path.join(self.dir, "model.safetensors")):
            wm = None
            self.index_file = None
        else:
            raise RefError(f"{d}: neither model.safetensors.index.json nor model.safetensors")
        shard_names = sorted(set(wm.values())) if wm is not None else ["model.safetensors"]
        self.shards = {}  # shard file name -> (header bytes, tensors)
        for s in shard_names:
            self.shards[s] = parse_header(os.path.join(self.dir, s))
        # name -> (shard, dtype, shape, start, end)
        self.tensors = {}
        if wm is not None:
            for name, s in wm.items():
                t = self.shards[s][1].get(name)
                if t is None:
                    raise RefError(f"{d}: index maps {name} to {s}, which does not hold it")
                self.tensors[name] = (s,) + t
        # tensors present in a shard header but absent from the index: still reachable by name
        seen = {}
        for s, (_, ts) in self.shards.items():
            for name, t in ts.items():
                if name in self.tensors:
                    continue
                if name in seen:
                    raise RefError(f"{d}: {name} in two shards and not in the index")
                seen[name] = (s,) + t
        self.tensors.update(seen)
        self._maps = {}

    def has(self, name):
        return name in self.tensors

    def dtype(self, name):
        return self.tensors[name][1]

    def shape(self, name):
        return self.tensors[name][2]

    def raw(self, name):
        s, _, _, a, b = self.tensors[name]
        if a == b:
            return b""
        m = self._maps.get(s)
        if m is None:
            m = np.memmap(os.path.join(self.dir, s), dtype=np.uint8, mode="r")
            self._maps[s] = m
        return m[a:b].tobytes()

    def array(self, name):
        dt = self.dtype(name)
        if dt not in NP_DTYPES:
            raise RefError(f"{self.dir}: {name}: unsupported dtype {dt}")
        return np.frombuffer(self.raw(name), dtype=NP_DTYPES[dt]).reshape(self.shape(name))


# ---------------------------------------------------------------------------------------------
# recipe


class Recipe:
    def __init__(self, path):
        with open(path) as f:
            r = json.load(f)
        self.base = r["base"]
        self.parents = list(r.get("parents", []))
        self.n = 1 + len(self.parents)
        self.weights = self._weights(r["weights"], "weights")
        self.delta = float(r.get("delta", 0.0))
        subset = r.get("subset", ["full"])
        if isinstance(subset, str):
            subset = [subset]
        self.full = False
        self.groups = set()
        self.regexes = []
        for s in subset:
            if s == "full":
                self.full = True
            elif s.startswith("re:"):
                self.regexes.append(re.compile(s[3:]))
            elif s in GROUP_NAMES:
                self.groups.add(s)
            else:
                raise RefError(f"unknown subset element {s!r}")
        self.rules = []
        for rule in r.get("rules", []) or []:
            self.rules.append((re.compile(rule["pattern"]), self._weights(rule["weights"], "rule")))
        self.metric = r.get("metric", "stored")
        if self.metric not in ("stored", "dequantized"):
            raise RefError(f"unknown metric {self.metric!r}")

    def _weights(self, ws, what):
        if len(ws) != self.n:
            raise RefError(f"{what}: {len(ws)} weights for {self.n} models")
        return [np.float32(float(w)) for w in ws]  # converted to f32 once

    def selected(self, w):
        if self.full:
            return True
        if group_of(w) in self.groups:
            return True
        return any(rx.search(w) for rx in self.regexes)

    def weights_for(self, w):
        for rx, ws in self.rules:
            if rx.search(w):
                return ws
        return self.weights


# ---------------------------------------------------------------------------------------------
# codecs


def expand_scales(scale, r, c):
    return np.repeat(np.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[:r, :c]


def scale_shape(shape):
    r, c = shape
    return (-(-r // BLOCK), -(-c // BLOCK))


def stored_f64(m, w):
    """Stored values as f64: FP8 codes without scales, other floats as they are."""
    dt = m.dtype(w)
    if dt not in FLOAT_DTYPES:
        raise RefError(f"{m.dir}: {w}: dtype {dt} has no float value")
    return m.array(w).astype(np.float64)


def dequant_f32(m, w):
    """Dequantized values in f32: FP8 code x its block scale (one f32 multiply); else value."""
    dt = m.dtype(w)
    if dt not in FLOAT_DTYPES:
        raise RefError(f"{m.dir}: {w}: dtype {dt} cannot be dequantized")
    a = m.array(w).astype(np.float32)
    comp = w + SCALE_SUFFIX
    if dt == "F8_E4M3" and m.has(comp):
        if a.ndim != 2:
            raise RefError(f"{m.dir}: {w}: FP8 weight with scales must be 2-D, is {a.shape}")
        if m.shape(comp) != scale_shape(a.shape):
            raise RefError(f"{m.dir}: {comp}: shape {m.shape(comp)} for weight {a.shape}")
        s = m.array(comp).astype(np.float32)
        a = np.multiply(a, expand_scales(s, *a.shape), dtype=np.float32)
    return a


def requant_fp8(acc):
    """f32 2-D -> (e4m3fn codes bytes, f32 scales bytes), per 128x128 block."""
    r, c = acc.shape
    R, C = scale_shape(acc.shape)
    pad = np.zeros((R * BLOCK, C * BLOCK), dtype=np.float32)
    pad[:r, :c] = acc  # zero padding never raises a block's max |x|; NaN still propagates
    amax = np.max(np.abs(pad).reshape(R, BLOCK, C, BLOCK), axis=(1, 3))
    scale = np.divide(amax, FP8_MAX, dtype=np.float32)
    scale = np.where(amax == 0, np.float32(1.0), scale).astype(np.float32)
    q = np.divide(acc, expand_scales(scale, r, c), dtype=np.float32)
    codes = q.astype(E4M3)
    return codes.tobytes(), scale.astype("<f4").tobytes()


# ---------------------------------------------------------------------------------------------
# MXFP4 (OCP Microscaling, GPT-OSS layout): X_blocks U8 [..., G, 16] (32 E2M1 values per block,
# value j in byte j // 2, low nibble for even j), X_scales U8 [..., G] (E8M0, 2^(s - 127)).

BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
MX_BLOCK = 32
# E2M1 magnitudes by 3-bit index; code bit 3 is the sign
E2M1_MAG = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
E2M1_LUT = np.concatenate([E2M1_MAG, -E2M1_MAG]).astype(np.float32)  # code 8 -> -0.0
QNAN_BITS = np.uint32(0x7FC00000)


def e8m0_f32(s):
    """E8M0 bytes -> f32 2^(s-127) (s = 0 is the subnormal 2^-127, s = 255 NaN), from bits."""
    s = np.asarray(s, dtype=np.uint32)
    bits = np.where(s == 0, np.uint32(0x00400000), s << np.uint32(23))
    bits = np.where(s == 255, QNAN_BITS, bits).astype(np.uint32)
    return bits.view(np.float32)


def mxfp4_decode(blocks, scales):
    """U8 [..., G, 16] + U8 [..., G] -> f32 [..., G * 32]."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if blocks.ndim < 1 or blocks.shape[-1] != 16 or scales.shape != blocks.shape[:-1]:
        raise RefError(f"MXFP4: blocks {blocks.shape} and scales {scales.shape} do not pair")
    codes = np.empty(blocks.shape[:-1] + (MX_BLOCK,), dtype=np.uint8)
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    sc = e8m0_f32(scales)[..., None]
    with np.errstate(over="ignore"):  # 6 * 2^127 -> +inf, as f32 math does
        vals = np.multiply(E2M1_LUT[codes], sc, dtype=np.float32)  # one f32 multiply
    nanblk = np.broadcast_to((scales == 255)[..., None], vals.shape)
    vals = np.where(nanblk, QNAN_BITS.view(np.float32), vals).astype(np.float32)
    return vals.reshape(blocks.shape[:-2] + (blocks.shape[-2] * MX_BLOCK,))


def mxfp4_stored(blocks):
    """E2M1 values without their scales (the 'stored' metric), f32 [..., G * 32]."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    codes = np.empty(blocks.shape[:-1] + (MX_BLOCK,), dtype=np.uint8)
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    return E2M1_LUT[codes].reshape(blocks.shape[:-2] + (blocks.shape[-2] * MX_BLOCK,))


def floor_log2_f32(a):
    """floor(log2(a)) for finite positive f32 a, exactly from the bits (subnormals included)."""
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.int64)
    exp = (bits >> 23) & 0xFF
    man = bits & 0x7FFFFF
    # subnormal: value = man * 2^-149, floor(log2) = (index of man's leading set bit) - 149
    lead = np.zeros_like(man)
    m = man.copy()
    for _ in range(23):
        nz = m > 1
        lead = np.where(nz, lead + 1, lead)
        m = np.where(nz, m >> 1, m)
    return np.where(exp > 0, exp - 127, lead - 149)


def pow2_f32(e):
    """f32 2^e for integer e in [-127, 127] (2^-127 is subnormal), from bits."""
    e = np.asarray(e, dtype=np.int64)
    bits = np.where(e >= -126, (e + 127) << 23, np.int64(0x00400000)).astype(np.uint32)
    return bits.view(np.float32)


def e2m1_index(a):
    """|q| (f32, >= 0, not NaN) -> 3-bit magnitude index, nearest, ties to the even index."""
    a = np.asarray(a, dtype=np.float32)
    idx = np.zeros(a.shape, dtype=np.uint8)
    # (lower bound, inclusive?) of each index 1..7; ties go to the even index of the two
    for k, (lo, incl) in enumerate([(0.25, False), (0.75, True), (1.25, False), (1.75, True),
                                    (2.5, False), (3.5, True), (5.0, False)], start=1):
        hit = (a >= np.float32(lo)) if incl else (a > np.float32(lo))
        idx = np.where(hit, np.uint8(k), idx)
    return idx


def mxfp4_encode(x):
    """f32 [..., N] (N a multiple of 32) -> (blocks U8 [..., N/32, 16], scales U8 [..., N/32])."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] % MX_BLOCK:
        raise RefError(f"MXFP4: last dimension of {x.shape} is not a multiple of 32")
    xb = x.reshape(x.shape[:-1] + (x.shape[-1] // MX_BLOCK, MX_BLOCK))
    with np.errstate(all="ignore"):
        ax = np.abs(xb)
        bad = np.any(np.isnan(xb), axis=-1)
        amax = np.max(np.where(np.isnan(ax), np.float32(0), ax), axis=-1).astype(np.float32)
        bad = bad | np.isinf(amax)
        zero = (amax == 0) & ~bad
        safe = np.where(bad | zero, np.float32(1), amax).astype(np.float32)
        e = np.maximum(floor_log2_f32(safe) - 2, -127)
        e = np.where(zero, -127, e)
        q = np.divide(xb, pow2_f32(e)[..., None], dtype=np.float32)  # one f32 division
        idx = e2m1_index(np.where(np.isnan(q), np.float32(0), np.abs(q)))
    codes = (np.signbit(xb).astype(np.uint8) << 3) | idx
    codes = np.where(bad[..., None], np.uint8(0), codes).astype(np.uint8)
    scales = np.where(bad, 255, e + 127).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, scales


# ---------------------------------------------------------------------------------------------
# synthesis


class Synth:
    def __init__(self, recipe):
        self.recipe = recipe
        self.models = [Checkpoint(recipe.base)] + [Checkpoint(p) for p in recipe.parents]
        self.base = self.models[0]
        names = set(self.base.tensors)
        # MXFP4 units: X_blocks + X_scales, the weight's name is X_blocks
        self.mx_units = {n for n in names if n.endswith(BLOCKS_SUFFIX)
                         and n[: -len(BLOCKS_SUFFIX)] + SCALES_SUFFIX in names}
        mx_comps = {n[: -len(BLOCKS_SUFFIX)] + SCALES_SUFFIX for n in self.mx_units}
        fp8_comps = {n for n in names if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in names}
        self.companions = (fp8_comps | mx_comps) - self.mx_units
        self.units = sorted(names - self.companions)

    def companion(self, w):
        if w in self.mx_units:
            return w[: -len(BLOCKS_SUFFIX)] + SCALES_SUFFIX
        c = w + SCALE_SUFFIX
        return c if c in self.companions else None

    # A unit's tensors in one model: ("mx", X_blocks, X_scales) or ("plain", X).  The logical
    # name X is the weight's name without _blocks for an MXFP4 unit of the base.
    def form(self, m, w):
        x = w[: -len(BLOCKS_SUFFIX)] if w in self.mx_units else w
        if m.has(x + BLOCKS_SUFFIX) and m.has(x + SCALES_SUFFIX):
            if w in self.mx_units or not m.has(x):
                return ("mx", x + BLOCKS_SUFFIX, x + SCALES_SUFFIX)
        if m.has(x):
            return ("plain", x)
        raise RefError(f"{m.dir}: missing tensor {w}")

    def logical_shape(self, m, f):
        if f[0] == "mx":
            shp = m.shape(f[1])
            if len(shp) < 2 or shp[-1] != 16:
                raise RefError(f"{m.dir}: {f[1]}: MXFP4 blocks must be [..., G, 16], are {list(shp)}")
            return shp[:-2] + (shp[-2] * MX_BLOCK,)
        return m.shape(f[1])

    def mx_arrays(self, m, f):
        for n in f[1:]:
            if m.dtype(n) != "U8":
                raise RefError(f"{m.dir}: {n}: MXFP4 tensors must be U8, is {m.dtype(n)}")
        return m.array(f[1]), m.array(f[2])

    def stored(self, m, w):
        f = self.form(m, w)
        if f[0] == "mx":
            return mxfp4_stored(self.mx_arrays(m, f)[0]).astype(np.float64)
        return stored_f64(m, f[1])

    def dequant(self, m, w):
        f = self.form(m, w)
        if f[0] == "mx":
            return mxfp4_decode(*self.mx_arrays(m, f))
        return dequant_f32(m, f[1])

    def check_shapes(self, w):
        shp = self.logical_shape(self.base, self.form(self.base, w))
        for m in self.models[1:]:
            s2 = self.logical_shape(m, self.form(m, w))
            if s2 != shp:
                raise RefError(f"{w}: shape {s2} in {m.dir}, {shp} in the base")

    def stat(self, w, metric):
        """max over donors of sqrt(sum (a-b)^2)/sqrt(numel), f64; NaN if there is no donor."""
        self.check_shapes(w)
        with np.errstate(all="ignore"):
            if metric == "stored":
                a = self.stored(self.base, w)
            else:
                a = self.dequant(self.base, w).astype(np.float64)
            numel = a.size
            vals = []
            for m in self.models[1:]:
                b = self.stored(m, w) if metric == "stored" else self.dequant(m, w).astype(np.float64)
                d = a - b
                s = float(np.sum(d * d, dtype=np.float64))
                vals.append(math.sqrt(s) / math.sqrt(numel) if numel else float("nan"))
        if not vals:
            return float("nan")
        # max with NaN propagation, like np.max: any NaN donor makes the unit "not above delta"
        return float("nan") if any(math.isnan(v) for v in vals) else max(vals)

    def unit(self, w):
        """-> {tensor name: bytes} for W and its companion (if the base has one)."""
        base = self.base
        comp = self.companion(w)
        mx = w in self.mx_units
        out = {w: base.raw(w)}
        if comp:
            out[comp] = base.raw(comp)
        dt = base.dtype(w)
        rc = self.recipe
        if not (mx or dt in INTERP_DTYPES) or not rc.selected(w):
            return out
        stat = self.stat(w, rc.metric)
        if not (stat > rc.delta):
            return out
        ws = rc.weights_for(w)
        ones = [i for i, x in enumerate(ws) if x == np.float32(1.0)]
        zeros = [i for i, x in enumerate(ws) if x == np.float32(0.0)]
        if len(ones) == 1 and len(zeros) == len(ws) - 1:
            m = self.models[ones[0]]
            same = m.has(w) and m.dtype(w) == dt and m.shape(w) == base.shape(w)
            if comp:
                same = same and m.has(comp) and m.dtype(comp) == base.dtype(comp) \
                    and m.shape(comp) == base.shape(comp)
            if same:
                out = {w: m.raw(w)}
                if comp:
                    out[comp] = m.raw(comp)
                return out
        with np.errstate(all="ignore"):
            acc = None
            for x, m in zip(ws, self.models):
                p = np.multiply(x, self.dequant(m, w), dtype=np.float32)
                acc = p if acc is None else np.add(acc, p, dtype=np.float32)
            if mx:
                self.mx_arrays(base, self.form(base, w))  # base dtypes checked
                out[w], out[comp] = (a.tobytes() for a in mxfp4_encode(acc))
            elif dt == "BF16":
                out[w] = acc.astype(BF16).tobytes()
            elif dt == "F16":
                out[w] = acc.astype(np.float16).tobytes()
            elif dt == "F32":
                out[w] = acc.astype("<f4").tobytes()
            elif dt == "F8_E4M3" and comp:
                if acc.ndim != 2:
                    raise RefError(f"{w}: FP8 weight with scales must be 2-D")
                if base.dtype(comp) != "F32" or base.shape(comp) != scale_shape(acc.shape):
                    raise RefError(f"{comp}: base scales must be F32 {scale_shape(acc.shape)}")
                out[w], out[comp] = requant_fp8(acc)
            elif dt == "F8_E4M3":
                out[w] = acc.astype(E4M3).tobytes()  # no companion: scale 1, plain RNE cast
            else:  # pragma: no cover
                raise AssertionError(dt)
        for n, b in out.items():
            t = base.tensors[n]
            assert len(b) == t[4] - t[3], (n, len(b), t)
        return out


def cmd_write(recipe_path, out_dir):
    rc = Recipe(recipe_path)
    sy = Synth(rc)
    base = sy.base
    os.makedirs(out_dir, exist_ok=True)
    # pass-through files: every regular top-level file of the base that is not a shard
    for f in sorted(os.listdir(base.dir)):
        p = os.path.join(base.dir, f)
        if f in base.shards or f == "aoe_recipe.json" or not os.path.isfile(p):
            continue
        shutil.copyfile(p, os.path.join(out_dir, f))
    # shards: the base file (same header bytes, same layout), then every tensor overwritten
    handles = {}
    for s in base.shards:
        dst = os.path.join(out_dir, s)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        shutil.copyfile(os.path.join(base.dir, s), dst)
        handles[s] = open(dst, "r+b")
    try:
        for w in sy.units:
            for n, b in sy.unit(w).items():
                s, _, _, a, e = base.tensors[n]
                fh = handles[s]
                fh.seek(a)
                fh.write(b)
    finally:
        for fh in handles.values():
            fh.close()
    for s, (hdr, _) in base.shards.items():  # sanity: headers untouched
        with open(os.path.join(out_dir, s), "rb") as f:
            assert f.read(len(hdr)) == hdr


def _jnum(v):
    if v is None:
        return None
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def cmd_stats(recipe_path):
    rc = Recipe(recipe_path)
    sy = Synth(rc)
    res = {}
    for w in sy.units:
        row = {}
        for metric in ("stored", "dequantized"):
            try:
                if sy.base.dtype(w) not in FLOAT_DTYPES and w not in sy.mx_units:
                    raise RefError("not a float tensor")
                row[metric] = _jnum(sy.stat(w, metric))
            except (RefError, KeyError):
                row[metric] = None
        res[w] = row
    json.dump(res, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


def _shard_files(d):
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.isfile(idx):
        with open(idx) as f:
            wanted = set(json.load(f)["weight_map"].values())
        files = [f for f in files if f in wanted]
    return files


def cmd_dump(d, out_path, raw=False):
    res = {}
    if raw:
        for fn in _shard_files(d):
            _, ts = parse_header(os.path.join(d, fn))
            with open(os.path.join(d, fn), "rb") as f:
                for name in sorted(ts):
                    dt, shape, a, b = ts[name]
                    f.seek(a)
                    data = f.read(b - a)
                    if name in res:
                        raise RefError(f"{name} in two files")
                    res[name] = {"dtype": dt, "shape": list(shape),
                                 "sha256": hashlib.sha256(data).hexdigest()}
    else:
        # safetensors' numpy path resolves dtypes by numpy attribute name
        np.float8_e4m3fn = ml_dtypes.float8_e4m3fn
        np.float8_e5m2 = ml_dtypes.float8_e5m2
        if not hasattr(np, "bfloat16"):
            np.bfloat16 = ml_dtypes.bfloat16
        from safetensors import safe_open

        for fn in _shard_files(d):
            with safe_open(os.path.join(d, fn), framework="np") as f:
                for name in sorted(f.keys()):
                    dt = f.get_slice(name).get_dtype()
                    t = f.get_tensor(name)
                    if t.dtype.byteorder == ">":
                        t = t.byteswap().view(t.dtype.newbyteorder("<"))
                    if name in res:
                        raise RefError(f"{name} in two files")
                    res[name] = {"dtype": dt, "shape": list(t.shape),
                                 "sha256": hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest()}
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
        f.write("\n")


def main(argv):
    usage = ("usage: aoe_ref.py write RECIPE.json OUT_DIR | stats RECIPE.json | "
             "dump DIR OUT.json [--raw]")
    if len(argv) < 2:
        print(usage, file=sys.stderr)
        return 2
    try:
        if argv[1] == "write" and len(argv) == 4:
            cmd_write(argv[2], argv[3])
        elif argv[1] == "stats" and len(argv) == 3:
            cmd_stats(argv[2])
        elif argv[1] == "dump" and len(argv) in (4, 5):
            raw = len(argv) == 5
            if raw and argv[4] != "--raw":
                print(usage, file=sys.stderr)
                return 2
            cmd_dump(argv[2], argv[3], raw)
        else:
            print(usage, file=sys.stderr)
            return 2
    except RefError as e:
        print(f"aoe_ref.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
