/* A prompt through the layer program a batch of tokens at a time, layer by layer: each layer runs
 * for every token of the batch before the next layer starts. An expert that several of the batch's
 * tokens chose is then read from storage once for all of them (fed token by token, a cache smaller
 * than the experts the prompt uses reads it again for each token that finds it evicted), and it runs
 * for them one after another while its weights are in the CPU's caches.
 *
 * Every token goes through the same kernels with the same inputs as em_decode_step would give it,
 * and its experts' outputs are added to its residual stream in the order its router chose them: the
 * logits are the same bits either way. Within a batch nothing is predicted: a layer's experts are
 * all known once its tokens have routed, and they are read together. An encoder (encoder_decoder.c)
 * runs its MoE steps over its input's rows the same way.
 *
 * Where the artifact has batched kernels (compiler/program.py BATCHED_KERNELS), the matrices go
 * EM_BATCH_ROWS tokens per call: a weight vector decoded once for all of them, each row the one-row
 * kernel's bits. The attention projections, the shared expert and dense MLPs here, the routed
 * experts in expert_lanes.c. */
#include <string.h>

#include "session.h"

/* Rows t0 … t0 + EM_BATCH_ROWS − 1 of the batch through attention step st at their positions
 * (from base + t0): norms, q/k/v of all of them in one call, each token's attention in turn (its key
 * and value into the cache before the next token attends), the output projection in one call. */
static int attention_rows(em_session* s, const em_step* st, uint32_t base, uint32_t t0) {
  uint32_t H = s->th.hidden, R = EM_BATCH_ROWS, qkv = s->q_dim + 2 * s->kv_dim;
  float* x = s->batch_x + (size_t)t0 * H;
  int rc = EM_OK;
  for (uint32_t m = 0; m < R && !rc; m++) rc = em_apply_norm(s, st, x + (size_t)m * H, s->rows.xn + (size_t)m * H);
  for (uint32_t m = 0; m < R && st->bias; m++) /* the bias is each row's residual */
    memcpy(s->rows.res + (size_t)m * qkv, st->bias, qkv * sizeof(float));
  if (!rc)
    rc = em_matvec_rows(st->bias ? s->k.qkv_bias_batch : s->k.qkv_batch, st->bias ? EM_KERNEL_QKV_BIAS : EM_KERNEL_QKV,
                        &st->m[EM_M_QKV], R, s->rows.xn, st->bias ? s->rows.res : NULL, s->rows.qkv, s->err, ERR_LEN);
  for (uint32_t m = 0; m < R && !rc; m++) {
    s->pos = base + t0 + m;
    rc = em_attention_core(s, st, s->rows.qkv + (size_t)m * qkv, s->rows.att + (size_t)m * s->q_dim);
  }
  float* res = st->o_bias ? s->rows.res : x; /* with an output bias: each row plus the bias */
  for (uint32_t m = 0; m < R && !rc && st->o_bias; m++) {
    float* row_res;
    rc = em_output_residual(s, st, x + (size_t)m * H, s->rows.res + (size_t)m * H, &row_res);
  }
  if (!rc)
    rc = em_matvec_rows(s->k.o_proj_batch, EM_KERNEL_O_PROJ, &st->m[EM_M_WO], R, s->rows.att, res, s->rows.y, s->err,
                        ERR_LEN);
  if (rc) return rc;
  memcpy(x, s->rows.y, (size_t)R * H * sizeof(float));
  s->st.batched_calls += 2;
  return EM_OK;
}

/* EM_BATCH_ROWS residual streams x plus rows.w · the resident MLP f of their normalised inputs xn, in
 * one call of its batched kernels. */
static int resident_rows(em_session* s, const em_ffn_block* f, float* x, const float* xn) {
  uint32_t H = s->th.hidden;
  int rc = em_ffn_call_batch(f, xn, s->rows.h, x, s->rows.w, s->rows.y, s->err, ERR_LEN);
  if (rc) return rc;
  memcpy(x, s->rows.y, (size_t)EM_BATCH_ROWS * H * sizeof(float));
  s->st.batched_calls += 2;
  return EM_OK;
}

