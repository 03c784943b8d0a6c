/* edgemoe_run: greedy generation from token ids on the device, no Python.
 *   edgemoe_run ARTIFACT_DIR --tokens 1,2,3 [-n 64] [--budget BYTES] [--max-seq N] [--no-verify]
 * Prints the generated token ids on one line, then the statistics as key=value lines. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "edgemoe.h"

static int usage(void) {
  fprintf(stderr,
          "usage: edgemoe_run ARTIFACT_DIR --tokens ID,ID,... [-n N] [--budget BYTES] [--max-seq N] [--no-verify]\n");
  return 2;
}

static size_t parse_tokens(const char* s, int32_t* out, size_t cap) {
  size_t n = 0;
  while (*s && n < cap) {
    char* end;
    long v = strtol(s, &end, 10);
    if (end == s) return 0;
    out[n++] = (int32_t)v;
    s = *end == ',' ? end + 1 : end;
  }
  return n;
}

static int argmax(const float* v, uint32_t n) {
  uint32_t best = 0;
  for (uint32_t i = 1; i < n; i++)
    if (v[i] > v[best]) best = i;
  return (int)best;
}

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  em_params p;
  em_default_params(&p);
  p.artifact_dir = argv[1];
  static int32_t prompt[4096];
  size_t n_prompt = 0;
  long n_new = 64;
  for (int i = 2; i < argc; i++) {
    if (!strcmp(argv[i], "--tokens") && i + 1 < argc) n_prompt = parse_tokens(argv[++i], prompt, 4096);
    else if (!strcmp(argv[i], "-n") && i + 1 < argc) n_new = strtol(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--budget") && i + 1 < argc) p.memory_budget = strtoull(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--max-seq") && i + 1 < argc) p.max_seq = (uint32_t)strtoul(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--no-verify")) p.verify_checksums = 0;
    else return usage();
  }
  if (n_prompt == 0) return usage();
  char err[512];
  em_session* s;
  if (em_open(&p, &s, err, sizeof err) != EM_OK) {
    fprintf(stderr, "edgemoe_run: %s\n", err);
    return 1;
  }
  em_model_info info;
  em_model_info_get(s, &info);
  int rc = em_prefill(s, prompt, n_prompt);
  for (long i = 0; rc == EM_OK && i < n_new; i++) {
    int next = argmax(em_logits(s), info.vocab_size);
    printf(i ? ",%d" : "%d", next);
    rc = em_decode_step(s, next, NULL);
  }
  printf("\n");
  if (rc != EM_OK) {
    fprintf(stderr, "edgemoe_run: %s\n", em_error(s));
    em_close(s);
    return 1;
  }
  em_stats st;
  em_stats_get(s, &st);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("tokens=%llu\nexpert_hits=%llu\nexpert_misses=%llu\nbytes_read=%llu\nread_ns=%llu\ncompute_ns=%llu\n"
         "memory_bytes=%llu\ntrunk_bytes=%llu\nexpert_cache_bytes=%llu\ncache_slots=%u\nrecord_bytes=%u\n"
         "peak_rss_bytes=%llu\n",
         (unsigned long long)st.tokens, (unsigned long long)st.expert_hits, (unsigned long long)st.expert_misses,
         (unsigned long long)st.bytes_read, (unsigned long long)st.read_ns, (unsigned long long)st.compute_ns,
         (unsigned long long)st.memory_bytes, (unsigned long long)st.trunk_bytes,
         (unsigned long long)st.expert_cache_bytes, st.cache_slots, st.record_bytes,
         (unsigned long long)ru.ru_maxrss * 1024ull);
  em_close(s);
  return 0;
}
