/* The memory plan of a session: what the budget pays for (trunk, KV cache, buffers, workspace
 * arena, bookkeeping) and how many expert-cache slots of each record size the rest buys. */
#ifndef EM_MEMORY_PLAN_H
#define EM_MEMORY_PLAN_H

#include <stdint.h>

#include "artifact.h"
#include "expert_cache.h"

#define EM_ALIGN_BUF 64
#define EM_ALIGN_PAGE 4096

typedef struct {
  uint64_t trunk, kv, buffers, arena, meta, fixed; /* fixed = everything but the expert slots */
  em_size_class classes[EM_MAX_SIZE_CLASSES];      /* distinct record sizes, ascending; .count = records */
  uint32_t n_classes;
  uint64_t per_slot[EM_MAX_SIZE_CLASSES];          /* one slot of the class plus its bookkeeping */
  uint64_t min_slots[EM_MAX_SIZE_CLASSES];         /* a layer's top-k could all be of one class */
  uint64_t min_cache, all_experts;                 /* bytes of expert slots: the least, and for every record */
} em_memory_plan;

static inline uint64_t em_align_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

/* em_params.prefill_tokens = 0: a prompt's tokens run through each layer together (prefill.c) */
#ifdef EM_BAREMETAL
#define EM_DEFAULT_PREFILL_TOKENS 1
#else
#define EM_DEFAULT_PREFILL_TOKENS 64
#endif
#define EM_MAX_PREFILL_TOKENS 1024

/* Bytes of bookkeeping for a prompt's batch of `tokens` tokens (session.c carves it): per chosen
 * expert of each token its block, task, id, record and place in the order they run, per token its
 * count of experts. */
uint64_t em_batch_meta_bytes(uint32_t tokens, uint32_t top_k);

/* Rows a batched kernel call takes (EM_BATCH_ROWS) where a prompt's batch of `prefill_tokens` holds
 * that many, else 1: the plan gives the batched calls' buffers and expert lanes room for them then. */
uint32_t em_batch_rows(uint32_t prefill_tokens);

/* Floats of the buffer between an MLP's two kernels: the widest of the experts', the shared
 * expert's and the dense layers' intermediate sizes. */
uint64_t em_ffn_floats(const em_trunk_header* th);
/* Floats the KV cache's two parts hold per layer and position: a key and a value per KV head, or with
 * latent attention the latent (k_row) and the rotated key every head shares (v_row). */
void em_kv_rows(const em_trunk_header* th, uint64_t* k_row, uint64_t* v_row);
/* Sorts the records' lengths into size classes (at most EM_MAX_SIZE_CLASSES); -1 if too many.
 * record_class[i] (if given) receives record i's class. */
int em_size_classes(const em_record* r, uint32_t n, em_size_class* out, uint32_t* n_out, uint8_t* record_class);
/* The plan for a context of max_seq tokens and prompts run prefill_tokens at a time; EM_ERR_FORMAT
 * (message in err) with too many record sizes. */
int em_plan_memory(const em_trunk_header* th, const em_image_header* ih, const em_record* records, uint32_t max_seq,
                   uint32_t prefill_tokens, size_t program_bytes, em_memory_plan* p, char* err, size_t n);
/* Slots per size class for a budget (0 = every record resident). */
void em_slots_for_budget(const em_memory_plan* p, uint64_t budget, uint64_t* slots);

#endif
