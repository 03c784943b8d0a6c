/* Shared by the fuzz harnesses: fuzzed bytes as a file descriptor, and the checksums recomputed so
 * that mutations reach the bounds checks behind them (a mutated file with stale CRCs is refused at
 * the first checksum and tests nothing else). Field offsets: docs/FORMAT.md. */
#ifndef EM_FUZZ_INPUT_H
#define EM_FUZZ_INPUT_H

#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "artifact.h"
#include "crc32.h"

static inline uint32_t fz_le32(const uint8_t* p) { return (uint32_t)p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static inline uint64_t fz_le64(const uint8_t* p) { return fz_le32(p) | (uint64_t)fz_le32(p + 4) << 32; }
static inline void fz_put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* A memory file holding data[0, n); -1 on failure. */
static inline int fz_memfd(const uint8_t* data, size_t n) {
  int fd = memfd_create("fuzz", 0);
  if (fd < 0) return -1;
  if (n && write(fd, data, n) != (ssize_t)n) {
    close(fd);
    return -1;
  }
  return fd;
}

/* Recomputes the CRC of a table [offset, offset + count * entry) where it lies in the buffer, then
 * stores it at crc_at, and the header's CRC at header_crc_at. */
static inline void fz_fix_crcs(uint8_t* b, size_t n, size_t table_off_at, size_t count_at, uint32_t entry, size_t crc_at,
                        size_t header_crc_at) {
  if (n < header_crc_at + 4) return;
  uint64_t off = fz_le64(b + table_off_at), bytes = (uint64_t)fz_le32(b + count_at) * entry;
  if (off <= n && bytes <= n - off) fz_put32(b + crc_at, em_crc32(0, b + off, (size_t)bytes));
  fz_put32(b + header_crc_at, em_crc32(0, b, header_crc_at));
}

/* experts.bin: its table's and header's CRCs, and every record's CRC-32C where it lies in the buffer. */
static inline void fz_fix_image(uint8_t* b, size_t n) {
  if (n < EM_IMAGE_HEADER_CRC_AT + 4) return;
  uint64_t table = fz_le64(b + 48);
  uint32_t count = fz_le32(b + 24);
  for (uint32_t i = 0; i < count && table <= n && (uint64_t)(i + 1) * EM_RECORD_ENTRY_BYTES <= n - table; i++) {
    uint8_t* e = b + table + (uint64_t)i * EM_RECORD_ENTRY_BYTES;
    uint64_t off = fz_le64(e + 16), len = fz_le64(e + 24);
    if (off <= n && len <= n - off) fz_put32(e + 12, em_crc32c(0, b + off, (size_t)len));
  }
  fz_fix_crcs(b, n, 48, 24, EM_RECORD_ENTRY_BYTES, 72, EM_IMAGE_HEADER_CRC_AT);
}

static inline void fz_fix_trunk(uint8_t* b, size_t n) {
  if (n < EM_TRUNK_HEADER_CRC_AT + 4) return;
  uint64_t data = fz_le64(b + 88), end = fz_le64(b + 96);
  if (data <= end && end <= n) fz_put32(b + 108, em_crc32(0, b + data, (size_t)(end - data)));
  fz_fix_crcs(b, n, 80, 76, EM_TENSOR_ENTRY_BYTES, 104, EM_TRUNK_HEADER_CRC_AT);
}

#endif
