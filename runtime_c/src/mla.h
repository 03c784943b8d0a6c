/* Multi-head latent attention's decode step (the MLA_ATTENTION op), in the absorbed form: the KV
 * cache holds per position the latent and the rotated key every head shares; the key half of wkv_b
 * is folded into the query, its value half applied to the attended latent. */
#ifndef EM_MLA_H
#define EM_MLA_H

#include <stddef.h>
#include <stdint.h>

#include "artifact.h"
#include "kernels.h"
#include "kv_cache.h"
#include "program.h"

/* Working buffers, sized by memory_plan.c: q [heads · (qk_nope + head_dim)], q_a and q_a_norm
 * [q_lora], ckv [kv_lora + head_dim], q_lat and o_lat [heads · kv_lora], q_rot [heads · head_dim],
 * att [heads · v_head]. */
typedef struct {
  float *q, *q_a, *q_a_norm, *ckv, *q_lat, *q_rot, *o_lat, *att;
} em_mla_buffers;

/* The attention of the normalised input xn at position pos over the layer's cache (keys: the latent
 * [kv_lora], values: the rotated key [head_dim]), whose rows pos it writes; the output
 * [heads · v_head] is left in b->att. 0 or an em_status with the reason in err. */
int em_mla_attention(const em_kernels* k, const em_trunk_header* th, const em_step* st, const em_mla_buffers* b,
                     float* xn, const em_kv_cache* kv, uint32_t pos, char* err, size_t n);

#endif
