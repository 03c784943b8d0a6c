#include "crc32.h"

#ifndef EM_BAREMETAL
#include <pthread.h>
#endif
#include <string.h>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#endif

/* Slicing-by-8 table-driven CRCs (reflected): eight bytes per step through eight 256-entry
 * tables. Slicing-by-4 checked about 1.1 GB/s here, slower than a phone's flash. */
static uint32_t ieee[8][256], castagnoli[8][256];
static int have_crc_instruction;
#ifdef EM_BAREMETAL
/* one thread: em_open builds the tables before anything else uses them */
static int tables_once;
#define ONCE(flag, fn) ((flag) ? (void)0 : ((flag) = 1, fn()))
#else
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;
#define ONCE(flag, fn) pthread_once(&(flag), fn)
#endif

static void build(uint32_t poly, uint32_t table[8][256]) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c & 1) ? poly ^ (c >> 1) : c >> 1;
    table[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; i++)
    for (int t = 1; t < 8; t++) table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xFF];
}

static void init(void) {
  build(0xEDB88320u, ieee);
  build(0x82F63B78u, castagnoli);
#if defined(__x86_64__)
  have_crc_instruction = __builtin_cpu_supports("sse4.2");
#elif defined(__aarch64__) && defined(__linux__)
  have_crc_instruction = (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
#endif
}

static uint32_t le32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* The register update without the initial and final inversion. */
static uint32_t slice8(uint32_t table[8][256], uint32_t crc, const uint8_t* p, size_t n) {
  while (n >= 8) {
    uint32_t lo = crc ^ le32(p), hi = le32(p + 4);
    crc = table[7][lo & 0xFF] ^ table[6][(lo >> 8) & 0xFF] ^ table[5][(lo >> 16) & 0xFF] ^ table[4][lo >> 24] ^
          table[3][hi & 0xFF] ^ table[2][(hi >> 8) & 0xFF] ^ table[1][(hi >> 16) & 0xFF] ^ table[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) crc = table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>
__attribute__((target("sse4.2"))) static uint32_t castagnoli_instruction(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c = crc, v;
  for (; n >= 8; p += 8, n -= 8) memcpy(&v, p, 8), c = _mm_crc32_u64(c, v);
  crc = (uint32_t)c;
  while (n--) crc = _mm_crc32_u8(crc, *p++);
  return crc;
}
#elif defined(__aarch64__)
static uint32_t castagnoli_instruction(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t v;
  for (; n >= 8; p += 8, n -= 8) {
    memcpy(&v, p, 8);
    __asm__(".arch_extension crc\n\tcrc32cx %w0, %w0, %x1" : "+r"(crc) : "r"(v));
  }
  while (n--) __asm__(".arch_extension crc\n\tcrc32cb %w0, %w0, %w1" : "+r"(crc) : "r"((uint32_t)*p++));
  return crc;
}
#else
static uint32_t castagnoli_instruction(uint32_t crc, const uint8_t* p, size_t n) {
  return slice8(castagnoli, crc, p, n);
}
#endif

uint32_t em_crc32(uint32_t crc, const void* data, size_t n) {
  ONCE(tables_once, init);
  return ~slice8(ieee, ~crc, (const uint8_t*)data, n);
}

uint32_t em_crc32c_tables(uint32_t crc, const void* data, size_t n) {
  ONCE(tables_once, init);
  return ~slice8(castagnoli, ~crc, (const uint8_t*)data, n);
}

uint32_t em_crc32c(uint32_t crc, const void* data, size_t n) {
  ONCE(tables_once, init);
  if (!have_crc_instruction) return ~slice8(castagnoli, ~crc, (const uint8_t*)data, n);
  return ~castagnoli_instruction(~crc, (const uint8_t*)data, n);
}
