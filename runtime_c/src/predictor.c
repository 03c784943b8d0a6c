#include "predictor.h"

void em_top_n(const float* scores, uint32_t count, uint32_t n, int lowest, uint32_t* out) {
  for (uint32_t k = 0; k < n && k < count; k++) {
    int best = -1;
    for (uint32_t e = 0; e < count; e++) {
      int taken = 0;
      for (uint32_t j = 0; j < k; j++) taken |= out[j] == e;
      if (taken) continue;
      if (best < 0 || (lowest ? scores[e] < scores[best] : scores[e] > scores[best])) best = (int)e;
    }
    out[k] = (uint32_t)best;
  }
}

void em_path_scores(const float* table, uint32_t experts, uint32_t layer, const uint32_t* selected, uint32_t k,
                    float* scores) {
  const float* t = table + (uint64_t)layer * experts * experts;
  for (uint32_t e = 0; e < experts; e++) scores[e] = 0.0f;
  for (uint32_t j = 0; j < k; j++)
    for (uint32_t e = 0; e < experts; e++) scores[e] += t[(uint64_t)selected[j] * experts + e];
}
