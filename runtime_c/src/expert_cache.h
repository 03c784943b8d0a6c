/* A fixed set of slots holding expert records, and the policy that picks which slot to reuse.
 * Records of different sizes (experts at different bitwidths) live in slots of their own size
 * class, so a small expert never occupies a large slot. Not synchronised: the loader (loader.c)
 * calls it under its lock. */
#ifndef EM_EXPERT_CACHE_H
#define EM_EXPERT_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "edgemoe.h"

typedef enum { EM_SLOT_FREE = 0, EM_SLOT_LOADING, EM_SLOT_READY } em_slot_state;

#define EM_MAX_SIZE_CLASSES 4

typedef struct {
  uint64_t slot_bytes; /* every slot of the class holds this many bytes */
  uint32_t first;      /* index of its first slot; its slots are consecutive */
  uint32_t count;
} em_size_class;

typedef struct {
  uint64_t offset;     /* of its memory from the start of the slot region */
  int32_t record;      /* record held or being loaded, -1 = none */
  uint8_t state;       /* em_slot_state */
  uint8_t prefetched;  /* loaded by a prefetch and not used since */
  float chance;        /* while prefetched: the chance the prediction gave its use (0 otherwise) */
  uint8_t size_class;
  uint16_t pins;       /* users computing with it right now: never evicted while > 0 */
  uint64_t used_at;    /* clock of the last use (LRU) */
  uint64_t loaded_at;  /* clock when it was filled (FIFO) */
} em_slot;

typedef struct {
  uint8_t* slots; /* every class's slots, one after another, 4096-aligned */
  uint32_t n_slots;
  em_size_class classes[EM_MAX_SIZE_CLASSES];
  uint32_t n_classes;
  const uint8_t* record_class; /* [n_records]: size class of each record */
  em_slot* slot;        /* [n_slots] */
  int32_t* record_slot; /* [n_records]: slot holding or loading each record, -1 = none */
  uint32_t n_records, experts_per_layer, layers;
  uint32_t n_ready; /* slots READY: every record resident once it reaches n_records */
  em_eviction policy;
  const float* frequency; /* [layers * experts]: activation frequency f(i, j), for EM_EVICT_EDGEMOE */
  float* usage; /* [n_records]: recent use, an average over the layer's last tokens (EM_USAGE_DECAY) */
  uint64_t clock;
} em_expert_cache;

/* Per token, how much of an expert's recent use carries over (a memory of ~1 / (1 - decay) = 20
 * tokens), and the weight of the calibration profile's frequency against it in EdgeMoE eviction's
 * estimate of the chance of use. Chosen by replaying routing traces of both bundled models on
 * WikiText-2 test text with frequencies from the calibration text (docs/BENCHMARKS.md §3). */
#define EM_USAGE_DECAY 0.95f
#define EM_PROFILE_WEIGHT 0.3

size_t em_cache_meta_bytes(uint32_t n_slots, uint32_t n_records);
/* classes[].count slots of classes[].slot_bytes each (first is filled in); slot memory at `slots`. */
void em_cache_init(em_expert_cache* c, uint8_t* slots, const em_size_class* classes, uint32_t n_classes,
                   const uint8_t* record_class, void* meta, uint32_t layers, uint32_t experts_per_layer,
                   em_eviction policy, const float* frequency);

/* Slot holding or loading `record`, or -1. */
static inline int32_t em_cache_lookup(const em_expert_cache* c, uint32_t record) { return c->record_slot[record]; }
/* The experts `layer` routes to at this token (records of that layer): its experts' recent use
 * decays, these ones' grows. Feeds EdgeMoE eviction. */
void em_cache_routed(em_expert_cache* c, uint32_t layer, const uint32_t* records, uint32_t n);
/* Marks a slot used now (and its prefetch, if any, used). */
void em_cache_touch(em_expert_cache* c, int32_t slot);
/* Claims a slot for `record` (state LOADING): a free slot, else the policy's victim among READY,
 * unpinned slots, judged at `current_layer`. -1 if every slot is loading or pinned.
 * *evicted_prefetch is set when the victim held a prefetched expert nobody used. */
int32_t em_cache_claim(em_expert_cache* c, uint32_t record, uint32_t current_layer, int prefetch,
                       int* evicted_prefetch);
/* Claims a slot for a prefetch of `record`, which a predictor names with this chance of use at its
 * layer's next run (its measured precision). Under EdgeMoE eviction, prefetch admission: a victim is
 * taken only if its own expected next use lies further ahead than the prefetched expert's, so a
 * guess never displaces an expert likelier to be needed first. Otherwise as em_cache_claim. */
int32_t em_cache_claim_prefetch(em_expert_cache* c, uint32_t record, uint32_t current_layer, double chance,
                                int* evicted_prefetch);
/* Whether `record`'s size class has a FREE slot. */
int em_cache_has_free(const em_expert_cache* c, uint32_t record);
void em_cache_ready(em_expert_cache* c, int32_t slot);
/* Frees a slot (after a failed load). */
void em_cache_release(em_expert_cache* c, int32_t slot);
static inline uint8_t* em_cache_slot(const em_expert_cache* c, int32_t slot) {
  return c->slots + c->slot[slot].offset;
}

#endif
