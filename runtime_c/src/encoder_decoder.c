#include "encoder_decoder.h"

#include <stdio.h>
#include <string.h>

#include "clock.h"
#include "generated/program.h"
#include "session.h"

/* s->pos_bias [heads][n]: the step's position bias for query position `query` over keys 0..n-1,
 * from its table by distance (row key - query + max_positions - 1, or query - key). */
static void gather_bias(em_session* s, const em_step* st, uint32_t query, uint32_t n) {
  uint32_t heads = s->th.heads, S = s->th.max_positions;
  for (uint32_t u = 0; u < n; u++) {
    const float* row = st->position_bias + (size_t)(st->bidirectional ? u + S - 1 - query : query - u) * heads;
    for (uint32_t h = 0; h < heads; h++) s->pos_bias[(size_t)h * n + u] = row[h];
  }
}

/* The normalised row x projected to q, k and v (no rotation: positions enter as the bias). */
static int project(em_session* s, const em_step* st, const float* x, float* q, float* k_row, float* v_row) {
  int rc = em_apply_norm(s, st, x, s->xn);
  if (!rc) rc = em_session_matvec(s, s->k.qkv, EM_KERNEL_QKV, &st->m[EM_M_QKV], s->xn, NULL, s->qkv);
  if (rc) return rc;
  memcpy(q, s->qkv, s->q_dim * sizeof(float));
  memcpy(k_row, s->qkv + s->q_dim, s->kv_dim * sizeof(float));
  memcpy(v_row, s->qkv + s->q_dim + s->kv_dim, s->kv_dim * sizeof(float));
  return EM_OK;
}

/* out = x + Wo · attention(q over n rows of kc, vc, the gathered bias added to the scores). */
static int attend(em_session* s, const em_step* st, float* q, float* kc, float* vc, uint32_t n, float* x, float* out) {
  int64_t hq = s->th.heads, hkv = s->th.kv_heads, d = s->th.head_dim;
  em_kernel_arg a[EM_SIG_ATTENTION_BIAS_ARGS] = {0};
  BIND(a, ATTENTION_BIAS, Q, T(q, 2, hq, d, 0));
  BIND(a, ATTENTION_BIAS, KC, T(kc, 3, n, hkv, d));
  BIND(a, ATTENTION_BIAS, VC, T(vc, 3, n, hkv, d));
  BIND(a, ATTENTION_BIAS, BIAS, T(s->pos_bias, 2, hq, n, 0));
  BIND(a, ATTENTION_BIAS, O, T(s->att, 2, hq, d, 0));
  int rc = INVOKE(s->k.attention_bias, EM_KERNEL_ATTENTION_BIAS, a, ATTENTION_BIAS);
  return rc ? rc : em_session_matvec(s, s->k.o_proj, EM_KERNEL_O_PROJ, &st->m[EM_M_WO], s->att, x, out);
}

/* layer's keys or values, self- or cross-attention: float32 (trunk.bin refuses a float16 KV cache with an encoder) */
static float* kv_slot(em_session* s, void* cache, uint32_t layer) {
  return (float*)cache + (size_t)layer * s->max_seq * s->kv_dim;
}

int em_rel_attention(em_session* s, const em_step* st) {
  float *kc = kv_slot(s, s->kv.k, st->layer), *vc = kv_slot(s, s->kv.v, st->layer);
  int rc = project(s, st, s->x, s->q, kc + (size_t)s->pos * s->kv_dim, vc + (size_t)s->pos * s->kv_dim);
  if (rc) return rc;
  gather_bias(s, st, s->pos, s->pos + 1);
  rc = attend(s, st, s->q, kc, vc, s->pos + 1, s->x, s->x2);
  if (!rc) em_swap(&s->x, &s->x2);
  return rc;
}

int em_cross_attention(em_session* s, const em_step* st) {
  int64_t hq = s->th.heads, hkv = s->th.kv_heads, d = s->th.head_dim, n = s->enc_len;
  int rc = em_apply_norm(s, st, s->x, s->xn);
  if (!rc) rc = em_session_matvec(s, s->k.cross_q, EM_KERNEL_CROSS_Q, &st->m[EM_M_CROSS_Q], s->xn, NULL, s->q);
  if (rc) return rc;
  em_kernel_arg a[EM_SIG_ATTENTION_ARGS] = {0};
  BIND(a, ATTENTION, Q, T(s->q, 2, hq, d, 0));
  BIND(a, ATTENTION, KC, T(kv_slot(s, s->cross_k, st->layer), 3, n, hkv, d));
  BIND(a, ATTENTION, VC, T(kv_slot(s, s->cross_v, st->layer), 3, n, hkv, d));
  BIND(a, ATTENTION, O, T(s->att, 2, hq, d, 0));
  rc = INVOKE(s->k.attention, EM_KERNEL_ATTENTION, a, ATTENTION);
  if (!rc) rc = em_session_matvec(s, s->k.o_proj, EM_KERNEL_O_PROJ, &st->m[EM_M_WO], s->att, s->x, s->x2);
  if (!rc) em_swap(&s->x, &s->x2);
  return rc;
}

/* A per-token op (feed-forward block) over every encoder row t: the row as the residual stream; MoE
 * steps a batch of rows at a time (prefill.c), each expert the batch chose read once. */
