/* edgemoe_run: generation on the device, no Python: text or token ids in, text or ids out.
 *   edgemoe_run ARTIFACT_DIR --prompt TEXT | --tokens 1,2,3 [-n 64] [--temperature T --seed S ...] [--budget SIZE] [--max-seq N] [--no-verify]
 *               [--predictor auto|none|path-table|next-router|fitted-router|wrong] [--eviction auto|lru|fifo|edgemoe]
 *               [--no-loader-thread] [--mmap] [--direct-io] [--emulate MBPS,MS] [--threads N]
 * Prints the generated text (--prompt) or token ids on one line, then the statistics as key=value lines
 * (decode_ns: the last round's generation loop, prefill excluded: with --repeat 2, a warmed-up one;
 * prefill_ns: the last round's prompt).
 *
 * Every number is checked in full (no trailing characters, no sign, no overflow, within its
 * range) before the artifact is opened; a bad one is a usage error (exit 2) naming the option and
 * what it accepts. A failure of the runtime exits 1. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "edgemoe.h"

#define MAX_PROMPT 4096
#define MAX_GENERATED 65536 /* tokens --repeat compares between rounds */
#define MAX_THREADS 1024
#define MAX_EMULATE_MBPS 1e6 /* 1 TB/s */
#define MAX_EMULATE_MS 6e4   /* a minute per read */

static const char USAGE[] =
    "usage: edgemoe_run ARTIFACT_DIR --prompt TEXT | --tokens ID,ID,... [-n N] [--budget SIZE] [--max-seq N] [--no-verify]\n"
    "       [--predictor auto|none|path-table|next-router|fitted-router|wrong] [--eviction auto|lru|fifo|edgemoe]\n"
    "       [--no-loader-thread] [--mmap] [--direct-io] [--emulate MBPS,MS] [--emulate-compute GBPS,GOPS,GFLOPS]\n"
    "       [--threads N] [--prefill-tokens N] [--inject-faults PLAN]\n"
    "       [--repeat R] [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S] [--ignore-eos]\n"
    "\n"
    "  --prompt TEXT    the prompt as text (the artifact's tokenizer.bin); the output is then text too\n"
    "  --tokens ID,...  prompt token ids: whole numbers 0..2147483647 (below the vocabulary size), at most 4096\n"
    "  -n N             tokens to generate greedily, 0..2147483647 (default 64); prompt + N must fit the context\n"
    "  --budget SIZE    memory for trunk + KV cache + buffers + expert cache: whole bytes (>= 1) or a number\n"
    "                   with a unit KB, MB, GB (10^3..) or KiB, MiB, GiB (2^10..), e.g. 24MiB, 1.5GB (rounded\n"
    "                   down to whole bytes); default: every expert resident\n"
    "  --max-seq N      context to allocate, 0..the artifact's maximum (default 0 = the artifact's maximum)\n"
    "  --emulate MBPS,MS  stretch each expert read to MBPS MB/s (> 0, <= 1000000) plus MS ms latency\n"
    "                   (>= 0, <= 60000)\n"
    "  --emulate-compute GBPS,GOPS,GFLOPS  make each kernel last as long as on a board with this memory\n"
    "                   bandwidth (GB/s), int8 throughput (G ops/s) and fp32 throughput (GFLOP/s), each > 0\n"
    "                   and <= 1000000 (a target's \"compute\" entry; board_wait_ns reports the time added)\n"
    "  --threads N      compute threads, 1..1024 (default 1; the loader thread is extra)\n"
    "  --readers N      expert reads in flight at once, 1..16 (default 1): reader threads for storage that\n"
    "                   overlaps requests (UFS, NVMe)\n"
    "  --prefetch-layers N  layers with experts to prefetch ahead, 1..4 (default 1): 2 gives each read two\n"
    "                   layers' compute to arrive in, for storage slower to answer than a layer computes\n"
    "  --prefill-tokens N  prompt tokens run through each layer together, 1..1024 (default 64): an expert\n"
    "                   several of them chose is read once for all; 1 = token by token, as decoding\n"
    "  --preload        fill the expert cache at open with the experts most often chosen on the calibration\n"
    "                   text, in runs of adjacent records\n"
    "  --one-read-per-record  read each expert record in its own request (default: records queued together\n"
    "                   that lie side by side in experts.bin are read in one)\n"
    "  --mmap           read experts out of a mapping of the image instead of pread\n"
    "  --direct-io      open the image with O_DIRECT\n"
    "  --no-verify      skip the CRC-32 check of each expert record read\n"
    "  --no-loader-thread  read experts on the decode thread (no prefetching)\n"
    "  --inject-faults PLAN  testing: make expert reads fail, e.g. eio@3,short@9,eintr@15,corrupt@21*2,delay@27:50\n"
    "  --temperature T  sample at temperature T (0..100; default 0 = greedy), with --top-k K (0 = all),\n"
    "                   --top-p P (0 < P <= 1, default 1), --repetition-penalty R (0 < R <= 100, default 1)\n"
    "                   and --seed S (0..2^64-1): the same seed gives the same tokens as edgemoe.Session\n"
    "  --ignore-eos     keep generating after the model's end-of-sequence token (default: stop there)\n"
    "  --repeat R       run the generation R times (1..1000000), the context reset between: the tokens must\n"
    "                   repeat (a soak test; rss_first_round_bytes and rss_last_round_bytes show memory growth)\n"
    "  -h, --help       this text\n"
    "exit status: 0 success, 1 the runtime failed, 2 bad arguments\n";

