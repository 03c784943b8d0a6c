#ifndef EM_CRC32_H
#define EM_CRC32_H
#include <stddef.h>
#include <stdint.h>
/* CRC-32 (IEEE 802.3, reflected, as zlib.crc32): crc = em_crc32(0, data, n). */
uint32_t em_crc32(uint32_t crc, const void* data, size_t n);
#endif
