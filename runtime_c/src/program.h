/* The layer program of an artifact (trunk.bin's "program" tensor, written by compiler/program.py):
 * the ops one token goes through, bound to the trunk's tensors and checked against the model's
 * shapes and the kernels the artifact carries, before the first token. The decode loop
 * (session.c) walks the bound steps; it knows no model family. */
#ifndef EM_PROGRAM_H
#define EM_PROGRAM_H

#include <stddef.h>
#include <stdint.h>

#include "artifact.h"
#include "kernels.h"
#include "matrix.h"
#include "trunk_view.h"

/* Matrices of a step, by op: EMBED and FINAL: the embedding / LM head; ATTENTION and REL_ATTENTION:
 * qkv, output; CROSS_ATTENTION: q, output, kv; MOE: the router (float32), then the shared expert's
 * gate, up and down projections and gate; DENSE_FFN: up, down, gate. */
enum { EM_M_EMBED = 0, EM_M_QKV = 0, EM_M_WO = 1, EM_M_ROUTER = 0, EM_M_SHARED_GATE_PROJ = 1, EM_M_SHARED_UP = 2,
       EM_M_SHARED_DOWN = 3, EM_M_SHARED_GATE = 4, EM_M_CROSS_Q = 0, EM_M_CROSS_KV = 2, EM_M_DENSE_UP = 0,
       EM_M_DENSE_DOWN = 1, EM_M_DENSE_GATE = 2, EM_M_COUNT = 5 };

typedef struct {
  uint32_t op, layer;
  uint32_t kind;      /* ATTENTION: EM_QK_NORM_*; MOE: EM_ROUTE_* */
  uint32_t norm_kind; /* ATTENTION, MOE, FINAL: EM_NORM_* (norm_bias bound for EM_NORM_LAYER) */
  const float *norm, *norm_bias, *bias, *q_norm, *k_norm, *rope_cos, *rope_sin, *o_bias;
  /* bias: ATTENTION: the qkv projection's; FINAL: the LM head's (NULL: none) */
  int shared, shared_gated; /* MOE: a shared expert, scaled by sigmoid(gate · x) */
  float scale;              /* EMBED: multiplies the embedding row; FINAL: the logits (1: none) */
  float route_threshold;    /* MOE, EM_ROUTE_SPARSEMIXER: the relative margin of each pick's softmax */
  uint32_t capacity;        /* MOE: tokens of one pass an expert takes (0: no limit) */
  uint32_t next_moe;        /* EMBED: the layer (of those with experts) its stack reaches first, or NONE */
  uint32_t act;             /* DENSE_FFN: EM_ACT_* */
  const float* position_bias; /* REL_ATTENTION: [rows, heads] by distance (program.py) */
  int bidirectional;          /* REL_ATTENTION: 1 in the encoder, 0 (causal) in the decoder */
  em_matrix m[EM_M_COUNT];
} em_step;

typedef struct {
  em_step* steps;
  uint32_t n_steps;
  const em_step** moe; /* [layers]: each layer's MOE step (for the predictors) */
  /* An encoder-decoder's encoder is steps [0, encoder_out], ENCODER_OUT its last; the decoder the
     steps after it. Decoder-only: encoder_out NONE, decoder_first 0. */
  uint32_t encoder_out, decoder_first;
} em_program;

/* Bytes em_program_bind needs in `storage` for a program of `steps` ops over `layers` layers with experts. */
size_t em_program_bytes(uint32_t steps, uint32_t layers);
/* Binds the program's operands to the trunk's tensors; EM_OK or EM_ERR_FORMAT / EM_ERR_KERNEL
 * with the reason in v->err (an op out of place, an operand of the wrong shape, a kernel the
 * artifact lacks). */
int em_program_bind(const em_trunk_view* v, const em_trunk_header* th, const em_kernels* k, void* storage,
                    em_program* p);

#endif