/* A usage error: the message, a pointer to --help, exit status 2. */
static int usage_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("edgemoe_run: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputs("\n(edgemoe_run --help for usage)\n", stderr);
  va_end(ap);
  return 2;
}

/* A whole number in [lo, hi]: decimal digits only (no sign, no spaces, nothing after), no overflow. */
static int parse_u64(const char* opt, const char* text, uint64_t lo, uint64_t hi, uint64_t* out) {
  if (!isdigit((unsigned char)text[0]))
    return usage_error("%s: '%s' is not a whole number; give %s in [%llu, %llu]", opt, text, opt,
                       (unsigned long long)lo, (unsigned long long)hi);
  char* end;
  errno = 0;
  unsigned long long v = strtoull(text, &end, 10);
  if (*end)
    return usage_error("%s: '%s' is not a whole number; give %s in [%llu, %llu]", opt, text, opt,
                       (unsigned long long)lo, (unsigned long long)hi);
  if (errno == ERANGE || v < lo || v > hi)
    return usage_error("%s: %s is out of range; give %s in [%llu, %llu]", opt, text, opt, (unsigned long long)lo,
                       (unsigned long long)hi);
  *out = (uint64_t)v;
  return 0;
}

/* A finite number with lo < x (lo_open) or lo <= x, and x <= hi; nothing after it. `what` names
 * the value within the option (e.g. "MBPS"). */
static int parse_double(const char* opt, const char* what, const char* text, double lo, int lo_open, double hi,
                        double* out) {
  char range[96];
  snprintf(range, sizeof range, "%s %s %.15g and <= %.15g", what, lo_open ? ">" : ">=", lo, hi);
  if (!text[0] || isspace((unsigned char)text[0]))
    return usage_error("%s: %s '%s' is not a number; give %s", opt, what, text, range);
  char* end;
  errno = 0;
  double v = strtod(text, &end);
  if (*end) return usage_error("%s: %s '%s' is not a number; give %s", opt, what, text, range);
  if (!isfinite(v)) return usage_error("%s: %s %s is not a finite number; give %s", opt, what, text, range);
  if ((lo_open ? !(v > lo) : !(v >= lo)) || !(v <= hi))
    return usage_error("%s: %s %s is out of range; give %s", opt, what, text, range);
  *out = v;
  return 0;
}

/* The first n letters of a equal b's, ignoring case. */
static int same_letters(const char* a, const char* b, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (tolower((unsigned char)a[i]) != tolower((unsigned char)b[i])) return 0;
  return 1;
}

