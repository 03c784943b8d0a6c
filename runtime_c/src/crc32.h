#ifndef EM_CRC32_H
#define EM_CRC32_H
#include <stddef.h>
#include <stdint.h>
/* CRC-32 (IEEE 802.3, reflected, as zlib.crc32): crc = em_crc32(0, data, n). Headers, tables, trunk. */
uint32_t em_crc32(uint32_t crc, const void* data, size_t n);
/* CRC-32C (Castagnoli, as iSCSI and Python's crc32c package): expert records, checked on every
 * load, so it uses the CPU's instruction where there is one (x86 SSE4.2, Armv8 CRC). */
uint32_t em_crc32c(uint32_t crc, const void* data, size_t n);
/* The same with tables only, whatever the CPU has (for testing the instruction path against). */
uint32_t em_crc32c_tables(uint32_t crc, const void* data, size_t n);
#endif
