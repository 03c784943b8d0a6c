/* EdgeMoE firmware: mounts the flash image, opens a session in the board's RAM, decodes greedy
 * tokens after a prompt and reports over semihosting what it cost. Its arguments are the
 * semihosting command line (qemu: -semihosting-config enable=on,target=native,arg=...):
 *
 *   firmware --tokens 1,464,2170 [-n 16] [--budget BYTES | --cache-fraction F] [--max-seq N]
 *            [--predictor auto|none|path-table|next-router|fitted-router] [--eviction auto|lru|fifo|edgemoe]
 *            [--flash-driver]
 *
 * --flash-driver reads the flash through a block-read routine (board_qspi_* below: the shape of a
 * QSPI controller's indirect mode, polled) instead of its memory-mapped window.
 *
 * Output, one "key value" per line: tokens (the generated ids), then per-token instructions (the
 * clock under qemu -icount shift=0 counts one nanosecond per instruction; qemu is not
 * cycle-accurate, so this is instructions, not cycles), flash bytes read, cache hit rate, memory. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "board.h"
#include "edgemoe.h"
#include "flash.h"

extern char __em_flash_start[], __em_flash_bytes[], __em_heap_reserve[]; /* memory.ld */

#define MAX_TOKENS 256
#define CMDLINE_BYTES 1024

/* Semihosting SYS_GET_CMDLINE: the command line the debugger (qemu) passes. */
static int semihosting_cmdline(char* buf, int len) {
  struct {
    char* buf;
    int len;
  } block = {buf, len - 1};
  register int op __asm__("r0") = 0x15;
  register void* arg __asm__("r1") = &block;
  __asm__ volatile("bkpt 0xAB" : "+r"(op) : "r"(arg) : "memory");
  if (op != 0) return -1;
  buf[block.len] = 0;
  return 0;
}

/* A block-read routine over the QSPI window, word by word through a FIFO-like register view, the
 * way a controller's indirect (command) mode delivers data; EM_FLASH_BURST bytes per poll. */
typedef struct {
  const volatile uint32_t* flash;
  uint32_t* dst;
  uint32_t at, left; /* in words */
} board_qspi;

static int board_qspi_start(void* ctx, void* dst, uint32_t len, uint32_t offset) {
  board_qspi* q = (board_qspi*)ctx;
  if ((offset | len | (uint32_t)(uintptr_t)dst) & 3) return -22; /* EINVAL: word transfers only */
  q->dst = (uint32_t*)dst, q->at = offset / 4, q->left = len / 4;
  return 0;
}

static int board_qspi_poll(void* ctx) {
  board_qspi* q = (board_qspi*)ctx;
  for (uint32_t n = 0; q->left && n < EM_FLASH_BURST / 4; n++, q->left--) *q->dst++ = q->flash[q->at++];
  return q->left == 0;
}

static int parse_tokens(const char* s, int32_t* out, size_t cap, size_t* n) {
  *n = 0;
  while (*s) {
    char* end;
    long v = strtol(s, &end, 10);
    if (end == s || *n == cap || v < 0) return -1;
    out[(*n)++] = (int32_t)v;
    s = *end == ',' ? end + 1 : end;
    if (*end && *end != ',') return -1;
  }
  return *n ? 0 : -1;
}

static int choice(const char* v, const char* const* names, int n) {
  for (int i = 0; i < n; i++)
    if (strcmp(v, names[i]) == 0) return i;
  return -1;
}

static int fail(const char* what, const char* why) {
  fprintf(stderr, "firmware: %s: %s\n", what, why);
  return 2;
}

