"""Tensors of a safetensors file read when used, not when imported.

A StoredTensor names where a tensor lies (file, byte range, stored dtype, shape); it holds no
data. Used as an array (np.asarray, arithmetic, indexing, .T) it reads those bytes from the
memory-mapped file and converts them to float32 — exactly what importing it eagerly gave — and
keeps nothing, so a checkpoint far larger than RAM can be walked tensor by tensor. bfloat16 and
float16 stay as stored until then. It pickles as its address, so a worker process reads its own.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

# safetensors dtype names → how the stored bytes become float32 (U8: MXFP4 blocks and scales, exact as float32)
STORED_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8}
HEADER_LIMIT = 100 << 20  # a safetensors JSON header larger than this is not a real one


class SafetensorsFormatError(ValueError):
    """A .safetensors file whose header cannot be read; the message names the file and the problem."""


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor name → {dtype, shape, data_offsets}, offset of the data section) of a .safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsFormatError(f"{path}: truncated safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > HEADER_LIMIT:
            raise SafetensorsFormatError(f"{path}: safetensors header of {n} bytes is not plausible (corrupted file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise SafetensorsFormatError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class _Mapped:
    """Read-only mappings of the files tensors are read from, one per file and process, opened on
    first use; remapped when the file at a path is replaced or rewritten, the least recently used
    closed beyond MAX_MAPPED."""

    MAX_MAPPED = 32
    maps: dict[Path, tuple[tuple, mmap.mmap]] = {}

    @classmethod
    def buffer(cls, path: Path) -> mmap.mmap:
        st = path.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        held = cls.maps.pop(path, None)
        if held is not None and held[0] != key:
            held[1].close()
            held = None
        if held is None:
            with open(path, "rb") as f:
                held = (key, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            while len(cls.maps) >= cls.MAX_MAPPED:
                cls.maps.pop(next(iter(cls.maps)))[1].close()
        cls.maps[path] = held  # most recently used last
        return held[1]


class LazyTensor(NDArrayOperatorsMixin):
    """A float32 tensor computed when used (read()), not when made: used as an array (np.asarray,
    arithmetic, indexing, .T, astype) it is read, and nothing is kept. Subclasses set `shape` and
    define read()."""

    shape: tuple[int, ...]
    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    dtype = np.dtype(np.float32)  # as used

    def read(self) -> np.ndarray:
        raise NotImplementedError

    def level_bounds(self, group: int) -> tuple[int, int] | None:
        """(lowest, highest) integer level where the tensor is stored as integer levels times one
        float16 scale per `group` consecutive inputs (a GGUF's Q8_0 and Q4_0 blocks), told without
        reading it; None otherwise."""
        return None

    def stored_levels(self, group: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(levels int8 [..., K], float16 scales [..., K / group]) as the tensor is stored, where it
        is so stored (level_bounds), so it can be repacked unrounded; None otherwise."""
        return None

    def stored_bits(self) -> float | None:
        """Bits per weight as the tensor is stored (a GGUF's blocks, scales included; a safetensors
        dtype), told without reading it; None where nothing stores it as such."""
        return None

    def __array__(self, dtype=None, copy=None):
        a = self.read()
        return a if dtype is None else a.astype(dtype)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(i.read() if isinstance(i, LazyTensor) else i for i in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getitem__(self, key):
        return self.read()[key]

    @property
    def T(self) -> np.ndarray:
        return self.read().T

    def astype(self, dtype, **kwargs) -> np.ndarray:
        return self.read().astype(dtype, **kwargs)

    def __len__(self) -> int:
        return self.shape[0]


class RowStack(LazyTensor):
    """Matrices of one width stacked along their rows (a fused q/k/v projection), each part kept as
    it is (an array or a LazyTensor) so that each can be quantized as it is stored."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.shape = (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])

    def read(self) -> np.ndarray:
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in self.parts], axis=0)

    def stored_bits(self) -> float | None:
        bits = [p.stored_bits() if isinstance(p, LazyTensor) else None for p in self.parts]
        return None if None in bits else max(bits)


class RowOrder(LazyTensor):
    """A matrix with its rows taken in another order (`order[i]`: the source row that is row i),
    reordered when read; stored levels reordered alike."""

    def __init__(self, source: LazyTensor, order: np.ndarray):
        self.source, self.order, self.shape = source, np.asarray(order), source.shape

    def read(self) -> np.ndarray:
        return self.source.read()[self.order]

    def level_bounds(self, group: int) -> tuple[int, int] | None:
        return self.source.level_bounds(group)

    def stored_levels(self, group: int) -> tuple[np.ndarray, np.ndarray] | None:
        stored = self.source.stored_levels(group)
        return None if stored is None else (stored[0][self.order], stored[1][self.order])

    def stored_bits(self) -> float | None:
        return self.source.stored_bits()


class FileTensor(LazyTensor):
    """A tensor lying in bytes start…end of a file, whose first axis steps through that range evenly
    (a safetensors tensor, a GGUF tensor: a fused [experts, …] tensor is one expert after another).
    Subclasses define read() and _slice()."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], start: int, end: int):
        self.path, self.name, self.shape, self.start, self.end = Path(path), name, tuple(shape), start, end

    def _slice(self, shape: tuple[int, ...], start: int, end: int) -> "FileTensor":
        """The same kind of tensor, of `shape`, in bytes start…end of the file."""
        raise NotImplementedError

    def stored_bits(self) -> float:
        return 8 * (self.end - self.start) / self.size

    def row(self, i: int) -> "FileTensor":
        """Index i along the first axis, still unread (a fused [experts, …] tensor's one expert)."""
        n = self.shape[0]
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} of shape {self.shape}")
        step = (self.end - self.start) // n
        at = self.start + (i % n) * step
        return self._slice(self.shape[1:], at, at + step)

    def rows(self, start: int, stop: int) -> "FileTensor":
        """Indices start…stop-1 along the first axis, still unread (one half of a fused gate-up matrix)."""
        n = self.shape[0]
        if not 0 <= start < stop <= n:
            raise IndexError(f"rows {start}:{stop} out of range for {self.name} of shape {self.shape}")
        step = (self.end - self.start) // n
        return self._slice((stop - start, *self.shape[1:]), self.start + start * step, self.start + stop * step)

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if isinstance(first, (int, np.integer)) and self.ndim > 1:
            sub = self.row(int(first))
            return sub[rest] if rest else sub
        return self.read()[key]

    def _mapped_bytes(self) -> tuple[mmap.mmap, np.ndarray]:
        """(the file's mapping, this tensor's bytes in it as uint8, not copied)."""
        m = _Mapped.buffer(self.path)
        return m, np.frombuffer(m, np.uint8, self.end - self.start, self.start)

    def _release(self, m: mmap.mmap) -> None:
        """Drops this tensor's mapped pages from the process (they stay in the page cache), so walking a
        checkpoint does not grow the RSS."""
        first = self.start - self.start % mmap.PAGESIZE
        if self.end > first:
            m.madvise(mmap.MADV_DONTNEED, first, self.end - first)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path.name}:{self.name}, {self.shape})"