/* A size as python/edgemoe/units.py parse_bytes reads it: optional spaces, digits with an optional
 * fraction ("5", "5.6", ".5"; not "5."), optional spaces, an optional unit (case-insensitive: B, KB,
 * MB, GB = 10^3.., KiB, MiB, GiB = 2^10..), optional spaces. Exact decimal arithmetic: a number with a
 * unit is rounded down to whole bytes; without one (or with B) it must be whole. At least min bytes. */
static int parse_size(const char* opt, const char* text, uint64_t min, uint64_t* out) {
  static const struct {
    const char* name;
    unsigned factor, times; /* multiplier = factor^times */
  } units[] = {{"", 1, 0}, {"b", 1, 0}, {"kb", 10, 3}, {"mb", 10, 6}, {"gb", 10, 9},
               {"kib", 2, 10}, {"mib", 2, 20}, {"gib", 2, 30}};
  const char* s = text;
  while (isspace((unsigned char)*s)) s++;
  const char *int_start = s, *frac_start, *frac_end;
  while (isdigit((unsigned char)*s)) s++;
  const char* int_end = s;
  frac_start = frac_end = s;
  int bad = 0;
  if (*s == '.') {
    frac_start = ++s;
    while (isdigit((unsigned char)*s)) s++;
    frac_end = s;
    bad = frac_end == frac_start;
  }
  bad |= int_end == int_start && frac_end == frac_start;
  while (isspace((unsigned char)*s)) s++;
  const char* unit_start = s;
  while (isalpha((unsigned char)*s)) s++;
  size_t unit_len = (size_t)(s - unit_start);
  while (isspace((unsigned char)*s)) s++;
  bad |= *s != 0;
  int u = -1;
  for (int i = 0; !bad && u < 0 && i < (int)(sizeof units / sizeof units[0]); i++)
    if (strlen(units[i].name) == unit_len && same_letters(unit_start, units[i].name, unit_len)) u = i;
  if (bad || u < 0)
    return usage_error("%s: cannot read '%s' as a size: use bytes or a unit such as 64MiB, 1.5GB, 512KiB", opt, text);

  uint64_t v = 0;
  for (const char* c = int_start; c < int_end; c++) {
    unsigned d = (unsigned)(*c - '0');
    if (v > (UINT64_MAX - d) / 10) goto too_big;
    v = v * 10 + d;
  }
  /* the fraction's digits, multiplied by the unit one factor at a time; what carries out of the
     fraction adds to the whole bytes */
  size_t nf = (size_t)(frac_end - frac_start);
  unsigned char* frac = (unsigned char*)malloc(nf ? nf : 1);
  if (!frac) return usage_error("%s: out of memory reading '%s'", opt, text);
  for (size_t i = 0; i < nf; i++) frac[i] = (unsigned char)(frac_start[i] - '0');
  for (unsigned t = 0; t < units[u].times; t++) {
    unsigned f = units[u].factor, carry = 0;
    for (size_t i = nf; i-- > 0;) {
      unsigned d = frac[i] * f + carry;
      frac[i] = (unsigned char)(d % 10);
      carry = d / 10;
    }
    if (v > (UINT64_MAX - carry) / f) {
      free(frac);
      goto too_big;
    }
    v = v * f + carry;
  }
  int fraction_left = 0;
  for (size_t i = 0; i < nf; i++) fraction_left |= frac[i];
  free(frac);
  if (fraction_left && units[u].times == 0)
    return usage_error("%s: '%s' is not a whole number of bytes; give whole bytes or a unit such as 1.5MiB", opt,
                       text);
  if (v < min)
    return usage_error("%s: '%s' is %llu bytes; give at least %llu byte%s", opt, text, (unsigned long long)v,
                       (unsigned long long)min, min == 1 ? "" : "s");
  *out = v;
  return 0;
too_big:
  return usage_error("%s: '%s' is out of range; give at most %llu bytes", opt, text, (unsigned long long)UINT64_MAX);
}

/* Comma-separated token ids, each a whole number in [0, INT32_MAX] (optionally with spaces around
 * it); at most cap of them. Which ids the vocabulary holds is the runtime's check. */
