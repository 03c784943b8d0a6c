/* The thread pool of a build without threads (EM_BAREMETAL): parallel loops of TVM-generated
 * kernels run whole on the calling thread, as one task. */
#include <stddef.h>

#include "thread_pool.h"

int em_pool_create(int threads, em_pool** out, char* err, size_t n) {
  (void)threads, (void)err, (void)n;
  *out = NULL;
  return 0;
}

void em_pool_destroy(em_pool* pool) { (void)pool; }

void em_pool_bind(em_pool* pool) { (void)pool; }

int em_parallel_launch(em_parallel_lambda f, void* cdata, int num_task) {
  (void)num_task;
  em_parallel_env env = {NULL, 1};
  return f(0, &env, cdata);
}

int em_pool_threads(const em_pool* pool) {
  (void)pool;
  return 1;
}
