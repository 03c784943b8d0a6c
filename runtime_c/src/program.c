#include "program.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "edgemoe.h"
#include "generated/program.h"

size_t em_program_bytes(uint32_t steps, uint32_t layers) {
  return (size_t)steps * sizeof(em_step) + (size_t)layers * sizeof(em_step*);
}

typedef struct {
  const em_trunk_view* v;
  const em_trunk_header* th;
  const uint32_t* operand;
  char what[96];
} binder;

static const char* OP_NAMES[] = {"?", "EMBED", "ATTENTION", "MOE", "FINAL", "MLA_ATTENTION", "DENSE_FFN",
                                  "ENCODER_OUT", "REL_ATTENTION", "CROSS_ATTENTION"};
#define N_OPS (sizeof OP_NAMES / sizeof OP_NAMES[0])

static const char* label(binder* b, uint32_t layer, const char* part) {
  if (layer == EM_OPERAND_NONE) snprintf(b->what, sizeof b->what, "%s", part);
  else snprintf(b->what, sizeof b->what, "layer %u's %s", layer, part);
  return b->what;
}

/* An optional float32 vector operand: NULL (absent) or bound; *ok cleared on a bad one. */
static const float* optional_vector(binder* b, uint32_t slot, uint32_t len, uint32_t layer, const char* part,
                                    int* ok) {
  if (b->operand[slot] == EM_OPERAND_NONE) return NULL;
  const float* p = em_bind_vector(b->v, b->operand[slot], len, 0, label(b, layer, part));
  if (!p) *ok = 0;
  return p;
}

/* A float32 operand (its bits as the word), which must be finite; *ok cleared otherwise. */
static float float_operand(binder* b, uint32_t slot, const char* part, int* ok) {
  float f;
  uint32_t word = b->operand[slot];
  memcpy(&f, &word, sizeof f);
  if (!isfinite(f)) {
    snprintf(b->v->err, b->v->err_len, "trunk.bin: the layer program's %s is not a finite number (0x%08X); recompile",
             part, word);
    *ok = 0;
  }
  return f;
}

static int need_kernel(binder* b, em_ffi_fn fn, const char* symbol, uint32_t layer, const char* why) {
  if (fn) return 1;
  snprintf(b->v->err, b->v->err_len, "kernels.so lacks %s, which %s needs; recompile the artifact", symbol,
           label(b, layer, why));
  return 0;
}

/* The step's norm: its kind (norm_kind operand), weight and, for LayerNorm, bias; EM_OK or EM_ERR_FORMAT. */
static int bind_norm(binder* b, em_step* s, uint32_t kind_slot, uint32_t norm_slot, uint32_t bias_slot,
                     const char* part) {
  uint32_t L = s->layer, H = b->th->hidden;
  const uint32_t* o = b->operand;
  s->norm_kind = o[kind_slot];
  if (s->norm_kind != EM_NORM_RMS && s->norm_kind != EM_NORM_LAYER) {
    snprintf(b->v->err, b->v->err_len, "trunk.bin: %s: unknown norm kind %u; recompile the artifact",
             label(b, L, part), s->norm_kind);
    return EM_ERR_FORMAT;
  }
  if (!(s->norm = em_bind_vector(b->v, o[norm_slot], H, 0, label(b, L, part)))) return EM_ERR_FORMAT;
  char what[64];
  snprintf(what, sizeof what, "%s bias", part);
  if (s->norm_kind == EM_NORM_RMS) {
    if (o[bias_slot] == EM_OPERAND_NONE) return EM_OK;
    snprintf(b->v->err, b->v->err_len, "trunk.bin: %s, which an RMSNorm does not have; recompile the artifact",
             label(b, L, what));
    return EM_ERR_FORMAT;
  }
  return (s->norm_bias = em_bind_vector(b->v, o[bias_slot], H, 0, label(b, L, what))) ? EM_OK : EM_ERR_FORMAT;
}

/* need_kernel for a kernel that reads the KV cache: its symbol ends with the cache type's suffix. */
static int need_kv_kernel(binder* b, const em_kernels* k, em_ffi_fn fn, const char* base, uint32_t layer,
                          const char* why) {
  char symbol[64];
  snprintf(symbol, sizeof symbol, "%s%s", base, k->kv_suffix);
  return need_kernel(b, fn, symbol, layer, why);
}

/* The kernel of the step's norm (bound by bind_norm) is in kernels.so. */
static int need_norm_kernel(binder* b, const em_kernels* k, const em_step* s, const char* part) {
  return s->norm_kind == EM_NORM_LAYER ? need_kernel(b, k->layernorm, EM_KERNEL_LAYERNORM, s->layer, part)
                                       : need_kernel(b, k->rmsnorm, EM_KERNEL_RMSNORM, s->layer, part);
}

