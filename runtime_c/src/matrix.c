#define _POSIX_C_SOURCE 200809L
#include "matrix.h"

#include <stdio.h>
#include <string.h>

#include "artifact.h"
#include "clock.h"
#include "edgemoe.h"
#include "generated/program.h"
#include "pacer.h"

float em_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13); /* inf, nan */
  } else if (exp) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (!man) {
    bits = sign;
  } else { /* subnormal: shift the mantissa up to an implicit leading one */
    exp = 113;
    while (!(man & 0x400u)) man <<= 1, exp--;
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t em_f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);    /* nan */
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7bffu);   /* would round to inf (or is): ±65504 */
  if (a <= 0x33000000u) return (uint16_t)sign;               /* at most half the least subnormal: ±0 */
  uint32_t e = a >> 23, mant, shift;
  if (e >= 113) { /* normal: rebias the exponent, keep 10 of the 23 mantissa bits */
    mant = ((e - 112) << 23 | (a & 0x7fffffu)), shift = 13;
  } else { /* subnormal: the mantissa with its leading one, in units of 2^-24 */
    mant = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
  }
  uint32_t h = mant >> shift, rest = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1u))) h++; /* to nearest, ties to even (a carry moves the exponent) */
  return (uint16_t)(sign | h);
}

/* Words per interleaved block: must agree with compiler/quantize.py interleave(). */
static uint32_t interleave(uint32_t bits, uint32_t k, uint32_t group) {
  uint32_t per = bits == 8 ? 1 : 32 / bits, lanes = 16;
  while (lanes > 1 && (group % lanes || k % (lanes * per))) lanes /= 2;
  return lanes;
}

/* The unsigned code that stands for zero below 8 bits (compiler/quantize.py code_centre): (2^b - 1) / 2 on the
 * half-integer grid, 8 for INT4 on the integer one. */
static float code_centre(const em_matrix* m) {
  if (m->bits == 4 && m->int4_grid == EM_GRID_INTEGER) return 8.0f;
  return (float)((1u << m->bits) - 1) / 2.0f;
}

/* Tiles layout: word (t, w, i) holds row 16t + i; its byte m, bit field j, holds column w·p + 4j + m. */
static void tiled_row(const em_matrix* m, uint32_t r, float* out) {
  uint32_t K = m->cols, b = m->bits, per = 32 / b, words = K / per, groups = K / m->group, mask = (1u << b) - 1;
  uint32_t t = r / EM_TILE_ROWS, i = r % EM_TILE_ROWS;
  float centre = b == 8 ? 128.0f : code_centre(m);
  const uint32_t* w = (const uint32_t*)m->codes + (uint64_t)t * words * EM_TILE_ROWS + i;
  const uint16_t* scale = m->scales + (uint64_t)t * groups * EM_TILE_ROWS + i;
  for (uint32_t c = 0; c < K; c++) {
    uint32_t within = c % per, j = within / 4, byte = within % 4;
    uint32_t code = (w[(c / per) * EM_TILE_ROWS] >> (8 * byte + j * b)) & mask;
    out[c] = ((float)code - centre) * em_f16_to_f32(scale[(c / m->group) * EM_TILE_ROWS]);
  }
}

void em_matrix_row(const em_matrix* m, uint32_t r, float* out) {
  uint32_t K = m->cols;
  if (m->bits == 32) {
    memcpy(out, (const float*)m->codes + (uint64_t)r * K, K * sizeof(float));
    return;
  }
  if (m->bits == 16) {
    const uint16_t* h = (const uint16_t*)m->codes + (uint64_t)r * K;
    for (uint32_t c = 0; c < K; c++) out[c] = em_f16_to_f32(h[c]);
    return;
  }
  if (m->tiled) {
    tiled_row(m, r, out);
    return;
  }
  const uint16_t* scale = m->scales + (uint64_t)r * (K / m->group);
  if (m->bits == 8) {
    const int8_t* q = (const int8_t*)m->codes + (uint64_t)r * K;
    for (uint32_t c = 0; c < K; c++) out[c] = (float)q[c] * em_f16_to_f32(scale[c / m->group]);
    return;
  }
  /* column t·L·p + j·L + i is in word t·L + i at bit j·bits */
  uint32_t b = m->bits, per = 32 / b, L = interleave(b, K, m->group), mask = (1u << b) - 1;
  float centre = code_centre(m);
  const uint32_t* w = (const uint32_t*)m->codes + (uint64_t)r * (K / per);
  for (uint32_t c = 0; c < K; c++) {
    uint32_t t = c / (L * per), j = c % (L * per) / L, i = c % L;
    uint32_t code = (w[t * L + i] >> (j * b)) & mask;
    out[c] = ((float)code - centre) * em_f16_to_f32(scale[c / m->group]);
  }
}