/* The shared expert of MOE step st for n rows whose normalised inputs are in batch_xn: EM_BATCH_ROWS at
 * a time through its batched kernels where it has them, the rest one by one. */
static int shared_rows(em_session* s, const em_step* st, float* rows, uint32_t n) {
  uint32_t H = s->th.hidden, t = 0;
  em_ffn_block f = em_resident_block(s, st);
  int rc = EM_OK;
  for (; f.gate_up_batch && t + EM_BATCH_ROWS <= n && !rc; t += EM_BATCH_ROWS) {
    for (uint32_t m = 0; m < EM_BATCH_ROWS && !rc; m++)
      rc = em_shared_weight(s, st, s->batch_xn + (size_t)(t + m) * H, &s->rows.w[m]);
    if (!rc) rc = resident_rows(s, &f, rows + (size_t)t * H, s->batch_xn + (size_t)t * H);
  }
  for (; t < n && !rc; t++) {
    memcpy(s->x, rows + (size_t)t * H, H * sizeof(float));
    memcpy(s->xn, s->batch_xn + (size_t)t * H, H * sizeof(float));
    rc = em_shared_expert(s, st);
    memcpy(rows + (size_t)t * H, s->x, H * sizeof(float));
  }
  return rc;
}

/* Whether step st can take EM_BATCH_ROWS tokens per call of its matrices' batched kernels. */
static int batched_step(const em_session* s, const em_step* st) {
  if (s->batch_rows < 2) return 0;
  if (st->op == EM_OP_ATTENTION) return (st->bias ? s->k.qkv_bias_batch : s->k.qkv_batch) && s->k.o_proj_batch;
  if (st->op == EM_OP_DENSE_FFN) return em_resident_block(s, st).gate_up_batch != NULL;
  return 0;
}

/* Rows t0 … t0 + EM_BATCH_ROWS − 1 through DENSE_FFN step st. */
static int dense_rows(em_session* s, const em_step* st, uint32_t t0) {
  uint32_t H = s->th.hidden;
  em_ffn_block f = em_resident_block(s, st);
  int rc = EM_OK;
  for (uint32_t m = 0; m < EM_BATCH_ROWS && !rc; m++) {
    rc = em_apply_norm(s, st, s->batch_x + (size_t)(t0 + m) * H, s->rows.xn + (size_t)m * H);
    s->rows.w[m] = 1.0f;
  }
  return rc ? rc : resident_rows(s, &f, s->batch_x + (size_t)t0 * H, s->rows.xn);
}