static int parse_tokens(const char* text, int32_t* out, size_t cap, size_t* n_out) {
  size_t count = 1;
  for (const char* c = text; *c; c++) count += *c == ',';
  if (count > cap)
    return usage_error("--tokens: %zu tokens; the prompt holds at most %zu", count, cap);
  size_t n = 0;
  const char* s = text;
  for (;;) {
    const char* comma = strchr(s, ',');
    size_t len = comma ? (size_t)(comma - s) : strlen(s);
    const char *a = s, *b = s + len;
    while (a < b && isspace((unsigned char)*a)) a++;
    while (b > a && isspace((unsigned char)b[-1])) b--;
    int ok = a < b;
    uint64_t v = 0;
    for (const char* c = a; ok && c < b; c++) {
      ok = isdigit((unsigned char)*c) && v <= (uint64_t)INT32_MAX;
      v = v * 10 + (uint64_t)(*c - '0');
    }
    if (!ok || v > (uint64_t)INT32_MAX)
      return usage_error("--tokens: element %zu ('%.*s') is not a token id; give whole numbers in [0, %ld] "
                         "separated by commas", n + 1, (int)len, s, (long)INT32_MAX);
    out[n++] = (int32_t)v;
    if (!comma) break;
    s = comma + 1;
  }
  *n_out = n;
  return 0;
}

/* Peak resident memory of this process image. Linux's ru_maxrss survives exec, so a tool started
 * from a large parent (Python, a test runner) would report the parent's peak; VmHWM does not. */
static unsigned long long status_kib(const char* field) {
  FILE* f = fopen("/proc/self/status", "r");
  unsigned long long kib = 0;
  if (f) {
    char line[256], format[64];
    snprintf(format, sizeof format, "%s: %%llu kB", field);
    while (fgets(line, sizeof line, f))
      if (sscanf(line, format, &kib) == 1) break;
    fclose(f);
  }
  return kib;
}

static uint64_t monotonic_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static unsigned long long peak_rss_bytes(void) {
  unsigned long long kib = status_kib("VmHWM");
  if (kib) return kib * 1024ull;
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (unsigned long long)ru.ru_maxrss * 1024ull;
}

static int lookup(const char* opt, const char* value, const char* const* names, int n, int* out) {
  for (int i = 0; i < n; i++)
    if (!strcmp(value, names[i])) return *out = i, 0;
  char list[256] = "";
  for (int i = 0; i < n; i++) {
    strncat(list, i ? ", " : "", sizeof list - strlen(list) - 1);
    strncat(list, names[i], sizeof list - strlen(list) - 1);
  }
  return usage_error("%s: '%s' is not one of %s", opt, value, list);
}

