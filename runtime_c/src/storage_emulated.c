/* Emulated storage device: real reads from the inner backend, stretched in time to the target
 * device's latency + size / bandwidth, so a phone's UFS or a board's SD card behaves the same on a
 * host whose NVMe and page cache are far faster. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "clock.h"
#include "storage.h"

typedef struct {
  em_storage base;
  em_storage* inner;
  double bandwidth, latency;
} emulated_storage;

static int emulated_read(em_storage* self, void* dst, uint64_t len, uint64_t offset) {
  emulated_storage* s = (emulated_storage*)self;
  uint64_t start = em_now_ns();
  int rc = s->inner->read(s->inner, dst, len, offset);
  if (rc) return rc;
  em_sleep_s(s->latency + (double)len / s->bandwidth - (double)(em_now_ns() - start) * 1e-9);
  return 0;
}

static void emulated_close(em_storage* self) {
  emulated_storage* s = (emulated_storage*)self;
  s->inner->close(s->inner);
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
  return &s->base;
}
