/* The session's state, shared by the decode loop (session.c) and the executors of the
 * encoder-decoder ops (encoder_decoder.c); not part of the public API. */
#ifndef EM_SESSION_H
#define EM_SESSION_H

#include <stdint.h>

#include "artifact.h"
#include "edgemoe.h"
#include "expert_cache.h"
#include "expert_lanes.h"
#include "ffn.h"
#include "generated/program.h"
#include "kernels.h"
#include "kv_cache.h"
#include "loader.h"
#include "matrix.h"
#include "mla.h"
#include "pacer.h"
#include "program.h"
#include "storage.h"
#include "thread_pool.h"
#include "tvm_backend.h"

#define ERR_LEN 1280 /* room for a path (up to 1024) and the message */
#define MAX_TOP_K 64
#define EM_GUESS_ABSENT 0x80000000u /* on a predicted expert id: a prefetch would have to read it */

struct em_session {
  em_trunk_header th;
  em_image_header ih;
  em_record* records; /* [layers * experts] */
  em_program prog;   /* the layer program, bound to the trunk's tensors */
  em_kernels k;
  em_storage* experts;
  em_expert_cache cache;
  em_loader loader;
  int loader_ready;
  int holds_all; /* every expert resident (em_loader_holds_all): no prediction can help any more */
  em_arena arena;
  em_pool* pool; /* compute threads for the kernels' parallel loops */
  em_predictor predictor; /* resolved: never EM_PREDICT_AUTO */
  em_eviction eviction;   /* resolved: never EM_EVICT_AUTO */
  uint32_t n_predict;     /* experts prefetched per layer (with a margin: at most) */
  float prefetch_margin;  /* em_params.prefetch_margin */
  uint32_t prefetch_layers; /* em_params.prefetch_layers, at least 1 */
  const float* path_table; /* [layers][experts][experts], from trunk.bin when compiled with calibration */
  const float* frequency;  /* [layers][experts] */
  /* fitted-router predictor: [layers][experts][hidden] on the current state, the same on the layer's
     previous-token MoE input, and [layers][experts] bias */
  const float *fitted_router, *fitted_prev, *fitted_bias;
  /* the same maps fitted for guesses two or more layers ahead (NULL in artifacts compiled before them:
     the maps above are used there too) */
  const float *ahead_router, *ahead_prev, *ahead_bias;
  /* per distance ahead (1..prefetch_layers), the last prediction made for each layer: [distance - 1]
     [layers][n_predict] experts, EM_GUESS_ABSENT set on those neither resident nor in flight when
     named, and [distance - 1][layers] how many it named (0 once scored) */
  uint32_t* predicted;
  uint16_t* named;
  /* per distance ahead: experts named, and of them used at their layer (the precision that prefetch
     admission weighs a guess by; expert_cache.h em_cache_claim_prefetch); the same for the absent
     ones, which a prefetch would read (whether prefetching pays: em_loader_prefetch) */
  uint64_t named_total[4], named_used[4], absent_total[4], absent_used[4];

  uint8_t* block; /* the one allocation: trunk, KV cache, buffers, arena, cache slots */
  float *x, *x2, *xn, *qkv, *qkv2, *q, *att, *h, *router_logits, *logits, *expert_weight, *shared_logit;
  /* a layer's chosen experts, of one token or each of a prompt's batch (prefill.c): their blocks, gate
     weights and weighted outputs [hidden] (expert_lanes.h), top_k per token, and the tasks that run
     them; zero: [hidden] zeros, the residual their down kernels add to */
  em_ffn_block* expert_blocks;
  em_expert_task* expert_tasks;
  em_task_run* expert_runs; /* em_experts_run's scratch, as many as the tasks */
  float *expert_weights, *expert_out, *zero;
  /* a prompt's batch: tokens run through each layer together (em_params.prefill_tokens, at most the
     context; 1: token by token), their residual streams and MoE inputs [batch][hidden], their chosen
     experts [batch][top_k] and how many each has, a layer's distinct experts' records [batch * top_k]
     and the order they run in */
  uint32_t prefill_tokens;
  float *batch_x, *batch_xn;
  uint32_t *batch_experts, *batch_records, *batch_order, *batch_counts;
  int batched; /* running a batch: no predictions (a layer's experts are known before they run) */
  uint32_t expert_lanes; /* chosen experts computed at once (em_expert_lanes) */
  /* a lane's inputs at once: EM_BATCH_ROWS where a batch holds that many tokens and the artifact has
     batched expert kernels, else 1 */
  uint32_t batch_rows;
  /* the batched kernel calls' rows [batch_rows][...] (prefill.c; empty where batch_rows is 1): inputs,
     q/k/v, residuals, attention outputs, outputs, MLP activations, weights */
  struct {
    float *xn, *qkv, *res, *att, *y, *h, *w;
  } rows;
  float *pred_xn, *pred_scores, *pred_prev; /* the next-router predictor's own buffers */
  float* prev_xn; /* [expert layers][hidden]: each layer's MoE input at the previous token (fitted-router) */
  float* route_scratch; /* [3 * experts] */
  em_mla_buffers mla;   /* latent attention's working buffers (empty without it) */
  em_kv_cache kv; /* [kv_layers][max_seq] positions (kv_cache.h) */
  /* encoder-decoder models: the cross-attention keys and values [cross_layers][max_seq][kv_dim]; the
     encoder's rows [max_seq][hidden] (its output, normalised, once it has run) and their q
     [max_seq][q_dim]; the position bias of one query [heads][max_seq] */
  float *cross_k, *cross_v, *enc_x, *enc_q, *pos_bias;
  uint32_t* taken;    /* [experts]: tokens each expert took in this pass (expert capacity) */
  uint32_t enc_len;   /* the encoder's input length (0: not run since open or reset) */
  int in_encoder;     /* running the encoder: no prefetching or route trace (its layers run per row) */
  uint32_t max_seq, pos, q_dim, kv_dim;
  uint64_t record_bytes;

