/* Fault injection for tests: a storage wrapper that makes chosen reads fail or misbehave the way
 * failing hardware does (an I/O error, a file that seems to end, an interrupted call, a flipped
 * byte, a latency spike), so the runtime's recovery is tested through its real read path. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "artifact.h"
#include "clock.h"
#include "storage.h"

#define MAX_FAULTS 32

typedef enum { FAULT_EIO, FAULT_SHORT, FAULT_EINTR, FAULT_CORRUPT, FAULT_DELAY } fault_kind;

typedef struct {
  fault_kind kind;
  uint64_t first, count; /* reads first .. first + count - 1 (1-based) */
  double delay_s;
} fault;

typedef struct {
  em_storage base;
  em_storage* inner;
  fault faults[MAX_FAULTS];
  int n_faults;
  uint64_t reads; /* reads so far; one reader at a time (the loader), atomics for safety */
} faulty_storage;

/* The faults planned for the next request (each read or coalesced read counts one): an error to
 * return instead of reading, else 0 with *corrupt set where the data must be damaged. */
static int next_faults(faulty_storage* s, int* corrupt) {
  uint64_t nth = __atomic_add_fetch(&s->reads, 1, __ATOMIC_RELAXED);
  *corrupt = 0;
  for (int i = 0; i < s->n_faults; i++) {
    const fault* f = &s->faults[i];
    if (nth < f->first || nth - f->first >= f->count) continue;
    switch (f->kind) {
      case FAULT_EIO: return -EIO;
      case FAULT_SHORT: return EM_READ_SHORT;
      case FAULT_EINTR: return -EINTR;
      case FAULT_CORRUPT: *corrupt = 1; break;
      case FAULT_DELAY: em_sleep_s(f->delay_s); break;
    }
  }
  return 0;
}

static int faulty_read(em_storage* self, void* dst, uint64_t len, uint64_t offset) {
  faulty_storage* s = (faulty_storage*)self;
  int corrupt, rc = next_faults(s, &corrupt);
  if (!rc) rc = s->inner->read(s->inner, dst, len, offset);
  if (!rc && corrupt && len) ((uint8_t*)dst)[len / 2] ^= 0x5a;
  return rc;
}

/* A coalesced read: a corruption damages its first buffer. */
static int faulty_readv(em_storage* self, const em_span* spans, uint32_t n, uint64_t offset) {
  faulty_storage* s = (faulty_storage*)self;
  int corrupt, rc = next_faults(s, &corrupt);
  if (!rc) rc = em_storage_readv(s->inner, spans, n, offset);
  if (!rc && corrupt && n && spans[0].len) ((uint8_t*)spans[0].dst)[spans[0].len / 2] ^= 0x5a;
  return rc;
}

static void faulty_close(em_storage* self) {
  faulty_storage* s = (faulty_storage*)self;
  s->inner->close(s->inner);
  free(s);
}

static int parse_plan(const char* plan, faulty_storage* s, char* err, size_t n) {
  static const char* const kinds[] = {"eio", "short", "eintr", "corrupt", "delay"};
  const char* p = plan;
  while (*p) {
    if (s->n_faults == MAX_FAULTS) {
      snprintf(err, n, "fault plan '%s': more than %d faults", plan, MAX_FAULTS);
      return -1;
    }
    fault* f = &s->faults[s->n_faults];
    size_t len = strcspn(p, "@");
    int k = -1;
    for (int i = 0; i < 5; i++)
      if (strlen(kinds[i]) == len && !strncmp(p, kinds[i], len)) k = i;
    char* end = NULL;
    unsigned long long first = 0, count = 1;
    double ms = 0.0;
    if (k >= 0 && p[len] == '@') first = strtoull(p + len + 1, &end, 10);
    if (end && *end == '*') count = strtoull(end + 1, &end, 10);
    if (end && *end == ':' && k == FAULT_DELAY) ms = strtod(end + 1, &end);
    if (k < 0 || !end || first == 0 || count == 0 || !(ms >= 0.0 && ms < 1e6) || (*end && *end != ',')) {
      snprintf(err, n, "fault plan '%s': expected KIND@N[*COUNT][:MS] with KIND eio, short, eintr, corrupt or delay",
               plan);
      return -1;
    }
    f->kind = (fault_kind)k, f->first = first, f->count = count, f->delay_s = ms * 1e-3;
    s->n_faults++;
    p = *end ? end + 1 : end;
  }
  return 0;
}

em_storage* em_storage_inject_faults(em_storage* inner, const char* plan, char* err, size_t err_len) {
  faulty_storage* s = (faulty_storage*)calloc(1, sizeof *s);
  if (!s || parse_plan(plan, s, err, err_len) != 0) {
    if (!s) snprintf(err, err_len, "out of memory");
    free(s);
    inner->close(inner);
    return NULL;
  }
  s->base.read = faulty_read;
  s->base.readv = faulty_readv;
  s->base.close = faulty_close;
  s->inner = inner;
  return &s->base;
}
