/* Where expert records come from. One small interface so a board's flash, an SD card or a
 * plain file all look the same to the expert cache. */
#ifndef EM_STORAGE_H
#define EM_STORAGE_H

#include <stddef.h>
#include <stdint.h>

typedef struct em_storage em_storage;
struct em_storage {
  /* Read exactly len bytes at offset into dst; 0 or a negative errno-style code. */
  int (*read)(em_storage* self, void* dst, uint64_t len, uint64_t offset);
  void (*close)(em_storage* self);
};

/* POSIX file read with pread(2). */
em_storage* em_storage_open_file(const char* path, char* err, size_t err_len);

#endif
