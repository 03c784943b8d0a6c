/* A fixed set of equally sized slots holding expert records, with least-recently-used eviction. */
#ifndef EM_EXPERT_CACHE_H
#define EM_EXPERT_CACHE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
  uint8_t* slots;          /* n_slots * slot_bytes, 4096-aligned */
  uint32_t n_slots;
  uint64_t slot_bytes;
  int32_t* slot_record;    /* record held by each slot, -1 = free */
  uint64_t* slot_used_at;  /* clock value of the slot's last use */
  int32_t* record_slot;    /* slot holding each record, -1 = not resident */
  uint32_t n_records;
  uint64_t clock;
} em_expert_cache;

/* Bytes of bookkeeping em_cache_init places in `meta` for these sizes. */
size_t em_cache_meta_bytes(uint32_t n_slots, uint32_t n_records);
void em_cache_init(em_expert_cache* c, uint8_t* slots, uint32_t n_slots, uint64_t slot_bytes, void* meta,
                   uint32_t n_records);
/* Slot holding `record` (marked used now), or -1. */
int32_t em_cache_find(em_expert_cache* c, uint32_t record);
/* A slot to load `record` into: a free one, else the least recently used; it now belongs to `record`. */
int32_t em_cache_claim(em_expert_cache* c, uint32_t record);
/* Forget what a slot holds (after a failed load). */
void em_cache_release(em_expert_cache* c, int32_t slot);
static inline uint8_t* em_cache_slot(const em_expert_cache* c, int32_t slot) {
  return c->slots + (uint64_t)slot * c->slot_bytes;
}

#endif
