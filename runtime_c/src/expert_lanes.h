/* Running a layer's chosen experts on the compute threads, one expert per thread at a time
 * ("lanes"), instead of one expert after another with each kernel split across the threads: a
 * routed expert's matrices are small (1–3 MiB), and splitting each costs a barrier per kernel and
 * leaves threads idle on the ones below the split threshold.
 *
 * Every task writes weight · expert(x) into its own row; the caller adds the rows into the residual
 * stream in the order the router chose them, so the result is the same bits whichever thread
 * computed which expert and however many threads there are. A prompt's batch (prefill.c) runs one
 * expert for several tokens as tasks of their own, EM_BATCH_ROWS of them at a time through the
 * batched kernels where the artifact has them (each token's output the same bits). A lane's scratch (the expert's
 * intermediate activations and its kernels' workspace) is a slice of the session's kernel arena,
 * which holds nothing while experts run (attention's scores live there only during attention). */
#ifndef EM_EXPERT_LANES_H
#define EM_EXPERT_LANES_H

#include <stddef.h>
#include <stdint.h>

#include "ffn.h"
#include "tvm_backend.h"

/* The memory plan gives the kernel arena room for this many lanes (fewer where top_k is smaller),
 * whatever the context length; a longer context's attention scores make room for more. */
#ifdef EM_BAREMETAL
#define EM_PLANNED_LANES 1 /* one thread */
#else
#define EM_PLANNED_LANES 8
#endif

/* Arena bytes `lanes` lanes take, each running an expert for up to `rows` inputs at once (1, or
 * EM_BATCH_ROWS: em_batch_rows). */
uint64_t em_expert_lanes_bytes(uint32_t lanes, uint32_t hidden, uint32_t inter, uint32_t rows);

/* How many experts can run at once: at most `threads` and `top_k`, and as many lanes as the
 * arena has room for (1: run them one at a time). */
uint32_t em_expert_lanes(uint32_t threads, uint32_t top_k, uint64_t arena_bytes, uint32_t hidden, uint32_t inter,
                         uint32_t rows);

/* One expert applied to one token's input: out = weight · expert(x). */
typedef struct {
  const em_ffn_block* f;
  const float* x;  /* [hidden] */
  float* weight;   /* its gate weight, where the down kernel reads it */
  float* out;      /* [hidden] */
} em_expert_task;

/* A run of consecutive tasks of one expert that one lane takes (scratch for em_experts_run). */
typedef struct {
  uint32_t first, count;
} em_task_run;

/* Runs tasks[0..n) on up to `lanes` threads of the pool bound to this thread (each lane's parallel
 * loops run serially), or on this thread where lanes is 1. With `rows` > 1 (lanes sized for it),
 * every EM_BATCH_ROWS consecutive tasks of one block with batched kernels run as one call. runs:
 * room for n. zero: [rows][hidden] zeros. batched_calls: incremented by the batched kernel calls.
 * On failure: the first failing task's error, as em_ffn_call gives it. */
int em_experts_run(const em_expert_task* tasks, uint32_t n, uint32_t lanes, uint32_t rows, em_task_run* runs,
                   const em_arena* arena, const float* zero, uint32_t hidden, uint32_t inter, uint64_t* batched_calls,
                   char* err, size_t errn);

#endif
