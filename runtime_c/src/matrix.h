/* A weight matrix of the trunk as trunk.bin stores it: float32, or quantized in the experts'
 * packed layout (docs/FORMAT.md) with float16 group scales. */
#ifndef EM_MATRIX_H
#define EM_MATRIX_H

#include <stdint.h>

#include "kernels.h"

typedef struct {
  const void* codes;      /* bits 32: float32 [rows, cols]; 8: int8 [rows, cols]; 2/4: uint32 [rows, cols·bits/32] */
  const uint16_t* scales; /* float16 [rows, cols / group]; NULL for float32 */
  uint32_t bits, rows, cols, group;
} em_matrix;

/* Row r of m, dequantized into out[cols] (the embedding lookup). */
void em_matrix_row(const em_matrix* m, uint32_t r, float* out);

/* The matrix's kernel arguments into out: 1 (float32 weights) or 2 (codes, scales); returns how many. */
int em_matrix_args(const em_matrix* m, em_arg* out);

float em_f16_to_f32(uint16_t h);

#endif