int main(int argc, char** argv) {
  em_params p;
  em_default_params(&p);
  static int32_t prompt[MAX_PROMPT];
  size_t n_prompt = 0;
  int have_tokens = 0;
  const char* prompt_text = NULL;
  uint64_t n_new = 64, max_seq = 0, repeat = 1, v;
  em_sampling sampling;
  em_default_sampling(&sampling);
  int ignore_eos = 0;
  const char* dir = NULL;
  for (int i = 1; i < argc; i++) {
    const char* a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      fputs(USAGE, stdout);
      return 0;
    }
    if (a[0] != '-') {
      if (dir) return usage_error("unexpected argument '%s' (the artifact directory is '%s')", a, dir);
      dir = a;
      continue;
    }
    if (!strcmp(a, "--no-verify")) p.verify_checksums = 0;
    else if (!strcmp(a, "--no-loader-thread")) p.loader_thread = 0;
    else if (!strcmp(a, "--mmap")) p.storage = EM_STORAGE_MMAP;
    else if (!strcmp(a, "--inject-faults") && i + 1 < argc) p.inject_faults = argv[++i];
    else if (!strcmp(a, "--ignore-eos")) ignore_eos = 1;
    else if (!strcmp(a, "--prompt") && i + 1 < argc) prompt_text = argv[++i];
    else if (!strcmp(a, "--direct-io")) p.direct_io = 1;
    else if (!strcmp(a, "--one-read-per-record")) p.one_read_per_record = 1;
    else if (!strcmp(a, "--preload")) p.preload = 1;
    else {
      static const char* const with_value[] = {"--tokens", "-n", "--budget", "--max-seq", "--emulate",
                                               "--predictor", "--eviction", "--threads", "--inject-faults",
                                               "--repeat", "--temperature", "--top-k", "--top-p",
                                               "--repetition-penalty", "--seed", "--prompt", "--readers",
                                               "--emulate-compute", "--prefetch-layers", "--prefill-tokens"};
      int known = 0;
      for (size_t k = 0; k < sizeof with_value / sizeof with_value[0]; k++) known |= !strcmp(a, with_value[k]);
      if (!known) return usage_error("unknown option '%s'", a);
      if (i + 1 >= argc) return usage_error("%s needs a value", a);
      const char* val = argv[++i];
      int rc = 0;
      if (!strcmp(a, "--tokens")) {
        rc = parse_tokens(val, prompt, MAX_PROMPT, &n_prompt);
        have_tokens = 1;
      } else if (!strcmp(a, "-n")) {
        rc = parse_u64(a, val, 0, INT32_MAX, &n_new);
      } else if (!strcmp(a, "--repeat")) {
        rc = parse_u64(a, val, 1, 1000000, &repeat);
      } else if (!strcmp(a, "--temperature") || !strcmp(a, "--top-p") || !strcmp(a, "--repetition-penalty")) {
        double d;
        int top_p = !strcmp(a, "--top-p"), temp = !strcmp(a, "--temperature");
        rc = parse_double(a, "the value", val, 0, !temp, temp ? 100 : top_p ? 1 : 100, &d);
        if (!rc) *(temp ? &sampling.temperature : top_p ? &sampling.top_p : &sampling.repetition_penalty) = (float)d;
      } else if (!strcmp(a, "--readers")) {
        if (!(rc = parse_u64(a, val, 1, 16, &v))) p.readers = (uint32_t)v;
      } else if (!strcmp(a, "--prefetch-layers")) {
        if (!(rc = parse_u64(a, val, 1, 4, &v))) p.prefetch_layers = (uint32_t)v;
      } else if (!strcmp(a, "--prefill-tokens")) {
        if (!(rc = parse_u64(a, val, 1, 1024, &v))) p.prefill_tokens = (uint32_t)v;
      } else if (!strcmp(a, "--top-k")) {
        if (!(rc = parse_u64(a, val, 0, UINT32_MAX, &v))) sampling.top_k = (uint32_t)v;
      } else if (!strcmp(a, "--seed")) {
        rc = parse_u64(a, val, 0, UINT64_MAX, &v);
        sampling.seed = v;
      } else if (!strcmp(a, "--budget")) {
        rc = parse_size(a, val, 1, &p.memory_budget);
      } else if (!strcmp(a, "--max-seq")) {
        rc = parse_u64(a, val, 0, UINT32_MAX, &max_seq);
        p.max_seq = (uint32_t)max_seq;
      } else if (!strcmp(a, "--threads")) {
        if (!(rc = parse_u64(a, val, 1, MAX_THREADS, &v))) p.compute_threads = (uint32_t)v;
      } else if (!strcmp(a, "--emulate")) {
        const char* comma = strchr(val, ',');
        if (!comma || strchr(comma + 1, ','))
          return usage_error("--emulate: '%s' is not MBPS,MS; give bandwidth in MB/s (> 0) and latency in ms "
                             "(>= 0), e.g. --emulate 45,1", val);
        char mbps_text[128];
        if ((size_t)(comma - val) >= sizeof mbps_text)
          return usage_error("--emulate: MBPS '%.*s' is not a number; give MBPS > 0 and <= %.15g", (int)(comma - val),
                             val, MAX_EMULATE_MBPS);
        snprintf(mbps_text, sizeof mbps_text, "%.*s", (int)(comma - val), val);
        double mbps, ms;
        rc = parse_double(a, "MBPS", mbps_text, 0, 1, MAX_EMULATE_MBPS, &mbps);
        if (!rc) rc = parse_double(a, "MS", comma + 1, 0, 0, MAX_EMULATE_MS, &ms);
        if (!rc) {
          p.emulate_bandwidth = mbps * 1e6;
          p.emulate_latency = ms * 1e-3;
        }
      } else if (!strcmp(a, "--emulate-compute")) {
        /* three comma-separated numbers, each in giga-units per second */
        static const char* const what[] = {"GBPS", "GOPS", "GFLOPS"};
        double* dst[] = {&p.emulate_memory_bandwidth, &p.emulate_int8_ops, &p.emulate_fp32_flops};
        const char* field = val;
        for (int f = 0; f < 3 && !rc; f++) {
          const char* end = f < 2 ? strchr(field, ',') : field + strlen(field);
          char text[128];
          if (!end || (f == 2 && strchr(field, ',')) || (size_t)(end - field) >= sizeof text)
            return usage_error("--emulate-compute: '%s' is not GBPS,GOPS,GFLOPS; give three numbers > 0, e.g. "
                               "--emulate-compute 4,48,24", val);
          snprintf(text, sizeof text, "%.*s", (int)(end - field), field);
          double g;
          if (!(rc = parse_double(a, what[f], text, 0, 1, 1e6, &g))) *dst[f] = g * 1e9;
          field = end + 1;
        }
      } else if (!strcmp(a, "--predictor")) {
        static const char* const names[] = {"none", "path-table", "next-router", "wrong", "fitted-router", "auto"};
        int k;
        if (!(rc = lookup(a, val, names, 6, &k))) p.predictor = (em_predictor)k;
      } else if (!strcmp(a, "--eviction")) {
        static const char* const names[] = {"lru", "fifo", "edgemoe", "auto"};
        int k;
        if (!(rc = lookup(a, val, names, 4, &k))) p.eviction = (em_eviction)k;
      }
      if (rc) return rc;
    }
  }
  if (!dir) return usage_error("give the artifact directory");
  if (have_tokens == (prompt_text != NULL)) return usage_error("give the prompt as --prompt TEXT or as --tokens ID,ID,...");
  p.artifact_dir = dir;

  char err[512];
  em_session* s;
  if (em_open(&p, &s, err, sizeof err) != EM_OK) {
    fprintf(stderr, "edgemoe_run: %s\n", err);
    return 1;
  }
  em_model_info info;
  em_model_info_get(s, &info);
  em_tokenizer* tok = NULL; /* with --prompt: text in, text out */
  if (prompt_text) {
    int trc = em_tokenizer_open(dir, &tok, err, sizeof err);
    if (!trc) trc = em_tokenize(tok, prompt_text, prompt, MAX_PROMPT, &n_prompt);
    if (trc || !n_prompt) {
      fprintf(stderr, "edgemoe_run: %s\n", trc == EM_ERR_ARGUMENT ? "the prompt is more than 4096 tokens"
                                                                 : trc ? err : "the prompt is empty");
      em_tokenizer_close(tok);
      em_close(s);
      return trc == EM_ERR_ARGUMENT || !n_prompt ? 2 : 1;
    }
  }
  /* what needs the artifact to check: the context it holds */
  if (max_seq > info.max_seq) {
    em_close(s);
    return usage_error("--max-seq: %llu is out of range; this artifact holds at most %u positions: give --max-seq "
                       "in [0, %u] (0 = %u)", (unsigned long long)max_seq, info.max_seq, info.max_seq, info.max_seq);
  }
  if (n_prompt + n_new > info.max_seq) {
    em_close(s);
    return usage_error("-n: %zu prompt tokens + %llu new tokens need %llu positions but the context holds %u: "
                       "give -n in [0, %llu]%s", n_prompt, (unsigned long long)n_new,
                       (unsigned long long)(n_prompt + n_new), info.max_seq,
                       (unsigned long long)(n_prompt < info.max_seq ? info.max_seq - n_prompt : 0),
                       max_seq && max_seq < info.max_seq ? " or raise --max-seq" : "");
  }
  /* --repeat R: the same generation R times, the context reset in between (a soak test: the
     tokens must repeat exactly, and resident memory must not grow from round to round) */
  static int32_t first[MAX_GENERATED];
  /* the last round's prompt and generation loop */
  unsigned long long rss_first_round = 0, decode_ns = 0, prefill_ns = 0;
  int32_t* history = (int32_t*)malloc((n_prompt + n_new) * sizeof(int32_t));
  if (!history) {
    fprintf(stderr, "edgemoe_run: out of memory\n");
    em_close(s);
    return 1;
  }
  int rc = EM_OK;
  for (uint64_t round = 0; rc == EM_OK && round < repeat; round++) {
    em_sampler* sampler;
    if ((rc = em_sampler_create(&sampling, info.vocab_size, &sampler, err, sizeof err)) != EM_OK) {
      fprintf(stderr, "edgemoe_run: %s\n", err);
      break;
    }
    memcpy(history, prompt, n_prompt * sizeof(int32_t));
    size_t n_history = n_prompt;
    em_reset(s);
    uint64_t prefill_start = monotonic_ns();
    rc = em_prefill(s, prompt, n_prompt);
    uint64_t decode_start = monotonic_ns();
    prefill_ns = decode_start - prefill_start;
    for (uint64_t i = 0; rc == EM_OK && i < n_new; i++) {
      int32_t next = em_sample(sampler, em_logits(s), history, n_history);
      if (!ignore_eos && next == info.eos_token_id) break;
      history[n_history++] = next;
      if (round == 0 && tok) {
        const char* text;
        size_t len = em_token_text(tok, next, &text);
        fwrite(text, 1, len, stdout);
        fflush(stdout);
        if (i < MAX_GENERATED) first[i] = next;
      } else if (round == 0) {
        printf(i ? ",%d" : "%d", next);
        if (i < MAX_GENERATED) first[i] = next;
      } else if (i < MAX_GENERATED && next != first[i]) {
        fprintf(stderr, "edgemoe_run: round %llu generated token %d at %llu where round 1 had %d\n",
                (unsigned long long)round + 1, next, (unsigned long long)i, first[i]);
        rc = EM_ERR_ARGUMENT;
        break;
      }
      rc = em_decode_step(s, next, NULL);
    }
    em_sampler_free(sampler);
    decode_ns = monotonic_ns() - decode_start;
    if (round == 0) printf("\n"), rss_first_round = status_kib("VmRSS") * 1024ull;
  }
  free(history);
  em_tokenizer_close(tok);
  if (rc == EM_ERR_ARGUMENT && repeat > 1) {
    em_close(s);
    return 1;
  }
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
         "record_bytes=%u\nread_retries=%llu\nrecords_read=%llu\npeak_rss_bytes=%llu\nrss_first_round_bytes=%llu\n"
         "rss_last_round_bytes=%llu\ndecode_ns=%llu\nboard_wait_ns=%llu\nread_requests=%llu\npreloaded=%llu\n"
         "predicted_ahead=%llu\npredicted_ahead_hits=%llu\nprefetch_declined=%llu\nprefill_ns=%llu\nbatched_calls=%llu\n"
         "kv_cache_bytes=%llu\n",
         U(st.tokens), U(st.expert_hits), U(st.expert_misses), U(st.bytes_read), U(st.read_ns), U(st.compute_ns),
         U(st.stall_ns), U(st.prefetch_issued), U(st.prefetch_used), U(st.prefetch_wasted), U(st.predicted),
         U(st.predicted_hits), U(st.memory_bytes), U(st.trunk_bytes), U(st.expert_cache_bytes), st.cache_slots,
         st.record_bytes, U(st.read_retries), U(st.records_read), peak_rss_bytes(), rss_first_round, status_kib("VmRSS") * 1024ull, decode_ns,
         U(st.board_wait_ns), U(st.read_requests), U(st.preloaded), U(st.predicted_ahead), U(st.predicted_ahead_hits),
         U(st.prefetch_declined), prefill_ns, U(st.batched_calls), U(st.kv_cache_bytes));
#undef U
  em_close(s);
  return 0;
}
