#include "kv_cache.h"

#include "generated/program.h"
#include "matrix.h"

uint32_t em_kv_element_bytes(uint32_t trunk_flags) { return trunk_flags & EM_TRUNK_FLAG_KV_FLOAT16 ? 2 : 4; }

static uint8_t* row_at(const em_kv_cache* c, uint8_t* base, uint64_t row, uint32_t layer, uint64_t pos) {
  return base + ((uint64_t)layer * c->max_seq + pos) * row * (c->dtype.bits / 8);
}

void* em_kv_key(const em_kv_cache* c, uint32_t layer, uint64_t pos) { return row_at(c, c->k, c->k_row, layer, pos); }

void* em_kv_value(const em_kv_cache* c, uint32_t layer, uint64_t pos) { return row_at(c, c->v, c->v_row, layer, pos); }

float* em_kv_key_out(const em_kv_cache* c, uint32_t layer, uint64_t pos) {
  return c->dtype.bits == 16 ? c->stage : (float*)em_kv_key(c, layer, pos);
}

float* em_kv_value_out(const em_kv_cache* c, uint32_t layer, uint64_t pos) {
  return c->dtype.bits == 16 ? c->stage + c->k_row : (float*)em_kv_value(c, layer, pos);
}

void em_kv_commit(const em_kv_cache* c, uint32_t layer, uint64_t pos) {
  if (c->dtype.bits != 16) return;
  uint16_t *k = (uint16_t*)em_kv_key(c, layer, pos), *v = (uint16_t*)em_kv_value(c, layer, pos);
  for (uint64_t i = 0; i < c->k_row; i++) k[i] = em_f32_to_f16(c->stage[i]);
  for (uint64_t i = 0; i < c->v_row; i++) v[i] = em_f32_to_f16(c->stage[c->k_row + i]);
}

em_kernel_arg em_kv_arg(const em_kv_cache* c, const void* first, int64_t rows, int64_t d1, int64_t d2) {
  return em_tensor_arg(em_typed((void*)first, c->dtype, d2 ? 3 : 2, rows, d1, d2));
}
