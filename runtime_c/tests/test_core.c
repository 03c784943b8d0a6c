/* Unit tests of the runtime's pieces that need no artifact: CRC-32, LRU cache, workspace arena. */
#include <stdio.h>
#include <string.h>

#include "crc32.h"
#include "expert_cache.h"
#include "tvm_backend.h"

static int failures = 0;
#define CHECK(cond)                                              \
  do {                                                           \
    if (!(cond)) {                                               \
      fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      failures++;                                                \
    }                                                            \
  } while (0)

static void test_crc32(void) {
  CHECK(em_crc32(0, "123456789", 9) == 0xCBF43926u); /* the standard check value */
  CHECK(em_crc32(0, "", 0) == 0);
  /* incremental == one-shot */
  CHECK(em_crc32(em_crc32(0, "12345", 5), "6789", 4) == 0xCBF43926u);
}

static void test_lru(void) {
  static uint8_t slots[3 * 16];
  static uint64_t meta[64];
  em_expert_cache c;
  em_cache_init(&c, slots, 3, 16, meta, 10);
  CHECK(em_cache_find(&c, 4) == -1);
  int32_t a = em_cache_claim(&c, 4), b = em_cache_claim(&c, 5), d = em_cache_claim(&c, 6);
  CHECK(a != b && b != d && a != d);
  CHECK(em_cache_find(&c, 4) == a); /* 4 is now the most recent; 5 the least */
  int32_t e = em_cache_claim(&c, 7);
  CHECK(e == b);
  CHECK(em_cache_find(&c, 5) == -1);
  CHECK(em_cache_find(&c, 6) == d);
  em_cache_release(&c, d);
  CHECK(em_cache_find(&c, 6) == -1);
  CHECK(em_cache_claim(&c, 8) == d); /* a released slot is reused before any eviction */
}

static void test_arena(void) {
  static uint8_t buf[1024];
  em_arena a;
  memset(&a, 0, sizeof a);
  a.base = buf;
  a.size = sizeof buf;
  em_arena_bind(&a);
  void* p = em_workspace_alloc(1, 0, 100, 2, 32);
  void* q = em_workspace_alloc(1, 0, 100, 2, 32);
  CHECK(p && q && ((uintptr_t)q % 64) == 0 && q > p);
  CHECK(em_workspace_alloc(1, 0, 2000, 2, 32) == NULL); /* over the arena: refused, not malloc'd */
  CHECK(em_workspace_free(1, 0, q) == 0);
  CHECK(em_workspace_free(1, 0, p) == 0);
  CHECK(a.top == 0 && a.n_live == 0);
  em_arena_bind(NULL);
}

int main(void) {
  test_crc32();
  test_lru();
  test_arena();
  if (failures) return 1;
  printf("3 passed, 0 failed\n");
  return 0;
}
