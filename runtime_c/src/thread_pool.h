/* A fixed pool of compute threads that runs the parallel loops of TVM-generated kernels
 * (TVMBackendParallelLaunch). A session creates one at em_open and binds it to its thread
 * before calling kernels; with no pool bound, parallel loops run on the calling thread. */
#ifndef EM_THREAD_POOL_H
#define EM_THREAD_POOL_H

#include <stddef.h>

#include "tvm_abi.h"

typedef struct em_pool em_pool;

/* `threads` counts the calling thread: threads - 1 workers are started. */
int em_pool_create(int threads, em_pool** out, char* err, size_t n);
void em_pool_destroy(em_pool* pool);

/* Parallel loops launched by kernels on this thread run on `pool` (NULL: serially). */
void em_pool_bind(em_pool* pool);

/* The pool's thread count, the calling thread included (1 for NULL). */
int em_pool_threads(const em_pool* pool);

/* The launch hook: runs task ids 0 .. 4·threads-1 of `f` (the env's num_task), each once, on
 * whichever threads take them first, the calling thread among them, and returns after all have
 * finished; non-zero if any task failed (its message is re-raised on the calling thread).
 * Parallel loops launched inside a task run serially on its thread. */
int em_parallel_launch(em_parallel_lambda f, void* cdata, int num_task);

#endif