static int bind_attention(binder* b, const em_kernels* k, em_step* s) {
  const em_trunk_header* th = b->th;
  const uint32_t* o = b->operand;
  uint32_t L = s->layer, H = th->hidden, d = th->head_dim, q = th->heads * d, kv = th->kv_heads * d;
  int ok = 1;
  s->kind = o[EM_ATTENTION_QK_NORM];
  int rc = bind_norm(b, s, EM_ATTENTION_NORM_KIND, EM_ATTENTION_NORM, EM_ATTENTION_NORM_BIAS, "attention norm");
  if (rc) return rc;
  ok = em_bind_matrix(b->v, o[EM_ATTENTION_WQKV], o[EM_ATTENTION_WQKV_SCALES], q + 2 * kv, H,
                      label(b, L, "qkv projection"), &s->m[EM_M_QKV]) &&
       em_bind_matrix(b->v, o[EM_ATTENTION_WO], o[EM_ATTENTION_WO_SCALES], H, q, label(b, L, "output projection"),
                      &s->m[EM_M_WO]) &&
       (s->rope_cos = em_bind_vector(b->v, o[EM_ATTENTION_ROPE_COS], th->max_positions, d / 2, "RoPE cos table")) &&
       (s->rope_sin = em_bind_vector(b->v, o[EM_ATTENTION_ROPE_SIN], th->max_positions, d / 2, "RoPE sin table"));
  s->bias = ok ? optional_vector(b, EM_ATTENTION_QKV_BIAS, q + 2 * kv, L, "qkv bias", &ok) : NULL;
  s->o_bias = ok ? optional_vector(b, EM_ATTENTION_O_BIAS, H, L, "output bias", &ok) : NULL;
  s->sinks = ok ? optional_vector(b, EM_ATTENTION_SINKS, th->heads, L, "attention sinks", &ok) : NULL;
  s->window = o[EM_ATTENTION_WINDOW]; /* any count: a window at least the context is full attention */
  if (ok && s->kind != EM_QK_NORM_NONE) {
    int head = s->kind == EM_QK_NORM_HEAD;
    if (s->kind != EM_QK_NORM_HEAD && s->kind != EM_QK_NORM_FULL) {
      snprintf(b->v->err, b->v->err_len, "trunk.bin: layer %u: unknown q/k norm %u; recompile the artifact", L,
               s->kind);
      return EM_ERR_FORMAT;
    }
    ok = (s->q_norm = em_bind_vector(b->v, o[EM_ATTENTION_Q_NORM], head ? d : q, 0, label(b, L, "q norm"))) &&
         (s->k_norm = em_bind_vector(b->v, o[EM_ATTENTION_K_NORM], head ? d : kv, 0, label(b, L, "k norm")));
    if (ok && !need_kernel(b, k->qk_norm, EM_KERNEL_QK_NORM, L, "q/k norm")) return EM_ERR_KERNEL;
  }
  if (!ok) return EM_ERR_FORMAT;
  if (!need_norm_kernel(b, k, s, "attention norm") ||
      !need_kernel(b, s->bias ? k->qkv_bias : k->qkv, s->bias ? EM_KERNEL_QKV_BIAS : EM_KERNEL_QKV, L,
                   "qkv projection") ||
      !need_kernel(b, k->rope, EM_KERNEL_ROPE, L, "RoPE") ||
      !need_kv_kernel(b, k, s->sinks ? k->attention_sinks : k->attention,
                      s->sinks ? EM_KERNEL_ATTENTION_SINKS : EM_KERNEL_ATTENTION, L, "attention") ||
      (s->o_bias && !need_kernel(b, k->add, EM_KERNEL_ADD, L, "output bias")))
    return EM_ERR_KERNEL;
  return EM_OK;
}

/* The MOE step's router logit bias and its routed experts' activation and biases (the biased activations'). */
static int bind_routed_experts(binder* b, const em_kernels* k, em_step* s) {
  const em_trunk_header* th = b->th;
  const uint32_t* o = b->operand;
  uint32_t L = s->layer, E = th->experts;
  int ok = 1;
  s->router_logit_bias = optional_vector(b, EM_MOE_ROUTER_LOGIT_BIAS, E, L, "router logit bias", &ok);
  if (!ok) return EM_ERR_FORMAT;
  if (s->router_logit_bias && !need_kernel(b, k->router_bias, EM_KERNEL_ROUTER_BIAS, L, "router logit bias"))
    return EM_ERR_KERNEL;
  s->expert_act = o[EM_MOE_EXPERT_ACT];
  if (s->expert_act >= EM_ACT_COUNT) {
    snprintf(b->v->err, b->v->err_len, "trunk.bin: layer %u: unknown expert activation %u; recompile the artifact",
             L, s->expert_act);
    return EM_ERR_FORMAT;
  }
  int biased = s->expert_act == EM_ACT_CLAMPED_SWIGLU;
  if (!biased) {
    if (o[EM_MOE_EXPERT_GATE_BIAS] == EM_OPERAND_NONE && o[EM_MOE_EXPERT_UP_BIAS] == EM_OPERAND_NONE &&
        o[EM_MOE_EXPERT_DOWN_BIAS] == EM_OPERAND_NONE)
      return EM_OK;
    snprintf(b->v->err, b->v->err_len, "trunk.bin: %s, which SwiGLU and ReLU experts do not have; recompile the artifact",
             label(b, L, "expert biases"));
    return EM_ERR_FORMAT;
  }
  ok = (s->expert_gate_bias = em_bind_vector(b->v, o[EM_MOE_EXPERT_GATE_BIAS], E, th->inter,
                                             label(b, L, "expert gate biases"))) &&
       (s->expert_up_bias = em_bind_vector(b->v, o[EM_MOE_EXPERT_UP_BIAS], E, th->inter,
                                           label(b, L, "expert up biases"))) &&
       (s->expert_down_bias = em_bind_vector(b->v, o[EM_MOE_EXPERT_DOWN_BIAS], E, th->hidden,
                                             label(b, L, "expert down biases")));
  return ok ? EM_OK : EM_ERR_FORMAT;
}

