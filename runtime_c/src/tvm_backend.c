#include "tvm_backend.h"

#include <stdio.h>
#include <string.h>

static EM_THREAD_LOCAL em_arena* bound_arena;
static EM_THREAD_LOCAL char kernel_error[512];

em_arena* em_arena_bind(em_arena* arena) {
  em_arena* previous = bound_arena;
  bound_arena = arena;
  return previous;
}

em_arena* em_arena_bound(void) { return bound_arena; }

static size_t aligned_offset(const em_arena* a, size_t offset) {
  return (size_t)((((uintptr_t)(a->base + offset) + 63) & ~(uintptr_t)63) - (uintptr_t)a->base);
}

void em_arena_share(const em_arena* parent, em_arena* tasks) {
  memset(tasks, 0, sizeof *tasks);
  if (!parent) return;
  size_t start = aligned_offset(parent, parent->top);
  if (start > parent->size) start = parent->size;
  tasks->base = parent->base + start;
  tasks->size = parent->size - start;
  tasks->shared = 1;
}

void em_arena_unshare(em_arena* parent, const em_arena* tasks) {
  if (!parent || !tasks->base) return;
  size_t top = (size_t)(tasks->base - parent->base) + (tasks->top < tasks->size ? tasks->top : tasks->size);
  if (top > parent->high_water) parent->high_water = top;
}

/* A request in a launch's shared arena: its bytes and alignment slack claimed at once. */
static void* shared_alloc(em_arena* a, uint64_t nbytes) {
  size_t need = (size_t)nbytes + 63;
  size_t old = __atomic_fetch_add(&a->top, need, __ATOMIC_RELAXED);
  if (need > a->size || old > a->size - need) {
    snprintf(kernel_error, sizeof kernel_error,
             "workspace request of %llu bytes does not fit the %llu bytes a parallel launch's tasks share",
             (unsigned long long)nbytes, (unsigned long long)a->size);
    return NULL;
  }
  return a->base + aligned_offset(a, old);
}

void* em_workspace_alloc(int device_type, int device_id, uint64_t nbytes, int dtype_code, int dtype_bits) {
  (void)device_type, (void)device_id, (void)dtype_code, (void)dtype_bits;
  em_arena* a = bound_arena;
  if (a && a->shared) return shared_alloc(a, nbytes);
  size_t start = a ? aligned_offset(a, a->top) : 0;
  if (!a || a->n_live == EM_ARENA_MAX_LIVE || nbytes > a->size || start > a->size - nbytes) {
    snprintf(kernel_error, sizeof kernel_error, "workspace request of %llu bytes does not fit the %llu-byte arena",
             (unsigned long long)nbytes, (unsigned long long)(a ? a->size - a->top : 0));
    return NULL;
  }
  a->live_start[a->n_live] = start;
  a->live_end[a->n_live++] = start + (size_t)nbytes;
  a->top = start + (size_t)nbytes;
  if (a->top > a->high_water) a->high_water = a->top;
  return a->base + start;
}

int em_workspace_free(int device_type, int device_id, void* ptr) {
  (void)device_type, (void)device_id;
  em_arena* a = bound_arena;
  if (!a) return -1;
  if (a->shared) return 0; /* released with the launch */
  size_t off = (size_t)((uint8_t*)ptr - a->base);
  /* Generated code frees in reverse order of allocation; anything freed out of order is
     released when the allocations above it are. */
  for (int i = a->n_live - 1; i >= 0; i--) {
    if (a->live_start[i] != off) continue;
    a->live_start[i] = (size_t)-1;
    while (a->n_live > 0 && a->live_start[a->n_live - 1] == (size_t)-1) a->n_live--;
    a->top = a->n_live ? a->live_end[a->n_live - 1] : 0;
    return 0;
  }
  return -1;
}

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts) {
  size_t n = 0;
  kernel_error[0] = 0;
  const char* head[2] = {kind ? kind : "Error", ": "};
  for (int i = 0; i < 2; i++) {
    size_t l = strlen(head[i]);
    if (n + l >= sizeof kernel_error) l = sizeof kernel_error - n - 1;
    memcpy(kernel_error + n, head[i], l);
    n += l;
  }
  for (int32_t i = 0; i < num_parts; i++) {
    if (!parts[i]) continue;
    size_t l = strlen(parts[i]);
    if (n + l >= sizeof kernel_error) l = sizeof kernel_error - n - 1;
    memcpy(kernel_error + n, parts[i], l);
    n += l;
  }
  kernel_error[n] = 0;
}

const char* em_take_kernel_error(void) {
  static EM_THREAD_LOCAL char copy[sizeof kernel_error];
  memcpy(copy, kernel_error, sizeof copy);
  kernel_error[0] = 0;
  return copy;
}
