/* Choosing experts by score: the router's top-k, and the predictors' guesses for the next layer. */
#ifndef EM_PREDICTOR_H
#define EM_PREDICTOR_H

#include <stdint.h>

/* Indices of the n highest scores (ties: lower index first); lowest instead when `lowest`. */
void em_top_n(const float* scores, uint32_t count, uint32_t n, int lowest, uint32_t* out);

/* The paper's activation-path predictor: scores[e] = sum over experts j selected at `layer` of
 * table[layer][j][e], the calibration-measured probability that expert e is selected at the next
 * layer (layer 0 of the next token after the last layer) given j at this one. */
void em_path_scores(const float* table, uint32_t experts, uint32_t layer, const uint32_t* selected, uint32_t k,
                    float* scores);

#endif
