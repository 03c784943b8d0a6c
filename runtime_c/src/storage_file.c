#define _XOPEN_SOURCE 700
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "artifact.h"
#include "storage.h"

typedef struct {
  em_storage base;
  int fd;
} file_storage;

static int file_read(em_storage* self, void* dst, uint64_t len, uint64_t offset) {
  return em_pread_all(((file_storage*)self)->fd, dst, len, offset);
}

static void file_close(em_storage* self) {
  close(((file_storage*)self)->fd);
  free(self);
}

em_storage* em_storage_open_file(const char* path, char* err, size_t err_len) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) {
    snprintf(err, err_len, "cannot open %s: %s", path, strerror(errno));
    return NULL;
  }
  file_storage* s = (file_storage*)calloc(1, sizeof *s);
  if (!s) {
    close(fd);
    snprintf(err, err_len, "out of memory");
    return NULL;
  }
  s->base.read = file_read;
  s->base.close = file_close;
  s->fd = fd;
  return &s->base;
}
