/* Typed views of the tensors of a loaded trunk.bin: vectors and weight matrices by table index,
 * each checked against the shape its user needs (docs/FORMAT.md). */
#ifndef EM_TRUNK_VIEW_H
#define EM_TRUNK_VIEW_H

#include <stddef.h>
#include <stdint.h>

#include "artifact.h"
#include "matrix.h"

typedef struct {
  const em_tensor_entry* entries;
  uint32_t n;
  const uint8_t* data;  /* the data region as loaded */
  uint64_t data_offset; /* of the data region in the file */
  int tiled;            /* quantized matrices in the tiles layout */
  uint32_t int4_grid;   /* EM_GRID_* of its INT4 matrices */
  char* err;
  size_t err_len;
} em_trunk_view;

/* Index of the tensor called `name`, or EM_OPERAND_NONE. */
uint32_t em_tensor_index(const em_trunk_view* v, const char* name);
/* The float32 tensor `index` as [rows] (cols 0) or [rows, cols]; NULL with the reason in v->err. */
const float* em_bind_vector(const em_trunk_view* v, uint32_t index, uint32_t rows, uint32_t cols, const char* what);
/* The [rows, cols] matrix of codes `index` and scales `scales_index` (EM_OPERAND_NONE for float32);
 * 0 with the reason in v->err. */
int em_bind_matrix(const em_trunk_view* v, uint32_t index, uint32_t scales_index, uint32_t rows, uint32_t cols,
                   const char* what, em_matrix* m);
/* The uint32 tensor `index` of any length: its words and their count; NULL if of another type. */
const uint32_t* em_bind_words(const em_trunk_view* v, uint32_t index, uint32_t* count);

#endif
