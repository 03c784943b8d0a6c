#include "expert_cache.h"

size_t em_cache_meta_bytes(uint32_t n_slots, uint32_t n_records) {
  return (size_t)n_slots * (sizeof(int32_t) + sizeof(uint64_t)) + (size_t)n_records * sizeof(int32_t);
}

void em_cache_init(em_expert_cache* c, uint8_t* slots, uint32_t n_slots, uint64_t slot_bytes, void* meta,
                   uint32_t n_records) {
  c->slots = slots;
  c->n_slots = n_slots;
  c->slot_bytes = slot_bytes;
  c->slot_used_at = (uint64_t*)meta;
  c->slot_record = (int32_t*)(c->slot_used_at + n_slots);
  c->record_slot = c->slot_record + n_slots;
  c->n_records = n_records;
  c->clock = 0;
  for (uint32_t i = 0; i < n_slots; i++) c->slot_record[i] = -1, c->slot_used_at[i] = 0;
  for (uint32_t i = 0; i < n_records; i++) c->record_slot[i] = -1;
}

int32_t em_cache_find(em_expert_cache* c, uint32_t record) {
  int32_t s = c->record_slot[record];
  if (s >= 0) c->slot_used_at[s] = ++c->clock;
  return s;
}

int32_t em_cache_claim(em_expert_cache* c, uint32_t record) {
  int32_t victim = 0;
  for (uint32_t i = 0; i < c->n_slots; i++) {
    if (c->slot_record[i] < 0) {
      victim = (int32_t)i;
      break;
    }
    if (c->slot_used_at[i] < c->slot_used_at[victim]) victim = (int32_t)i;
  }
  if (c->slot_record[victim] >= 0) c->record_slot[c->slot_record[victim]] = -1;
  c->slot_record[victim] = (int32_t)record;
  c->record_slot[record] = victim;
  c->slot_used_at[victim] = ++c->clock;
  return victim;
}

void em_cache_release(em_expert_cache* c, int32_t slot) {
  if (c->slot_record[slot] >= 0) c->record_slot[c->slot_record[slot]] = -1;
  c->slot_record[slot] = -1;
  c->slot_used_at[slot] = 0;
}