class StoredTensor(FileTensor):
    """A tensor in a safetensors file, read as float32 when used (module docstring)."""

    def __init__(self, path: Path, name: str, dtype: str, shape: tuple[int, ...], start: int, end: int):
        if dtype not in STORED_DTYPES:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} is {dtype}; EdgeMoE imports "
                                         f"{', '.join(STORED_DTYPES)} tensors (convert the checkpoint to one of them)")
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * np.dtype(STORED_DTYPES[dtype]).itemsize:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} spans {end - start} bytes, its shape "
                                         f"{tuple(shape)} at {dtype} needs {count * np.dtype(STORED_DTYPES[dtype]).itemsize}")
        super().__init__(path, name, shape, start, end)
        self.stored_dtype = dtype

    def _slice(self, shape: tuple[int, ...], start: int, end: int) -> "StoredTensor":
        return StoredTensor(self.path, self.name, self.stored_dtype, shape, start, end)

    def read(self) -> np.ndarray:
        """The tensor as a new float32 array (its mapped pages released afterwards)."""
        m, raw = self._mapped_bytes()
        raw = raw.view(STORED_DTYPES[self.stored_dtype]).reshape(self.shape)
        if self.stored_dtype == "BF16":  # bfloat16 is the top half of a float32
            out = (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            out = raw.astype(np.float32)
        del raw
        self._release(m)
        return out

    def __repr__(self) -> str:
        return f"StoredTensor({self.path.name}:{self.name}, {self.stored_dtype}, {self.shape})"


def materialize(a):
    """`a` as an ndarray where it is a LazyTensor, else `a` itself."""
    return a.read() if isinstance(a, LazyTensor) else a
