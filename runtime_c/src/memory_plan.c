#include "memory_plan.h"

#include <stdio.h>

#include "edgemoe.h"
#include "expert_lanes.h"
#include "ffn.h"    /* em_ffn_block */
#include "kv_cache.h"
#include "loader.h" /* em_loader_meta_bytes */

int em_size_classes(const em_record* r, uint32_t n, em_size_class* out, uint32_t* n_out, uint8_t* record_class) {
  uint32_t k = 0;
  for (uint32_t i = 0; i < n; i++) {
    uint32_t j = 0;
    while (j < k && out[j].slot_bytes != r[i].length) j++;
    if (j == k) {
      if (k == EM_MAX_SIZE_CLASSES) return -1;
      out[k].slot_bytes = r[i].length, out[k].count = 0, out[k].first = 0;
      k++;
    }
    out[j].count++;
  }
  for (uint32_t a = 1; a < k; a++) /* ascending by size, for a stable class numbering */
    for (uint32_t b = a; b > 0 && out[b].slot_bytes < out[b - 1].slot_bytes; b--) {
      em_size_class t = out[b];
      out[b] = out[b - 1];
      out[b - 1] = t;
    }
  for (uint32_t i = 0; record_class && i < n; i++)
    for (uint32_t j = 0; j < k; j++)
      if (out[j].slot_bytes == r[i].length) record_class[i] = (uint8_t)j;
  *n_out = k;
  return 0;
}

uint64_t em_ffn_floats(const em_trunk_header* th) {
  uint64_t ffn = th->inter > th->shared_inter ? th->inter : th->shared_inter;
  return th->dense_inter > ffn ? th->dense_inter : ffn;
}

void em_kv_rows(const em_trunk_header* th, uint64_t* k_row, uint64_t* v_row) {
  *k_row = th->kv_lora ? th->kv_lora : (uint64_t)th->kv_heads * th->head_dim;
  *v_row = th->kv_lora ? th->head_dim : (uint64_t)th->kv_heads * th->head_dim;
}

uint64_t em_batch_meta_bytes(uint32_t tokens, uint32_t top_k) {
  uint64_t chosen = (uint64_t)tokens * top_k;
  return chosen * (sizeof(em_ffn_block) + sizeof(em_expert_task) + 3 * sizeof(uint32_t) + sizeof(em_task_run)) +
         tokens * sizeof(uint32_t) + 4 * EM_ALIGN_BUF;
}

uint32_t em_batch_rows(uint32_t prefill_tokens) { return prefill_tokens >= EM_BATCH_ROWS ? EM_BATCH_ROWS : 1; }

