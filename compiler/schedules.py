"""Default CPU schedules for the decode kernels (the hand schedule used when no tuning record exists).

Every matrix-vector block (a spatial row loop over a reduction) is split along its innermost
reduction axis into `lanes` independent partial sums (rfactor) computed as one vector, then summed:
LLVM emits vector FMAs with the dequantization of `lanes` packed codes done side by side. For
sub-8-bit weights that axis is the interleave of the packing (quantize.interleave: word i of a
block holds column i of each of its bit fields), so the lanes read consecutive words and a lane
count above the interleave width is cut down to it.
"""
from __future__ import annotations

import tvm
from tvm import s_tir

# names compiler/kernels.py gives row × reduction blocks ("y": a matvec without residual); a block of
# one of these names that reduces nothing (an elementwise "y") is not one
GEMV_BLOCKS = ("g", "u", "acc", "y")
DEFAULT_LANES = 16
# Kernels reading at least this many weight bytes split their rows over the runtime's compute
# threads; below it, waking the threads costs more than it saves.
PARALLEL_MIN_BYTES = 256 << 10


def _vectorize_reduction(sch: s_tir.Schedule, block, lanes: int, parallel: bool) -> None:
    red = sch.get_loops(block)[-1]  # the innermost reduction: contiguous in memory (kernels.py)
    extent = int(sch.get(red).extent)
    while lanes > 1 and extent % lanes:
        lanes //= 2
    if lanes == 1:
        return
    _, inner = sch.split(red, [None, lanes])
    partial = sch.rfactor(inner, factor_axis=1)
    sch.vectorize(sch.get_loops(partial)[-1])
    # Sum each row's partials right after computing them: the partial buffer shrinks to one
    # vector on the stack instead of a [rows, lanes] workspace allocation.
    rows = sch.get_loops(partial)[0]
    sch.reverse_compute_at(block, rows)
    if parallel:
        sch.parallel(rows)


# Attention's weighted sum of the cached values, o[h, i] = Σ_t e[h, t] · v[t, ·, i] / z[h]
# (kernels.py: "o"; latent attention's "o_lat"). As written its loops run t innermost, walking every
# cache row once per output element with a stride of a whole row; with t outside i each row is read
# once, contiguously, and LLVM vectorizes the loop over i. Same sums in the same order: bit-identical.
# Measured on the bundled model's attention at 200 positions: 65 → 29 µs (Zen 4), 55 → 18 µs (Haswell
# target); attention was 45% of a decode step's time there.
ATTENTION_SUM_BLOCKS = ("o", "o_lat")


def _rows_outside(sch: s_tir.Schedule, block) -> None:
    loops = sch.get_loops(block)
    if len(loops) != 3:
        return
    head, element, row = loops
    sch.reorder(head, row, element)
    sch.decompose_reduction(block, row)


def _weight_bytes(func: tvm.tirx.PrimFunc) -> int:
    """Bytes of the kernel's largest static-shape parameter: its weight matrix."""
    sizes = [0]
    for p in func.params:
        if all(isinstance(d, tvm.tirx.IntImm) for d in p.shape):
            n = 1
            for d in p.shape:
                n *= int(d)
            sizes.append(n * tvm.DataType(str(p.dtype)).bits // 8)
    return max(sizes)


def has_gemv_blocks(func: tvm.tirx.PrimFunc) -> bool:
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    return any(_block(sch, name, "main") is not None for name in GEMV_BLOCKS)


def _block(sch: s_tir.Schedule, name: str, func_name: str):
    """The matrix-vector block `name` of the function, if it has one: a block that reduces."""
    try:
        block = sch.get_sblock(name, func_name=func_name)
    except s_tir.ScheduleError:  # this kernel has no such block
        return None
    reduces = any(v.iter_type == tvm.tirx.IterVar.CommReduce for v in sch.get(block).iter_vars)
    return block if reduces else None


def schedule(mod: tvm.IRModule, lanes: dict[str, int] | None = None) -> tvm.IRModule:
    """Vectorize every matrix-vector block, and spread the rows of large ones over threads; run
    attention's value sums row by row;
    `lanes` gives tuned lane counts by kernel name (kernels not in it get DEFAULT_LANES)."""
    sch = s_tir.Schedule(mod)
    for gv in mod.get_global_vars():
        parallel = _weight_bytes(mod[gv]) >= PARALLEL_MIN_BYTES
        for name in GEMV_BLOCKS:
            block = _block(sch, name, gv.name_hint)
            if block is not None:
                _vectorize_reduction(sch, block, (lanes or {}).get(gv.name_hint, DEFAULT_LANES), parallel)
        for name in ATTENTION_SUM_BLOCKS:
            block = _block(sch, name, gv.name_hint)
            if block is not None:
                _rows_outside(sch, block)
    return sch.mod
