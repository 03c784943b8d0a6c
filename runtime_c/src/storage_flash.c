/* Expert records read from experts.bin in the mounted flash image (bare-metal builds): the
 * loader's blocking reads, and the transfers it starts and polls between kernels. */
#include <stdio.h>
#include <stdlib.h>

#include "artifact.h"
#include "flash.h"
#include "storage.h"

typedef struct {
  em_storage base;
  uint32_t offset, length; /* of experts.bin in the flash */
} flash_storage;

static int in_file(const flash_storage* s, uint64_t len, uint64_t offset) {
  return offset <= s->length && len <= s->length - offset;
}

static int flash_storage_start(em_storage* self, void* dst, uint64_t len, uint64_t offset) {
  flash_storage* s = (flash_storage*)self;
  if (!in_file(s, len, offset)) return EM_READ_SHORT;
  return em_flash_start(dst, (uint32_t)len, s->offset + (uint32_t)offset);
}

static int flash_storage_poll(em_storage* self) {
  (void)self;
  return em_flash_poll();
}

static int flash_storage_read(em_storage* self, void* dst, uint64_t len, uint64_t offset) {
  int rc = flash_storage_start(self, dst, len, offset);
  while (rc == 0) rc = em_flash_poll();
  return rc < 0 ? rc : 0;
}

static void flash_storage_close(em_storage* self) { free(self); }

em_storage* em_storage_open(const em_params* p, const char* path, char* err, size_t err_len) {
  (void)p; /* one back end: the mounted flash (memory-mapped or driver) */
  int fd = em_open_file(path, err, err_len);
  if (fd < 0) return NULL;
  flash_storage* s = (flash_storage*)calloc(1, sizeof *s);
  if (!s) {
    snprintf(err, err_len, "out of memory");
    return NULL;
  }
  em_flash_file_range(fd, &s->offset, &s->length);
  s->base.read = flash_storage_read;
  s->base.start = flash_storage_start;
  s->base.poll = flash_storage_poll;
  s->base.close = flash_storage_close;
  return &s->base;
}