static int bind_moe(binder* b, const em_kernels* k, em_step* s) {
  const em_trunk_header* th = b->th;
  const uint32_t* o = b->operand;
  uint32_t L = s->layer, H = th->hidden, S = th->shared_inter;
  s->kind = o[EM_MOE_ROUTE];
  if (s->kind != EM_ROUTE_SOFTMAX_TOPK && s->kind != EM_ROUTE_SOFTMAX_TOPK_RENORM && s->kind != EM_ROUTE_SPARSEMIXER &&
      s->kind != EM_ROUTE_SIGMOID_TOPK && s->kind != EM_ROUTE_SIGMOID_TOPK_RENORM && s->kind != EM_ROUTE_TOPK_SOFTMAX) {
    snprintf(b->v->err, b->v->err_len, "trunk.bin: layer %u: unknown routing function %u; recompile the artifact", L,
             s->kind);
    return EM_ERR_FORMAT;
  }
  int ok = 1;
  s->capacity = o[EM_MOE_CAPACITY];
  s->route_threshold = float_operand(b, EM_MOE_ROUTE_THRESHOLD, label(b, L, "routing threshold"), &ok);
  s->route_scale = ok ? float_operand(b, EM_MOE_ROUTE_SCALE, label(b, L, "routing scale"), &ok) : 0.0f;
  if (!ok) return EM_ERR_FORMAT;
  s->route_groups = o[EM_MOE_ROUTE_GROUPS];
  s->route_topk_groups = o[EM_MOE_ROUTE_TOPK_GROUPS];
  s->group_score = o[EM_MOE_GROUP_SCORE];
  uint32_t G = s->route_groups, per = G ? th->experts / G : 0;
  /* groups must split the experts evenly, the eligible ones hold top-k, a top-2 score needs pairs */
  if (!G || th->experts % G || !s->route_topk_groups || s->route_topk_groups > G ||
      (uint64_t)s->route_topk_groups * per < th->top_k ||
      (s->group_score != EM_GROUP_SCORE_MAX && s->group_score != EM_GROUP_SCORE_TOP2) ||
      (G > 1 && s->group_score == EM_GROUP_SCORE_TOP2 && per < 2) ||
      (G > 1 && s->kind == EM_ROUTE_SPARSEMIXER) || !(s->route_scale > 0.0f)) {
    snprintf(b->v->err, b->v->err_len,
             "trunk.bin: layer %u: expert groups %u (top %u, score %u) or routing scale %g do not fit %u experts "
             "top-%u; recompile the artifact", L, G, s->route_topk_groups, s->group_score, (double)s->route_scale,
             th->experts, th->top_k);
    return EM_ERR_FORMAT;
  }
  s->router_bias = optional_vector(b, EM_MOE_ROUTER_BIAS, th->experts, L, "router bias", &ok);
  if (!ok) return EM_ERR_FORMAT;
  if (s->kind == EM_ROUTE_SPARSEMIXER && (th->top_k != 2 || !(s->route_threshold >= 0.0f))) {
    snprintf(b->v->err, b->v->err_len,
             "trunk.bin: layer %u: sparsemixer routing needs top-k 2 (the header says %u) and a threshold >= 0 "
             "(the program says %g); recompile the artifact", L, th->top_k, (double)s->route_threshold);
    return EM_ERR_FORMAT;
  }
  int rc = bind_norm(b, s, EM_MOE_NORM_KIND, EM_MOE_NORM, EM_MOE_NORM_BIAS, "MoE norm");
  if (rc) return rc;
  if (!em_bind_matrix(b->v, o[EM_MOE_ROUTER], EM_OPERAND_NONE, th->experts, H, label(b, L, "router"),
                      &s->m[EM_M_ROUTER]))
    return EM_ERR_FORMAT;
  rc = bind_routed_experts(b, k, s);
  if (rc) return rc;
  s->shared = o[EM_MOE_SHARED_GATE_PROJ] != EM_OPERAND_NONE;
  if (!s->shared) return need_norm_kernel(b, k, s, "MoE norm") ? EM_OK : EM_ERR_KERNEL;
  if (!S ||
      !em_bind_matrix(b->v, o[EM_MOE_SHARED_GATE_PROJ], o[EM_MOE_SHARED_GATE_PROJ_SCALES], S, H,
                      label(b, L, "shared expert gate projection"), &s->m[EM_M_SHARED_GATE_PROJ]) ||
      !em_bind_matrix(b->v, o[EM_MOE_SHARED_UP_PROJ], o[EM_MOE_SHARED_UP_PROJ_SCALES], S, H,
                      label(b, L, "shared expert up projection"), &s->m[EM_M_SHARED_UP]) ||
      !em_bind_matrix(b->v, o[EM_MOE_SHARED_DOWN_PROJ], o[EM_MOE_SHARED_DOWN_PROJ_SCALES], H, S,
                      label(b, L, "shared expert down projection"), &s->m[EM_M_SHARED_DOWN])) {
    if (!S) snprintf(b->v->err, b->v->err_len, "trunk.bin: a shared expert but no shared size in the header");
    return EM_ERR_FORMAT;
  }
  s->shared_gated = o[EM_MOE_SHARED_GATE] != EM_OPERAND_NONE;
  if (s->shared_gated && !em_bind_matrix(b->v, o[EM_MOE_SHARED_GATE], EM_OPERAND_NONE, 1, H,
                                         label(b, L, "shared expert gate"), &s->m[EM_M_SHARED_GATE]))
    return EM_ERR_FORMAT;
  if (!need_norm_kernel(b, k, s, "MoE norm") ||
      !need_kernel(b, k->shared_gate_up, EM_KERNEL_SHARED_GATE_UP, L, "shared expert") ||
      !need_kernel(b, k->shared_down, EM_KERNEL_SHARED_DOWN, L, "shared expert") ||
      (s->shared_gated && !need_kernel(b, k->shared_gate, EM_KERNEL_SHARED_GATE, L, "shared expert gate")))
    return EM_ERR_KERNEL;
  return EM_OK;
}

