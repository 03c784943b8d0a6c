/* Where expert records come from, behind one small interface: a file read with pread (optionally
 * O_DIRECT), a memory mapping, and an emulation wrapper that imposes a device's bandwidth and
 * latency so a board's storage can be reproduced on a host. */
#ifndef EM_STORAGE_H
#define EM_STORAGE_H

#include <stddef.h>
#include <stdint.h>

#include "edgemoe.h"

#define EM_MAX_SPANS 16 /* buffers one request fills at most (records coalesced into one read) */

/* One destination of a request that reads consecutive bytes into several buffers. */
typedef struct {
  void* dst;
  uint64_t len;
} em_span;

typedef struct em_storage em_storage;
struct em_storage {
  /* Read exactly len bytes at offset into dst (both 4096-aligned for O_DIRECT); 0, -errno, or
   * EM_READ_SHORT (artifact.h) where the file ends first. May be called from the loader thread while
   * the decode thread waits. */
  int (*read)(em_storage* self, void* dst, uint64_t len, uint64_t offset);
  /* Reads the consecutive bytes at offset into the spans in order, as one request to the device
   * (adjacent expert records coalesced: one latency instead of one each); same results as read.
   * NULL where the back end has no such request (em_storage_readv then reads span by span). */
  int (*readv)(em_storage* self, const em_span* spans, uint32_t n, uint64_t offset);
  void (*close)(em_storage* self);
  /* Bare-metal back ends (storage_flash.c) also read in the background: start() begins a read
   * (0 or a read's error code), poll() then returns 1 once it is complete, 0 while it runs, or
   * an error code. NULL elsewhere. */
  int (*start)(em_storage* self, void* dst, uint64_t len, uint64_t offset);
  int (*poll)(em_storage* self);
};

em_storage* em_storage_open_pread(const char* path, int direct_io, char* err, size_t err_len);
em_storage* em_storage_open_mmap(const char* path, char* err, size_t err_len);
/* Wraps `inner` (taking ownership) so each read lasts at least latency_s + len / bandwidth. */
em_storage* em_storage_emulate(em_storage* inner, double bandwidth, double latency_s, char* err, size_t err_len);

/* Wraps `inner` (taking ownership) so that reads fail or misbehave as `plan` says, for testing that
 * every fault is survived or reported: comma-separated KIND@N[*COUNT][:MS], N the 1-based ordinal
 * of the read (COUNT consecutive reads from it, default 1); KIND is eio (fails with EIO), short
 * (the file seems to end), eintr (fails with EINTR), corrupt (one byte of the data flipped) or
 * delay (takes MS milliseconds longer). NULL with the reason in err for a malformed plan. */
em_storage* em_storage_inject_faults(em_storage* inner, const char* plan, char* err, size_t err_len);

/* The spans read as one request where the back end can, else one read each (bare-metal builds too). */
static inline int em_storage_readv(em_storage* s, const em_span* spans, uint32_t n, uint64_t offset) {
  if (s->readv) return s->readv(s, spans, n, offset);
  for (uint32_t i = 0; i < n; offset += spans[i].len, i++) {
    int rc = s->read(s, spans[i].dst, spans[i].len, offset);
    if (rc) return rc;
  }
  return 0;
}

/* The backend the session parameters ask for. */
em_storage* em_storage_open(const em_params* p, const char* path, char* err, size_t err_len);

#endif
