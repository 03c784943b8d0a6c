/* edgemoe_run: greedy generation from token ids on the device, no Python.
 *   edgemoe_run ARTIFACT_DIR --tokens 1,2,3 [-n 64] [--budget BYTES] [--max-seq N] [--no-verify]
 *               [--predictor auto|none|path-table|next-router|fitted-router|wrong] [--eviction auto|lru|fifo|edgemoe]
 *               [--no-loader-thread] [--mmap] [--direct-io] [--emulate MBPS,MS] [--threads N]
 * Prints the generated token ids on one line, then the statistics as key=value lines. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "edgemoe.h"

static int usage(void) {
  fprintf(stderr,
          "usage: edgemoe_run ARTIFACT_DIR --tokens ID,ID,... [-n N] [--budget BYTES] [--max-seq N] [--no-verify]\n"
          "       [--predictor auto|none|path-table|next-router|fitted-router|wrong] [--eviction auto|lru|fifo|edgemoe]\n"
          "       [--no-loader-thread] [--mmap] [--direct-io] [--emulate MBPS,MS] [--threads N]\n");
  return 2;
}

/* Peak resident memory of this process image. Linux's ru_maxrss survives exec, so a tool started
 * from a large parent (Python, a test runner) would report the parent's peak; VmHWM does not. */
static unsigned long long peak_rss_bytes(void) {
  FILE* f = fopen("/proc/self/status", "r");
  if (f) {
    char line[256];
    unsigned long long kib = 0;
    while (fgets(line, sizeof line, f))
      if (sscanf(line, "VmHWM: %llu kB", &kib) == 1) break;
    fclose(f);
    if (kib) return kib * 1024ull;
  }
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (unsigned long long)ru.ru_maxrss * 1024ull;
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

static int lookup(const char* value, const char* const* names, int n) {
  for (int i = 0; i < n; i++)
    if (!strcmp(value, names[i])) return i;
  return -1;
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
    else if (!strcmp(argv[i], "--no-loader-thread")) p.loader_thread = 0;
    else if (!strcmp(argv[i], "--mmap")) p.storage = EM_STORAGE_MMAP;
    else if (!strcmp(argv[i], "--direct-io")) p.direct_io = 1;
    else if (!strcmp(argv[i], "--emulate") && i + 1 < argc) {
      double mbps, ms;
      if (sscanf(argv[++i], "%lf,%lf", &mbps, &ms) != 2) return usage();
      p.emulate_bandwidth = mbps * 1e6;
      p.emulate_latency = ms * 1e-3;
    } else if (!strcmp(argv[i], "--predictor") && i + 1 < argc) {
      static const char* const names[] = {"none", "path-table", "next-router", "wrong", "fitted-router", "auto"};
      int v = lookup(argv[++i], names, 6);
      if (v < 0) return usage();
      p.predictor = (em_predictor)v;
    } else if (!strcmp(argv[i], "--eviction") && i + 1 < argc) {
      static const char* const names[] = {"lru", "fifo", "edgemoe", "auto"};
      int v = lookup(argv[++i], names, 4);
      if (v < 0) return usage();
      p.eviction = (em_eviction)v;
    } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
      p.compute_threads = (uint32_t)strtoul(argv[++i], NULL, 10);
    } else
      return usage();
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
#define U(x) (unsigned long long)(x)
  printf("tokens=%llu\nexpert_hits=%llu\nexpert_misses=%llu\nbytes_read=%llu\nread_ns=%llu\ncompute_ns=%llu\n"
         "stall_ns=%llu\nprefetch_issued=%llu\nprefetch_used=%llu\nprefetch_wasted=%llu\npredicted=%llu\n"
         "predicted_hits=%llu\nmemory_bytes=%llu\ntrunk_bytes=%llu\nexpert_cache_bytes=%llu\ncache_slots=%u\n"
         "record_bytes=%u\npeak_rss_bytes=%llu\n",
         U(st.tokens), U(st.expert_hits), U(st.expert_misses), U(st.bytes_read), U(st.read_ns), U(st.compute_ns),
         U(st.stall_ns), U(st.prefetch_issued), U(st.prefetch_used), U(st.prefetch_wasted), U(st.predicted),
         U(st.predicted_hits), U(st.memory_bytes), U(st.trunk_bytes), U(st.expert_cache_bytes), st.cache_slots,
         st.record_bytes, peak_rss_bytes());
#undef U
  em_close(s);
  return 0;
}