/* ---- encoder-decoder ops ---------------------------------------------------------------- */

static int bind_rel_attention(binder* b, const em_kernels* k, em_step* s) {
  const em_trunk_header* th = b->th;
  const uint32_t* o = b->operand;
  uint32_t L = s->layer, H = th->hidden, d = th->head_dim, q = th->heads * d, kv = th->kv_heads * d;
  s->bidirectional = (int)o[EM_REL_ATTENTION_BIDIRECTIONAL];
  int rc = bind_norm(b, s, EM_REL_ATTENTION_NORM_KIND, EM_REL_ATTENTION_NORM, EM_REL_ATTENTION_NORM_BIAS,
                     "attention norm");
  if (rc) return rc;
  uint32_t rows = s->bidirectional ? 2 * th->max_positions - 1 : th->max_positions;
  if (!em_bind_matrix(b->v, o[EM_REL_ATTENTION_WQKV], o[EM_REL_ATTENTION_WQKV_SCALES], q + 2 * kv, H,
                      label(b, L, "qkv projection"), &s->m[EM_M_QKV]) ||
      !em_bind_matrix(b->v, o[EM_REL_ATTENTION_WO], o[EM_REL_ATTENTION_WO_SCALES], H, q,
                      label(b, L, "output projection"), &s->m[EM_M_WO]) ||
      !(s->position_bias = em_bind_vector(b->v, o[EM_REL_ATTENTION_POSITION_BIAS], rows, th->heads,
                                          s->bidirectional ? "encoder position bias" : "decoder position bias")))
    return EM_ERR_FORMAT;
  if (!need_norm_kernel(b, k, s, "attention norm") || !need_kernel(b, k->qkv, EM_KERNEL_QKV, L, "qkv projection") ||
      !need_kernel(b, k->attention_bias, EM_KERNEL_ATTENTION_BIAS, L, "attention") ||
      !need_kernel(b, k->o_proj, EM_KERNEL_O_PROJ, L, "output projection"))
    return EM_ERR_KERNEL;
  return EM_OK;
}

/* Multi-head latent attention: the q path (a plain projection, or q_a, its norm and q_b), kv_a with
 * the latent's norm, the float32 wkv_b both halves of which the kernels read, the output projection. */
