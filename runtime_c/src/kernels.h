/* The TVM-generated kernels of an artifact (kernels.so), resolved by name, and a call helper. */
#ifndef EM_KERNELS_H
#define EM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "generated/program.h"
#include "tvm_abi.h"

#define EM_MAX_BITS 16

/* Symbols: generated/program.h (from compiler/program.py). NULL where the artifact has no such
 * kernel: the layer program says which it needs (program.c checks). */
typedef struct {
  void* lib;
  /* "" or EM_KV_FLOAT16_SUFFIX: what the symbols of the kernels that read the KV cache end with */
  const char* kv_suffix;
  em_ffi_fn rmsnorm, layernorm, qkv, qkv_bias, qk_norm, rope, attention, add, o_proj, router, shared_gate,
      shared_gate_up, shared_down, lm_head, lm_head_bias, mla_q_a, mla_q_a_norm, mla_q, mla_kv_a, mla_kv_norm,
      mla_rope, mla_absorb, mla_attention, mla_v, dense_gate_up, dense_down, attention_sinks, router_bias,
      attention_bias, cross_q, cross_kv, dense_up_relu;
  /* by the experts' activation (EM_ACT_*) and bitwidth; NULL if not compiled. A ReLU expert's
     "gate-up" is its up projection alone. */
  em_ffi_fn gate_up[EM_ACT_COUNT][EM_MAX_BITS + 1], down[EM_ACT_COUNT][EM_MAX_BITS + 1];
  /* the same over EM_BATCH_ROWS inputs (a prompt's batch, prefill.c); NULL where not compiled */
  em_ffi_fn gate_up_batch[EM_ACT_COUNT][EM_MAX_BITS + 1], down_batch[EM_ACT_COUNT][EM_MAX_BITS + 1];
  /* the batched forms of trunk kernels (compiler/program.py BATCHED_KERNELS); NULL where not compiled */
  em_ffi_fn qkv_batch, qkv_bias_batch, o_proj_batch, shared_gate_up_batch, shared_down_batch, dense_gate_up_batch,
      dense_down_batch, dense_up_relu_batch;
} em_kernels;

/* Loads kernels.so after checking that its SHA-256 is `sha256` (the digest trunk.bin records):
 * a modified, truncated or swapped library is refused before any of its code runs. A firmware's
 * kernels are linked in: their table's digest (of kernels.o) must be `sha256`. `kv_float16`: the
 * KV cache holds float16 (trunk.bin's flag), so attention's kernels are those named for it. */
int em_kernels_load(em_kernels* k, const char* path, const uint8_t sha256[32], int kv_float16, char* err,
                    size_t n);
void em_kernels_unload(em_kernels* k);

/* What em_kernels_load stands on, one pair per build: kernels_dlopen.c (kernels.so) or
 * kernels_static.c (the firmware's kernel table). open checks the digest and points the kernels'
 * calls into the runtime (workspace, parallel launch) at ours; symbol finds __tvm_ffi_<name>. */
int em_kernels_open(em_kernels* k, const char* path, const uint8_t sha256[32], char* err, size_t n);
em_ffi_fn em_kernels_symbol(const em_kernels* k, const char* symbol);

/* A tensor argument: a DLTensor with its own shape storage. */
typedef struct {
  em_dl_tensor t;
  int64_t shape[3];
} em_arg;

em_arg em_f32(void* data, int ndim, int64_t d0, int64_t d1, int64_t d2);
em_arg em_typed(void* data, em_dl_dtype dtype, int ndim, int64_t d0, int64_t d1, int64_t d2);

/* Calls fn(args...). 0 or a negative em_status with the kernel's message in err. */
int em_kernel_call(em_ffi_fn fn, const char* name, em_arg* args, int n_args, char* err, size_t n);

#endif