int main(void) {
  static char cmdline[CMDLINE_BYTES];
  static int32_t prompt[MAX_TOKENS], generated[MAX_TOKENS];
  static const char* const predictors[] = {"none", "path-table", "next-router", "wrong", "fitted-router", "auto"};
  static const char* const evictions[] = {"lru", "fifo", "edgemoe", "auto"};
  char err[512];
  size_t n_prompt = 0;
  long n_new = 16;
  double fraction = -1;
  int use_driver = 0;
  em_params p;
  em_default_params(&p);
  p.artifact_dir = "flash";
  p.memory_budget = em_board_heap_size() - (size_t)(uintptr_t)__em_heap_reserve;
  /* stdout's buffer is allocated on first use: now, before the heap is sealed */
  printf("EdgeMoE firmware: %u Hz core clock, %u bytes of heap\n", (unsigned)em_board_hz(),
         (unsigned)em_board_heap_size());

  if (semihosting_cmdline(cmdline, sizeof cmdline)) return fail("command line", "semihosting gave none");
  char* save = NULL;
  strtok_r(cmdline, " ", &save); /* the program's name */
  for (char* a = strtok_r(NULL, " ", &save); a; a = strtok_r(NULL, " ", &save)) {
    char* v = strcmp(a, "--flash-driver") ? strtok_r(NULL, " ", &save) : NULL;
    int i;
    if (!strcmp(a, "--flash-driver")) use_driver = 1;
    else if (!v) return fail(a, "needs a value");
    else if (!strcmp(a, "--tokens")) {
      if (parse_tokens(v, prompt, MAX_TOKENS, &n_prompt)) return fail(a, "expected ids like 1,464,2170");
    } else if (!strcmp(a, "-n")) n_new = strtol(v, NULL, 10);
    else if (!strcmp(a, "--budget")) p.memory_budget = strtoull(v, NULL, 10);
    else if (!strcmp(a, "--cache-fraction")) fraction = strtod(v, NULL);
    else if (!strcmp(a, "--max-seq")) p.max_seq = (uint32_t)strtoul(v, NULL, 10);
    else if (!strcmp(a, "--predictor") && (i = choice(v, predictors, 6)) >= 0) p.predictor = (em_predictor)i;
    else if (!strcmp(a, "--eviction") && (i = choice(v, evictions, 4)) >= 0) p.eviction = (em_eviction)i;
    else return fail(a, "unknown option or value (see runtime_c/firmware/firmware_main.c)");
  }
  if (!n_prompt) return fail("--tokens", "a prompt is needed");
  if (n_new < 1 || n_new > MAX_TOKENS) return fail("-n", "between 1 and 256");

  static board_qspi qspi;
  qspi.flash = (const volatile uint32_t*)__em_flash_start;
  em_flash_driver driver = {board_qspi_start, board_qspi_poll, &qspi};
  uint32_t flash_bytes = (uint32_t)(uintptr_t)__em_flash_bytes;
  int rc = use_driver ? em_flash_mount_driver(&driver, flash_bytes, err, sizeof err)
                      : em_flash_mount_mapped(__em_flash_start, flash_bytes, err, sizeof err);
  if (!rc && fraction >= 0) rc = em_budget_bytes(p.artifact_dir, p.max_seq, fraction, &p.memory_budget, err, sizeof err);
  em_session* s = NULL;
  if (!rc) rc = em_open(&p, &s, err, sizeof err);
  if (rc) return fail("opening the model", err);
  em_board_seal_heap();
  size_t heap_at_open = em_board_heap_used();

  uint64_t t0 = em_board_now_ns();
  rc = em_prefill(s, prompt, n_prompt);
  uint64_t t1 = em_board_now_ns();
  em_stats after_prefill;
  em_stats_get(s, &after_prefill);
  em_model_info info;
  em_model_info_get(s, &info);
  for (long i = 0; !rc && i < n_new; i++) {
    const float* logits = em_logits(s);
    int32_t best = 0;
    for (uint32_t t = 1; t < info.vocab_size; t++)
      if (logits[t] > logits[best]) best = (int32_t)t;
    generated[i] = best;
    if (i + 1 < n_new) rc = em_decode_step(s, best, NULL);
  }
  uint64_t t2 = em_board_now_ns();
  if (rc) return fail("decoding", em_error(s));
  em_stats st;
  em_stats_get(s, &st);

  printf("tokens ");
  for (long i = 0; i < n_new; i++) printf(i ? ",%ld" : "%ld", (long)generated[i]);
  uint64_t steps = n_new > 1 ? (uint64_t)(n_new - 1) : 1, uses = st.expert_hits + st.expert_misses;
  printf("\nflash %s\n", use_driver ? "block-read routine" : "memory-mapped");
  printf("predictor %s\neviction %s\n", predictors[info.predictor], evictions[info.eviction]);
  printf("prefill_instructions_per_token %llu\n", (unsigned long long)((t1 - t0) / n_prompt));
  printf("instructions_per_token %llu\n", (unsigned long long)((t2 - t1) / steps));
  printf("flash_bytes_read %llu\n", (unsigned long long)st.bytes_read);
  printf("flash_bytes_per_token %llu\n", (unsigned long long)((st.bytes_read - after_prefill.bytes_read) / steps));
  printf("expert_hit_rate %.4f\n", uses ? (double)st.expert_hits / (double)uses : 0.0);
  printf("prefetch_issued %llu\nprefetch_used %llu\n", (unsigned long long)st.prefetch_issued,
         (unsigned long long)st.prefetch_used);
  printf("cache_slots %u\nsession_bytes %llu\ntrunk_bytes %llu\nexpert_cache_bytes %llu\n", st.cache_slots,
         (unsigned long long)st.memory_bytes, (unsigned long long)st.trunk_bytes,
         (unsigned long long)st.expert_cache_bytes);
  printf("heap_bytes %u\nheap_grew_after_open %u\nheap_refused %u\n", (unsigned)heap_at_open,
         (unsigned)(em_board_heap_used() - heap_at_open), (unsigned)em_board_heap_refused());
  em_close(s);
  return 0;
}
