#include "ffn.h"

#include "generated/program.h"
#include "kernels.h"

#define INVOKE(fn, name, args, SIG) em_kernel_invoke(fn, name, args, EM_SIG_##SIG##_ARGS, err, n)

/* The block over `rows` inputs through gate_up and down (the decode kernels, or the batched ones). */
static int ffn_rows(const em_ffn_block* f, em_ffi_fn gate_up, em_ffi_fn down, uint32_t rows, const float* x, float* h,
                    const float* res, float* weight, float* y, char* err, size_t n) {
  em_kernel_arg a[EM_SIG_FFN_GATE_UP_BIAS_ARGS] = {0};
  const em_matrix *wg = f->gated ? &f->gate : NULL, *wu = &f->up, *wd = &f->down_w;
  int rc;
  if (!wg) {
    BIND(a, FFN_UP, X, ROWS(x, rows, wu->cols));
    BIND(a, FFN_UP, UP, em_matrix_arg(wu));
    BIND(a, FFN_UP, H, ROWS(h, rows, wu->rows));
    rc = INVOKE(gate_up, f->gate_up_name, a, FFN_UP);
  } else if (f->gate_bias) {
    BIND(a, FFN_GATE_UP_BIAS, X, ROWS(x, rows, wg->cols));
    BIND(a, FFN_GATE_UP_BIAS, GATE, em_matrix_arg(wg));
    BIND(a, FFN_GATE_UP_BIAS, UP, em_matrix_arg(wu));
    BIND(a, FFN_GATE_UP_BIAS, GATE_BIAS, T(f->gate_bias, 1, wg->rows, 0, 0));
    BIND(a, FFN_GATE_UP_BIAS, UP_BIAS, T(f->up_bias, 1, wu->rows, 0, 0));
    BIND(a, FFN_GATE_UP_BIAS, H, ROWS(h, rows, wg->rows));
    rc = INVOKE(gate_up, f->gate_up_name, a, FFN_GATE_UP_BIAS);
  } else {
    BIND(a, FFN_GATE_UP, X, ROWS(x, rows, wg->cols));
    BIND(a, FFN_GATE_UP, GATE, em_matrix_arg(wg));
    BIND(a, FFN_GATE_UP, UP, em_matrix_arg(wu));
    BIND(a, FFN_GATE_UP, H, ROWS(h, rows, wg->rows));
    rc = INVOKE(gate_up, f->gate_up_name, a, FFN_GATE_UP);
  }
  if (rc) return rc;
  if (f->down_bias) {
    BIND(a, FFN_DOWN_BIAS, H, ROWS(h, rows, wd->cols));
    BIND(a, FFN_DOWN_BIAS, DOWN, em_matrix_arg(wd));
    BIND(a, FFN_DOWN_BIAS, DOWN_BIAS, T(f->down_bias, 1, wd->rows, 0, 0));
    BIND(a, FFN_DOWN_BIAS, RES, ROWS(res, rows, wd->rows));
    BIND(a, FFN_DOWN_BIAS, WEIGHT, T(weight, 1, rows, 0, 0));
    BIND(a, FFN_DOWN_BIAS, Y, ROWS(y, rows, wd->rows));
    return INVOKE(down, f->down_name, a, FFN_DOWN_BIAS);
  }
  BIND(a, FFN_DOWN, H, ROWS(h, rows, wd->cols));
  BIND(a, FFN_DOWN, DOWN, em_matrix_arg(wd));
  BIND(a, FFN_DOWN, RES, ROWS(res, rows, wd->rows));
  BIND(a, FFN_DOWN, WEIGHT, T(weight, 1, rows, 0, 0));
  BIND(a, FFN_DOWN, Y, ROWS(y, rows, wd->rows));
  return INVOKE(down, f->down_name, a, FFN_DOWN);
}

int em_ffn_call(const em_ffn_block* f, const float* x, float* h, const float* res, float* weight, float* y,
                char* err, size_t n) {
  return ffn_rows(f, f->gate_up, f->down, 1, x, h, res, weight, y, err, n);
}

int em_ffn_call_batch(const em_ffn_block* f, const float* x, float* h, const float* res, float* weights, float* y,
                      char* err, size_t n) {
  return ffn_rows(f, f->gate_up_batch, f->down_batch, EM_BATCH_ROWS, x, h, res, weights, y, err, n);
}
