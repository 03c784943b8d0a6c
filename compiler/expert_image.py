"""The expert image: every expert's quantized weights in one file, one sequential read per expert.

Layout (little-endian; docs/FORMAT.md is the normative description):
  [0, 4096)        header (HEADER_FMT) padded with zeros
  table            num_records × 64-byte records (RECORD_FMT), ordered by (layer, expert)
  data             each record's bytes at a 4096-aligned offset, length padded to 4096; layer by
                   layer, a layer's records in the writer's order (by default by expert; a compile
                   with calibration text sets experts often chosen together side by side)
Within a record: gate codes, gate scales, up codes, up scales, down codes, down scales, each
64-byte aligned (the TVM kernels use aligned vector loads); for an image of ReLU experts (the
header's act, program.ACT) up codes, up scales, down codes, down scales, the last two part
offsets zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .binfmt import ArtifactFormatError, align_up, crc32, crc32c, pack, size, unpack
from .program import ACT
from .quantize import QuantizedMatrix, grid_at

MAGIC = b"EMOEXPRT"
VERSION = 7  # 2: sub-8-bit codes interleaved over words; 3: the layout field (quantize.py); 4: CRC-32C records;
# 5: the compile id (every file of one compile carries it); 6: the experts' activation (ReLU records of two matrices);
# 7: the INT4 grid (quantize.GRIDS)
ALIGN = 4096
PART_ALIGN = 64
# magic, version, header_bytes, layers, experts, records, record_bytes, align, hidden, inter, group,
# table_offset, data_offset, file_bytes, table_crc, layout, compile_id, act, int4_grid, header_crc
HEADER_FMT = "8sIIIIIIIIIIQQQII16sIII"
LAYOUT_CODES = {"rows": 0, "tiles": 1}
GRID_CODES = {"half": 0, "integer": 1}  # the INT4 records' levels (quantize.GRIDS)
# layer, expert, bits, crc32c, offset, length, part offsets ×6, payload_bytes, reserved
RECORD_FMT = "IIIIQQ6III"
RECORD_BYTES = 64
PART_NAMES = ("gate_q", "gate_s", "up_q", "up_s", "down_q", "down_s")  # SwiGLU; ReLU: up_q, up_s, down_q, down_s
assert size(RECORD_FMT) == RECORD_BYTES


def matrix_shapes(hidden: int, inter: int, act: str) -> list[tuple[int, int]]:
    """[rows, cols] of an expert's matrices in record order: gate, up, down (SwiGLU) or up, down (ReLU)."""
    return [(inter, hidden)] * (1 if act == "relu" else 2) + [(hidden, inter)]


@dataclass
class ExpertWeights:
    """One expert's quantized matrices (gate None for a ReLU expert)."""

    gate: QuantizedMatrix | None
    up: QuantizedMatrix
    down: QuantizedMatrix

    def matrices(self) -> list[QuantizedMatrix]:
        return [m for m in (self.gate, self.up, self.down) if m is not None]

    def parts(self) -> list[np.ndarray]:
        return [a for m in self.matrices() for a in (m.packed, m.scales)]


@dataclass
class Record:
    layer: int
    expert: int
    bits: int
    crc: int
    offset: int
    length: int
    part_offsets: tuple[int, ...]
    payload_bytes: int


def record_payload(w: ExpertWeights) -> tuple[bytes, list[int]]:
    """One expert's record bytes (before the padding to ALIGN) and where each part starts in them."""
    out = bytearray()
    offsets = []
    for arr in w.parts():
        out += bytes(align_up(len(out), PART_ALIGN) - len(out))
        offsets.append(len(out))
        out += np.ascontiguousarray(arr).tobytes()
    return bytes(out), offsets