static int bind_mla_attention(binder* b, const em_kernels* k, em_step* s) {
  const em_trunk_header* th = b->th;
  const uint32_t* o = b->operand;
  uint32_t L = s->layer, H = th->hidden, d = th->head_dim, R = th->kv_lora, Q = th->q_lora, heads = th->heads;
  if (!R) {
    snprintf(b->v->err, b->v->err_len, "trunk.bin: layer %u has latent attention but the header no latent size; "
             "recompile the artifact", L);
    return EM_ERR_FORMAT;
  }
  int rc = bind_norm(b, s, EM_MLA_ATTENTION_NORM_KIND, EM_MLA_ATTENTION_NORM, EM_MLA_ATTENTION_NORM_BIAS,
                     "attention norm");
  if (rc) return rc;
  int ok = 1, has_q_a = o[EM_MLA_ATTENTION_WQ_A] != EM_OPERAND_NONE;
  if (has_q_a != (Q != 0)) {
    snprintf(b->v->err, b->v->err_len, "trunk.bin: layer %u's q bottleneck disagrees with the header's rank %u; "
             "recompile the artifact", L, Q);
    return EM_ERR_FORMAT;
  }
  if (Q)
    ok = em_bind_matrix(b->v, o[EM_MLA_ATTENTION_WQ_A], o[EM_MLA_ATTENTION_WQ_A_SCALES], Q, H,
                        label(b, L, "q_a projection"), &s->m[EM_M_Q_A]) &&
         (s->q_a_norm = em_bind_vector(b->v, o[EM_MLA_ATTENTION_Q_A_NORM], Q, 0, label(b, L, "q_a norm")));
  ok = ok &&
       em_bind_matrix(b->v, o[EM_MLA_ATTENTION_WQ], o[EM_MLA_ATTENTION_WQ_SCALES], heads * (th->qk_nope + d),
                      Q ? Q : H, label(b, L, "q projection"), &s->m[EM_M_Q]) &&
       em_bind_matrix(b->v, o[EM_MLA_ATTENTION_WKV_A], o[EM_MLA_ATTENTION_WKV_A_SCALES], R + d, H,
                      label(b, L, "kv_a projection"), &s->m[EM_M_KV_A]) &&
       (s->kv_a_norm = em_bind_vector(b->v, o[EM_MLA_ATTENTION_KV_A_NORM], R, 0, label(b, L, "kv_a norm"))) &&
       (s->wkv_b = em_bind_vector(b->v, o[EM_MLA_ATTENTION_WKV_B], heads * (th->qk_nope + th->v_head), R,
                                  label(b, L, "kv_b projection"))) &&
       em_bind_matrix(b->v, o[EM_MLA_ATTENTION_WO], o[EM_MLA_ATTENTION_WO_SCALES], H, heads * th->v_head,
                      label(b, L, "output projection"), &s->m[EM_M_WO]) &&
       (s->rope_cos = em_bind_vector(b->v, o[EM_MLA_ATTENTION_ROPE_COS], th->max_positions, d / 2, "RoPE cos table")) &&
       (s->rope_sin = em_bind_vector(b->v, o[EM_MLA_ATTENTION_ROPE_SIN], th->max_positions, d / 2, "RoPE sin table"));
  if (!ok) return EM_ERR_FORMAT;
  struct {
    em_ffi_fn fn;
    const char *symbol, *why;
  } need[] = {{k->mla_q, EM_KERNEL_MLA_Q, "q projection"},        {k->mla_kv_a, EM_KERNEL_MLA_KV_A, "kv_a projection"},
              {k->mla_kv_norm, EM_KERNEL_MLA_KV_NORM, "latent norm"}, {k->mla_rope, EM_KERNEL_MLA_ROPE, "RoPE"},
              {k->mla_absorb, EM_KERNEL_MLA_ABSORB, "attention"},
              {k->mla_v, EM_KERNEL_MLA_V, "attention"},            {k->o_proj, EM_KERNEL_O_PROJ, "output projection"},
              {Q ? k->mla_q_a : k->mla_q, Q ? EM_KERNEL_MLA_Q_A : EM_KERNEL_MLA_Q, "q projection"},
              {Q ? k->mla_q_a_norm : k->mla_q, Q ? EM_KERNEL_MLA_Q_A_NORM : EM_KERNEL_MLA_Q, "q norm"}};
  for (size_t i = 0; i < sizeof need / sizeof need[0]; i++)
    if (!need_kernel(b, need[i].fn, need[i].symbol, L, need[i].why)) return EM_ERR_KERNEL;
  if (!need_kv_kernel(b, k, k->mla_attention, EM_KERNEL_MLA_ATTENTION, L, "attention")) return EM_ERR_KERNEL;
  return need_norm_kernel(b, k, s, "attention norm") ? EM_OK : EM_ERR_KERNEL;
}

