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

/* The most a wait is shortened by: a timer's usual lateness, not a loaded host's scheduling delay. */
#define EM_OVERSLEEP_MAX_NS 60000ull

typedef struct {
  em_storage base;
  em_storage* inner;
  double bandwidth, latency;
  pthread_mutex_t lock;
  uint64_t busy_until_ns; /* when the device finishes the transfers already scheduled */
  /* how late a sleep wakes here, a running average: each wait asks for that much less, so reads end
     when the device would have finished them rather than tens of microseconds after (most of a UFS
     device's 0.1 ms request latency) */
  uint64_t oversleep_ns;
} emulated_storage;

/* Stretches a request of len bytes that started at `start` (its real read done) to the device's time. */
static void pace_request(emulated_storage* s, uint64_t len, uint64_t start) {
  uint64_t ready = start + (uint64_t)(s->latency * 1e9), transfer = (uint64_t)((double)len / s->bandwidth * 1e9);
  pthread_mutex_lock(&s->lock);
  uint64_t begin = ready > s->busy_until_ns ? ready : s->busy_until_ns, done = begin + transfer;
  s->busy_until_ns = done;
  uint64_t wake = done > s->oversleep_ns ? done - s->oversleep_ns : 0;
  pthread_mutex_unlock(&s->lock);
  uint64_t now = em_now_ns();
  if (wake > now) {
    em_sleep_s((double)(wake - now) * 1e-9);
    uint64_t late = em_now_ns() - wake;
    if (late > EM_OVERSLEEP_MAX_NS) late = EM_OVERSLEEP_MAX_NS; /* a descheduled thread is not a late timer */
    pthread_mutex_lock(&s->lock);
    s->oversleep_ns = (7 * s->oversleep_ns + late) / 8;
    pthread_mutex_unlock(&s->lock);
  }
}

static int emulated_read(em_storage* self, void* dst, uint64_t len, uint64_t offset) {
  emulated_storage* s = (emulated_storage*)self;
  uint64_t start = em_now_ns();
  int rc = s->inner->read(s->inner, dst, len, offset);
  if (!rc) pace_request(s, len, start);
  return rc;
}

/* Coalesced records are one request: one latency, then their bytes. */
static int emulated_readv(em_storage* self, const em_span* spans, uint32_t n, uint64_t offset) {
  emulated_storage* s = (emulated_storage*)self;
  uint64_t start = em_now_ns(), len = 0;
  int rc = em_storage_readv(s->inner, spans, n, offset);
  for (uint32_t i = 0; i < n; i++) len += spans[i].len;
  if (!rc) pace_request(s, len, start);
  return rc;
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
  s->base.readv = emulated_readv;
  s->base.close = emulated_close;
  s->inner = inner;
  s->bandwidth = bandwidth;
  s->latency = latency_s;
  pthread_mutex_init(&s->lock, NULL);
  return &s->base;
}
