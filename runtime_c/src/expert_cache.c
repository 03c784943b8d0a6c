#include "expert_cache.h"

#include <math.h>

size_t em_cache_meta_bytes(uint32_t n_slots, uint32_t n_records) {
  return (size_t)n_slots * sizeof(em_slot) + (size_t)n_records * sizeof(int32_t);
}

void em_cache_init(em_expert_cache* c, uint8_t* slots, const em_size_class* classes, uint32_t n_classes,
                   const uint8_t* record_class, void* meta, uint32_t layers, uint32_t experts_per_layer,
                   em_eviction policy, const float* frequency) {
  uint32_t n_slots = 0;
  uint64_t offset = 0;
  c->slots = slots;
  c->n_classes = n_classes;
  c->record_class = record_class;
  c->slot = (em_slot*)meta;
  for (uint32_t k = 0; k < n_classes; k++) {
    c->classes[k] = classes[k];
    c->classes[k].first = n_slots;
    for (uint32_t i = 0; i < classes[k].count; i++, n_slots++) {
      em_slot empty = {offset, -1, EM_SLOT_FREE, 0, (uint8_t)k, 0, 0, 0};
      c->slot[n_slots] = empty;
      offset += classes[k].slot_bytes;
    }
  }
  c->n_slots = n_slots;
  c->record_slot = (int32_t*)(c->slot + n_slots);
  c->layers = layers;
  c->experts_per_layer = experts_per_layer;
  c->n_records = layers * experts_per_layer;
  c->policy = policy;
  c->frequency = frequency;
  c->clock = 0;
  for (uint32_t i = 0; i < c->n_records; i++) c->record_slot[i] = -1;
}

void em_cache_touch(em_expert_cache* c, int32_t slot) {
  c->slot[slot].used_at = ++c->clock;
  c->slot[slot].prefetched = 0;
}

/* EdgeMoE's eviction score -f(i, j) / d for expert j of layer i (f: its activation frequency in
 * the routing profile); the highest is evicted first. d is how many layers from the current layer
 * I until layer i runs again: (i - I) mod S, and S for layer I itself, since the decode loop
 * claims slots only after layer I has routed and pinned what it uses. The design brief writes the
 * distance as (S - i + I) mod S, layers since i ran; measured on the bundled model that evicts the
 * next layer's experts first and cut the cache hit rate from 44% (LRU) to 9% (docs/BENCHMARKS.md),
 * so this is the reading that keeps "the experts most likely to be needed soon". */
static double edgemoe_score(const em_expert_cache* c, uint32_t record, uint32_t current_layer) {
  uint32_t S = c->layers, i = record / c->experts_per_layer;
  uint32_t d = (i + S - current_layer) % S;
  if (d == 0) d = S;
  double f = c->frequency ? c->frequency[record] : 0.0;
  return -f / (double)d;
}

int32_t em_cache_claim(em_expert_cache* c, uint32_t record, uint32_t current_layer, int prefetch,
                       int* evicted_prefetch) {
  int32_t victim = -1;
  double best = 0.0;
  const em_size_class* k = &c->classes[c->record_class[record]];
  *evicted_prefetch = 0;
  for (uint32_t i = k->first; i < k->first + k->count; i++) {
    const em_slot* s = &c->slot[i];
    if (s->state == EM_SLOT_FREE) {
      victim = (int32_t)i;
      break;
    }
    if (s->state != EM_SLOT_READY || s->pins) continue;
    double score; /* higher = evict sooner */
    switch (c->policy) {
      case EM_EVICT_FIFO: score = -(double)s->loaded_at; break;
      case EM_EVICT_EDGEMOE: score = edgemoe_score(c, (uint32_t)s->record, current_layer); break;
      default: score = -(double)s->used_at; break;
    }
    if (victim < 0 || score > best) victim = (int32_t)i, best = score;
  }
  if (victim < 0) return -1;
  em_slot* v = &c->slot[victim];
  if (v->record >= 0) {
    *evicted_prefetch = v->prefetched;
    c->record_slot[v->record] = -1;
  }
  v->record = (int32_t)record;
  v->state = EM_SLOT_LOADING;
  v->prefetched = (uint8_t)(prefetch != 0);
  v->pins = 0;
  c->record_slot[record] = victim;
  return victim;
}

void em_cache_ready(em_expert_cache* c, int32_t slot) {
  em_slot* s = &c->slot[slot];
  s->state = EM_SLOT_READY;
  s->loaded_at = s->used_at = ++c->clock;
}

void em_cache_release(em_expert_cache* c, int32_t slot) {
  em_slot* s = &c->slot[slot];
  if (s->record >= 0) c->record_slot[s->record] = -1;
  s->record = -1;
  s->state = EM_SLOT_FREE;
  s->prefetched = 0;
  s->pins = 0;
}
