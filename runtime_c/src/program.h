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
 * qkv, output; MLA_ATTENTION: q (or q_b), output, the q bottleneck's q_a, kv_a; CROSS_ATTENTION: q,
 * output, kv; MOE: the router (float32), then the shared expert's gate, up and down projections and
 * gate; DENSE_FFN: the same three projections as the shared expert (no gate for ReLU). */
enum { EM_M_EMBED = 0, EM_M_QKV = 0, EM_M_WO = 1, EM_M_Q = 0, EM_M_Q_A = 2, EM_M_KV_A = 3, EM_M_ROUTER = 0,
       EM_M_SHARED_GATE_PROJ = 1, EM_M_SHARED_UP = 2, EM_M_SHARED_DOWN = 3, EM_M_SHARED_GATE = 4, EM_M_CROSS_Q = 0,
       EM_M_CROSS_KV = 2, EM_M_COUNT = 5 };

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
  uint32_t next_moe;        /* self-attention: the expert layer of its layer's MOE, or NONE (a dense layer) */
  uint32_t act;             /* DENSE_FFN: EM_ACT_* */
  const float* position_bias; /* REL_ATTENTION: [rows, heads] by distance (program.py) */
  int bidirectional;          /* REL_ATTENTION: 1 in the encoder, 0 (causal) in the decoder */
  /* MOE: the layer's experts in experts.bin; the chosen weights' scale; only the route_topk_groups
     best of route_groups groups (scored as EM_GROUP_SCORE_*) eligible; a bias for choosing (NULL: none) */
  uint32_t expert_layer, route_groups, route_topk_groups, group_score;
  float route_scale;
  const float* router_bias;
  const float *q_a_norm, *kv_a_norm, *wkv_b; /* MLA_ATTENTION (q_a_norm NULL without a q bottleneck) */
  em_matrix m[EM_M_COUNT];
  uint32_t window;     /* ATTENTION: positions attended to, the query's own included (0: all) */
  const float* sinks;  /* ATTENTION: [heads] logits joining each head's softmax denominator (NULL: none) */
  const float* router_logit_bias; /* MOE: [experts], added to the router's logits (NULL: none) */
  uint32_t expert_act;      /* MOE: EM_ACT_*, which kernels the routed experts call */
  /* MOE, EM_ACT_CLAMPED_SWIGLU: [experts][inter] gate and up biases, [experts][hidden] down */
  const float *expert_gate_bias, *expert_up_bias, *expert_down_bias;
} em_step;

typedef struct {
  em_step* steps;
  uint32_t n_steps;
  uint32_t expert_layers; /* the layers with experts (MOE steps), experts.bin's layers */
  const em_step** moe;    /* [expert_layers]: each expert layer's MOE step (for the predictors) */
  /* An encoder-decoder's encoder is steps [0, encoder_out], ENCODER_OUT its last; the decoder the
     steps after it. Decoder-only: encoder_out NONE, decoder_first 0. */
  uint32_t encoder_out, decoder_first;
} em_program;

/* Bytes em_program_bind needs in `storage` for a program of `steps` ops over `layers` layers with experts. */
size_t em_program_bytes(uint32_t steps, uint32_t layers);
/* Binds the program's operands to the trunk's tensors; EM_OK or EM_ERR_FORMAT / EM_ERR_KERNEL
 * with the reason in v->err (an op out of place, an operand of the wrong shape, a kernel the
 * artifact lacks). */
int em_program_bind(const em_trunk_view* v, const em_trunk_header* th, uint32_t expert_layers, const em_kernels* k,
                    void* storage, em_program* p);

#endif
