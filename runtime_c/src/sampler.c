/* Choosing the next token from the logits: repetition penalty, temperature, top-k, top-p and a
 * seeded random draw (greedy at temperature 0). The Python API samples through this same code, so
 * one seed gives one text from either. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgemoe.h"

typedef struct {
  float p;
  int32_t id;
} candidate;

struct em_sampler {
  em_sampling params;
  uint32_t vocab;
  uint64_t rng;
  candidate* cand; /* [vocab] */
  uint8_t* seen;   /* [vocab]: tokens the repetition penalty already applied to */
};

void em_default_sampling(em_sampling* p) {
  memset(p, 0, sizeof *p);
  p->top_p = 1.0f;
  p->repetition_penalty = 1.0f;
}

/* splitmix64: a small, well-mixed generator whose sequence is fixed by the seed on every platform. */
static uint64_t next_u64(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static double uniform(uint64_t* state) { return (double)(next_u64(state) >> 11) * (1.0 / 9007199254740992.0); }

int em_sampler_create(const em_sampling* p, uint32_t vocab_size, em_sampler** out, char* err, size_t n) {
  *out = NULL;
  const char* why = NULL;
  if (!(p->temperature >= 0.0f && p->temperature <= 100.0f)) why = "temperature must be within [0, 100]";
  else if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) why = "top_p must be within (0, 1]";
  else if (!(p->repetition_penalty > 0.0f && p->repetition_penalty <= 100.0f))
    why = "repetition_penalty must be within (0, 100]";
  else if (!vocab_size) why = "the vocabulary is empty";
  if (why) {
    snprintf(err, n, "bad sampling parameter: %s", why);
    return EM_ERR_ARGUMENT;
  }
  em_sampler* s = (em_sampler*)calloc(1, sizeof *s);
  if (s) s->cand = (candidate*)malloc(vocab_size * sizeof(candidate)), s->seen = (uint8_t*)calloc(vocab_size, 1);
  if (!s || !s->cand || !s->seen) {
    em_sampler_free(s);
    snprintf(err, n, "out of memory for a sampler over %u tokens", vocab_size);
    return EM_ERR_NOMEM;
  }
  s->params = *p;
  s->vocab = vocab_size;
  s->rng = p->seed;
  *out = s;
  return EM_OK;
}

void em_sampler_free(em_sampler* s) {
  if (!s) return;
  free(s->cand);
  free(s->seen);
  free(s);
}

static int by_probability(const void* a, const void* b) {
  const candidate *x = (const candidate*)a, *y = (const candidate*)b;
  if (x->p != y->p) return x->p > y->p ? -1 : 1;
  return x->id < y->id ? -1 : x->id > y->id; /* ties: the lower id first, as a stable sort would */
}

int32_t em_sample(em_sampler* s, const float* logits, const int32_t* history, size_t n_history) {
  const em_sampling* p = &s->params;
  uint32_t V = s->vocab;
  if (p->temperature == 0.0f && p->repetition_penalty == 1.0f) { /* greedy on the logits as they are */
    uint32_t best = 0;
    for (uint32_t i = 1; i < V; i++)
      if (logits[i] > logits[best]) best = i;
    return (int32_t)best;
  }
  for (uint32_t i = 0; i < V; i++) s->cand[i].p = logits[i], s->cand[i].id = (int32_t)i;
  if (p->repetition_penalty != 1.0f) { /* CTRL's rule, once per distinct token of the context */
    for (size_t i = 0; i < n_history; i++) {
      int32_t t = history[i];
      if (t < 0 || (uint32_t)t >= V || s->seen[t]) continue;
      s->seen[t] = 1;
      float* l = &s->cand[t].p;
      *l = *l > 0 ? *l / p->repetition_penalty : *l * p->repetition_penalty;
    }
    for (size_t i = 0; i < n_history; i++)
      if (history[i] >= 0 && (uint32_t)history[i] < V) s->seen[history[i]] = 0;
  }
  if (p->temperature == 0.0f) { /* greedy after the penalty: the first of the largest */
    uint32_t best = 0;
    for (uint32_t i = 1; i < V; i++)
      if (s->cand[i].p > s->cand[best].p) best = i;
    return (int32_t)best;
  }
  uint32_t n = V;
  qsort(s->cand, V, sizeof *s->cand, by_probability);
  if (p->top_k && p->top_k < n) n = p->top_k;
  double total = 0.0, mx = s->cand[0].p;
  for (uint32_t i = 0; i < n; i++) total += s->cand[i].p = (float)exp((s->cand[i].p - mx) / p->temperature);
  if (p->top_p < 1.0f) { /* the fewest most likely tokens whose probability reaches top_p */
    double kept = 0.0;
    uint32_t m = 0;
    while (m < n && kept < p->top_p * total) kept += s->cand[m++].p;
    n = m ? m : 1;
    total = kept > 0.0 ? kept : s->cand[0].p;
  }
  double r = uniform(&s->rng) * total, acc = 0.0;
  for (uint32_t i = 0; i < n; i++) {
    acc += s->cand[i].p;
    if (r < acc) return s->cand[i].id;
  }
  return s->cand[n - 1].id;
}