static int bind_cross_attention(binder* b, const em_kernels* k, em_step* s) {
  const em_trunk_header* th = b->th;
  const uint32_t* o = b->operand;
  uint32_t L = s->layer, H = th->hidden, d = th->head_dim, q = th->heads * d, kv = th->kv_heads * d;
  int rc = bind_norm(b, s, EM_CROSS_ATTENTION_NORM_KIND, EM_CROSS_ATTENTION_NORM, EM_CROSS_ATTENTION_NORM_BIAS,
                     "cross-attention norm");
  if (rc) return rc;
  if (!em_bind_matrix(b->v, o[EM_CROSS_ATTENTION_WQ], o[EM_CROSS_ATTENTION_WQ_SCALES], q, H,
                      label(b, L, "cross-attention q projection"), &s->m[EM_M_CROSS_Q]) ||
      !em_bind_matrix(b->v, o[EM_CROSS_ATTENTION_WKV], o[EM_CROSS_ATTENTION_WKV_SCALES], 2 * kv, H,
                      label(b, L, "cross-attention kv projection"), &s->m[EM_M_CROSS_KV]) ||
      !em_bind_matrix(b->v, o[EM_CROSS_ATTENTION_WO], o[EM_CROSS_ATTENTION_WO_SCALES], H, q,
                      label(b, L, "cross-attention output projection"), &s->m[EM_M_WO]))
    return EM_ERR_FORMAT;
  if (!need_norm_kernel(b, k, s, "cross-attention norm") ||
      !need_kernel(b, k->cross_q, EM_KERNEL_CROSS_Q, L, "cross-attention") ||
      !need_kernel(b, k->cross_kv, EM_KERNEL_CROSS_KV, L, "cross-attention") ||
      !need_kernel(b, k->attention, EM_KERNEL_ATTENTION, L, "cross-attention") ||
      !need_kernel(b, k->o_proj, EM_KERNEL_O_PROJ, L, "cross-attention"))
    return EM_ERR_KERNEL;
  return EM_OK;
}

/* A dense layer's MLP, resident at the trunk's bitwidth: SwiGLU (gate, up and down) or ReLU (up and
 * down, no gate). */
static int bind_dense_ffn(binder* b, const em_kernels* k, em_step* s) {
  const em_trunk_header* th = b->th;
  const uint32_t* o = b->operand;
  uint32_t L = s->layer, H = th->hidden, D = th->dense_inter;
  s->act = o[EM_DENSE_FFN_ACT];
  int gated = o[EM_DENSE_FFN_GATE_PROJ] != EM_OPERAND_NONE;
  if (!D || !(s->act == EM_ACT_SWIGLU ? gated : s->act == EM_ACT_RELU && !gated)) {
    snprintf(b->v->err, b->v->err_len, "trunk.bin: layer %u: a dense MLP of activation %u %s a gate%s; this runtime "
             "runs SwiGLU MLPs (with a gate) and ReLU ones (without) of the header's dense size; recompile the "
             "artifact", L, s->act, gated ? "with" : "without", D ? "" : ", but no dense size in the header");
    return EM_ERR_FORMAT;
  }
  int rc = bind_norm(b, s, EM_DENSE_FFN_NORM_KIND, EM_DENSE_FFN_NORM, EM_DENSE_FFN_NORM_BIAS, "MLP norm");
  if (rc) return rc;
  if ((gated && !em_bind_matrix(b->v, o[EM_DENSE_FFN_GATE_PROJ], o[EM_DENSE_FFN_GATE_PROJ_SCALES], D, H,
                                label(b, L, "MLP gate projection"), &s->m[EM_M_SHARED_GATE_PROJ])) ||
      !em_bind_matrix(b->v, o[EM_DENSE_FFN_UP_PROJ], o[EM_DENSE_FFN_UP_PROJ_SCALES], D, H,
                      label(b, L, "MLP up projection"), &s->m[EM_M_SHARED_UP]) ||
      !em_bind_matrix(b->v, o[EM_DENSE_FFN_DOWN_PROJ], o[EM_DENSE_FFN_DOWN_PROJ_SCALES], H, D,
                      label(b, L, "MLP down projection"), &s->m[EM_M_SHARED_DOWN]))
    return EM_ERR_FORMAT;
  if (!need_norm_kernel(b, k, s, "MLP norm") ||
      !(gated ? need_kernel(b, k->dense_gate_up, EM_KERNEL_DENSE_GATE_UP, L, "MLP")
              : need_kernel(b, k->dense_up_relu, EM_KERNEL_DENSE_UP_RELU, L, "MLP")) ||
      !need_kernel(b, k->dense_down, EM_KERNEL_DENSE_DOWN, L, "MLP"))
    return EM_ERR_KERNEL;
  return EM_OK;
}

/* ---- the program ------------------------------------------------------------------------ */

static uint32_t operand_count(uint32_t op) {
  switch (op) {
    case EM_OP_EMBED: return EM_OP_EMBED_OPERANDS;
    case EM_OP_ATTENTION: return EM_OP_ATTENTION_OPERANDS;
    case EM_OP_MOE: return EM_OP_MOE_OPERANDS;
    case EM_OP_FINAL: return EM_OP_FINAL_OPERANDS;
    case EM_OP_MLA_ATTENTION: return EM_OP_MLA_ATTENTION_OPERANDS;
    case EM_OP_ENCODER_OUT: return EM_OP_ENCODER_OUT_OPERANDS;
    case EM_OP_REL_ATTENTION: return EM_OP_REL_ATTENTION_OPERANDS;
    case EM_OP_CROSS_ATTENTION: return EM_OP_CROSS_ATTENTION_OPERANDS;
    default: return EM_OP_DENSE_FFN_OPERANDS;
  }
}

/* Where an op may stand: EMBED first (and first again after ENCODER_OUT), FINAL last; an
 * encoder-decoder's encoder (before ENCODER_OUT) holds bidirectional attention and feed-forward
 * ops; attention with a KV cache, and cross-attention, only in the decoder. NULL if op may stand
 * at step i, else why not. */
