/* libFuzzer harness: em_open and a few decode steps on a whole artifact whose experts.bin is the
 * fuzzed input (checksums and compile id fixed up), at the minimum budget so that experts are
 * really read into slots. trunk.bin and kernels.so come from a valid artifact named by
 * $EM_FUZZ_ARTIFACT; the harness works in a temporary directory beside them. */
#include <stdio.h>
#include <stdlib.h>

#include "edgemoe.h"
#include "fuzz_input.h"

static char dir[256];

static void setup(void) {
  const char* src = getenv("EM_FUZZ_ARTIFACT");
  if (!src) {
    fprintf(stderr, "set EM_FUZZ_ARTIFACT to a compiled artifact directory\n");
    abort();
  }
  char* abs = realpath(src, NULL);
  snprintf(dir, sizeof dir, "/tmp/em_fuzz_session.XXXXXX");
  if (!abs || !mkdtemp(dir)) abort();
  const char* names[] = {"trunk.bin", "kernels.so"};
  for (int i = 0; i < 2; i++) {
    char from[1024], to[512];
    snprintf(from, sizeof from, "%s/%s", abs, names[i]);
    snprintf(to, sizeof to, "%s/%s", dir, names[i]);
    if (symlink(from, to) != 0) abort();
  }
  free(abs);
}

/* The trunk's compile id, so that fuzzed images are not all refused as another compile's. */
static void copy_compile_id(uint8_t* b, size_t n) {
  char path[512];
  uint8_t head[EM_TRUNK_HEADER_CRC_AT];
  snprintf(path, sizeof path, "%s/trunk.bin", dir);
  FILE* f = fopen(path, "rb");
  if (f && fread(head, 1, sizeof head, f) == sizeof head && n >= 96) memcpy(b + 80, head + 112, 16);
  if (f) fclose(f);
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t n) {
  if (!dir[0]) setup();
  uint8_t* b = (uint8_t*)malloc(n ? n : 1);
  memcpy(b, data, n);
  copy_compile_id(b, n);
  fz_fix_image(b, n);
  char path[512], err[1024];
  snprintf(path, sizeof path, "%s/experts.bin", dir);
  FILE* f = fopen(path, "wb");
  if (!f || fwrite(b, 1, n, f) != n) abort();
  fclose(f);
  free(b);
  em_params p;
  em_default_params(&p);
  p.artifact_dir = dir;
  uint64_t budget;
  if (em_budget_bytes(dir, 16, 0.0, &budget, err, sizeof err) != EM_OK) return 0;
  p.memory_budget = budget;
  p.max_seq = 16;
  em_session* s;
  int rc = em_open(&p, &s, err, sizeof err), steps = 0;
  int32_t prompt[3] = {1, 2, 3};
  if (rc == EM_OK && (rc = em_prefill(s, prompt, 3)) == EM_OK)
    for (steps = 1; steps < 4 && (rc = em_decode_step(s, 3 + steps, NULL)) == EM_OK; steps++) {
    }
  if (getenv("EM_FUZZ_VERBOSE")) fprintf(stderr, "steps %d: %s\n", steps, rc ? (steps ? em_error(s) : err) : "ok");
  if (steps || rc == EM_OK) em_close(s);
  return 0;
}