int em_matrix_args(const em_matrix* m, em_arg* out) {
  em_dl_dtype i8 = {0, 8, 1}, u32 = {1, 32, 1}, f16 = {2, 16, 1};
  if (m->bits == 32) {
    out[0] = em_f32((void*)m->codes, 2, m->rows, m->cols, 0);
    return 1;
  }
  if (m->bits == 16) {
    out[0] = em_typed((void*)m->codes, f16, 2, m->rows, m->cols, 0);
    return 1;
  }
  if (m->tiled) {
    out[0] = em_typed((void*)m->codes, u32, 3, m->rows / EM_TILE_ROWS, m->cols * m->bits / 32, EM_TILE_ROWS);
    out[1] = em_typed((void*)m->scales, f16, 3, m->rows / EM_TILE_ROWS, m->cols / m->group, EM_TILE_ROWS);
  } else {
    out[0] = m->bits == 8 ? em_typed((void*)m->codes, i8, 2, m->rows, m->cols, 0)
                          : em_typed((void*)m->codes, u32, 2, m->rows, m->cols * m->bits / 32, 0);
    out[1] = em_typed((void*)m->scales, f16, 2, m->rows, m->cols / m->group, 0);
  }
  return 2;
}

em_kernel_arg em_tensor_arg(em_arg tensor) {
  em_kernel_arg a = {tensor, NULL, 1};
  return a;
}

em_kernel_arg em_matrix_arg(const em_matrix* m) {
  em_kernel_arg a;
  memset(&a, 0, sizeof a);
  a.matrix = m;
  a.bound = 1;
  return a;
}

#define EM_MAX_KERNEL_PARAMS EM_SIG_MAX_PARAMS

int em_kernel_invoke(em_ffi_fn fn, const char* name, const em_kernel_arg* args, int n, char* err, size_t len) {
  em_arg params[EM_MAX_KERNEL_PARAMS];
  int count = 0;
  for (int i = 0; i < n; i++) {
    if (!args[i].bound || count + (args[i].matrix ? 2 : 1) > EM_MAX_KERNEL_PARAMS) {
      snprintf(err, len, "kernel %s: argument %d of %d %s (a runtime defect)", name, i, n,
               args[i].bound ? "exceeds the parameter limit" : "was never bound");
      return EM_ERR_KERNEL;
    }
    if (args[i].matrix)
      count += em_matrix_args(args[i].matrix, params + count);
    else
      params[count++] = args[i].tensor;
  }
  em_pacer* pacer = em_pacer_current();
  if (!em_pacer_on(pacer)) return em_kernel_call(fn, name, params, count, err, len);
  uint64_t t0 = em_now_ns();
  int rc = em_kernel_call(fn, name, params, count, err, len);
  em_pacer_account(pacer, args, n, em_now_ns() - t0);
  return rc;
}

/* Arguments at the indices compiler/program.py's SIGNATURES give them (generated/program.h). */
int em_matvec_rows(em_ffi_fn fn, const char* name, const em_matrix* w, uint32_t rows, float* x, float* res, float* y,
                   char* err, size_t n) {
  em_kernel_arg a[EM_SIG_MATVEC_RESIDUAL_ARGS] = {0};
  if (!res) {
    a[EM_SIG_MATVEC_W] = em_matrix_arg(w);
    a[EM_SIG_MATVEC_X] = ROWS(x, rows, w->cols);
    a[EM_SIG_MATVEC_Y] = ROWS(y, rows, w->rows);
    return em_kernel_invoke(fn, name, a, EM_SIG_MATVEC_ARGS, err, n);
  }
  a[EM_SIG_MATVEC_RESIDUAL_W] = em_matrix_arg(w);
  a[EM_SIG_MATVEC_RESIDUAL_X] = ROWS(x, rows, w->cols);
  a[EM_SIG_MATVEC_RESIDUAL_RES] = ROWS(res, rows, w->rows);
  a[EM_SIG_MATVEC_RESIDUAL_Y] = ROWS(y, rows, w->rows);
  return em_kernel_invoke(fn, name, a, EM_SIG_MATVEC_RESIDUAL_ARGS, err, n);
}

int em_matvec(em_ffi_fn fn, const char* name, const em_matrix* w, float* x, float* res, float* y, char* err,
              size_t n) {
  return em_matvec_rows(fn, name, w, 1, x, res, y, err, n);
}
