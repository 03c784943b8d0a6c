#include "mla.h"

#include "edgemoe.h"
#include "generated/program.h"
#include "matrix.h"

/* A kernel call of signature SIG, returning on failure (matrix.h: BIND, T). */
#define INVOKE(fn, name, args, SIG)                                                      \
  do {                                                                                   \
    int rc_ = em_kernel_invoke(fn, name, args, EM_SIG_##SIG##_ARGS, err, n);             \
    if (rc_) return rc_;                                                                 \
  } while (0)

int em_mla_attention(const em_kernels* k, const em_trunk_header* th, const em_step* st, const em_mla_buffers* b,
                     float* xn, const em_kv_cache* kv, uint32_t pos, char* err, size_t n) {
  int64_t heads = th->heads, d = th->head_dim, R = th->kv_lora, Q = th->q_lora, qk = th->qk_nope + th->head_dim;
  int64_t wkv_b_rows = heads * (th->qk_nope + th->v_head);
  em_kernel_arg a[EM_SIG_MLA_ROPE_ARGS] = {0}; /* the widest signature here */
  float* q_in = xn;
  if (Q) { /* the q bottleneck: q_a, its RMSNorm, then q_b */
    int rc = em_matvec(k->mla_q_a, EM_KERNEL_MLA_Q_A, &st->m[EM_M_Q_A], xn, NULL, b->q_a, err, n);
    if (rc) return rc;
    BIND(a, NORM, X, T(b->q_a, 1, Q, 0, 0));
    BIND(a, NORM, W, T(st->q_a_norm, 1, Q, 0, 0));
    BIND(a, NORM, Y, T(b->q_a_norm, 1, Q, 0, 0));
    INVOKE(k->mla_q_a_norm, EM_KERNEL_MLA_Q_A_NORM, a, NORM);
    q_in = b->q_a_norm;
  }
  int rc = em_matvec(k->mla_q, EM_KERNEL_MLA_Q, &st->m[EM_M_Q], q_in, NULL, b->q, err, n);
  if (!rc) rc = em_matvec(k->mla_kv_a, EM_KERNEL_MLA_KV_A, &st->m[EM_M_KV_A], xn, NULL, b->ckv, err, n);
  if (rc) return rc;
  /* the cache row: the normalised latent, and the shared key's rotated dims */
  BIND(a, NORM, X, T(b->ckv, 1, R, 0, 0));
  BIND(a, NORM, W, T(st->kv_a_norm, 1, R, 0, 0));
  BIND(a, NORM, Y, T(em_kv_key_out(kv, st->layer, pos), 1, R, 0, 0));
  INVOKE(k->mla_kv_norm, EM_KERNEL_MLA_KV_NORM, a, NORM);
  BIND(a, MLA_ROPE, Q, T(b->q, 1, heads * qk, 0, 0));
  BIND(a, MLA_ROPE, KR, T(b->ckv + R, 1, d, 0, 0));
  BIND(a, MLA_ROPE, COS, T(st->rope_cos + pos * (d / 2), 1, d / 2, 0, 0));
  BIND(a, MLA_ROPE, SIN, T(st->rope_sin + pos * (d / 2), 1, d / 2, 0, 0));
  BIND(a, MLA_ROPE, Q_ROT, T(b->q_rot, 2, heads, d, 0));
  BIND(a, MLA_ROPE, K_ROT, T(em_kv_value_out(kv, st->layer, pos), 1, d, 0, 0));
  INVOKE(k->mla_rope, EM_KERNEL_MLA_ROPE, a, MLA_ROPE);
  em_kv_commit(kv, st->layer, pos);
  BIND(a, MLA_ABSORB, Q, T(b->q, 1, heads * qk, 0, 0));
  BIND(a, MLA_ABSORB, WKV_B, T(st->wkv_b, 2, wkv_b_rows, R, 0));
  BIND(a, MLA_ABSORB, Q_LAT, T(b->q_lat, 2, heads, R, 0));
  INVOKE(k->mla_absorb, EM_KERNEL_MLA_ABSORB, a, MLA_ABSORB);
  BIND(a, MLA_ATTENTION, Q_LAT, T(b->q_lat, 2, heads, R, 0));
  BIND(a, MLA_ATTENTION, Q_ROT, T(b->q_rot, 2, heads, d, 0));
  BIND(a, MLA_ATTENTION, LATENT, em_kv_arg(kv, em_kv_key(kv, st->layer, 0), pos + 1, R, 0));
  BIND(a, MLA_ATTENTION, K_ROT, em_kv_arg(kv, em_kv_value(kv, st->layer, 0), pos + 1, d, 0));
  BIND(a, MLA_ATTENTION, O_LAT, T(b->o_lat, 2, heads, R, 0));
  INVOKE(k->mla_attention, EM_KERNEL_MLA_ATTENTION, a, MLA_ATTENTION);
  BIND(a, MLA_V, O_LAT, T(b->o_lat, 2, heads, R, 0));
  BIND(a, MLA_V, WKV_B, T(st->wkv_b, 2, wkv_b_rows, R, 0));
  BIND(a, MLA_V, ATT, T(b->att, 1, heads * th->v_head, 0, 0));
  INVOKE(k->mla_v, EM_KERNEL_MLA_V, a, MLA_V);
  return EM_OK;
}
