/* The ops of encoder-decoder models (the layer program's REL_ATTENTION, CROSS_ATTENTION,
 * DENSE_FFN, ENCODER_OUT): the encoder, run over the whole input at prefill one op at a time, and
 * the decoder's per-token steps of those ops. Family-agnostic: what each layer holds is the
 * program's business. */
#ifndef EM_ENCODER_DECODER_H
#define EM_ENCODER_DECODER_H

#include <stddef.h>
#include <stdint.h>

#include "edgemoe.h"
#include "program.h"

/* Runs the program's encoder steps over tokens[n] and fills every cross-attention step's keys
 * and values from its output; the decoder restarts at position 0. */
int em_run_encoder(em_session* s, const int32_t* tokens, size_t n);
/* The decoder's steps for the token at s->pos, on the residual stream s->x. */
int em_rel_attention(em_session* s, const em_step* st);
int em_cross_attention(em_session* s, const em_step* st);

#endif