int em_plan_memory(const em_trunk_header* th, const em_image_header* ih, const em_record* records, uint32_t max_seq,
                   uint32_t prefill_tokens, size_t program_bytes, em_memory_plan* p, char* err, size_t n) {
  uint64_t kv_dim = (uint64_t)th->kv_heads * th->head_dim, q_dim = (uint64_t)th->heads * th->head_dim;
  uint64_t ffn = em_ffn_floats(th), H = th->heads, enc = th->cross_layers ? max_seq : 0;
  uint64_t batch = prefill_tokens, chosen = batch * th->top_k, rows = em_batch_rows(prefill_tokens);
  uint64_t R = rows > 1 ? rows : 0, qkv = q_dim + 2 * kv_dim, res = qkv > th->hidden ? qkv : th->hidden, k_row, v_row;
  em_kv_rows(th, &k_row, &v_row);
  uint64_t kv_stage = em_kv_element_bytes(th->flags) == 2 ? k_row + v_row : 0;
  /* the order session.c carves them in; the latent attention's are empty without it, then the
     experts' take, one query's position bias, the encoder's rows and their q (empty without an encoder),
     then the chosen experts' outputs and weights (a batch's tokens' each), rows of zeros, a batch's
     residual streams and normalised MoE inputs, and the batched kernel calls' rows (empty without
     them): inputs, q/k/v, residuals, attention outputs, outputs, MLP activations, weights; last a
     float16 KV cache's stage (kv_cache.h) */
  uint64_t floats[] = {th->hidden, th->hidden, th->hidden, q_dim + 2 * kv_dim, q_dim + 2 * kv_dim, q_dim, q_dim, ffn,
                       th->experts, th->vocab, 1, 1, th->hidden, th->experts, th->experts,
                       (uint64_t)th->layers * th->hidden, 3ull * th->experts,
                       th->kv_lora ? H * ((uint64_t)th->qk_nope + th->head_dim) : 0, th->q_lora, th->q_lora,
                       th->kv_lora ? (uint64_t)th->kv_lora + th->head_dim : 0, H * th->kv_lora,
                       th->kv_lora ? H * th->head_dim : 0, H * th->kv_lora, H * th->v_head,
                       th->experts, H * max_seq, enc * th->hidden, enc * q_dim,
                       chosen * th->hidden, chosen, rows * th->hidden, batch * th->hidden, batch * th->hidden,
                       R * th->hidden, R * qkv, R * res, R * q_dim, R * th->hidden, R * ffn, R, kv_stage};
  if (em_size_classes(records, ih->n_records, p->classes, &p->n_classes, NULL)) {
    snprintf(err, n, "experts.bin has more than %d distinct record sizes", EM_MAX_SIZE_CLASSES);
    return EM_ERR_FORMAT;
  }
  p->trunk = em_align_up(th->file_bytes - th->data_offset, EM_ALIGN_PAGE);
  /* self-attention K and V (the decoder's layers), then cross-attention K and V: carved one after the other */
  uint64_t element = em_kv_element_bytes(th->flags);
  p->kv = em_align_up(em_align_up((uint64_t)th->kv_layers * max_seq * k_row * element, EM_ALIGN_BUF) +
                          em_align_up((uint64_t)th->kv_layers * max_seq * v_row * element, EM_ALIGN_BUF) +
                          2 * em_align_up((uint64_t)th->cross_layers * max_seq * kv_dim * sizeof(float), EM_ALIGN_BUF),
                      EM_ALIGN_PAGE);
  p->buffers = 0;
  for (size_t i = 0; i < sizeof floats / sizeof floats[0]; i++)
    p->buffers += em_align_up(floats[i] * sizeof(float), EM_ALIGN_BUF);
  p->buffers = em_align_up(p->buffers, EM_ALIGN_PAGE);
  /* attention keeps scores and their exponentials, [heads, n] each, in workspace (with its heads split
     over the threads, a few aligned allocations per head: 8 per head is room for them); an integer-dot
     kernel quantizes its input there (int8 values, a float scale and centre per group: under two
     floats per input element), its widest input being one of these. While a layer's experts run,
     their lanes share it out (expert_lanes.h): the scores are not live then */
  uint64_t widest = th->hidden;
  uint64_t inputs[] = {q_dim, H * th->v_head, ffn, th->q_lora, th->kv_lora};
  for (size_t i = 0; i < sizeof inputs / sizeof inputs[0]; i++)
    if (inputs[i] > widest) widest = inputs[i];
  uint64_t lanes = em_expert_lanes_bytes(th->top_k < EM_PLANNED_LANES ? th->top_k : EM_PLANNED_LANES, th->hidden,
                                         th->inter, em_batch_rows(prefill_tokens));
  p->arena = 2ull * th->heads * max_seq * sizeof(float) + 2 * widest * sizeof(float) + 8ull * (th->heads + 1) * EM_ALIGN_BUF;
  p->arena = em_align_up(p->arena > lanes ? p->arena : lanes, EM_ALIGN_PAGE);
  /* records and their size classes; per record: cache and loader bookkeeping; per layer: weights
     and predictions */
  p->meta = em_align_up((uint64_t)ih->n_records * (sizeof(em_record) + 1) + em_cache_meta_bytes(0, ih->n_records) +
                         em_loader_meta_bytes(0, ih->n_records) +
                         program_bytes + th->layers * (1 + th->experts * sizeof(uint32_t)) +
                         em_batch_meta_bytes(prefill_tokens, th->top_k) +
                         4 * EM_ALIGN_BUF, /* alignment between the parts */
                     EM_ALIGN_BUF);
  p->fixed = p->trunk + p->kv + p->buffers + p->arena + p->meta;
  p->min_cache = p->all_experts = 0;
  for (uint32_t c = 0; c < p->n_classes; c++) {
    p->per_slot[c] = p->classes[c].slot_bytes + em_cache_meta_bytes(1, 0) + em_loader_meta_bytes(1, 0);
    p->min_slots[c] = p->classes[c].count < th->top_k ? p->classes[c].count : th->top_k;
    p->min_cache += p->min_slots[c] * p->per_slot[c];
    p->all_experts += p->classes[c].count * p->per_slot[c];
  }
  return EM_OK;
}

/* Slots per size class for a budget (0 = every record resident): each class its share of the
 * expert cache in proportion to its bytes of experts, never below its minimum; if the minimums
 * overdraw the budget, the classes furthest above their share give slots back; what rounding
 * leaves over buys more slots. */
void em_slots_for_budget(const em_memory_plan* p, uint64_t budget, uint64_t* slots) {
  uint64_t cache = budget ? budget - p->fixed : p->all_experts, used = 0;
  for (uint32_t c = 0; c < p->n_classes; c++) {
    double share = (double)(p->classes[c].count * p->per_slot[c]) / (double)p->all_experts;
    slots[c] = (uint64_t)((double)cache * share / (double)p->per_slot[c] + 1e-6);
    if (slots[c] < p->min_slots[c]) slots[c] = p->min_slots[c];
    if (slots[c] > p->classes[c].count) slots[c] = p->classes[c].count;
    used += slots[c] * p->per_slot[c];
  }
  while (used > cache) {
    int worst = -1;
    double worst_ratio = 0.0;
    for (uint32_t c = 0; c < p->n_classes; c++) {
      double ratio = (double)slots[c] / (double)p->classes[c].count;
      if (slots[c] > p->min_slots[c] && (worst < 0 || ratio > worst_ratio)) worst = (int)c, worst_ratio = ratio;
    }
    if (worst < 0) break; /* at the minimum everywhere: the caller checked the budget covers it */
    slots[worst]--;
    used -= p->per_slot[worst];
  }
  /* Rounding down leaves up to a slot per class unused: hand what is left, a slot at a time, to
   * the class with the fewest slots for its records among those a slot still fits. */
  for (;;) {
    int best = -1;
    double best_ratio = 0.0;
    for (uint32_t c = 0; c < p->n_classes; c++) {
      double ratio = (double)slots[c] / (double)p->classes[c].count;
      if (slots[c] < p->classes[c].count && used + p->per_slot[c] <= cache && (best < 0 || ratio < best_ratio))
        best = (int)c, best_ratio = ratio;
    }
    if (best < 0) break;
    slots[best]++;
    used += p->per_slot[best];
  }
}

