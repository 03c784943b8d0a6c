#include "trunk_view.h"

#include <stdio.h>
#include <string.h>

#include "generated/program.h"

static const uint32_t DTYPE_BYTES[] = {4, 2, 1, 4}; /* float32, float16, int8, uint32 (docs/FORMAT.md) */
enum { F32 = 0, F16 = 1, I8 = 2, U32 = 3 };

uint32_t em_tensor_index(const em_trunk_view* v, const char* name) {
  for (uint32_t i = 0; i < v->n; i++)
    if (strcmp(v->entries[i].name, name) == 0) return i;
  return EM_OPERAND_NONE;
}

static const void* data_of(const em_trunk_view* v, const em_tensor_entry* e) {
  return v->data + (e->offset - v->data_offset);
}

/* Whether the entry holds `dtype` with exactly the shape dims[0..ndim). */
static int shape_is(const em_tensor_entry* e, uint32_t dtype, uint32_t ndim, const uint32_t* dims) {
  uint64_t count = 1;
  if (e->dtype != dtype || e->ndim != ndim) return 0;
  for (uint32_t i = 0; i < ndim; i++) {
    if (e->shape[i] != dims[i]) return 0;
    count *= dims[i];
  }
  return e->nbytes == count * DTYPE_BYTES[dtype];
}

static const em_tensor_entry* at(const em_trunk_view* v, uint32_t index, const char* what) {
  if (index < v->n) return &v->entries[index];
  if (index == EM_OPERAND_NONE)
    snprintf(v->err, v->err_len, "trunk.bin: the layer program lacks the %s; recompile the artifact", what);
  else
    snprintf(v->err, v->err_len, "trunk.bin: the layer program names tensor %u for the %s, of %u; recompile the "
             "artifact", index, what, v->n);
  return NULL;
}

const float* em_bind_vector(const em_trunk_view* v, uint32_t index, uint32_t rows, uint32_t cols, const char* what) {
  const em_tensor_entry* e = at(v, index, what);
  uint32_t dims[2] = {rows, cols};
  if (!e) return NULL;
  if (shape_is(e, F32, cols ? 2 : 1, dims)) return (const float*)data_of(v, e);
  snprintf(v->err, v->err_len, "trunk.bin: tensor '%s' (the %s) is not float32 [%u%s%.0u]; recompile the artifact",
           e->name, what, rows, cols ? ", " : "", cols);
  return NULL;
}

const uint32_t* em_bind_words(const em_trunk_view* v, uint32_t index, uint32_t* count) {
  const em_tensor_entry* e = at(v, index, "layer program");
  if (!e || e->dtype != U32 || e->ndim != 1) return NULL;
  *count = e->shape[0];
  return (const uint32_t*)data_of(v, e);
}

/* Whether codes and scales have the shapes of m's bits and layout (m->group is set from the scales). */
static int quantized_shapes(const em_tensor_entry* codes, const em_tensor_entry* scales, em_matrix* m) {
  uint32_t b = m->bits, rows = m->rows, cols = m->cols;
  if (!(b == 2 || b == 4 || b == 8) || cols % (32 / b) || !scales || scales->ndim != (m->tiled ? 3u : 2u)) return 0;
  uint32_t groups = scales->shape[1];
  if (!groups || cols % groups) return 0;
  m->group = cols / groups;
  if (m->tiled) {
    uint32_t tiles = rows / EM_TILE_ROWS, code_dims[3] = {tiles, cols * b / 32, EM_TILE_ROWS},
             scale_dims[3] = {tiles, groups, EM_TILE_ROWS};
    return rows % EM_TILE_ROWS == 0 && shape_is(codes, U32, 3, code_dims) && shape_is(scales, F16, 3, scale_dims);
  }
  uint32_t code_dims[2] = {rows, b == 8 ? cols : cols * b / 32}, scale_dims[2] = {rows, groups};
  return shape_is(codes, b == 8 ? I8 : U32, 2, code_dims) && shape_is(scales, F16, 2, scale_dims);
}

int em_bind_matrix(const em_trunk_view* v, uint32_t index, uint32_t scales_index, uint32_t rows, uint32_t cols,
                   const char* what, em_matrix* m) {
  const em_tensor_entry* e = at(v, index, what);
  if (!e) return 0;
  memset(m, 0, sizeof *m);
  m->rows = rows, m->cols = cols, m->bits = e->bits ? e->bits : 32, m->codes = data_of(v, e);
  int ok;
  if (m->bits == 32) {
    uint32_t dims[2] = {rows, cols};
    ok = scales_index == EM_OPERAND_NONE && shape_is(e, F32, 2, dims);
  } else {
    const em_tensor_entry* se = scales_index < v->n ? &v->entries[scales_index] : NULL;
    m->tiled = v->tiled;
    m->int4_grid = v->int4_grid;
    ok = quantized_shapes(e, se, m);
    if (ok) m->scales = (const uint16_t*)data_of(v, se);
  }
  if (!ok)
    snprintf(v->err, v->err_len, "trunk.bin: matrix '%s' (the %s) is not a [%u, %u] matrix of this layout and "
             "bitwidth; recompile the artifact", e->name, what, rows, cols);
  return ok;
}