int em_moe_rows(em_session* s, const em_step* st, float* rows, uint32_t n, int pass_per_token) {
  const em_trunk_header* th = &s->th;
  uint32_t H = th->hidden, K = th->top_k, l = st->expert_layer;
  uint32_t *chosen = s->batch_experts, *count = s->batch_counts, *distinct = s->batch_records, n_distinct = 0;
  float* wts = s->expert_weights;
  int rc = EM_OK;
  for (uint32_t t = 0; t < n && !rc; t++) {
    memcpy(s->x, rows + (size_t)t * H, H * sizeof(float));
    if (pass_per_token) memset(s->taken, 0, th->experts * sizeof *s->taken);
    rc = em_moe_route(s, st, s->trace_tokens + t, chosen + (size_t)t * K, wts + (size_t)t * K, &count[t]);
    if (rc) break;
    memcpy(s->batch_xn + (size_t)t * H, s->xn, H * sizeof(float));
    uint32_t records[MAX_TOP_K];
    for (uint32_t k = 0; k < count[t]; k++) {
      uint32_t e = chosen[t * K + k], seen = 0;
      records[k] = em_record_of(s, l, e);
      while (seen < n_distinct && distinct[seen] != records[k]) seen++;
      if (seen == n_distinct) distinct[n_distinct++] = records[k];
    }
    if (count[t]) em_loader_routed(&s->loader, records, count[t], l);
  }
  if (!rc && st->shared) rc = shared_rows(s, st, rows, n);
  for (uint32_t first = 0; first < n_distinct && !rc;) {
    /* a group: as many of the distinct experts as each size class has slots to pin at once */
    uint32_t end = first, per_class[EM_MAX_SIZE_CLASSES] = {0};
    while (end < n_distinct) {
      uint8_t c = s->cache.record_class[distinct[end]];
      if (per_class[c] == s->cache.classes[c].count) break;
      per_class[c]++, end++;
    }
    rc = em_loader_need(&s->loader, distinct + first, end - first, l, s->err, ERR_LEN);
    if (rc) break;
    /* the experts resident now first, then those being read, in the order the reads were queued */
    uint32_t *order = s->batch_order, group = end - first, head = 0, tail = group;
    for (uint32_t g = first; g < end; g++) /* each asked once: a read may finish meanwhile */
      if (em_loader_ready(&s->loader, distinct[g])) order[head++] = g;
      else order[--tail] = g;
    for (uint32_t a = tail, b = group - 1; a < b; a++, b--) { /* those being read: in queue order */
      uint32_t t = order[a];
      order[a] = order[b], order[b] = t;
    }
    for (uint32_t j = 0; j < group && !rc;) {
      /* this expert (waiting for it) and those after it already read: their tokens' tasks run together */
      uint32_t n_tasks = 0, joined = 0;
      do {
        uint32_t g = order[j + joined], expert = distinct[g] - l * th->experts;
        em_ffn_block* block = &s->expert_blocks[g];
        rc = em_chosen_expert(s, st, expert, block);
        for (uint32_t t = 0; t < n && !rc; t++)
          for (uint32_t k = 0; k < count[t]; k++)
            if (chosen[t * K + k] == expert)
              s->expert_tasks[n_tasks++] = (em_expert_task){block, s->batch_xn + (size_t)t * H, &wts[t * K + k],
                                                            s->expert_out + ((size_t)t * K + k) * H};
        joined++;
      } while (!rc && j + joined < group && s->expert_lanes > 1 &&
               em_loader_ready(&s->loader, distinct[order[j + joined]]));
      if (!rc) rc = em_run_expert_tasks(s, s->expert_tasks, n_tasks);
      j += joined;
    }
    for (uint32_t g = first; g < end; g++) em_loader_release(&s->loader, distinct[g]);
    first = end;
  }
  for (uint32_t t = 0; t < n && !rc; t++) { /* each token's experts added in its router's order */
    float* x = rows + (size_t)t * H;
    for (uint32_t k = 0; k < count[t]; k++) {
      const float* y = s->expert_out + ((size_t)t * K + k) * H;
      for (uint32_t i = 0; i < H; i++) x[i] += y[i];
    }
  }
  return rc;
}

int em_prefill_batch(em_session* s, const int32_t* tokens, uint32_t n, int want_logits) {
  uint32_t H = s->th.hidden, base = s->pos;
  em_pass pass;
  em_pass_begin(s, &pass);
  s->batched = 1;
  int rc = EM_OK;
  for (uint32_t i = s->prog.decoder_first; !rc && i < s->prog.n_steps; i++) {
    const em_step* st = &s->prog.steps[i];
    if (st->op == EM_OP_MOE) {
      rc = em_moe_rows(s, st, s->batch_x, n, 1); /* one token is a pass of the expert capacity */
      continue;
    }
    /* the other steps token by token, each at its position (EM_BATCH_ROWS at a time through batched
       kernels where the step has them); the logits for the last token alone */
    uint32_t t = st->op == EM_OP_FINAL ? n - 1 : 0;
    if (st->op == EM_OP_FINAL && !want_logits) continue;
    for (; batched_step(s, st) && t + EM_BATCH_ROWS <= n && !rc; t += EM_BATCH_ROWS)
      rc = st->op == EM_OP_ATTENTION ? attention_rows(s, st, base, t) : dense_rows(s, st, t);
    for (; t < n && !rc; t++) {
      s->pos = base + t;
      memcpy(s->x, s->batch_x + (size_t)t * H, H * sizeof(float));
      rc = em_token_step(s, st, tokens[t], st->op == EM_OP_FINAL);
      memcpy(s->batch_x + (size_t)t * H, s->x, H * sizeof(float));
    }
  }
  s->batched = 0;
  s->pos = base;
  if (!rc) em_pass_end(s, &pass, n);
  return rc;
}
