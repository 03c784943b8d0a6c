/* One feed-forward block through its two kernels: h = act(gate·x, up·x) (plus biases where the
 * block has them), then y = res + weight · (down·h) (plus the down bias). Used for the shared
 * expert, dense layers and each routed expert (expert_lanes.c). */
#ifndef EM_FFN_H
#define EM_FFN_H

#include <stddef.h>

#include "matrix.h"
#include "tvm_abi.h"

typedef struct {
  em_ffi_fn gate_up, down;
  const char *gate_up_name, *down_name;
  em_matrix gate, up, down_w;
  int gated; /* 0: a ReLU block, up only (gate unused) */
  const float *gate_bias, *up_bias, *down_bias; /* all NULL or all set (clamped SwiGLU) */
  em_ffi_fn gate_up_batch, down_batch; /* the same over EM_BATCH_ROWS inputs at once; NULL: none */
} em_ffn_block;

/* h: [up rows] scratch; weight: one float the down kernel reads (the caller stores the weight
 * there); res and y: [down rows] (y may not alias res). EM_OK or EM_ERR_KERNEL with the reason. */
int em_ffn_call(const em_ffn_block* f, const float* x, float* h, const float* res, float* weight, float* y,
                char* err, size_t n);
/* The same for EM_BATCH_ROWS inputs through the batched kernels (f->gate_up_batch set): x [batch,
 * gate cols], h [batch, up rows], res [batch, down rows], weights [batch], y [batch, down rows]. Each
 * row of y is the same bits as em_ffn_call gives for that row. */
int em_ffn_call_batch(const em_ffn_block* f, const float* x, float* h, const float* res, float* weights, float* y,
                      char* err, size_t n);

#endif
