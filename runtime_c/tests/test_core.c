/* Unit tests of the runtime's pieces that need no artifact: CRC-32, LRU cache, workspace arena, the
 * workspace a parallel launch's tasks share, coalesced reads from storage, float16 rounding. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "artifact.h"
#include "crc32.h"
#include "expert_cache.h"
#include "matrix.h"
#include "storage.h"
#include "thread_pool.h"
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
  CHECK(em_crc32c(0, "123456789", 9) == 0xE3069283u);
  CHECK(em_crc32c_tables(0, "123456789", 9) == 0xE3069283u);
  CHECK(em_crc32c(em_crc32c(0, "12345", 5), "6789", 4) == 0xE3069283u);
  static uint8_t buf[4099 + 6]; /* room for the largest offset below */
  for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)(i * 2654435761u >> 13);
  for (size_t n = 0; n < 24; n++) /* every tail length, and odd alignments */
    CHECK(em_crc32c(0, buf + n % 7, 4099 - 24 + n) == em_crc32c_tables(0, buf + n % 7, 4099 - 24 + n));
}

static uint8_t one_class[64]; /* every record in size class 0 */

static void init_uniform(em_expert_cache* c, uint8_t* slots, uint32_t n_slots, void* meta, uint32_t layers,
                         uint32_t experts, em_eviction policy, const float* freq) {
  em_size_class k = {16, 0, n_slots};
  em_cache_init(c, slots, &k, 1, one_class, meta, layers, experts, policy, freq);
}

/* Fills slots with records 0..n-1 of a 2-layer x 4-expert model, all ready. */
static void fill(em_expert_cache* c, uint32_t n) {
  int wasted;
  for (uint32_t r = 0; r < n; r++) em_cache_ready(c, em_cache_claim(c, r, 0, 0, &wasted));
}

static void test_lru(void) {
  static uint8_t slots[3 * 16];
  static uint64_t meta[64];
  em_expert_cache c;
  int wasted;
  init_uniform(&c, slots, 3, meta, 2, 4, EM_EVICT_LRU, NULL);
  CHECK(em_cache_lookup(&c, 4) == -1);
  fill(&c, 3);
  em_cache_touch(&c, em_cache_lookup(&c, 0)); /* 0 most recent; 1 least */
  int32_t s1 = em_cache_lookup(&c, 1);
  CHECK(em_cache_claim(&c, 5, 0, 0, &wasted) == s1);
  CHECK(em_cache_lookup(&c, 1) == -1 && em_cache_lookup(&c, 5) == s1);
  em_cache_ready(&c, s1);
  int32_t s2 = em_cache_lookup(&c, 2);
  em_cache_release(&c, s2);
  CHECK(em_cache_claim(&c, 6, 0, 0, &wasted) == s2); /* a freed slot is reused before any eviction */
  /* loading and pinned slots are never victims */
  c.slot[em_cache_lookup(&c, 0)].pins = 1;
  CHECK(em_cache_claim(&c, 7, 0, 0, &wasted) == s1); /* 6 is loading, 0 pinned: 5 goes */
  c.slot[s1].pins = 1;
  CHECK(em_cache_claim(&c, 8, 0, 0, &wasted) == -1); /* loading or pinned, every one */
}

static void test_fifo_and_prefetch_accounting(void) {
  static uint8_t slots[2 * 16];
  static uint64_t meta[64];
  em_expert_cache c;
  int wasted;
  init_uniform(&c, slots, 2, meta, 2, 4, EM_EVICT_FIFO, NULL);
  em_cache_ready(&c, em_cache_claim(&c, 0, 0, 1, &wasted)); /* prefetched, never used */
  em_cache_ready(&c, em_cache_claim(&c, 1, 0, 0, &wasted));
  em_cache_touch(&c, em_cache_lookup(&c, 0)); /* used: LRU would keep it, FIFO still evicts it */
  int32_t s0 = em_cache_lookup(&c, 0);
  CHECK(em_cache_claim(&c, 2, 0, 0, &wasted) == s0 && wasted == 0);
  em_cache_ready(&c, s0);
  em_cache_ready(&c, em_cache_claim(&c, 3, 0, 1, &wasted)); /* evicts 1 */
  CHECK(em_cache_lookup(&c, 1) == -1);
  CHECK(em_cache_claim(&c, 4, 0, 0, &wasted) == s0 && wasted == 0); /* 2 is older than 3 */
  em_cache_ready(&c, s0);
  CHECK(em_cache_claim(&c, 5, 0, 0, &wasted) >= 0 && wasted == 1); /* 3 evicted unused */
}