static const char* misplaced(const em_trunk_header* th, const em_program* p, uint32_t i, uint32_t op, int encoder) {
  int first = i == 0 || (p->encoder_out != EM_OPERAND_NONE && i == p->encoder_out + 1);
  if (first != (op == EM_OP_EMBED)) return first ? "where EMBED is due" : "where only the first step of a stack is EMBED";
  if ((i + 1 == p->n_steps) != (op == EM_OP_FINAL)) return i + 1 == p->n_steps ? "where FINAL is due" : "before the end";
  if (op == EM_OP_ENCODER_OUT && !encoder) return "in a model without an encoder, or twice";
  if ((op == EM_OP_ATTENTION || op == EM_OP_MLA_ATTENTION || op == EM_OP_CROSS_ATTENTION) && encoder)
    return "in the encoder";
  if (op == EM_OP_CROSS_ATTENTION && !th->cross_layers) return "in a model without an encoder";
  return NULL;
}

/* The slot a layer operand must name: the next one in order (the decoder's attention, the
 * cross-attention caches, each layer's feed-forward op); the encoder's attention reuses any KV slot. */
typedef struct {
  uint32_t kv, cross, ffn, expert;
} next_slots;

static int slot_ok(const em_step* s, uint32_t op, int encoder, next_slots* next, const em_trunk_header* th) {
  switch (op) {
    case EM_OP_ATTENTION:
    case EM_OP_MLA_ATTENTION:
    case EM_OP_REL_ATTENTION:
      if (encoder) return s->layer < th->kv_layers;
      return s->layer == next->kv++ && s->layer < th->kv_layers;
    case EM_OP_CROSS_ATTENTION: return s->layer == next->cross++ && s->layer < th->cross_layers;
    case EM_OP_MOE:
    case EM_OP_DENSE_FFN: return s->layer == next->ffn++ && s->layer < th->layers;
    default: return 1;
  }
}

