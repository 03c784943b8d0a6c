/* Where expert records come from, behind one small interface: a file read with pread (optionally
 * O_DIRECT), a memory mapping, and an emulation wrapper that imposes a device's bandwidth and
 * latency so a board's storage can be reproduced on a host. */
#ifndef EM_STORAGE_H
#define EM_STORAGE_H

#include <stddef.h>
#include <stdint.h>

#include "edgemoe.h"

typedef struct em_storage em_storage;
struct em_storage {
  /* Read exactly len bytes at offset into dst (both 4096-aligned for O_DIRECT); 0 or -errno
   * (-EIO for a short read). May be called from the loader thread while the decode thread waits. */
  int (*read)(em_storage* self, void* dst, uint64_t len, uint64_t offset);
  void (*close)(em_storage* self);
};

em_storage* em_storage_open_pread(const char* path, int direct_io, char* err, size_t err_len);
em_storage* em_storage_open_mmap(const char* path, char* err, size_t err_len);
/* Wraps `inner` (taking ownership) so each read lasts at least latency_s + len / bandwidth. */
em_storage* em_storage_emulate(em_storage* inner, double bandwidth, double latency_s, char* err, size_t err_len);

/* The backend the session parameters ask for. */
em_storage* em_storage_open(const em_params* p, const char* path, char* err, size_t err_len);

#endif
