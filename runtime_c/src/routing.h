/* The MoE router's choice: which experts a token goes to and with what weights, by the MOE step's
 * routing operands (score function, expert groups, choice bias, renormalisation, scale; or a softmax
 * over the top-k logits alone, or the sparsemixer). */
#ifndef EM_ROUTING_H
#define EM_ROUTING_H

#include <stdint.h>

#include "program.h"

/* idx[top_k] and w[top_k] for the router logits l[experts]; scratch: 3 × experts floats. In
 * float32, as the reference (models/reference.py route_rows, sparsemixer). */
void em_route(const em_step* st, const float* l, uint32_t experts, uint32_t top_k, float* scratch, uint32_t* idx,
              float* w);

#endif
