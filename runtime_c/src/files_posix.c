/* The artifact's files on a POSIX file system: opened as regular files, read with pread. The
 * bare-metal build reads the same names out of a flash image instead (files_flash.c). */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "artifact.h"
#include "edgemoe.h"

int em_pread_all(int fd, void* buf, uint64_t len, uint64_t offset) {
  uint8_t* p = (uint8_t*)buf;
  while (len > 0) {
    ssize_t got = pread(fd, p, len > (1u << 30) ? (1u << 30) : (size_t)len, (off_t)offset);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return -errno;
    if (got == 0) return EM_READ_SHORT;
    p += got;
    len -= (uint64_t)got;
    offset += (uint64_t)got;
  }
  return 0;
}

const char* em_read_error(int code) {
  return code == EM_READ_SHORT ? "the file ends before it (truncated?)" : strerror(-code);
}

int em_open_file(const char* path, char* err, size_t n) {
  /* O_NONBLOCK: opening a FIFO must not wait for a writer; cleared below for a regular file. */
  int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  struct stat st;
  if (fd < 0) {
    snprintf(err, n, "cannot open %s: %s (is this an edgemoe-compile output directory?)", path, strerror(errno));
    return EM_ERR_IO;
  }
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    snprintf(err, n, "%s: %s; an artifact's files are regular files written by edgemoe-compile", path,
             S_ISDIR(st.st_mode) ? "is a directory" : "is not a regular file (a FIFO, socket or device?)");
    close(fd);
    return EM_ERR_IO;
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  return fd;
}

uint64_t em_file_size(int fd) {
  struct stat st;
  return fstat(fd, &st) == 0 ? (uint64_t)st.st_size : 0;
}

void em_close_file(int fd) { close(fd); }
