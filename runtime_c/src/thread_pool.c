#include "thread_pool.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgemoe.h"
#include "tvm_backend.h"

/* A launch is cut into TASKS_PER_THREAD tasks per thread, which the threads take off a counter
 * until none is left, the caller among them: a thread that wakes late, or is descheduled on a
 * shared machine, leaves its share to the others, and the launch ends when every task has run,
 * not when every thread has checked in (static halves made two-thread decode wait for the slower
 * thread each launch). */
#define TASKS_PER_THREAD 4

struct em_pool {
  pthread_mutex_t mu;
  pthread_cond_t start, done;
  pthread_t* workers;
  int threads, started, tasks;
  /* The loop being run. `ticket` holds the launch's generation (high 32 bits) and its next task
   * (low 32 bits): claiming a task is a compare-and-swap on both, so a thread never takes a task
   * of a launch that has ended, and reads f and cdata only once it holds a task, which the
   * launch cannot end without. generation, ticket, finished and stop are read without the lock. */
  em_parallel_lambda f;
  void* cdata;
  unsigned long generation;
  uint64_t ticket;
  int finished; /* tasks of this launch run to the end */
  em_arena task_arena; /* the launcher's free arena, shared by the launch's tasks (a kernel's per-task workspace) */
  int failed;
  char error[512];
  int stop;
};

/* A decode step launches a parallel loop every few tens of microseconds; waking a thread blocked
 * on a condition variable takes about as long, so both sides spin this many pauses first. */
#define SPIN_PAUSES 4096
#if defined(__x86_64__) || defined(__i386__)
#define CPU_PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define CPU_PAUSE() __asm__ __volatile__("yield")
#else
#define CPU_PAUSE() ((void)0)
#endif
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)

typedef struct {
  em_pool* pool;
} worker_arg;

static EM_THREAD_LOCAL em_pool* bound_pool;

void em_pool_bind(em_pool* pool) { bound_pool = pool; }

static void run_task(em_pool* p, int task_id) {
  em_parallel_env env = {NULL, p->tasks};
  em_arena* previous = em_arena_bind(&p->task_arena);
  int rc = p->f(task_id, &env, p->cdata);
  em_arena_bind(previous);
  if (rc == 0) return;
  const char* msg = em_take_kernel_error();
  pthread_mutex_lock(&p->mu);
  if (!p->failed) snprintf(p->error, sizeof p->error, "%s", msg[0] ? msg : "parallel task failed");
  p->failed = 1;
  pthread_mutex_unlock(&p->mu);
}

/* Runs tasks of launch `generation` until none is left to claim. */
static void run_tasks(em_pool* p, unsigned long generation) {
  uint64_t t = LOAD(p->ticket);
  while ((t >> 32) == (generation & 0xffffffffu) && (uint32_t)t < (uint32_t)p->tasks) {
    if (!__atomic_compare_exchange_n(&p->ticket, &t, t + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
    run_task(p, (int)(uint32_t)t);
    if (__atomic_add_fetch(&p->finished, 1, __ATOMIC_ACQ_REL) == p->tasks) {
      pthread_mutex_lock(&p->mu);
      pthread_cond_signal(&p->done);
      pthread_mutex_unlock(&p->mu);
    }
    t = LOAD(p->ticket);
  }
}

static void* worker_main(void* argp) {
  em_pool* p = ((worker_arg*)argp)->pool;
  free(argp);
  unsigned long seen = 0;
  for (;;) {
    for (int i = 0; i < SPIN_PAUSES && LOAD(p->generation) == seen && !LOAD(p->stop); i++) CPU_PAUSE();
    if (LOAD(p->generation) == seen && !LOAD(p->stop)) { /* nothing came while spinning: sleep */
      pthread_mutex_lock(&p->mu);
      while (!LOAD(p->stop) && LOAD(p->generation) == seen) pthread_cond_wait(&p->start, &p->mu);
      pthread_mutex_unlock(&p->mu);
    }
    if (LOAD(p->stop)) break;
    seen = LOAD(p->generation);
    run_tasks(p, seen);
  }
  return NULL;
}

int em_pool_create(int threads, em_pool** out, char* err, size_t n) {
  *out = NULL;
  if (threads < 1) threads = 1;
  em_pool* p = (em_pool*)calloc(1, sizeof *p);
  if (p) p->workers = (pthread_t*)calloc((size_t)threads, sizeof(pthread_t));
  if (!p || !p->workers) {
    free(p);
    snprintf(err, n, "out of memory creating a %d-thread compute pool", threads);
    return EM_ERR_NOMEM;
  }
  p->threads = threads;
  p->tasks = threads * TASKS_PER_THREAD;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->start, NULL);
  pthread_cond_init(&p->done, NULL);
  for (int i = 1; i < threads; i++) {
    worker_arg* a = (worker_arg*)malloc(sizeof *a);
    if (a) *a = (worker_arg){p};
    if (!a || pthread_create(&p->workers[i], NULL, worker_main, a) != 0) {
      free(a);
      em_pool_destroy(p);
      snprintf(err, n, "cannot start compute thread %d of %d (lower the thread count)", i, threads);
      return EM_ERR_NOMEM;
    }
    p->started = i;
  }
  *out = p;
  return EM_OK;
}

void em_pool_destroy(em_pool* p) {
  if (!p) return;
  pthread_mutex_lock(&p->mu);
  STORE(p->stop, 1);
  pthread_cond_broadcast(&p->start);
  pthread_mutex_unlock(&p->mu);
  for (int i = 1; i <= p->started; i++) pthread_join(p->workers[i], NULL);
  pthread_cond_destroy(&p->start);
  pthread_cond_destroy(&p->done);
  pthread_mutex_destroy(&p->mu);
  free(p->workers);
  free(p);
}

int em_parallel_launch(em_parallel_lambda f, void* cdata, int num_task) {
  (void)num_task; /* generated code passes 0 ("all"); the pool decides */
  em_pool* p = bound_pool;
  if (!p || p->threads == 1) {
    em_parallel_env env = {NULL, 1};
    return f(0, &env, cdata);
  }
  pthread_mutex_lock(&p->mu);
  unsigned long generation = p->generation + 1;
  p->f = f;
  p->cdata = cdata;
  p->failed = 0;
  em_arena* arena = em_arena_bound();
  em_arena_share(arena, &p->task_arena);
  STORE(p->finished, 0);
  STORE(p->ticket, (uint64_t)(generation & 0xffffffffu) << 32); /* release: f and cdata before it */
  STORE(p->generation, generation);
  pthread_cond_broadcast(&p->start);
  pthread_mutex_unlock(&p->mu);

  bound_pool = NULL; /* a parallel loop inside a task runs on that task's thread */
  run_tasks(p, generation);
  bound_pool = p;

  for (int i = 0; i < SPIN_PAUSES && LOAD(p->finished) < p->tasks; i++) CPU_PAUSE();
  pthread_mutex_lock(&p->mu);
  while (LOAD(p->finished) < p->tasks) pthread_cond_wait(&p->done, &p->mu);
  em_arena_unshare(arena, &p->task_arena);
  int failed = p->failed;
  char msg[sizeof p->error];
  memcpy(msg, p->error, sizeof msg);
  pthread_mutex_unlock(&p->mu);
  if (!failed) return 0;
  const char* parts[1] = {msg};
  TVMFFIErrorSetRaisedFromCStrParts("ParallelTaskError", parts, 1);
  return -1;
}

int em_pool_threads(const em_pool* pool) { return pool ? pool->threads : 1; }
