#include "routing.h"

#include <math.h>

#include "generated/program.h"
#include "predictor.h"

/* Sparsemixer routing at inference (top-2; program.c checks top_k): pick i1, the top logit m1
 * (ties: the lower index), weighted by the softmax at i1 over the experts j with
 * (m1 - l[j]) / max(|l[j]|, m1) <= threshold, the rest masked out; then i2, the top logit m2 of the
 * experts but i1, weighted likewise over the experts but i1 with m2 in place of m1. Not
 * renormalised. */
static void sparsemixer(const float* l, uint32_t E, float threshold, uint32_t* idx, float* w) {
  for (uint32_t pick = 0; pick < 2; pick++) {
    uint32_t best = pick && idx[0] == 0 ? 1 : 0;
    for (uint32_t e = best + 1; e < E; e++)
      if (!(pick && e == idx[0]) && l[e] > l[best]) best = e;
    float m = l[best], sum = 0.0f;
    for (uint32_t e = 0; e < E; e++) {
      if (pick && e == idx[0]) continue;
      float a = fabsf(l[e]), factor = a > m ? a : m;
      /* kept unless above the threshold: 0/0 (a zero logit at a zero top) compares false, as in torch */
      if (e == best || !((m - l[e]) / factor > threshold)) sum += expf(l[e] - m);
    }
    idx[pick] = best;
    w[pick] = 1.0f / sum;
  }
}

/* A group's score: its best choice score, or its two best summed. */
static float group_score(const float* c, uint32_t n, uint32_t kind) {
  float a = -INFINITY, b = -INFINITY; /* a >= b: the two best */
  for (uint32_t i = 0; i < n; i++) {
    if (c[i] > a) b = a, a = c[i];
    else if (c[i] > b) b = c[i];
  }
  return kind == EM_GROUP_SCORE_TOP2 ? a + b : a;
}

/* Masks to -inf the choice scores of every expert outside the best `keep` of G equal groups (ties:
 * the lower group), each group scored by group_score; gscore: G floats of scratch. */
static void keep_best_groups(float* choice, uint32_t E, uint32_t G, uint32_t keep, uint32_t kind, float* gscore) {
  uint32_t per = E / G;
  for (uint32_t g = 0; g < G; g++) gscore[g] = group_score(choice + g * per, per, kind);
  for (uint32_t g = 0; g < G; g++) {
    uint32_t ahead = 0;
    for (uint32_t o = 0; o < G; o++) ahead += gscore[o] > gscore[g] || (gscore[o] == gscore[g] && o < g);
    if (ahead >= keep)
      for (uint32_t i = 0; i < per; i++) choice[g * per + i] = -INFINITY;
  }
}

void em_route(const em_step* st, const float* l, uint32_t E, uint32_t K, float* scratch, uint32_t* idx, float* w) {
  uint32_t route = st->kind;
  if (route == EM_ROUTE_SPARSEMIXER) {
    sparsemixer(l, E, st->route_threshold, idx, w);
    return;
  }
  if (route == EM_ROUTE_TOPK_SOFTMAX) { /* the top-k logits, a softmax over those k alone */
    float chosen = 0.0f;
    em_top_n(l, E, K, 0, idx);
    for (uint32_t k = 0; k < K; k++) chosen += w[k] = expf(l[idx[k]] - l[idx[0]]);
    for (uint32_t k = 0; k < K; k++) w[k] /= chosen;
    return;
  }
  float *score = scratch, *choice = scratch + E;
  if (route == EM_ROUTE_SIGMOID_TOPK || route == EM_ROUTE_SIGMOID_TOPK_RENORM) {
    for (uint32_t e = 0; e < E; e++) score[e] = 1.0f / (1.0f + expf(-l[e]));
  } else { /* softmax over every expert */
    float mx = l[0], total = 0.0f;
    for (uint32_t e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
    for (uint32_t e = 0; e < E; e++) total += score[e] = expf(l[e] - mx);
    for (uint32_t e = 0; e < E; e++) score[e] /= total;
  }
  /* the bias steers the choice only: the weights are the scores themselves */
  for (uint32_t e = 0; e < E; e++) choice[e] = st->router_bias ? score[e] + st->router_bias[e] : score[e];
  if (st->route_groups > 1)
    keep_best_groups(choice, E, st->route_groups, st->route_topk_groups, st->group_score, scratch + 2 * E);
  em_top_n(choice, E, K, 0, idx);
  float chosen = 0.0f;
  for (uint32_t k = 0; k < K; k++) chosen += w[k] = score[idx[k]];
  int renorm = route == EM_ROUTE_SOFTMAX_TOPK_RENORM || route == EM_ROUTE_SIGMOID_TOPK_RENORM;
  for (uint32_t k = 0; k < K; k++) {
    if (renorm) w[k] /= chosen;
    w[k] *= st->route_scale;
  }
}
