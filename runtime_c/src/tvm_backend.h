/* The few functions TVM-generated kernels call back into: error reporting, workspace
 * allocation (from a fixed arena, never malloc); parallel launch is in thread_pool.h. */
#ifndef EM_TVM_BACKEND_H
#define EM_TVM_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "tvm_abi.h"

#if defined(__GNUC__) && !defined(EM_BAREMETAL) /* bare-metal: one thread, no TLS */
#define EM_THREAD_LOCAL __thread
#else
#define EM_THREAD_LOCAL
#endif

#define EM_ARENA_MAX_LIVE 16

typedef struct {
  uint8_t* base;
  size_t size, top;
  size_t live_start[EM_ARENA_MAX_LIVE]; /* live allocations, in allocation order; start = -1 once freed */
  size_t live_end[EM_ARENA_MAX_LIVE];
  int n_live;
  size_t high_water;
  /* A parallel launch's tasks share one arena: requests are bump-allocated with an atomic `top`, frees
     do nothing, and everything is released when the launch ends (em_arena_share). */
  int shared;
} em_arena;

/* Kernel workspace requests on this thread are served from `arena` until the next bind; returns the
 * arena bound before. */
em_arena* em_arena_bind(em_arena* arena);
/* The arena bound on this thread (NULL if none). */
em_arena* em_arena_bound(void);
/* Makes `tasks` the part of `parent` above its live allocations, to be bound by every task of a
 * parallel launch; em_arena_unshare, once the launch has ended, carries its high water back. */
void em_arena_share(const em_arena* parent, em_arena* tasks);
void em_arena_unshare(em_arena* parent, const em_arena* tasks);

void* em_workspace_alloc(int device_type, int device_id, uint64_t nbytes, int dtype_code, int dtype_bits);
int em_workspace_free(int device_type, int device_id, void* ptr);

/* The message of the last kernel error on this thread ("" if none); cleared by the call. */
const char* em_take_kernel_error(void);

/* The symbol the generated code calls on an argument-check failure. */
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts);

#endif
