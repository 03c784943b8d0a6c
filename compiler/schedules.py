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


def _fitting_lanes(extent: int, lanes: int) -> int:
    """The most lanes, `lanes` halved as often as needed, that divide `extent`."""
    while lanes > 1 and extent % lanes:
        lanes //= 2
    return lanes


def _vectorize_reduction(sch: s_tir.Schedule, block, lanes: int, parallel: bool) -> None:
    red = sch.get_loops(block)[-1]  # the innermost reduction: contiguous in memory (kernels.py)
    lanes = _fitting_lanes(int(sch.get(red).extent), lanes)
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


# Attention (kernels.py: em_attention's blocks s, mx, e, z, o; latent attention's s ... o_lat) runs
# head by head: every block moves under the head loop of the weighted value sum o[h, i] = Σ_t e[h, t] ·
# v[t, ·, i] / z[h], so a head's scores and exponentials are still in L1 when the next block reads them.
# Within a head the value sum runs t outside i (each cache row read once, contiguously, i vectorized),
# and the scores s[h, t] = q[h] · k[t] are `lanes` vector partial sums over the head's dims, as the
# matvecs. Measured at 16 heads × 128 dims over 73 positions (Zen 4): 129 → 28 µs (the scalar score
# dot products were most of it); the value sums' row order alone took the bundled model's attention
# at 200 positions from 65 to 29 µs.
ATTENTION_SUM_BLOCKS = ("o", "o_lat")
ATTENTION_SCORE_BLOCK = "s"
# The heads are split over the compute threads where a cache position holds at least this many bytes
# for them to read (query heads × dims, keys and values, float32): each task's scores then come from
# the workspace the launch's tasks share (runtime_c thread_pool.c). Below it a launch costs more than
# the split saves at the contexts decode runs at (the bundled model: 2 KiB).
ATTENTION_PARALLEL_MIN_ROW_BYTES = 8 << 10


def _attention_row_bytes(func: tvm.tirx.PrimFunc) -> int:
    """Bytes the heads read per cache position: the output's [heads, dims], float32, for keys and values."""
    heads, dims = (int(d) for d in func.params[-1].shape)
    return heads * dims * 4 * 2


def _attention_by_head(sch: s_tir.Schedule, block, func_name: str, parallel: bool) -> None:
    loops = sch.get_loops(block)
    if len(loops) != 3:
        return
    head, element, row = loops
    sch.reorder(head, row, element)
    score = _block(sch, ATTENTION_SCORE_BLOCK, func_name)
    partial = None
    if score is not None:
        red = sch.get_loops(score)[-1]  # the head's dims, contiguous in the cache row
        lanes = _fitting_lanes(int(sch.get(red).extent), DEFAULT_LANES)
        if lanes > 1:
            _, inner = sch.split(red, [None, lanes])
            partial = sch.rfactor(inner, factor_axis=1)
    root = sch.get_sblock("root", func_name=func_name)
    producers = [b for b in sch.get_child_blocks(root) if not sch.get(b).same_as(sch.get(block))]
    for producer in reversed(producers):  # consumers first: each joins the head loop its readers are in
        sch.compute_at(producer, head)
    if partial is not None:
        # compute_at laid the partial sums' loops out as (lane, position, rest of the dims): the
        # lanes go innermost, as one vector, and each position's lanes are summed right after
        lane, *others = sch.get_loops(partial)[1:]
        position = next(loop for loop in others if not isinstance(sch.get(loop).extent, tvm.tirx.IntImm))
        sch.reorder(position, *(loop for loop in others if not loop.same_as(position)), lane)
        sch.vectorize(lane)
        sch.reverse_compute_at(score, position)
    if parallel:
        sch.parallel(head)
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


def _block_names(sch: s_tir.Schedule, func_name: str) -> set[str]:
    """The names of the function's blocks; none for a kernel written as plain loops (the integer-dot
    ones). Looked up rather than asked for: a failed get_sblock renders the whole module into its
    error message, which took 68 s of a Cortex-M7 compile."""
    if not isinstance(sch.mod[func_name].body, s_tir.SBlockRealize):
        return set()
    names, todo = set(), [sch.get_sblock("root", func_name=func_name)]
    while todo:
        for child in sch.get_child_blocks(todo.pop()):
            names.add(sch.get(child).name_hint)
            todo.append(child)
    return names


def _block(sch: s_tir.Schedule, name: str, func_name: str):
    """The matrix-vector block `name` of the function, if it has one: a block that reduces."""
    if name not in _block_names(sch, func_name):
        return None
    block = sch.get_sblock(name, func_name=func_name)
    reduces = any(v.iter_type == tvm.tirx.IterVar.CommReduce for v in sch.get(block).iter_vars)
    return block if reduces else None


def schedule(mod: tvm.IRModule, lanes: dict[str, int] | None = None) -> tvm.IRModule:
    """Vectorize every matrix-vector block, and spread the rows of large ones over threads; run
    attention head by head;
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
                _attention_by_head(sch, block, gv.name_hint,
                                   _attention_row_bytes(mod[gv]) >= ATTENTION_PARALLEL_MIN_ROW_BYTES)
    return sch.mod
