/* SHA-256 (FIPS 180-4): the artifact's kernels.so is checked against the digest trunk.bin records
 * before it is loaded. */
#ifndef EM_SHA256_H
#define EM_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
  uint32_t h[8];
  uint64_t bytes;
  uint8_t block[64];
  size_t used;
} em_sha256;

void em_sha256_init(em_sha256* c);
void em_sha256_update(em_sha256* c, const void* data, size_t n);
void em_sha256_final(em_sha256* c, uint8_t digest[32]);

#endif
