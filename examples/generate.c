/* generate.c: greedy generation with the EdgeMoE C library, using only edgemoe.h.
 *
 *   generate ARTIFACT_DIR [-m MIB] [-n STEPS] [-p ID,ID,...]
 *
 * Opens a compiled artifact (edgemoe-compile ... -o ARTIFACT_DIR) within a memory budget,
 * feeds the prompt's token ids, then picks the most likely token STEPS times. Prints the
 * generated ids on one line, then a few statistics. Build it against an installed EdgeMoE:
 * examples/README.md. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <edgemoe.h>

#define MAX_PROMPT 1024

static void usage(void) {
  fprintf(stderr,
          "usage: generate ARTIFACT_DIR [-m MIB] [-n STEPS] [-p ID,ID,...]\n"
          "  -m MIB   memory budget in MiB for trunk, KV cache and expert cache\n"
          "           (default: enough to cache a quarter of the experts; 0 = every expert resident)\n"
          "  -n STEPS tokens to generate (default 16)\n"
          "  -p IDS   prompt token ids, comma-separated (default: the model's BOS token)\n");
  exit(2);
}

/* The index of the largest logit (the first one on a tie). */
static int32_t argmax(const float* x, uint32_t n) {
  uint32_t best = 0;
  for (uint32_t i = 1; i < n; i++)
    if (x[i] > x[best]) best = i;
  return (int32_t)best;
}

/* "1,2,3" -> tokens; returns how many, or -1 if it is not a list of whole numbers. */
static int parse_ids(const char* text, int32_t* tokens, int max) {
  int n = 0;
  while (*text) {
    char* end;
    long v = strtol(text, &end, 10);
    if (end == text || v < 0 || v > INT32_MAX || n == max || (*end && *end != ',')) return -1;
    tokens[n++] = (int32_t)v;
    text = *end ? end + 1 : end;
  }
  return n;
}

int main(int argc, char** argv) {
  if (argc < 2 || argv[1][0] == '-') usage();
  const char* artifact = argv[1];
  double budget_mib = -1; /* < 0: a quarter of the experts cached */
  int steps = 16;
  const char* prompt_text = NULL;
  for (int i = 2; i < argc; i += 2) {
    if (i + 1 >= argc) usage();
    if (!strcmp(argv[i], "-m")) budget_mib = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "-n")) steps = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "-p")) prompt_text = argv[i + 1];
    else usage();
  }
  if (steps < 0 || budget_mib < -1) usage();

  /* 1. the memory budget: everything the session allocates, once, at em_open */
  char err[512];
  em_params params;
  em_default_params(&params);
  params.artifact_dir = artifact;
  if (budget_mib < 0) {
    if (em_budget_bytes(artifact, 0, 0.25, &params.memory_budget, err, sizeof err) != EM_OK) {
      fprintf(stderr, "generate: %s\n", err);
      return 1;
    }
  } else {
    params.memory_budget = (uint64_t)(budget_mib * 1024 * 1024);
  }

  /* 2. open the artifact: trunk into RAM, expert cache allocated, kernels.so verified and loaded */
  em_session* s;
  if (em_open(&params, &s, err, sizeof err) != EM_OK) {
    fprintf(stderr, "generate: %s\n", err);
    return 1;
  }
  em_model_info info;
  em_model_info_get(s, &info);

  /* 3. the prompt */
  int32_t prompt[MAX_PROMPT];
  int n_prompt = 1;
  prompt[0] = info.bos_token_id;
  if (prompt_text) n_prompt = parse_ids(prompt_text, prompt, MAX_PROMPT);
  if (n_prompt < 1) {
    fprintf(stderr, "generate: -p takes 1 to %d comma-separated token ids\n", MAX_PROMPT);
    em_close(s);
    return 2;
  }

  /* 4. prefill, then greedy decoding: each step feeds the token just chosen */
  int rc = em_prefill(s, prompt, (size_t)n_prompt);
  for (int i = 0; rc == EM_OK && i < steps; i++) {
    int32_t next = argmax(em_logits(s), info.vocab_size);
    printf(i ? " %d" : "%d", next);
    fflush(stdout);
    if (i + 1 < steps) rc = em_decode_step(s, next, NULL);
  }
  printf("\n");
  if (rc != EM_OK) {
    fprintf(stderr, "generate: %s\n", em_error(s));
    em_close(s);
    return 1;
  }

  /* 5. what it cost */
  em_stats st;
  em_stats_get(s, &st);
  uint64_t uses = st.expert_hits + st.expert_misses;
  printf("tokens=%llu expert_hits=%llu expert_misses=%llu hit_rate=%.1f%% memory=%.1fMiB\n",
         (unsigned long long)st.tokens, (unsigned long long)st.expert_hits, (unsigned long long)st.expert_misses,
         uses ? 100.0 * (double)st.expert_hits / (double)uses : 0.0, (double)st.memory_bytes / (1024.0 * 1024.0));
  em_close(s);
  return 0;
}