/* A cache of 4 slots holding records 1 (layer 0, e1), 3 (1, e1), 6 (3, e0), 7 (3, e1) of a
 * 4-layer x 2-expert model, at current layer 1; layer 3 first routed to e0 `recent` times. */
static const uint32_t held[4] = {1, 3, 6, 7};

static void fill_edgemoe(em_expert_cache* c, uint32_t recent) {
  /* f: expert 1 of each layer is three times as frequent as expert 0 */
  static const float freq[8] = {0.25f, 0.75f, 0.25f, 0.75f, 0.25f, 0.75f, 0.25f, 0.75f};
  static uint8_t slots[4 * 16];
  static uint64_t meta[64];
  static const uint32_t layer3_e0 = 6;
  int wasted;
  init_uniform(c, slots, 4, meta, 4, 2, EM_EVICT_EDGEMOE, freq);
  for (uint32_t i = 0; i < recent; i++) em_cache_routed(c, 3, &layer3_e0, 1);
  for (int i = 0; i < 4; i++) em_cache_ready(c, em_cache_claim(c, held[i], 1, 0, &wasted));
}

static int32_t edgemoe_victim(uint32_t recent) {
  em_expert_cache c;
  int wasted;
  fill_edgemoe(&c, recent);
  int32_t slot = em_cache_claim(&c, 0, 1, 0, &wasted);
  for (int i = 0; i < 4; i++)
    if (em_cache_lookup(&c, held[i]) < 0) return (int32_t)held[i];
  return slot < 0 ? -2 : -1;
}

static void test_edgemoe_score(void) {
  /* expected next use d + S (1 - p) / p, p = 0.3 f + 0.7 recent use. Nothing used yet: layer 3 runs
     in d = 2 steps, but its e0 (p = 0.075) only every ~13th time: 51.3 steps, against 15.8 (3, e1),
     16.8 (0, e1) and 17.8 (1, e1) */
  CHECK(edgemoe_victim(0) == 6);
  /* layer 3 chose e0 on its last 20 tokens (recent use 0.64, p = 0.52: 5.6 steps): now the layer-1
     expert, furthest away with the same frequency as the others, goes */
  CHECK(edgemoe_victim(20) == 3);
}

/* A prefetch takes a slot only from an expert expected to be needed later than the guess. */
static void test_prefetch_admission(void) {
  em_expert_cache c;
  int wasted;
  fill_edgemoe(&c, 0); /* the furthest resident: record 6, next use 51.3 steps ahead */
  /* record 0 (layer 0, e0: its layer runs in 3 steps, p = 0.075) named with no better chance than its
     own: 52.3 steps, further than every resident's, so it is refused */
  CHECK(em_cache_claim_prefetch(&c, 0, 1, 0.0, &wasted) == -1);
  /* named at even odds (p = 0.54: 6.4 steps) it displaces record 6 */
  int32_t guess = em_cache_claim_prefetch(&c, 0, 1, 0.5, &wasted);
  CHECK(guess >= 0 && em_cache_lookup(&c, 6) < 0);
  em_cache_ready(&c, guess);
  /* unused yet, the guess keeps its chance: a demand read takes record 3's slot (layer 1, e1: 17.8 steps) */
  CHECK(em_cache_claim(&c, 6, 1, 0, &wasted) >= 0 && em_cache_lookup(&c, 0) == guess && em_cache_lookup(&c, 3) < 0);
  em_cache_ready(&c, em_cache_lookup(&c, 6));
  /* layer 0 routes without it: its chance was for that pass, so it is the furthest again (52.3 steps) */
  static const uint32_t layer0_e1 = 1;
  em_cache_routed(&c, 0, &layer0_e1, 1);
  CHECK(em_cache_claim(&c, 3, 1, 0, &wasted) == guess);
}