int em_program_bind(const em_trunk_view* v, const em_trunk_header* th, uint32_t expert_layers, const em_kernels* k,
                    void* storage, em_program* p) {
  uint32_t n_words = 0, n_steps = th->program_steps;
  next_slots next = {0, 0, 0, 0};
  const uint32_t* w = em_bind_words(v, em_tensor_index(v, "program"), &n_words);
  if (!w) {
    snprintf(v->err, v->err_len, "trunk.bin has no layer program; recompile the artifact");
    return EM_ERR_FORMAT;
  }
  p->steps = (em_step*)storage;
  p->moe = (const em_step**)(p->steps + n_steps);
  p->n_steps = n_steps;
  p->encoder_out = EM_OPERAND_NONE;
  p->decoder_first = 0;
  p->expert_layers = 0;
  memset(p->steps, 0, n_steps * sizeof(em_step));
  binder b = {v, th, NULL, {0}};
  uint32_t at = 0;
  for (uint32_t i = 0; i < n_steps; i++) {
    em_step* s = &p->steps[i];
    int encoder = th->cross_layers && p->encoder_out == EM_OPERAND_NONE;
    uint32_t op = n_words - at >= 2 ? w[at] : 0;
    const char* why = op >= 1 && op < N_OPS ? misplaced(th, p, i, op, encoder) : "no valid op";
    if (why) {
      snprintf(v->err, v->err_len, "trunk.bin: the layer program's step %u is %s %s; recompile the artifact", i,
               op >= 1 && op < N_OPS ? OP_NAMES[op] : "not an op", why);
      return EM_ERR_FORMAT;
    }
    if (w[at + 1] != operand_count(op) || n_words - at - 2 < w[at + 1]) {
      snprintf(v->err, v->err_len, "trunk.bin: the layer program's %s op has %u operands where this runtime reads %u "
               "(compiled by another version?); recompile the artifact", OP_NAMES[op], w[at + 1], operand_count(op));
      return EM_ERR_FORMAT;
    }
    s->op = op;
    b.operand = w + at + 2;
    at += 2 + w[at + 1];
    int has_layer = op != EM_OP_EMBED && op != EM_OP_FINAL && op != EM_OP_ENCODER_OUT;
    s->layer = has_layer ? b.operand[0] : EM_OPERAND_NONE;
    s->expert_layer = op == EM_OP_MOE ? b.operand[EM_MOE_EXPERT_LAYER] : EM_OPERAND_NONE;
    if (!slot_ok(s, op, encoder, &next, th)) {
      snprintf(v->err, v->err_len, "trunk.bin: the layer program's step %u (%s) names layer %u out of order or beyond "
               "the header's; recompile the artifact", i, OP_NAMES[op], s->layer);
      return EM_ERR_FORMAT;
    }
    if (op == EM_OP_MOE && (s->expert_layer != next.expert++ || s->expert_layer >= expert_layers)) {
      /* expert layers in order, as many as experts.bin has */
      snprintf(v->err, v->err_len, "trunk.bin: layer %u's experts are expert layer %u where %u is due (of %u in "
               "experts.bin); recompile the artifact", s->layer, s->expert_layer, next.expert - 1, expert_layers);
      return EM_ERR_FORMAT;
    }
    if (op == EM_OP_REL_ATTENTION && b.operand[EM_REL_ATTENTION_BIDIRECTIONAL] != (uint32_t)encoder) {
      snprintf(v->err, v->err_len, "trunk.bin: the layer program's step %u: %s attention in the %s; recompile the "
               "artifact", i, encoder ? "causal" : "bidirectional", encoder ? "encoder" : "decoder");
      return EM_ERR_FORMAT;
    }
    int rc = EM_OK;
    switch (op) {
      case EM_OP_EMBED: {
        int ok = 1;
        s->scale = float_operand(&b, EM_EMBED_SCALE, "embedding scale", &ok);
        if (!ok || !em_bind_matrix(v, b.operand[EM_EMBED_EMBED], b.operand[EM_EMBED_EMBED_SCALES], th->vocab,
                                   th->hidden, "embedding", &s->m[EM_M_EMBED]))
          rc = EM_ERR_FORMAT;
        break;
      }
      case EM_OP_ATTENTION: rc = bind_attention(&b, k, s); break;
      case EM_OP_MLA_ATTENTION: rc = bind_mla_attention(&b, k, s); break;
      case EM_OP_MOE:
        rc = bind_moe(&b, k, s);
        if (!rc) p->moe[p->expert_layers++] = s;
        break;
      case EM_OP_DENSE_FFN: rc = bind_dense_ffn(&b, k, s); break;
      case EM_OP_REL_ATTENTION: rc = bind_rel_attention(&b, k, s); break;
      case EM_OP_CROSS_ATTENTION: rc = bind_cross_attention(&b, k, s); break;
      case EM_OP_ENCODER_OUT:
        rc = bind_norm(&b, s, EM_ENCODER_OUT_NORM_KIND, EM_ENCODER_OUT_NORM, EM_ENCODER_OUT_NORM_BIAS,
                       "encoder output norm");
        if (!rc && !need_norm_kernel(&b, k, s, "encoder output norm")) rc = EM_ERR_KERNEL;
        p->encoder_out = i;
        p->decoder_first = i + 1;
        break;
      case EM_OP_FINAL: {
        int ok = 1;
        s->scale = float_operand(&b, EM_FINAL_SCALE, "logit scale", &ok);
        rc = ok ? bind_norm(&b, s, EM_FINAL_NORM_KIND, EM_FINAL_NORM, EM_FINAL_NORM_BIAS, "final norm") : EM_ERR_FORMAT;
        if (!rc && !em_bind_matrix(v, b.operand[EM_FINAL_LM_HEAD], b.operand[EM_FINAL_LM_HEAD_SCALES], th->vocab,
                                   th->hidden, "LM head", &s->m[0]))
          rc = EM_ERR_FORMAT;
        if (!rc) s->bias = optional_vector(&b, EM_FINAL_LM_HEAD_BIAS, th->vocab, EM_OPERAND_NONE, "LM head bias", &ok);
        if (!rc && !ok) rc = EM_ERR_FORMAT;
        if (!rc && (!need_norm_kernel(&b, k, s, "final norm") ||
                    !need_kernel(&b, s->bias ? k->lm_head_bias : k->lm_head,
                                 s->bias ? EM_KERNEL_LM_HEAD_BIAS : EM_KERNEL_LM_HEAD, EM_OPERAND_NONE, "LM head")))
          rc = EM_ERR_KERNEL;
        break;
      }
    }
    if (rc) return rc;
  }
  if (at != n_words || next.ffn != th->layers || next.expert != expert_layers || next.kv != th->kv_layers ||
      next.cross != th->cross_layers || (th->cross_layers && p->encoder_out == EM_OPERAND_NONE)) {
    snprintf(v->err, v->err_len, "trunk.bin: the layer program does not cover the header's layers (%u of %u "
             "feed-forward, %u of %u with experts in experts.bin, %u of %u attention, %u of %u cross-attention) or has "
             "%u words after its FINAL op; recompile", next.ffn, th->layers, next.expert, expert_layers, next.kv,
             th->kv_layers, next.cross, th->cross_layers, n_words - at);
    return EM_ERR_FORMAT;
  }
  /* each self-attention op predicts for its layer's experts (NONE: a dense layer) */
  uint32_t next_moe = EM_OPERAND_NONE;
  for (uint32_t i = n_steps; i-- > 0;) {
    em_step* s = &p->steps[i];
    s->next_moe = next_moe;
    if (s->op == EM_OP_MOE) next_moe = s->expert_layer;
    if (s->op == EM_OP_ATTENTION || s->op == EM_OP_MLA_ATTENTION || s->op == EM_OP_REL_ATTENTION ||
        s->op == EM_OP_DENSE_FFN)
      next_moe = EM_OPERAND_NONE;
  }
  return EM_OK;
}
