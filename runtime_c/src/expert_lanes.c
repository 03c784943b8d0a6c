#include "expert_lanes.h"

#include <stdio.h>
#include <string.h>

#include "edgemoe.h"
#include "thread_pool.h"

#define LANE_ALIGN 64u

static uint64_t align_up(uint64_t v) { return (v + LANE_ALIGN - 1) & ~(uint64_t)(LANE_ALIGN - 1); }

/* A lane's slice: the intermediate activations [rows · inter]; for a batch, its inputs and outputs
 * [rows · hidden] each and its weights [rows]; then its kernels' workspace: an integer-dot kernel
 * quantizes its inputs there (under two floats per input element; memory_plan.c), the widest input
 * being hidden (gate/up) or inter (down), plus alignment between allocations. */
typedef struct {
  uint64_t h, x, y, w, size;
} lane_layout;

static lane_layout layout_of(uint32_t hidden, uint32_t inter, uint32_t rows) {
  uint64_t widest = hidden > inter ? hidden : inter, io = rows > 1 ? align_up((uint64_t)rows * hidden * sizeof(float)) : 0;
  lane_layout l;
  l.h = 0;
  l.x = align_up((uint64_t)rows * inter * sizeof(float));
  l.y = l.x + io;
  l.w = l.y + io;
  l.size = l.w + (rows > 1 ? align_up(rows * sizeof(float)) : 0) + align_up(2 * rows * widest * sizeof(float)) +
           8 * LANE_ALIGN;
  return l;
}

uint64_t em_expert_lanes_bytes(uint32_t lanes, uint32_t hidden, uint32_t inter, uint32_t rows) {
  return lanes * layout_of(hidden, inter, rows).size;
}

uint32_t em_expert_lanes(uint32_t threads, uint32_t top_k, uint64_t arena_bytes, uint32_t hidden, uint32_t inter,
                         uint32_t rows) {
  uint64_t fit = arena_bytes / layout_of(hidden, inter, rows).size;
  uint64_t lanes = threads < top_k ? threads : top_k;
  if (lanes > fit) lanes = fit;
  return lanes ? (uint32_t)lanes : 1;
}

typedef struct {
  const em_expert_task* tasks;
  const em_task_run* runs;
  uint32_t n_runs, lanes, hidden, inter, rows;
  const em_arena* arena;
  const float* zero;
  int next;   /* the next run to take (atomic) */
  int failed; /* set once by the first failing expert (atomic) */
  int rc;
  char* err;
  size_t errn;
} lane_work;

/* One run of tasks: through the batched kernels where it is a full batch, else task by task. */
static int run_tasks(const lane_work* w, const em_task_run* run, uint8_t* base, const lane_layout* l, char* err,
                     size_t n) {
  const em_expert_task* t = &w->tasks[run->first];
  float* h = (float*)(base + l->h);
  if (run->count == w->rows && w->rows > 1) {
    float *x = (float*)(base + l->x), *y = (float*)(base + l->y), *wts = (float*)(base + l->w);
    for (uint32_t m = 0; m < run->count; m++) {
      memcpy(x + (size_t)m * w->hidden, t[m].x, w->hidden * sizeof(float));
      wts[m] = *t[m].weight;
    }
    int rc = em_ffn_call_batch(t->f, x, h, w->zero, wts, y, err, n);
    for (uint32_t m = 0; m < run->count && !rc; m++) memcpy(t[m].out, y + (size_t)m * w->hidden, w->hidden * sizeof(float));
    return rc;
  }
  for (uint32_t m = 0; m < run->count; m++) {
    int rc = em_ffn_call(t[m].f, t[m].x, h, w->zero, t[m].weight, t[m].out, err, n);
    if (rc) return rc;
  }
  return EM_OK;
}

static int run_lane(int task_id, em_parallel_env* penv, void* cdata) {
  (void)penv;
  lane_work* w = (lane_work*)cdata;
  if ((uint32_t)task_id >= w->lanes) return 0;
  lane_layout l = layout_of(w->hidden, w->inter, w->rows);
  uint8_t* base = w->arena->base + (uint64_t)task_id * l.size;
  em_arena scratch;
  memset(&scratch, 0, sizeof scratch);
  scratch.base = base + l.w + (w->rows > 1 ? align_up(w->rows * sizeof(float)) : 0);
  scratch.size = l.size - (uint64_t)(scratch.base - base);
  em_arena* previous = em_arena_bind(&scratch);
  char err[512];
  for (;;) {
    int k = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
    if ((uint32_t)k >= w->n_runs || __atomic_load_n(&w->failed, __ATOMIC_ACQUIRE)) break;
    int rc = run_tasks(w, &w->runs[k], base, &l, err, sizeof err);
    if (rc && !__atomic_exchange_n(&w->failed, 1, __ATOMIC_ACQ_REL)) {
      w->rc = rc;
      snprintf(w->err, w->errn, "%s", err);
    }
  }
  em_arena_bind(previous);
  return 0;
}

int em_experts_run(const em_expert_task* tasks, uint32_t n, uint32_t lanes, uint32_t rows, em_task_run* runs,
                   const em_arena* arena, const float* zero, uint32_t hidden, uint32_t inter, uint64_t* batched_calls,
                   char* err, size_t errn) {
  uint32_t n_runs = 0;
  for (uint32_t k = 0; k < n;) { /* a run: up to `rows` consecutive tasks of one block that has batched kernels */
    uint32_t count = 1;
    if (rows > 1 && tasks[k].f->gate_up_batch)
      while (count < rows && k + count < n && tasks[k + count].f == tasks[k].f) count++;
    if (rows > 1 && count == rows) *batched_calls += 2; /* gate-up and down */
    runs[n_runs++] = (em_task_run){k, count};
    k += count;
  }
  lane_work w = {tasks, runs, n_runs, lanes < n_runs ? lanes : n_runs, hidden, inter, rows, arena, zero, 0, 0, EM_OK,
                 err, errn};
  if (w.lanes > 1)
    em_parallel_launch(run_lane, &w, 0); /* run_lane reports failures in w, never to the pool */
  else
    run_lane(0, NULL, &w);
  return w.rc;
}
