/* llama.cpp's own greedy decoding of a GGUF, through its C API (libllama), for
 * tests/test_gguf_llamacpp.py to compare the EdgeMoE runtime with:
 *
 *   llamacpp_greedy MODEL.gguf N_NEW LOGITS.bin ID...
 *
 * feeds the prompt's token ids, then N_NEW times writes the last position's logits (float32 × the
 * vocabulary) to LOGITS.bin and feeds their argmax (the first of equals). One thread, CPU only. */
#include <stdio.h>
#include <stdlib.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char* text, void* user) {
  (void)user;
  if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s MODEL.gguf N_NEW LOGITS.bin ID...\n", argv[0]);
    return 2;
  }
  int n_new = atoi(argv[2]), n_prompt = argc - 4;
  llama_token* prompt = malloc(sizeof(llama_token) * (size_t)n_prompt);
  for (int i = 0; i < n_prompt; i++) prompt[i] = atoi(argv[4 + i]);

  llama_log_set(quiet, NULL);
  llama_backend_init();
  struct llama_model_params mp = llama_model_default_params();
  mp.n_gpu_layers = 0;
  struct llama_model* model = llama_model_load_from_file(argv[1], mp);
  if (!model) {
    fprintf(stderr, "%s: cannot load the model\n", argv[1]);
    return 1;
  }
  struct llama_context_params cp = llama_context_default_params();
  cp.n_ctx = (uint32_t)(n_prompt + n_new);
  cp.n_batch = cp.n_ubatch = cp.n_ctx;
  cp.n_threads = cp.n_threads_batch = 1;
  struct llama_context* ctx = llama_init_from_model(model, cp);
  FILE* out = fopen(argv[3], "wb");
  if (!ctx || !out) {
    fprintf(stderr, "cannot create the context or %s\n", argv[3]);
    return 1;
  }
  int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  llama_token next;
  struct llama_batch batch = llama_batch_get_one(prompt, n_prompt);
  for (int step = 0; step < n_new; step++) {
    if (llama_decode(ctx, batch)) {
      fprintf(stderr, "llama_decode failed at step %d\n", step);
      return 1;
    }
    const float* logits = llama_get_logits_ith(ctx, -1);
    if (fwrite(logits, sizeof(float), (size_t)n_vocab, out) != (size_t)n_vocab) return 1;
    next = 0;
    for (int v = 1; v < n_vocab; v++)
      if (logits[v] > logits[next]) next = v;
    batch = llama_batch_get_one(&next, 1);
  }
  fclose(out);
  llama_free(ctx);
  llama_model_free(model);
  llama_backend_free();
  free(prompt);
  return 0;
}
