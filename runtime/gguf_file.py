"""A lean GGUF reader: metadata as a plain dict, tensors as memory-mapped numpy views.

gguf.GGUFReader builds numpy views for every element of every metadata array;
for a 49k-token vocabulary that costs ~2.5 s and ~160 MB. This reader parses
the same format (GGUF v2/v3, little-endian) in a fraction of that and exposes
the part of the GGUFReader interface the loader uses: `tensors` with `name`,
`tensor_type`, `shape` (GGUF order, innermost first), `n_elements`, `data`
(quantized: uint8 [rows, bytes per row], float: [rows, cols]), and the
metadata through `fuselm.config.gguf_value`.

Layout: magic "GGUF", version u32, tensor count u64, metadata count u64,
metadata (key string, type u32, value), tensor infos (name, n_dims u32,
dims u64 x n, type u32, offset u64), padding to general.alignment, data.
"""
import bisect
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# GGUF metadata value types -> struct format of the scalar (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_PLAIN_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}


@dataclass
class GGUFTensor:
    name: str
    tensor_type: object        # gguf.GGMLQuantizationType
    shape: tuple               # GGUF order: innermost dimension first
    n_elements: int
    data: np.ndarray           # a read-only view into the memory-mapped file
    offset: int                # where the data starts in the file


class GGUFFile:
    """Parse a GGUF file's header; tensors stay in the memory map until read."""

    def __init__(self, path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        self._map = np.memmap(self.path, mode="r")
        self._buf = memoryview(self._map)
        if bytes(self._buf[:4]) != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file")
        self._pos = 4
        version, tensor_count, kv_count = self._unpack("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (only 2 and 3, little-endian)")
        self.metadata = {}
        for _ in range(kv_count):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I")[0])
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            n_dims = self._unpack("<I")[0]
            dims = self._unpack(f"<{n_dims}Q")
            kind, offset = self._unpack("<IQ")
            try:
                kind = GGMLQuantizationType(kind)
            except ValueError:
                raise ValueError(f"tensor {name} has unknown GGUF type {kind}") from None
            infos.append((name, tuple(int(d) for d in dims), kind, offset))
        alignment = self.metadata.get("general.alignment", 32)
        start = -(-self._pos // alignment) * alignment
        self.tensors = []
        ends = sorted(start + offset for *_, offset in infos) + [len(self._map)]
        for name, dims, kind, offset in infos:
            n = int(np.prod(dims))
            block, type_size = GGML_QUANT_SIZES[kind]
            if dims and dims[0] % block:
                raise ValueError(f"tensor {name} of shape {tuple(reversed(dims))} is {kind.name}, whose blocks hold "
                                 f"{block} values, but its rows hold {dims[0]}")
            begin, size = start + offset, n // block * type_size
            following = ends[bisect.bisect_right(ends, begin):]  # the starts after this one (and the file's end)
            if following and begin + size > following[0] and following[0] != len(self._map):
                raise ValueError(f"tensor {name}: {size} bytes of {kind.name} for shape {tuple(reversed(dims))} run "
                                 f"past the start of the next tensor (byte {following[0]})")
            if begin + size > len(self._map):
                raise ValueError(f"{self.path} is truncated: tensor {name} ends at byte {begin + size}, "
                                 f"the file has {len(self._map)}")
            raw = self._map[begin:begin + size]
            rows = tuple(reversed(dims))
            if kind.name in _PLAIN_DTYPES:
                data = raw.view(_PLAIN_DTYPES[kind.name]).reshape(rows)
            else:
                data = raw.reshape(*rows[:-1], rows[-1] // block * type_size)
            self.tensors.append(GGUFTensor(name, kind, dims, n, data, begin))

    def read(self, tensor):
        """A fresh copy of a tensor's data (same shape and dtype as `tensor.data`), read with plain file I/O:
        pages touched through the memory map would stay in this process's RSS, page-cache reads do not."""
        out = np.empty(tensor.data.shape, dtype=tensor.data.dtype)
        with open(self.path, "rb") as f:
            f.seek(tensor.offset)
            n = f.readinto(memoryview(out).cast("B"))
        if n != out.nbytes:
            raise ValueError(f"{self.path}: tensor {tensor.name} is truncated ({n} of {out.nbytes} bytes)")
        return out

    def read_rows(self, tensor, rows, cols=None):
        """The rows [a, b) of each range in `rows` of a tensor stored as [N, row bytes] (a block-quantized
        matrix's GGUF rows), and of each row only bytes [c0, c1) when cols is given: uint8 [n, bytes].
        Only those bytes are read (one read per range of whole rows, one per row with cols)."""
        row_bytes = tensor.data.shape[-1] * tensor.data.dtype.itemsize
        c0, c1 = cols or (0, row_bytes)
        out = np.empty((sum(b - a for a, b in rows), c1 - c0), dtype=np.uint8)
        at = 0
        with open(self.path, "rb") as f:
            for a, b in rows:
                if cols is None:
                    f.seek(tensor.offset + a * row_bytes)
                    f.readinto(memoryview(out[at:at + b - a]).cast("B"))
                else:
                    for r in range(a, b):
                        f.seek(tensor.offset + r * row_bytes + c0)
                        f.readinto(memoryview(out[at + r - a]).cast("B"))
                at += b - a
        return out

    def _unpack(self, fmt):
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self):
        (length,) = self._unpack("<Q")
        text = str(self._buf[self._pos:self._pos + length], "utf-8")
        self._pos += length
        return text

    def _value(self, kind):
        if kind == _STRING:
            return self._string()
        if kind in _SCALARS:
            return self._unpack("<" + _SCALARS[kind])[0]
        if kind != _ARRAY:
            raise ValueError(f"{self.path}: unknown metadata value type {kind}")
        item, count = self._unpack("<IQ")
        if item in _NUMPY:  # numeric arrays in one step
            values = np.frombuffer(self._buf, dtype=_NUMPY[item], count=count, offset=self._pos)
            self._pos += values.nbytes
            return values.tolist()
        return [self._value(item) for _ in range(count)]
