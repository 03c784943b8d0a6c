/* POSIX file backends: pread (optionally O_DIRECT) and mmap. */
#define _GNU_SOURCE /* O_DIRECT */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "artifact.h"
#include "storage.h"

typedef struct {
  em_storage base;
  int fd;
} pread_storage;

static int pread_read(em_storage* self, void* dst, uint64_t len, uint64_t offset) {
  return em_pread_all(((pread_storage*)self)->fd, dst, len, offset);
}

/* One preadv for all the spans, continued after a partial transfer (a signal, a large request). */
static int pread_readv(em_storage* self, const em_span* spans, uint32_t n, uint64_t offset) {
  struct iovec iov[EM_MAX_SPANS];
  if (n > EM_MAX_SPANS) return -EINVAL;
  for (uint32_t i = 0; i < n; i++) iov[i] = (struct iovec){spans[i].dst, (size_t)spans[i].len};
  struct iovec* at = iov;
  int left = (int)n;
  while (left > 0) {
    ssize_t got = preadv(((pread_storage*)self)->fd, at, left, (off_t)offset);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return -errno;
    if (got == 0) return EM_READ_SHORT;
    offset += (uint64_t)got;
    for (; left > 0 && (size_t)got >= at->iov_len; left--, at++) got -= (ssize_t)at->iov_len;
    if (left > 0) at->iov_base = (uint8_t*)at->iov_base + got, at->iov_len -= (size_t)got;
  }
  return 0;
}

static void pread_close(em_storage* self) {
  close(((pread_storage*)self)->fd);
  free(self);
}

em_storage* em_storage_open_pread(const char* path, int direct_io, char* err, size_t err_len) {
  int flags = O_RDONLY;
#ifdef O_DIRECT
  if (direct_io) flags |= O_DIRECT;
#else
  if (direct_io) {
    snprintf(err, err_len, "O_DIRECT is not available on this system");
    return NULL;
  }
#endif
  int checked = em_open_file(path, err, err_len); /* a regular file, not a FIFO or directory */
  if (checked < 0) return NULL;
  close(checked);
  int fd = open(path, flags | O_CLOEXEC);
  if (fd < 0) {
    snprintf(err, err_len, "cannot open %s%s: %s", path, direct_io ? " with O_DIRECT" : "", strerror(errno));
    return NULL;
  }
  pread_storage* s = (pread_storage*)calloc(1, sizeof *s);
  if (!s) {
    close(fd);
    snprintf(err, err_len, "out of memory");
    return NULL;
  }
  s->base.read = pread_read;
  s->base.readv = pread_readv;
  s->base.close = pread_close;
  s->fd = fd;
  return &s->base;
}

/* A page fault on a file mapping maps neighbouring cached pages too (Linux: fault_around_bytes,
 * 64 KiB by default); the pages dropped after a copy include these. */
#define FAULT_AROUND_BYTES (64u << 10)

typedef struct {
  em_storage base;
  const uint8_t* map;
  uint64_t size;
  int fd;
} mmap_storage;

static int mmap_readv(em_storage* self, const em_span* spans, uint32_t n, uint64_t offset) {
  mmap_storage* s = (mmap_storage*)self;
  uint64_t len = 0;
  for (uint32_t i = 0; i < n; i++) len += spans[i].len;
  /* The mapping's length was fixed at open; a file truncated since reads as a short read. */
  struct stat st;
  if (offset > s->size || len > s->size - offset || fstat(s->fd, &st) != 0 || (uint64_t)st.st_size < offset + len)
    return EM_READ_SHORT;
  for (uint64_t i = 0, at = offset; i < n; at += spans[i].len, i++) memcpy(spans[i].dst, s->map + at, spans[i].len);
  /* The copy is what the session keeps: drop the mapped pages from this process (the kernel's page
     cache may keep them), so the process's resident memory stays within the budget. */
  uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), around = FAULT_AROUND_BYTES;
  uint64_t start = offset > around ? (offset - around) / page * page : 0;
  uint64_t end = s->size - offset - len > around ? offset + len + around : s->size;
  madvise((void*)(s->map + start), (size_t)(end - start), MADV_DONTNEED);
  return 0;
}

static int mmap_read(em_storage* self, void* dst, uint64_t len, uint64_t offset) {
  em_span one = {dst, len};
  return mmap_readv(self, &one, 1, offset);
}

static void mmap_close(em_storage* self) {
  mmap_storage* s = (mmap_storage*)self;
  munmap((void*)s->map, s->size);
  close(s->fd);
  free(s);
}

em_storage* em_storage_open_mmap(const char* path, char* err, size_t err_len) {
  int fd = em_open_file(path, err, err_len);
  struct stat st;
  if (fd < 0) return NULL;
  if (fstat(fd, &st) != 0) {
    snprintf(err, err_len, "cannot open %s: %s", path, strerror(errno));
    close(fd);
    return NULL;
  }
  void* map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  mmap_storage* s = map == MAP_FAILED ? NULL : (mmap_storage*)calloc(1, sizeof *s);
  if (!s) {
    snprintf(err, err_len, "cannot map %s: %s", path, strerror(errno));
    if (map != MAP_FAILED) munmap(map, (size_t)st.st_size);
    close(fd);
    return NULL;
  }
  s->base.read = mmap_read;
  s->base.readv = mmap_readv;
  s->base.close = mmap_close;
  s->map = (const uint8_t*)map;
  s->size = (uint64_t)st.st_size;
  s->fd = fd;
  return &s->base;
}
