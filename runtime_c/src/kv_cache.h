/* The self-attention KV cache: per layer and position a key row and a value row (memory_plan.c
 * em_kv_rows: keys and values per KV head, or with latent attention the latent and the rotated key),
 * held as float32 or, where trunk.bin's header says so (EM_TRUNK_FLAG_KV_FLOAT16), as float16: half
 * the memory, and half the bytes attention reads per token at depth, as llama.cpp's default cache.
 * Kernels compute a position's rows in float32; a float16 cache stages them and stores them rounded. */
#ifndef EM_KV_CACHE_H
#define EM_KV_CACHE_H

#include <stdint.h>

#include "matrix.h" /* em_kernel_arg */

typedef struct {
  uint8_t *k, *v;         /* [layers][max_seq][k_row], [layers][max_seq][v_row] elements */
  uint64_t k_row, v_row;  /* elements per position */
  uint32_t max_seq;
  em_dl_dtype dtype;      /* float32 or float16 */
  float* stage;           /* float16: a position's key and value rows as computed [k_row + v_row] */
} em_kv_cache;

/* Bytes of one element: 4, or 2 for a float16 cache (trunk header flags). */
uint32_t em_kv_element_bytes(uint32_t trunk_flags);

/* Layer `layer`'s key (value) row at position pos. */
void* em_kv_key(const em_kv_cache* c, uint32_t layer, uint64_t pos);
void* em_kv_value(const em_kv_cache* c, uint32_t layer, uint64_t pos);

/* Where a kernel writes position pos's key (value) row in float32: the cache itself, or the stage
 * that em_kv_commit then stores. */
float* em_kv_key_out(const em_kv_cache* c, uint32_t layer, uint64_t pos);
float* em_kv_value_out(const em_kv_cache* c, uint32_t layer, uint64_t pos);

/* A float16 cache takes the staged rows of position pos (rounded to nearest even, saturated at
 * ±65504); nothing to do for float32. */
void em_kv_commit(const em_kv_cache* c, uint32_t layer, uint64_t pos);

/* `rows` cached rows from `first` (em_kv_key / em_kv_value) as a kernel argument of shape
 * [rows, d1, d2] (d2 = 0: [rows, d1]) in the cache's element type. */
em_kernel_arg em_kv_arg(const em_kv_cache* c, const void* first, int64_t rows, int64_t d1, int64_t d2);

#endif