static void test_size_classes(void) {
  /* records 0-3 are small (class 0, 8-byte slots), 4-7 large (class 1, 32-byte slots) */
  static const uint8_t record_class[8] = {0, 0, 0, 0, 1, 1, 1, 1};
  static uint8_t slots[2 * 8 + 2 * 32];
  static uint64_t meta[64];
  em_size_class k[2] = {{8, 0, 2}, {32, 0, 2}};
  em_expert_cache c;
  int wasted;
  em_cache_init(&c, slots, k, 2, record_class, meta, 2, 4, EM_EVICT_LRU, NULL);
  int32_t a = em_cache_claim(&c, 0, 0, 0, &wasted), b = em_cache_claim(&c, 1, 0, 0, &wasted);
  em_cache_ready(&c, a);
  em_cache_ready(&c, b);
  int32_t big = em_cache_claim(&c, 5, 0, 0, &wasted);
  CHECK(big >= 2 && em_cache_slot(&c, big) == slots + 16); /* a large slot, though small ones are older */
  em_cache_ready(&c, big);
  int32_t small = em_cache_claim(&c, 2, 0, 0, &wasted);
  CHECK(small == a && em_cache_slot(&c, small) == slots); /* small evicts small (LRU: 0) */
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

/* Each task takes two blocks of workspace, as a kernel whose parallel loop allocates inside its body. */
#define TASK_BYTES 100
typedef struct {
  uint8_t* block[64][2];
  uint64_t ask; /* bytes per request */
} task_blocks;

static int take_workspace(int task_id, em_parallel_env* penv, void* cdata) {
  task_blocks* t = (task_blocks*)cdata;
  if (penv->num_task > 64) return -1;
  for (int i = 0; i < 2; i++) {
    uint8_t* p = (uint8_t*)em_workspace_alloc(1, 0, t->ask, 2, 32);
    if (!p) return -1;
    memset(p, task_id + 1, (size_t)t->ask);
    t->block[task_id][i] = p;
  }
  return em_workspace_free(1, 0, t->block[task_id][1]) || em_workspace_free(1, 0, t->block[task_id][0]);
}

static void test_parallel_workspace(void) {
  static uint8_t buf[1 << 16];
  em_arena a;
  memset(&a, 0, sizeof a);
  a.base = buf;
  a.size = sizeof buf;
  em_pool* pool;
  char err[256];
  CHECK(em_pool_create(3, &pool, err, sizeof err) == 0);
  em_pool_bind(pool);
  em_arena_bind(&a);
  uint8_t* live = (uint8_t*)em_workspace_alloc(1, 0, 1000, 2, 32); /* the launcher's, live across the launch */
  size_t top = a.top;
  task_blocks t;
  memset(&t, 0, sizeof t);
  t.ask = TASK_BYTES;
  CHECK(em_parallel_launch(take_workspace, &t, 0) == 0);
  int tasks = 4 * em_pool_threads(pool);
  for (int i = 0; i < tasks; i++)
    for (int j = 0; j < 2; j++) {
      uint8_t* p = t.block[i][j];
      CHECK(p && (uintptr_t)p % 64 == 0 && p >= live + 1000 && p + TASK_BYTES <= buf + sizeof buf);
      /* no other task's block overlaps it: each still holds its own task's bytes */
      for (int k = 0; p && k < TASK_BYTES; k++) CHECK(p[k] == (uint8_t)(i + 1));
    }
  CHECK(a.top == top && a.n_live == 1); /* the launcher's allocations are as they were */
  CHECK(a.high_water >= top + (size_t)tasks * 2 * TASK_BYTES);
  t.ask = sizeof buf / 8; /* two such requests per task do not fit for 12 tasks: the launch fails */
  CHECK(em_parallel_launch(take_workspace, &t, 0) != 0);
  CHECK(em_workspace_free(1, 0, live) == 0 && a.top == 0);
  em_arena_bind(NULL);
  em_pool_bind(NULL);
  em_pool_destroy(pool);
}

/* One request into several buffers reads what one read per buffer would, from every back end; a
 * fault plan counts it as one read; a request past the end is short. */
static void test_coalesced_reads(void) {
  char path[] = "/tmp/edgemoe_test_readv_XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  if (fd < 0) return;
  static uint8_t file[5 * 4096], got[3][8192];
  for (size_t i = 0; i < sizeof file; i++) file[i] = (uint8_t)(i * 2654435761u >> 11);
  CHECK(write(fd, file, sizeof file) == (ssize_t)sizeof file);
  close(fd);
  char err[256];
  em_storage* backends[3] = {em_storage_open_pread(path, 0, err, sizeof err), em_storage_open_mmap(path, err, sizeof err),
                             NULL};
  backends[2] = em_storage_inject_faults(em_storage_open_pread(path, 0, err, sizeof err), "eio@2", err, sizeof err);
  for (int b = 0; b < 3; b++) {
    em_storage* s = backends[b];
    CHECK(s != NULL);
    if (!s) continue;
    memset(got, 0, sizeof got);
    em_span spans[3] = {{got[0], 4096}, {got[1], 8192}, {got[2], 4096}};
    CHECK(em_storage_readv(s, spans, 3, 4096) == 0);
    CHECK(!memcmp(got[0], file + 4096, 4096) && !memcmp(got[1], file + 8192, 8192) &&
          !memcmp(got[2], file + 16384, 4096));
    if (b == 2) { /* the request above was the plan's read 1: this is read 2 */
      CHECK(s->read(s, got[0], 4096, 0) == -EIO);
      CHECK(s->read(s, got[0], 4096, 0) == 0);
    }
    em_span past[2] = {{got[0], 4096}, {got[1], 8192}};
    CHECK(em_storage_readv(s, past, 2, 3 * 4096) == EM_READ_SHORT);
    s->close(s);
  }
  unlink(path);
}

static float float_bits(uint32_t b) {
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
}

static uint32_t bits_of(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return b;
}

/* Every finite float16 comes back as itself; between two neighbours (normal or subnormal, either sign)
 * a float32 goes to the nearer, the midpoint to the even one; beyond ±65504 saturates; NaN stays NaN. */
static void test_float16_rounding(void) {
  int bad_round_trip = 0, bad_ties = 0;
  for (uint32_t h = 0; h < 0x10000u; h++) {
    if ((h & 0x7c00u) == 0x7c00u) continue; /* inf, nan */
    if (em_f32_to_f16(em_f16_to_f32((uint16_t)h)) != h) bad_round_trip++;
    if ((h & 0x7fffu) == 0x7bffu) continue; /* the largest: no finite neighbour above */
    float lo = em_f16_to_f32((uint16_t)h), hi = em_f16_to_f32((uint16_t)(h + 1)), mid = (lo + hi) / 2;
    uint32_t even = h & 1u ? h + 1 : h;
    uint32_t m = bits_of(mid); /* away from zero: bits + 1, towards it: bits - 1 (mid is never 0) */
    if (em_f32_to_f16(mid) != even || em_f32_to_f16(float_bits(m + 1)) != h + 1 ||
        em_f32_to_f16(float_bits(m - 1)) != h)
      bad_ties++;
  }
  CHECK(bad_round_trip == 0);
  CHECK(bad_ties == 0);
  CHECK(em_f32_to_f16(65519.0f) == 0x7bffu && em_f32_to_f16(65520.0f) == 0x7bffu);
  CHECK(em_f32_to_f16(-1e30f) == 0xfbffu && em_f32_to_f16(float_bits(0x7f800000u)) == 0x7bffu);
  uint16_t nan = em_f32_to_f16(float_bits(0x7fc00000u));
  CHECK((nan & 0x7c00u) == 0x7c00u && (nan & 0x3ffu) != 0);
  CHECK(em_f32_to_f16(float_bits(0x33000000u)) == 0 && em_f32_to_f16(float_bits(0x33000001u)) == 1);
}

int main(void) {
  test_crc32();
  test_lru();
  test_fifo_and_prefetch_accounting();
  test_edgemoe_score();
  test_prefetch_admission();
  test_size_classes();
  test_arena();
  test_parallel_workspace();
  test_coalesced_reads();
  test_float16_rounding();
  if (failures) return 1;
  printf("10 passed, 0 failed\n");
  return 0;
}
