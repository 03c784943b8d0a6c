/* Emulated storage device: real reads from the inner backend, stretched in time to the target
 * device's latency + size / bandwidth, so a phone's UFS or a board's SD card behaves the same on a
 * host whose NVMe and page cache are far faster. Requests in flight together (several reader
 * threads) overlap their latencies but share the bandwidth: the device transfers one request's
 * bytes at a time, in the order their latencies end. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "clock.h"
#include "storage.h"

typedef struct {
  em_storage base;
  em_storage* inner;
  double bandwidth, latency;
  pthread_mutex_t lock;
  uint64_t busy_until_ns; /* when the device finishes the transfers already scheduled */
} emulated_storage;

static int emulated_read(em_storage* self, void* dst, uint64_t len, uint64_t offset) {
  emulated_storage* s = (emulated_storage*)self;
  uint64_t start = em_now_ns();
  int rc = s->inner->read(s->inner, dst, len, offset);
  if (rc) return rc;
  uint64_t ready = start + (uint64_t)(s->latency * 1e9), transfer = (uint64_t)((double)len / s->bandwidth * 1e9);
  pthread_mutex_lock(&s->lock);
  uint64_t begin = ready > s->busy_until_ns ? ready : s->busy_until_ns, done = begin + transfer;
  s->busy_until_ns = done;
  pthread_mutex_unlock(&s->lock);
  uint64_t now = em_now_ns();
  if (done > now) em_sleep_s((double)(done - now) * 1e-9);
  return 0;
}

static void emulated_close(em_storage* self) {
  emulated_storage* s = (emulated_storage*)self;
  s->inner->close(s->inner);
  pthread_mutex_destroy(&s->lock);
  free(s);
}

em_storage* em_storage_emulate(em_storage* inner, double bandwidth, double latency_s, char* err, size_t err_len) {
  emulated_storage* s = (emulated_storage*)calloc(1, sizeof *s);
  if (!s || bandwidth <= 0 || latency_s < 0) {
    snprintf(err, err_len, s ? "emulated storage needs a bandwidth > 0 and a latency >= 0" : "out of memory");
    free(s);
    inner->close(inner);
    return NULL;
  }
  s->base.read = emulated_read;
  s->base.close = emulated_close;
  s->inner = inner;
  s->bandwidth = bandwidth;
  s->latency = latency_s;
  pthread_mutex_init(&s->lock, NULL);
  return &s->base;
}