static int each_row(em_session* s, const em_step* st, uint32_t n) {
  size_t H = s->th.hidden;
  if (st->op == EM_OP_MOE) memset(s->taken, 0, s->th.experts * sizeof *s->taken); /* the input is one pass */
  if (st->op == EM_OP_MOE && s->prefill_tokens > 1) {
    for (uint32_t t = 0; t < n; t += s->prefill_tokens) {
      int rc = em_moe_rows(s, st, s->enc_x + t * H, n - t < s->prefill_tokens ? n - t : s->prefill_tokens, 0);
      if (rc) return rc;
    }
    return EM_OK;
  }
  for (uint32_t t = 0; t < n; t++) {
    float* row = s->enc_x + t * H;
    memcpy(s->x, row, H * sizeof(float));
    int rc = st->op == EM_OP_MOE ? em_moe_layer(s, st) : em_dense_ffn(s, st);
    if (rc) return rc;
    memcpy(row, s->x, H * sizeof(float));
  }
  return EM_OK;
}

/* Bidirectional attention over the n encoder rows: every row's q, k and v first (k and v into
 * the layer's KV slot, free until the decoder runs), then every row's attention. */
static int encoder_attention(em_session* s, const em_step* st, uint32_t n) {
  size_t H = s->th.hidden, q = s->q_dim, kv = s->kv_dim;
  float *kc = kv_slot(s, s->kv.k, st->layer), *vc = kv_slot(s, s->kv.v, st->layer);
  for (uint32_t t = 0; t < n; t++) {
    int rc = project(s, st, s->enc_x + t * H, s->enc_q + t * q, kc + t * kv, vc + t * kv);
    if (rc) return rc;
  }
  for (uint32_t t = 0; t < n; t++) {
    gather_bias(s, st, t, n);
    int rc = attend(s, st, s->enc_q + t * q, kc, vc, n, s->enc_x + t * H, s->x2);
    if (rc) return rc;
    memcpy(s->enc_x + t * H, s->x2, H * sizeof(float));
  }
  return EM_OK;
}

/* The encoder's output rows normalised, and from them every cross-attention step's k and v. */
static int encoder_out(em_session* s, const em_step* st, uint32_t n) {
  size_t H = s->th.hidden, kv = s->kv_dim;
  for (uint32_t t = 0; t < n; t++) {
    int rc = em_apply_norm(s, st, s->enc_x + t * H, s->xn);
    if (rc) return rc;
    memcpy(s->enc_x + t * H, s->xn, H * sizeof(float));
  }
  for (uint32_t i = s->prog.decoder_first; i < s->prog.n_steps; i++) {
    const em_step* c = &s->prog.steps[i];
    if (c->op != EM_OP_CROSS_ATTENTION) continue;
    for (uint32_t t = 0; t < n; t++) {
      int rc = em_session_matvec(s, s->k.cross_kv, EM_KERNEL_CROSS_KV, &c->m[EM_M_CROSS_KV], s->enc_x + t * H, NULL, s->qkv);
      if (rc) return rc;
      memcpy(kv_slot(s, s->cross_k, c->layer) + t * kv, s->qkv, kv * sizeof(float));
      memcpy(kv_slot(s, s->cross_v, c->layer) + t * kv, s->qkv + kv, kv * sizeof(float));
    }
  }
  return EM_OK;
}

static int run_steps(em_session* s, const int32_t* tokens, uint32_t n) {
  size_t H = s->th.hidden;
  for (uint32_t i = 0; i <= s->prog.encoder_out; i++) {
    const em_step* st = &s->prog.steps[i];
    int rc = EM_OK;
    switch (st->op) {
      case EM_OP_EMBED:
        for (uint32_t t = 0; t < n; t++) {
          em_matrix_row(&st->m[EM_M_EMBED], (uint32_t)tokens[t], s->enc_x + t * H);
          if (st->scale != 1.0f) em_scale_vector(s->enc_x + t * H, (int64_t)H, st->scale);
        }
        break;
      case EM_OP_REL_ATTENTION: rc = encoder_attention(s, st, n); break;
      case EM_OP_MOE:
      case EM_OP_DENSE_FFN: rc = each_row(s, st, n); break;
      case EM_OP_ENCODER_OUT: rc = encoder_out(s, st, n); break;
    }
    if (rc) return rc;
  }
  return EM_OK;
}

int em_run_encoder(em_session* s, const int32_t* tokens, size_t n) {
  if (n > s->max_seq) {
    snprintf(s->err, ERR_LEN, "the encoder input holds %zu tokens, more than the context of %u (open with a larger "
             "max_seq)", n, s->max_seq);
    return EM_ERR_ARGUMENT;
  }
  for (size_t t = 0; t < n; t++)
    if (tokens[t] < 0 || (uint32_t)tokens[t] >= s->th.vocab) {
      snprintf(s->err, ERR_LEN, "token id %d out of range [0, %u)", tokens[t], s->th.vocab);
      return EM_ERR_ARGUMENT;
    }
  em_stats before, after;
  uint64_t t_start = em_now_ns();
  em_loader_stats(&s->loader, &before);
  em_arena_bind(&s->arena);
  em_pool_bind(s->pool);
  s->pos = s->enc_len = 0; /* a new input: the decoder starts again */
  s->in_encoder = 1;
  int rc = run_steps(s, tokens, (uint32_t)n);
  s->in_encoder = 0;
  if (rc) return rc;
  s->enc_len = (uint32_t)n;
  em_loader_stats(&s->loader, &after);
  s->st.tokens += n;
  s->st.compute_ns += (em_now_ns() - t_start) - (after.stall_ns - before.stall_ns);
  return EM_OK;
}
