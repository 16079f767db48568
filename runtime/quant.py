"""GGUF block formats kept quantized: their sizes, the kernels' layouts, quantizing at load.

A `QuantizedTensor` is a weight [N, K] whose rows are GGUF blocks (K/block blocks
of type_size bytes each). It carries GGUF's own rows (`raw`, what
reference.dequantize reads: the oracle) and/or one of two layouts built once at
load: the tiles the native CPU kernels stream (`tiles`, by `pack`) or the planes
the Triton kernels read (`planes`, by `pack_planes`; described at `planes`). The
loader then drops `raw` (the embedding table keeps it on GPUs: torch gathers its rows).

Tile layout (csrc/quant_cpu.cpp reads it; `tile_planes` is its one description):
rows go in tiles of 4, each tile one contiguous record, padded to 64 bytes, so a
thread streams its tiles front to back. Every format is stored as unsigned
values q with weight = scale * q + min per group of 32 weights (16 for Q6_K),
min derived where the format stores none (Q4_0: -8 scale, Q5_0: -16 scale, Q8_0:
-128 scale with q = int8 value + 128, Q6_K: -32 scale). For each 32-weight
block b of the row, a tile holds, in planes:
  qs  64 bytes: byte 16 r + j = low 4 bits of q[r, 32b + j] | of q[r, 32b + 16 + j] << 4
      (Q8_0: 128 bytes, byte 16 r + j = q[r, 32b + j], byte 64 + 16 r + j = q[r, 32b + 16 + j]),
      so one 64-byte load unpacks into 4 rows x 16 values for each half of the block;
  qh  Q5_*: two 64-bit masks (bit 16 r + j = bit 4 of the values of each half);
      Q6_K: four (bit 4 and bit 5 of each half);
  then the scales: float16 d (and m) per block and row for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0;
  float16 d and dmin per 256-superblock and uint8 scale and min per block for Q4_K/Q5_K;
  float16 d per superblock and int8 scale per 16 weights for Q6_K.
The bytes equal the GGUF file's (Q4_K/Q5_K: +2.8%/2.3%: their 6-bit scales unpacked to bytes).
"""
import itertools
from dataclasses import dataclass

import torch

from . import reference

TILE_ROWS = 4
_TILE_ALIGN = 64


@dataclass(frozen=True)
class Format:
    name: str
    code: int        # the native kernels' id (csrc/quant_cpu.cpp: enum Fmt)
    block: int       # weights per GGUF block
    type_size: int   # bytes per GGUF block
    bits: int        # bits per stored value

    def row_bytes(self, cols):
        return cols // self.block * self.type_size


FORMATS = {f.name: f for f in (
    Format("Q4_0", 0, 32, 18, 4), Format("Q4_1", 1, 32, 20, 4), Format("Q5_0", 2, 32, 22, 5),
    Format("Q5_1", 3, 32, 24, 5), Format("Q8_0", 4, 32, 34, 8), Format("Q4_K", 5, 256, 144, 4),
    Format("Q5_K", 6, 256, 176, 5), Format("Q6_K", 7, 256, 210, 6))}
# formats `quantize=` produces from float weights (with the gguf package's quantizers)
QUANTIZE_TO = ("Q8_0", "Q4_0", "Q4_1")


def tile_planes(fmt, cols):
    """[(field, bytes)] of one tile of `fmt` rows with `cols` columns, in storage order."""
    nb, ns = cols // 32, cols // 256
    planes = [("qs", nb * (128 if fmt.bits == 8 else 64))]
    if fmt.bits in (5, 6):
        planes.append(("qh", nb * 8 * 2 * (fmt.bits - 4)))
    if fmt.block == 32:
        planes += [("d", nb * 8)] + ([("m", nb * 8)] if fmt.name in ("Q4_1", "Q5_1") else [])
    elif fmt.name == "Q6_K":
        planes += [("d", ns * 8), ("sc6", nb * 8)]
    else:
        planes += [("d", ns * 8), ("dmin", ns * 8), ("sc", nb * 4), ("mn", nb * 4)]
    return planes