  uint32_t* route_trace; /* em_route_trace's buffer, NULL when not tracing */
  uint32_t trace_max, trace_tokens;

  em_pacer pacer; /* the emulated board's compute timing (off unless em_params asks for it) */
  em_stats st;
  char err[ERR_LEN];
};

/* The accounting of a pass over tokens: the loader's counters and the clock when it began. */
typedef struct {
  em_stats before;
  uint64_t t_start;
} em_pass;

/* A kernel call of signature SIG through the session (matrix.h: BIND, T). */
#define INVOKE(fn, name, args, SIG) em_session_kernel(s, fn, name, args, EM_SIG_##SIG##_ARGS)

/* y = W x (+ res) through a matrix-vector kernel, whatever W's storage; errors into s->err. */
/* A kernel call through the session: the error into s->err, then a read in flight progressed (bare metal). */
int em_session_kernel(em_session* s, em_ffi_fn fn, const char* name, const em_kernel_arg* args, int n_args);
int em_session_matvec(em_session* s, em_ffi_fn fn, const char* name, const em_matrix* w, float* x, float* res,
                      float* y);
/* A dense layer's feed-forward block (DENSE_FFN): norm, then its SwiGLU or ReLU MLP added to s->x. */
int em_dense_ffn(em_session* s, const em_step* st);
/* The resident MLP of step st: a DENSE_FFN step's, or a MOE step's shared expert (kernels, matrices;
 * the batched kernels where batch_rows > 1 and the artifact has both). */
em_ffn_block em_resident_block(const em_session* s, const em_step* st);
/* The shared expert's weight for the normalised input xn: sigmoid(gate · xn) where gated, else 1. */
int em_shared_weight(em_session* s, const em_step* st, const float* xn, float* weight);
/* Attention step st at s->pos from one token's q, k and v (qkv_in [q_dim + 2 kv_dim]): q/k norm, RoPE,
 * its key and value into the KV cache, each head's attention over the positions it sees, into att. */
int em_attention_core(em_session* s, const em_step* st, float* qkv_in, float* att);
/* The residual the output projection adds to: x, or x + the output bias into scratch ([hidden]). */
int em_output_residual(em_session* s, const em_step* st, float* x, float* scratch, float** res);
/* out = the step's norm of x: RMSNorm (weight) or LayerNorm (weight and bias), as its norm_kind says. */
int em_apply_norm(em_session* s, const em_step* st, const float* x, float* out);
/* The MoE block of step st for the residual stream s->x (the result in s->x). */
int em_moe_layer(em_session* s, const em_step* st);
/* Its routing: norm s->x into s->xn, the router, the chosen experts idx[*n] and their weights (those
 * past an expert's capacity dropped); the choice recorded at route-trace row trace_row. */
int em_moe_route(em_session* s, const em_step* st, uint32_t trace_row, uint32_t* idx, float* wts, uint32_t* n);
/* The shared expert: every token, resident weights, its output added to the residual stream s->x
 * (scaled by sigmoid(gate · xn) where gated). */
int em_shared_expert(em_session* s, const em_step* st);
/* Waits for one chosen expert's record and describes its feed-forward block (its kernels at the
 * record's bitwidth, its matrices in the record, its rows of the layer's expert biases). */
int em_chosen_expert(em_session* s, const em_step* st, uint32_t expert, em_ffn_block* out);
/* Runs expert tasks (their records resident): several at once on the compute threads where there are
 * lanes, else one after another with each kernel's loops split over the threads. */
int em_run_expert_tasks(em_session* s, const em_expert_task* tasks, uint32_t n);
/* One step of the layer program for one token on s->x (EM_OP_MOE: this token alone). */
int em_token_step(em_session* s, const em_step* st, int32_t token, int want_logits);
/* EM_ERR_ARGUMENT, with the reason in s->err, unless these tokens can be fed from s->pos on. */
int em_check_tokens(em_session* s, const int32_t* tokens, size_t n);
/* A pass over `tokens` tokens begins (the compute threads and arena bound to the caller) and ends
 * (positions, route trace, counters and compute time advanced). */
void em_pass_begin(em_session* s, em_pass* p);
void em_pass_end(em_session* s, const em_pass* p, uint32_t tokens);
/* n (>= 2) checked tokens of a prompt through the layer program together (prefill.c). */
int em_prefill_batch(em_session* s, const int32_t* tokens, uint32_t n, int want_logits);
/* The MoE step st for n (<= prefill_tokens) residual streams rows[n][hidden] together: each routed
 * (its shared expert added), the distinct experts they chose read in groups that fit the cache's
 * slots, a group's reads issued together, and each expert run for its rows as its record arrives,
 * their outputs added in each row's router order. pass_per_token: the expert capacity's count starts
 * again for each row (else the caller starts it for the pass). */
int em_moe_rows(em_session* s, const em_step* st, float* rows, uint32_t n, int pass_per_token);

static inline uint32_t em_record_of(const em_session* s, uint32_t layer, uint32_t expert) {
  return layer * s->th.experts + expert;
}

static inline void em_scale_vector(float* x, int64_t n, float scale) {
  for (int64_t i = 0; i < n; i++) x[i] *= scale;
}

static inline void em_swap(float** a, float** b) {
  float* t = *a;
  *a = *b;
  *b = t;
}

#endif
