#include "expert_lanes.h"

#include <stdio.h>
#include <string.h>

#include "edgemoe.h"
#include "thread_pool.h"

#define LANE_ALIGN 64u

static uint64_t align_up(uint64_t v) { return (v + LANE_ALIGN - 1) & ~(uint64_t)(LANE_ALIGN - 1); }

/* A lane's slice: the intermediate activations [inter], then its kernels' workspace: an integer-dot
 * kernel quantizes its input there (under two floats per input element; memory_plan.c), the
 * widest input being hidden (gate/up) or inter (down), plus alignment between allocations. */
static uint64_t lane_bytes(uint32_t hidden, uint32_t inter) {
  uint64_t widest = hidden > inter ? hidden : inter;
  return align_up((uint64_t)inter * sizeof(float)) + align_up(2 * widest * sizeof(float)) + 8 * LANE_ALIGN;
}

uint64_t em_expert_lanes_bytes(uint32_t lanes, uint32_t hidden, uint32_t inter) {
  return lanes * lane_bytes(hidden, inter);
}

uint32_t em_expert_lanes(uint32_t threads, uint32_t top_k, uint64_t arena_bytes, uint32_t hidden, uint32_t inter) {
  uint64_t fit = arena_bytes / lane_bytes(hidden, inter);
  uint64_t lanes = threads < top_k ? threads : top_k;
  if (lanes > fit) lanes = fit;
  return lanes ? (uint32_t)lanes : 1;
}

typedef struct {
  const em_expert_task* tasks;
  uint32_t n, lanes, hidden, inter;
  const em_arena* arena;
  const float* zero;
  int next;   /* the next expert to take (atomic) */
  int failed; /* set once by the first failing expert (atomic) */
  int rc;
  char* err;
  size_t errn;
} lane_work;

static int run_lane(int task_id, em_parallel_env* penv, void* cdata) {
  (void)penv;
  lane_work* w = (lane_work*)cdata;
  if ((uint32_t)task_id >= w->lanes) return 0;
  uint64_t size = lane_bytes(w->hidden, w->inter);
  uint8_t* base = w->arena->base + (uint64_t)task_id * size;
  float* h = (float*)base;
  em_arena scratch;
  memset(&scratch, 0, sizeof scratch);
  scratch.base = base + align_up((uint64_t)w->inter * sizeof(float));
  scratch.size = size - align_up((uint64_t)w->inter * sizeof(float));
  em_arena* previous = em_arena_bind(&scratch);
  char err[512];
  for (;;) {
    int k = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
    if ((uint32_t)k >= w->n || __atomic_load_n(&w->failed, __ATOMIC_ACQUIRE)) break;
    const em_expert_task* t = &w->tasks[k];
    int rc = em_ffn_call(t->f, t->x, h, w->zero, t->weight, t->out, err, sizeof err);
    if (rc && !__atomic_exchange_n(&w->failed, 1, __ATOMIC_ACQ_REL)) {
      w->rc = rc;
      snprintf(w->err, w->errn, "%s", err);
    }
  }
  em_arena_bind(previous);
  return 0;
}

int em_experts_parallel(const em_expert_task* tasks, uint32_t n, uint32_t lanes, const em_arena* arena,
                        const float* zero, uint32_t hidden, uint32_t inter, char* err, size_t errn) {
  lane_work w = {tasks, n, lanes < n ? lanes : n, hidden, inter, arena, zero, 0, 0, EM_OK, err, errn};
  em_parallel_launch(run_lane, &w, 0); /* run_lane reports failures in w, never to the pool */
  return w.rc;
}
