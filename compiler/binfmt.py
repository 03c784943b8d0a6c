"""Little-endian binary helpers shared by the artifact writers and readers."""
from __future__ import annotations

import struct
import zlib

import crc32c as _crc32c


def crc32(data: bytes | memoryview) -> int:
    """CRC-32 (IEEE 802.3, as zlib); runtime_c/crc32.c computes the same."""
    return zlib.crc32(data) & 0xFFFFFFFF


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli) of an expert record: the runtime checks it on every load with the CPU's
    CRC instruction (runtime_c/crc32.c em_crc32c)."""
    return _crc32c.crc32c(data) & 0xFFFFFFFF


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def pack(fmt: str, *values) -> bytes:
    return struct.pack("<" + fmt, *values)


def unpack(fmt: str, data: bytes, offset: int = 0) -> tuple:
    return struct.unpack_from("<" + fmt, data, offset)


def size(fmt: str) -> int:
    return struct.calcsize("<" + fmt)


class ArtifactFormatError(ValueError):
    """An artifact file is corrupted, truncated or of another version; the message names the file and field."""
