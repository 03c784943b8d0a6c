/* A weight matrix as the artifact stores it: float32, or quantized codes with float16 group
 * scales in the rows or the tiles layout (docs/FORMAT.md). */
#ifndef EM_MATRIX_H
#define EM_MATRIX_H

#include <stdint.h>

#include "kernels.h"

typedef struct {
  /* bits 32: float32 [rows, cols]; 16: float16 [rows, cols] (no scales). Rows layout: int8 [rows, cols]
     at 8 bits, uint32 [rows, cols·bits/32] below. Tiles layout: uint32 [rows/16, cols·bits/32, 16]. */
  const void* codes;
  const uint16_t* scales; /* float16 [rows, cols / group], tiles: [rows/16, cols / group, 16]; NULL for float32 */
  uint32_t bits, rows, cols, group;
  uint32_t tiled;     /* tiles layout */
  uint32_t int4_grid; /* EM_GRID_* of INT4 codes */
} em_matrix;

#define EM_TILE_ROWS 16

/* Row r of m, dequantized into out[cols] (the embedding lookup). */
void em_matrix_row(const em_matrix* m, uint32_t r, float* out);

/* The matrix's kernel arguments into out: 1 (float32 or float16 weights) or 2 (codes, scales); returns how many. */
int em_matrix_args(const em_matrix* m, em_arg* out);

/* One argument of a kernel signature (compiler/program.py SIGNATURES; its index is the generated
 * EM_SIG_<SIGNATURE>_<PARAM>): a tensor, or a matrix that becomes its one or two parameters. */
typedef struct {
  em_arg tensor;
  const em_matrix* matrix; /* non-NULL: a matrix argument */
  int bound;
} em_kernel_arg;

em_kernel_arg em_tensor_arg(em_arg tensor);
em_kernel_arg em_matrix_arg(const em_matrix* m);

/* Kernel arguments go to the indices compiler/program.py's SIGNATURES give them (generated/program.h);
 * T: a float32 tensor argument. */
#define BIND(args, SIG, PARAM, value) ((args)[EM_SIG_##SIG##_##PARAM] = (value))
#define T(data, ndim, d0, d1, d2) em_tensor_arg(em_f32((void*)(data), ndim, d0, d1, d2))
/* `rows` rows of cols floats: a vector for one row (the decode kernels), else [rows, cols] (batched) */
#define ROWS(data, rows, cols) ((rows) == 1 ? T(data, 1, cols, 0, 0) : T(data, 2, rows, cols, 0))

/* Calls fn with the signature's n arguments, matrices expanded; an unbound argument is refused. */
int em_kernel_invoke(em_ffi_fn fn, const char* name, const em_kernel_arg* args, int n, char* err, size_t len);

float em_f16_to_f32(uint16_t h);
/* f as float16: to nearest, ties to even, saturated at ±65504 (NumPy's astype after np.clip). */
uint16_t em_f32_to_f16(float f);

/* y = W x (+ res) through the matrix-vector kernel fn, whatever W's storage; 0 or an em_status with
 * the reason in err. */
int em_matvec(em_ffi_fn fn, const char* name, const em_matrix* w, float* x, float* res, float* y, char* err,
              size_t n);
/* The same for `rows` rows of x, res and y at once through a batched matrix-vector kernel. */
int em_matvec_rows(em_ffi_fn fn, const char* name, const em_matrix* w, uint32_t rows, float* x, float* res, float* y,
                   char* err, size_t n);

#endif
