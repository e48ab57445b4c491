"""The GGUF container, read straight from a memory map: metadata, tensor directory, and
dequantization of the common block formats in torch.

`gguf.GGUFReader` builds a Python object for every element of every metadata array (the
49k-entry vocabulary and merge list of SmolLM2 took ~6 s of a ~9 s load); here arrays are
only walked to find where they end, and decoded when asked for. F32/F16/BF16, Q8_0, Q4_0
and Q4_1 are dequantized in torch, whole tensors at a time; every other type goes through
`gguf.quants.dequantize` (numpy). Layout per the GGUF specification (ggml's docs/gguf.md):
little-endian, a header, key/value metadata, tensor infos, then aligned tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# metadata value types -> struct format of a scalar (8: string, 9: array)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}

# ggml tensor types decoded here: type id -> (elements per block, bytes per block)
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20),
           Q8_0: (32, 34)}
_CHUNK_ELEMENTS = 1 << 15  # per chunk: cache-resident, and under torch's parallel grain size


@dataclass
class GGUFArray:
    """A metadata array, decoded on demand (`values()`)."""

    buf: memoryview
    offset: int  # of the first element
    elem_type: int
    count: int

    def values(self) -> list[Any]:
        if self.elem_type in _NUMPY:
            arr = np.frombuffer(self.buf, _NUMPY[self.elem_type], self.count, self.offset)
            return arr.tolist()
        out, pos = [], self.offset
        for _ in range(self.count):
            value, pos = _read_value(self.buf, pos, self.elem_type)
            out.append(value)
        return out

    def __len__(self) -> int:
        return self.count


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # outermost first (GGUF lists dims innermost first)
    ggml_type: int
    offset: int  # absolute, in the file

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def _read_string(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    return bytes(buf[pos : pos + n]).decode("utf-8", errors="replace"), pos + n


def _skip_array(buf: memoryview, pos: int, elem_type: int, count: int) -> int:
    if elem_type in _SCALAR:
        return pos + struct.calcsize(_SCALAR[elem_type]) * count
    if elem_type == _STRING:
        for _ in range(count):
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        return pos
    for _ in range(count):  # nested arrays
        _, pos = _read_value(buf, pos, elem_type)
    return pos


def _read_value(buf: memoryview, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in _SCALAR:
        fmt = _SCALAR[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        return _read_string(buf, pos)
    if vtype == _ARRAY:
        elem_type, count = struct.unpack_from("<IQ", buf, pos)
        start = pos + 12
        return GGUFArray(buf, start, elem_type, count), _skip_array(buf, start, elem_type, count)
    raise ValueError(f"unknown GGUF metadata value type {vtype}")


class GGUFContainer:
    """Metadata and tensor directory of a GGUF file (v2/v3), memory-mapped copy-on-write so
    tensors can be viewed as writable arrays without copying the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        buf = memoryview(self._map)
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file")
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} of {self.path} is not supported")
        pos = 24
        self.fields: dict[str, Any] = {}
        for _ in range(num_kv):
            key, pos = _read_string(buf, pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            self.fields[key], pos = _read_value(buf, pos + 4, vtype)
        infos = []
        for _ in range(num_tensors):
            name, pos = _read_string(buf, pos)
            (ndim,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            infos.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
        align = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-pos // align) * align
        self.tensors = [GGUFTensorInfo(n, s, t, data_start + o) for n, s, t, o in infos]
        self._buf = buf

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value: a scalar or string, or a list for an array."""
        value = self.fields.get(key, default)
        return value.values() if isinstance(value, GGUFArray) else value

    def field_length(self, key: str) -> int | None:
        value = self.fields.get(key)
        return len(value) if isinstance(value, GGUFArray) else None

    def raw_bytes(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes, [rows, bytes per row] uint8 (rows = all but the last dim)."""
        per_block, block_bytes = _type_size(info.ggml_type)
        inner = info.shape[-1] if info.shape else 1
        if inner % per_block:
            raise ValueError(f"{info.name}: {inner} elements per row is not a whole number "
                             f"of {per_block}-element blocks")
        row_bytes = inner // per_block * block_bytes
        rows = info.num_elements // inner
        return np.ndarray((rows, row_bytes), np.uint8, self._map, info.offset)

    def dequantize(self, info: GGUFTensorInfo, row_order: np.ndarray | None = None) -> torch.Tensor:
        """The tensor as a new float32 tensor, in its (outermost-first) shape."""
        out = torch.empty(info.shape, dtype=torch.float32)
        self.dequantize_into(info, out, row_order)
        return out

    def dequantize_into(self, info: GGUFTensorInfo, out: torch.Tensor,
                        row_order: np.ndarray | None = None) -> None:
        """Write the tensor's values into `out` (its shape; any dtype and device). With
        `row_order`, row i of `out` is row row_order[i] of the tensor: rows are quantized
        independently, so their bytes are reordered before dequantizing (8x fewer bytes
        than floats, and no float temporary)."""
        if tuple(out.shape) != info.shape:
            raise ValueError(f"{info.name}: shape {info.shape}, destination {tuple(out.shape)}")
        raw = self.raw_bytes(info)
        if row_order is not None:
            raw = raw[row_order]
        if info.ggml_type not in _BLOCKS:
            import gguf

            values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.ggml_type))
            out.copy_(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
                      .reshape(info.shape))
            return
        per_block, block_bytes = _BLOCKS[info.ggml_type]
        blocks = torch.from_numpy(raw).view(-1, block_bytes)
        if not out.is_contiguous():
            raise ValueError(f"{info.name}: the destination must be contiguous")
        flat = out.view(-1)
        direct = out.dtype == torch.float32 and out.device.type == "cpu"
        step = max(1, _CHUNK_ELEMENTS // per_block)
        scratch = None if direct else torch.empty(step * per_block, dtype=torch.float32)
        for b0 in range(0, blocks.shape[0], step):
            chunk = blocks[b0 : b0 + step]
            e0, e1 = b0 * per_block, (b0 + chunk.shape[0]) * per_block
            target = flat[e0:e1] if scratch is None else scratch[: e1 - e0]
            _dequantize_blocks(chunk, info.ggml_type, target.view(chunk.shape[0], per_block))
            if scratch is not None:
                flat[e0:e1].copy_(target)


def _type_size(ggml_type: int) -> tuple[int, int]:
    if ggml_type in _BLOCKS:
        return _BLOCKS[ggml_type]
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown ggml tensor type {ggml_type}") from None


def _dequantize_blocks(blocks: torch.Tensor, ggml_type: int, out: torch.Tensor) -> None:
    """Blocks [n, bytes per block] uint8 -> out [n, elements per block] float32.

    Works a chunk at a time (the caller's), writing into `out` with no full-size
    temporaries: every fresh allocation of a large tensor costs its page faults."""
    if ggml_type == F32:
        out.copy_(blocks.view(torch.float32))
    elif ggml_type == F16:
        out.copy_(blocks.view(torch.float16))
    elif ggml_type == BF16:
        out.copy_(blocks.view(torch.bfloat16))
    elif ggml_type == Q8_0:
        out.copy_(blocks[:, 2:].view(torch.int8))
        out.mul_(blocks[:, :2].view(torch.float16))
    else:
        # 4-bit: element j of a block is the low nibble of byte j (j < 16), else the high
        # nibble of byte j - 16.
        packed = blocks[:, -16:]
        torch.bitwise_and(packed, 0x0F, out=out[:, :16])
        torch.bitwise_right_shift(packed, 4, out=out[:, 16:])
        if ggml_type == Q4_0:
            out.sub_(8.0)
        halves = blocks[:, :4].view(torch.float16)  # d, and m for Q4_1
        out.mul_(halves[:, :1])
        if ggml_type == Q4_1:
            out.add_(halves[:, 1:2])