def record_length(hidden: int, inter: int, bits: int, group: int, act: str = "swiglu") -> int:
    """Bytes one expert occupies in the image at `bits` (payload laid out as record_payload does)."""
    scale_bytes = 2  # fp16
    parts = []
    for rows, cols in matrix_shapes(hidden, inter, act):
        parts += [rows * cols * bits // 8, 0 if bits == 16 else rows * (cols // group) * scale_bytes]
    n = 0
    for nbytes in parts:
        n = align_up(n, PART_ALIGN) + nbytes
    return align_up(n, ALIGN)


def image_bytes(plan: list[list[int]], hidden: int, inter: int, group: int, act: str = "swiglu") -> int:
    """Size of the expert image for a bit plan (bits per [layer][expert])."""
    n = sum(len(row) for row in plan)
    data = sum(record_length(hidden, inter, b, group, act) for row in plan for b in row)
    return align_up(ALIGN + n * RECORD_BYTES, ALIGN) + data


# The journal of an image being written: what identifies the compile's inputs, then one entry per
# record written (RECORD_FMT, then the CRC-32 of those bytes). It lets an interrupted compile resume.
JOURNAL_ENTRY = RECORD_BYTES + 4


class ImageWriter:
    """The expert image written record by record as experts are rounded, in any order: every
    record's place follows from the bit plan, so each is written where it belongs as soon as it
    exists, and the table and header (which need the compile id) last, by finish().

    Each record written is noted in a journal beside the image (`journal`). Opened again with the
    same `inputs` (a digest of everything the records depend on), the writer keeps every record the
    journal names whose bytes still match their CRC-32C (`done`), so an interrupted compile resumes
    from them; with other inputs, or none, it starts afresh.

    `order`: per layer, its experts in the order their records lie in the data (profile.py's
    coactivation_order); default by expert. The table is by (layer, expert) whatever the order."""

    def __init__(self, path: Path, plan: list[list[int]], hidden: int, inter: int, group: int, layout: str,
                 journal: Path, inputs: bytes = b"", act: str = "swiglu", int4_grid: str = "half",
                 order: list[list[int]] | None = None):
        self.path, self.plan, self.journal_path = Path(path), plan, Path(journal)
        self.hidden, self.inter, self.group, self.layout, self.act = hidden, inter, group, layout, act
        self.int4_grid = int4_grid
        self.n = sum(len(row) for row in plan)
        self.data_offset = align_up(ALIGN + self.n * RECORD_BYTES, ALIGN)
        self.place: dict[tuple[int, int], tuple[int, int]] = {}  # (layer, expert) -> (offset, length)
        if order is not None and (len(order) != len(plan) or
                                  any(sorted(o) != list(range(len(row))) for o, row in zip(order, plan))):
            raise ValueError("an expert order names each layer's experts once")
        pos = self.data_offset
        for li, row in enumerate(plan):
            for ei in (range(len(row)) if order is None else order[li]):
                bits = row[ei]
                length = record_length(hidden, inter, bits, group, act)
                self.place[li, ei] = (pos, length)
                pos += length
        self.file_bytes = pos
        self.done: dict[tuple[int, int], Record] = self._resumed(inputs) if inputs else {}
        if not self.done:
            with open(self.path, "wb") as f:
                f.truncate(self.file_bytes)
        self._file = open(self.path, "r+b")
        self._journal = open(self.journal_path, "ab" if self.done else "wb")
        if not self.done:
            self._journal.write(pack("I", len(inputs)) + inputs)
            self._journal.flush()

    def _resumed(self, inputs: bytes) -> dict[tuple[int, int], Record]:
        """The records an earlier writer with the same inputs finished (journal entry and CRC intact)."""
        if not (self.path.is_file() and self.journal_path.is_file()) or self.path.stat().st_size != self.file_bytes:
            return {}
        data = self.journal_path.read_bytes()
        head = pack("I", len(inputs)) + inputs
        if not data.startswith(head):
            return {}
        done = {}
        with open(self.path, "rb") as f:
            for at in range(len(head), len(data) - JOURNAL_ENTRY + 1, JOURNAL_ENTRY):
                entry = data[at : at + JOURNAL_ENTRY]
                if crc32(entry[:RECORD_BYTES]) != unpack("I", entry, RECORD_BYTES)[0]:
                    break  # torn by the interruption: nothing after it was completed
                v = unpack(RECORD_FMT, entry)
                r = Record(v[0], v[1], v[2], v[3], v[4], v[5], tuple(v[6:12]), v[12])
                if self.place.get((r.layer, r.expert)) != (r.offset, r.length) or \
                        self.plan[r.layer][r.expert] != r.bits:
                    continue
                f.seek(r.offset)
                if crc32c(f.read(r.length)) == r.crc:
                    done[r.layer, r.expert] = r
        return done

    def write(self, layer: int, expert: int, bits: int, payload: bytes, part_offsets: list[int]) -> Record:
        """Writes one record's payload (record_payload) in its place and notes it in the journal."""
        offset, length = self.place[layer, expert]
        if bits != self.plan[layer][expert] or len(payload) > length:
            raise ValueError(f"expert {layer}/{expert}: a {bits}-bit record of {len(payload)} bytes where the plan "
                             f"has {self.plan[layer][expert]} bits ({length} bytes)")
        blob = payload + bytes(length - len(payload))
        parts = tuple(part_offsets) + (0,) * (6 - len(part_offsets))  # a two-matrix (ReLU) record: four parts
        r = Record(layer, expert, bits, crc32c(blob), offset, length, parts, len(payload))
        self._file.seek(offset)
        self._file.write(blob)
        self._file.flush()  # the data before the journal entry that vouches for it
        entry = pack(RECORD_FMT, r.layer, r.expert, r.bits, r.crc, r.offset, r.length, *r.part_offsets,
                     r.payload_bytes, 0)
        self._journal.write(entry + pack("I", crc32(entry)))
        self._journal.flush()
        self.done[layer, expert] = r
        return r

    def finish(self, compile_id: bytes = bytes(16)) -> list[Record]:
        """Writes the table and header once every record is in; removes the journal. `compile_id`
        (16 bytes) ties the image to the trunk.bin of the same compile."""
        missing = [k for k in self.place if k not in self.done]
        if missing:
            raise ValueError(f"expert image incomplete: {len(missing)} records missing, first {missing[0]}")
        records = [self.done[k] for k in sorted(self.place)]
        table = b"".join(
            pack(RECORD_FMT, r.layer, r.expert, r.bits, r.crc, r.offset, r.length, *r.part_offsets, r.payload_bytes, 0)
            for r in records
        )
        head = pack(HEADER_FMT[:-1], MAGIC, VERSION, ALIGN, len(self.plan), len(self.plan[0]), self.n, RECORD_BYTES,
                    ALIGN, self.hidden, self.inter, self.group, ALIGN, self.data_offset, self.file_bytes, crc32(table),
                    LAYOUT_CODES[self.layout], compile_id, ACT[self.act], GRID_CODES[self.int4_grid])
        head += pack("I", crc32(head))
        self._file.seek(0)
        self._file.write(head + bytes(ALIGN - len(head)))
        self._file.write(table + bytes(self.data_offset - ALIGN - len(table)))
        self.close()
        self.journal_path.unlink()
        return records

    def close(self) -> None:
        self._file.close()
        self._journal.close()


def write_image(path: Path, experts: list[list[ExpertWeights]], hidden: int, inter: int, group: int,
                layout: str = "rows", compile_id: bytes = bytes(16), act: str = "swiglu") -> list[Record]:
    """Write experts[layer][expert] (all quantized in `layout`, of the activation `act`, INT4 ones on
    one grid) to `path`; return the record table. `layer` counts the layers with experts.
    `compile_id` (16 bytes) ties the image to the trunk.bin of the same compile."""
    if any((w.gate is None) != (act == "relu") for row in experts for w in row):
        raise ValueError(f"every expert of a {act} image has {'two' if act == 'relu' else 'three'} matrices")
    grids = {m.grid for row in experts for w in row for m in w.matrices() if m.bits == 4}
    if len(grids) > 1:
        raise ValueError("an expert image holds its INT4 experts on one grid")
    plan = [[w.up.bits for w in row] for row in experts]
    writer = ImageWriter(path, plan, hidden, inter, group, layout, Path(f"{path}.journal"), act=act,
                         int4_grid=grids.pop() if grids else "half")
    for li, row in enumerate(experts):
        for ei, w in enumerate(row):
            writer.write(li, ei, w.up.bits, *record_payload(w))
    return writer.finish(compile_id)


@dataclass
class ImageHeader:
    num_layers: int
    num_experts: int
    hidden: int
    inter: int
    group: int
    data_offset: int
    file_bytes: int
    layout: str
    compile_id: bytes
    act: str
    int4_grid: str


def read_table(path: Path) -> tuple[ImageHeader, list[Record]]:
    """Read and check the header and the record table (not the records' data)."""
    path = Path(path)
    data = path.read_bytes()[: 2 * ALIGN]
    hsize = size(HEADER_FMT)
    if len(data) < hsize:
        raise ArtifactFormatError(f"{path}: truncated header ({len(data)} bytes)")
    (magic, version, _hb, nl, ne, nr, rb, _al, hidden, inter, group, toff, doff, fbytes, tcrc, layout, compile_id,
     act, grid, hcrc) = unpack(HEADER_FMT, data)
    if magic != MAGIC:
        raise ArtifactFormatError(f"{path}: not an EdgeMoE expert image (magic {magic!r})")
    if len(data) >= 12 and version != VERSION:
        raise ArtifactFormatError(f"{path}: expert image version {version}, this tool reads {VERSION}; recompile the model")
    if crc32(data[: hsize - 4]) != hcrc:
        raise ArtifactFormatError(f"{path}: header checksum mismatch (corrupted header)")
    actual = path.stat().st_size
    if actual < fbytes:
        raise ArtifactFormatError(f"{path}: truncated: {actual} bytes, header says {fbytes}")
    with open(path, "rb") as f:
        f.seek(toff)
        table = f.read(nr * rb)
    if crc32(table) != tcrc:
        raise ArtifactFormatError(f"{path}: record table checksum mismatch")
    recs = []
    for i in range(nr):
        v = unpack(RECORD_FMT, table, i * rb)
        recs.append(Record(v[0], v[1], v[2], v[3], v[4], v[5], tuple(v[6:12]), v[12]))
    layouts, acts, grids = ({v: k for k, v in codes.items()} for codes in (LAYOUT_CODES, ACT, GRID_CODES))
    if layout not in layouts:
        raise ArtifactFormatError(f"{path}: unknown weight layout {layout}; recompile the model")
    if act not in acts:
        raise ArtifactFormatError(f"{path}: unknown expert activation {act}; recompile the model")
    if grid not in grids:
        raise ArtifactFormatError(f"{path}: unknown INT4 grid {grid}; recompile the model")
    return ImageHeader(nl, ne, hidden, inter, group, doff, fbytes, layouts[layout], compile_id, acts[act],
                       grids[grid]), recs



def _matrix(blob: bytes, offsets: tuple[int, int], rows: int, cols: int, bits: int, group: int,
            layout: str, int4_grid: str) -> QuantizedMatrix:
    """The QuantizedMatrix [rows, cols] whose codes and scales start at `offsets` in a record's payload."""
    from .quantize import TILE_ROWS

    if bits == 16:
        shapes = (np.float16, (rows, cols)), (np.float16, (rows, 0))
    elif layout == "tiles":
        shapes = ((np.uint32, (rows // TILE_ROWS, cols * bits // 32, TILE_ROWS)),
                  (np.float16, (rows // TILE_ROWS, cols // group, TILE_ROWS)))
    elif bits == 8:
        shapes = (np.int8, (rows, cols)), (np.float16, (rows, cols // group))
    else:
        shapes = (np.uint32, (rows, cols * bits // 32)), (np.float16, (rows, cols // group))
    codes, scales = (np.frombuffer(blob, dtype, int(np.prod(shape)), at).reshape(shape)
                     for (dtype, shape), at in zip(shapes, offsets))
    return QuantizedMatrix(bits, group, codes, scales, layout, grid_at(bits, int4_grid))


def read_experts(path: Path) -> list[list[ExpertWeights]]:
    """Every expert as stored, [layer][expert], each record's checksum verified."""
    head, recs = read_table(path)
    experts = [[None] * head.num_experts for _ in range(head.num_layers)]
    shapes = matrix_shapes(head.hidden, head.inter, head.act)
    with open(path, "rb") as f:
        for r in recs:
            f.seek(r.offset)
            blob = f.read(r.length)
            if len(blob) != r.length or crc32c(blob) != r.crc:
                raise ArtifactFormatError(f"{path}: expert {r.layer}/{r.expert}: record checksum mismatch (corrupted)")
            matrices = [_matrix(blob, r.part_offsets[2 * i : 2 * i + 2], rows, cols, r.bits, head.group, head.layout,
                                head.int4_grid)
                        for i, (rows, cols) in enumerate(shapes)]
            experts[r.layer][r.expert] = ExpertWeights(*([None] * (3 - len(matrices)) + matrices))
    return experts