def tile_bytes(fmt, cols):
    return -(-sum(size for _, size in tile_planes(fmt, cols)) // _TILE_ALIGN) * _TILE_ALIGN


def check_shape(fmt, shape, name):
    """A clear error for a weight `fmt` cannot hold: it must be [N, K] with K a multiple of the block."""
    if len(shape) != 2 or shape[1] % fmt.block:
        raise ValueError(f"tensor {name} of shape {tuple(shape)}: {fmt.name} stores rows in blocks of {fmt.block}, "
                         f"so it must be 2-D with a row length that is a multiple of {fmt.block}")


class QuantizedTensor:
    """A weight [N, K] in a GGUF block format; see the module docstring for its two layouts."""

    def __init__(self, fmt, shape, raw=None, tiles=None, name="weight", planes=None):
        self.fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
        self.shape = tuple(int(s) for s in shape)
        self.name = name
        check_shape(self.fmt, self.shape, name)
        if raw is None and tiles is None and planes is None:
            raise ValueError(f"tensor {name}: a QuantizedTensor needs its data (raw GGUF rows, tiles or planes)")
        if raw is not None:
            expected = (self.shape[0], self.fmt.row_bytes(self.shape[1]))
            if raw.dtype != torch.uint8 or tuple(raw.shape) != expected:
                raise ValueError(f"tensor {name}: {self.fmt.name} data for shape {self.shape} must be uint8 "
                                 f"{expected} ({self.fmt.type_size} bytes per {self.fmt.block} weights), got "
                                 f"{raw.dtype} {tuple(raw.shape)}")
        self.raw, self.tiles, self.planes = raw, tiles, planes

    @property
    def device(self):
        if self.planes is not None:
            return self.planes["qs"].device
        return (self.raw if self.raw is not None else self.tiles).device

    @property
    def nbytes(self):
        """The bytes a matmul reads: the tiles or planes once packed, else GGUF's rows."""
        if self.planes is not None:
            return sum(p.numel() * p.element_size() for p in self.planes.values())
        data = self.tiles if self.tiles is not None else self.raw
        return data.numel()

    def __repr__(self):
        return f"QuantizedTensor({self.fmt.name}, shape={self.shape}, {self.nbytes / 2**20:.1f} MiB)"

    def require(self, layout):
        """`raw` or `tiles`, with a clear error when this tensor does not hold it."""
        data = getattr(self, layout)
        if data is None and layout == "raw":
            raise ValueError(f"tensor {self.name} keeps only a kernel layout (packed at load); "
                             "load with quant='dequantize' for dense weights")
        if data is None:
            kernels, call = {"tiles": ("native CPU", "pack"), "planes": ("Triton", "pack_planes")}[layout]
            raise ValueError(f"tensor {self.name} is not packed for the {kernels} kernels; call .{call}() first")
        return data

    def dequantize(self, dtype=torch.float32):
        """The weights as a dense [N, K] tensor (reference.dequantize: bit-exact with gguf)."""
        return reference.dequantize(self.fmt.name, self.require("raw"), self.shape).to(dtype)

    def pack(self, keep_raw=False, out=None):
        """Build the native kernels' tiles from `raw` (once), into `out` if given (see tiles_shape);
        drop `raw` unless keep_raw."""
        if self.tiles is None:
            self.tiles = pack(self.fmt, self.raw, self.shape, out=out)
        if not keep_raw:
            self.raw = None
        return self

    def pack_planes(self, device=None, keep_raw=False):
        """Build the Triton kernels' planes from `raw` (once) on `device` (default raw's); drop `raw`
        unless keep_raw, else move it to `device` too (torch's embedding gathers its rows there)."""
        if self.planes is None:
            self.planes = {k: v.to(device or self.raw.device) for k, v in planes(self.fmt, self.raw).items()}
        if not keep_raw:
            self.raw = None
        elif device is not None:
            self.raw = self.raw.to(device)
        return self


class QuantizedStack:
    """Row blocks of one fused weight stored in different formats (Q4_K_M files keep q and k in Q4_K and
    v in Q6_K): fuselm.ops.linear runs each and concatenates the outputs."""

    def __init__(self, parts, name):
        self.parts, self.name = tuple(parts), name
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    @property
    def device(self):
        return self.parts[0].device

    def pack(self, keep_raw=False, out=None):
        """out: None or one tensor per part."""
        for p, o in zip(self.parts, out or [None] * len(self.parts)):
            p.pack(keep_raw, o)
        return self

    def pack_planes(self, device=None, keep_raw=False):
        for p in self.parts:
            p.pack_planes(device, keep_raw)
        return self

    def __repr__(self):
        return f"QuantizedStack({', '.join(map(repr, self.parts))})"


def runs(parts):
    """[(format, rows)] of consecutive parts sharing a format: the QuantizedTensors concat_rows makes."""
    return [(fmt, sum(rows for _, rows in group)) for fmt, group in itertools.groupby(parts, key=lambda p: p[0])]


def concat_rows(parts, name):
    """Quantized [N_i, K] parts -> one [sum N_i, K] weight: a QuantizedTensor when they share a format,
    else a QuantizedStack of the runs of consecutive parts that do."""
    K = parts[0].shape[1]
    if any(p.shape[1] != K for p in parts):
        raise ValueError(f"tensor {name}: parts {', '.join(p.name for p in parts)} have different row lengths")
    if len(parts) == 1:
        return parts[0]
    if any(p.raw is None for p in parts):
        raise ValueError(f"tensor {name}: concat_rows joins GGUF rows; parts already packed without them cannot be")
    joined = []
    for fmt, group in itertools.groupby(parts, key=lambda p: p.fmt):
        run = list(group)
        joined.append(run[0] if len(run) == 1 else QuantizedTensor(
            fmt, (sum(p.shape[0] for p in run), K), torch.cat([p.raw for p in run]), name=name))
    return joined[0] if len(joined) == 1 else QuantizedStack(joined, name)


def quantize(weight, fmt, name="weight"):
    """A float [N, K] tensor -> QuantizedTensor in `fmt` (one of QUANTIZE_TO), with gguf's quantizers."""
    import gguf
    fmt = FORMATS[fmt]
    check_shape(fmt, weight.shape, name)
    raw = gguf.quants.quantize(weight.detach().float().cpu().numpy(), gguf.GGMLQuantizationType[fmt.name])
    return QuantizedTensor(fmt, weight.shape, torch.from_numpy(raw), name=name)


# ---------------------------------------------------------------- packing

def _f16_bytes(x):
    """float32 values that are exact float16 [T, ..., 4] -> their float16 bytes [T, ...*8]."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def _masks(bits):
    """0/1 [T, nb, 4, 16] -> little-endian 64-bit masks as bytes [T, nb, 8] (bit 16 r + j)."""
    T, nb = bits.shape[:2]
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (bits.reshape(T, nb, 8, 8) * weights).sum(-1, dtype=torch.uint8)


def _pack_rows(fmt, raw, cols):
    """GGUF rows uint8 [n, row bytes] (n a multiple of TILE_ROWS) -> tiles uint8 [n / 4, tile bytes]."""
    n = raw.shape[0]
    T, nb, ns = n // TILE_ROWS, cols // 32, cols // 256
    f = reference.unpack_blocks(fmt.name, raw.reshape(-1, fmt.type_size))
    q = f["q"].reshape(T, TILE_ROWS, nb, 2, 16).permute(0, 2, 3, 1, 4)        # [T, nb, half, row, j]
    if fmt.bits == 8:
        planes = {"qs": q.reshape(T, nb * 128)}
    else:
        planes = {"qs": ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(T, nb * 64)}
    if fmt.bits in (5, 6):
        high = [_masks((q[:, :, half] >> bit) & 1) for half in (0, 1) for bit in range(4, fmt.bits)]
        planes["qh"] = torch.stack(high, dim=2).reshape(T, -1)

    def per_tile(x, groups):  # [n * groups] (row-major: row, group) -> [T, groups * 4 bytes or values]
        return x.reshape(T, TILE_ROWS, groups).transpose(1, 2)

    if fmt.block == 32:
        planes["d"] = _f16_bytes(per_tile(f["d"], nb))
        if "m" in f:
            planes["m"] = _f16_bytes(per_tile(f["m"], nb))
    else:
        planes["d"] = _f16_bytes(per_tile(f["d"], ns))
        if fmt.name == "Q6_K":
            planes["sc6"] = per_tile(f["sc6"], nb * 2).reshape(T, nb, 2, TILE_ROWS).view(torch.uint8).reshape(T, -1)
        else:
            planes["dmin"] = _f16_bytes(per_tile(f["dmin"], ns))
            planes["sc"] = per_tile(f["sc"], nb).reshape(T, -1)
            planes["mn"] = per_tile(f["mn"], nb).reshape(T, -1)
    out = torch.zeros(T, tile_bytes(fmt, cols), dtype=torch.uint8)
    at = 0
    for field, size in tile_planes(fmt, cols):
        out[:, at:at + size] = planes[field]
        at += size
    return out


def tiles_shape(fmt, shape):
    """The shape of a [N, K] weight's tiles: [ceil(N / 4), tile bytes]."""
    return -(-shape[0] // TILE_ROWS), tile_bytes(fmt, shape[1])


def pack(fmt, raw, shape, chunk_rows=4096, out=None):
    """GGUF rows -> tiles [ceil(N / 4), tile bytes] (into `out` if given); missing rows of the last
    tile are zeros (scale 0)."""
    N, K = shape
    if out is None:
        out = torch.empty(tiles_shape(fmt, shape), dtype=torch.uint8)
    elif tuple(out.shape) != tiles_shape(fmt, shape) or out.dtype != torch.uint8:
        raise ValueError(f"{fmt.name} tiles of a {tuple(shape)} weight are uint8 {tiles_shape(fmt, shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    for r0 in range(0, N, chunk_rows):  # bounded temporaries for big tensors
        rows = raw[r0:r0 + chunk_rows]
        pad = -rows.shape[0] % TILE_ROWS
        if pad:
            rows = torch.cat((rows, torch.zeros(pad, rows.shape[1], dtype=torch.uint8)))
        out[r0 // TILE_ROWS:r0 // TILE_ROWS + rows.shape[0] // TILE_ROWS] = _pack_rows(fmt, rows, K)
    return out


# ---------------------------------------------------------------- the Triton kernels' planes

# weight = s * q + mn per group: q the unsigned value, (s, mn) from the block fields. The planes
# (each [N, ...], row-major) keep the file's bytes apart by kind, so that a kernel's loads are
# aligned and coalesced whatever the block size (18, 20, 22, ... bytes), and every 4/5/6-bit
# format shares one value layout:
#   qs  uint8 [N, K/2]: byte 16 b + j of a row = q[32 b + j] | q[32 b + 16 + j] << 4, the low
#       nibbles of 32-block b's two halves (GGUF's own order for Q4_0..Q5_1);
#       Q8_0: uint8 [N, K], q itself (the int8 value + 128);
#   qh  Q5_*: uint8 [N, K/8], Q6_K: [N, K/4]: the values' bits above 4, HB = bits - 4 per value:
#       the 2 HB bits of qs byte c (its low value's, then its high value's) at bit 2 HB (c % P) of
#       byte c // P, P = 4 / HB;
#   d   float16 [N, K/32] per block (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0), [N, K/256] per superblock (K-quants);
#   m   float16 [N, K/32] (Q4_1, Q5_1); dmin float16 [N, K/256] (Q4_K, Q5_K);
#   sc, mn  uint8 [N, K/32] (Q4_K, Q5_K: their 6-bit scales, unpacked); sc6 int8 [N, K/16] (Q6_K).
# Bytes: the file's (K-quants +2.8% / 2.3%, as in the tiles).

def planes(fmt, raw, chunk_rows=4096):
    """GGUF rows uint8 [N, row bytes] of `fmt` -> {plane: tensor} on raw's device (see above)."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    parts = [_planes_rows(fmt, raw[r0:r0 + chunk_rows]) for r0 in range(0, raw.shape[0], chunk_rows)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _planes_rows(fmt, raw):
    n = raw.shape[0]
    K = raw.shape[1] // fmt.type_size * fmt.block
    f = reference.unpack_blocks(fmt.name, raw.reshape(-1, fmt.type_size))
    q = f["q"].reshape(n, K)
    out = {}
    if fmt.bits == 8:
        out["qs"] = q.contiguous()
    else:
        halves = q.reshape(n, K // 32, 2, 16)
        out["qs"] = ((halves[:, :, 0] & 15) | ((halves[:, :, 1] & 15) << 4)).reshape(n, K // 2)
    if fmt.bits in (5, 6):
        hb = fmt.bits - 4
        high = (halves >> 4).to(torch.int32)
        pair = (high[:, :, 0] | (high[:, :, 1] << hb)).reshape(n, K // 2)   # 2 hb bits per qs byte
        per = 4 // hb
        shifts = torch.arange(per, dtype=torch.int32) * 2 * hb
        out["qh"] = (pair.reshape(n, K // 2 // per, per) << shifts).sum(-1).to(torch.uint8)
    groups = K // fmt.block
    out["d"] = f["d"].reshape(n, groups).half()
    for name in ("m", "dmin"):
        if name in f:
            out[name] = f[name].reshape(n, groups).half()
    for name in ("sc", "mn", "sc6"):
        if name in f:
            out[name] = f[name].reshape(n, -1).contiguous()
    return out
