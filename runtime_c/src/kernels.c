/* Finding an artifact's kernels by name (in kernels.so, kernels_dlopen.c, or the firmware's kernel
 * table, kernels_static.c) and calling them. */
#include "kernels.h"

#include <stdio.h>
#include <string.h>

#include "edgemoe.h"
#include "generated/program.h"
#include "tvm_backend.h"

static int resolve(const em_kernels* k, const char* name, em_ffi_fn* out, int required, char* err, size_t n) {
  char sym[96];
  snprintf(sym, sizeof sym, "__tvm_ffi_%s", name);
  *out = em_kernels_symbol(k, sym);
  if (!*out && required) {
    snprintf(err, n, "kernel library lacks %s; recompile the artifact", sym);
    return EM_ERR_KERNEL;
  }
  return EM_OK;
}

int em_kernels_load(em_kernels* k, const char* path, const uint8_t sha256[32], int kv_float16, char* err,
                    size_t n) {
  memset(k, 0, sizeof *k);
  int rc = em_kernels_open(k, path, sha256, err, n);
  if (rc) return rc;
  k->kv_suffix = kv_float16 ? EM_KV_FLOAT16_SUFFIX : "";
  struct {
    const char* name;
    em_ffi_fn* fn;
    int required; /* by every layer program */
  } reads_kv[] = {{EM_KERNEL_ATTENTION, &k->attention, 0},
                  {EM_KERNEL_ATTENTION_SINKS, &k->attention_sinks, 0},
                  {EM_KERNEL_MLA_ATTENTION, &k->mla_attention, 0}},
    trunk[] = {{EM_KERNEL_RMSNORM, &k->rmsnorm, 0},       {EM_KERNEL_LAYERNORM, &k->layernorm, 0},
               {EM_KERNEL_QKV, &k->qkv, 0},               {EM_KERNEL_QKV_BIAS, &k->qkv_bias, 0},
               {EM_KERNEL_QK_NORM, &k->qk_norm, 0},       {EM_KERNEL_ROPE, &k->rope, 0},
               {EM_KERNEL_ADD, &k->add, 0},
               {EM_KERNEL_O_PROJ, &k->o_proj, 1},         {EM_KERNEL_ROUTER, &k->router, 1},
               {EM_KERNEL_SHARED_GATE, &k->shared_gate, 0}, {EM_KERNEL_SHARED_GATE_UP, &k->shared_gate_up, 0},
               {EM_KERNEL_SHARED_DOWN, &k->shared_down, 0}, {EM_KERNEL_LM_HEAD, &k->lm_head, 0},
               {EM_KERNEL_LM_HEAD_BIAS, &k->lm_head_bias, 0}, {EM_KERNEL_MLA_Q_A, &k->mla_q_a, 0},
               {EM_KERNEL_MLA_Q_A_NORM, &k->mla_q_a_norm, 0}, {EM_KERNEL_MLA_Q, &k->mla_q, 0},
               {EM_KERNEL_MLA_KV_A, &k->mla_kv_a, 0},     {EM_KERNEL_MLA_KV_NORM, &k->mla_kv_norm, 0},
               {EM_KERNEL_MLA_ROPE, &k->mla_rope, 0},     {EM_KERNEL_MLA_ABSORB, &k->mla_absorb, 0},
               {EM_KERNEL_MLA_V, &k->mla_v, 0},
               {EM_KERNEL_DENSE_GATE_UP, &k->dense_gate_up, 0}, {EM_KERNEL_DENSE_DOWN, &k->dense_down, 0},
               {EM_KERNEL_ROUTER_BIAS, &k->router_bias, 0},
               {EM_KERNEL_ATTENTION_BIAS, &k->attention_bias, 0}, {EM_KERNEL_CROSS_Q, &k->cross_q, 0},
               {EM_KERNEL_CROSS_KV, &k->cross_kv, 0},     {EM_KERNEL_DENSE_UP_RELU, &k->dense_up_relu, 0}};
  for (size_t i = 0; i < sizeof trunk / sizeof trunk[0]; i++)
    if (resolve(k, trunk[i].name, trunk[i].fn, trunk[i].required, err, n)) return EM_ERR_KERNEL;
  for (size_t i = 0; i < sizeof reads_kv / sizeof reads_kv[0]; i++) {
    char name[64];
    snprintf(name, sizeof name, "%s%s", reads_kv[i].name, k->kv_suffix);
    resolve(k, name, reads_kv[i].fn, reads_kv[i].required, err, n);
  }
  struct {
    const char* name;
    em_ffi_fn* fn;
  } batched[] = {{EM_KERNEL_QKV, &k->qkv_batch}, {EM_KERNEL_QKV_BIAS, &k->qkv_bias_batch},
                 {EM_KERNEL_O_PROJ, &k->o_proj_batch}, {EM_KERNEL_SHARED_GATE_UP, &k->shared_gate_up_batch},
                 {EM_KERNEL_SHARED_DOWN, &k->shared_down_batch}, {EM_KERNEL_DENSE_GATE_UP, &k->dense_gate_up_batch},
                 {EM_KERNEL_DENSE_DOWN, &k->dense_down_batch}, {EM_KERNEL_DENSE_UP_RELU, &k->dense_up_relu_batch}};
  for (size_t i = 0; i < sizeof batched / sizeof batched[0]; i++) {
    char name[64];
    snprintf(name, sizeof name, "%s%s", batched[i].name, EM_BATCH_SUFFIX);
    resolve(k, name, batched[i].fn, 0, err, n);
  }
  static const char* const fmts[EM_ACT_COUNT][2] = EM_ACT_KERNEL_FMTS;
  for (int act = 0; act < EM_ACT_COUNT; act++)
    for (int b = 1; b <= EM_MAX_BITS; b++) {
      em_ffi_fn* fns[2][2] = {{&k->gate_up[act][b], &k->gate_up_batch[act][b]}, {&k->down[act][b], &k->down_batch[act][b]}};
      for (int i = 0; i < 2; i++) {
        char name[64], batched[80];
        snprintf(name, sizeof name, fmts[act][i], b);
        snprintf(batched, sizeof batched, "%s%s", name, EM_BATCH_SUFFIX);
        resolve(k, name, fns[i][0], 0, err, n);
        resolve(k, batched, fns[i][1], 0, err, n);
      }
      if (!k->gate_up_batch[act][b] || !k->down_batch[act][b]) /* the pair or neither */
        k->gate_up_batch[act][b] = k->down_batch[act][b] = NULL;
    }
  return EM_OK;
}

static em_arg make_arg(void* data, em_dl_dtype dtype, int ndim, int64_t d0, int64_t d1, int64_t d2) {
  em_arg a;
  memset(&a, 0, sizeof a);
  a.shape[0] = d0, a.shape[1] = d1, a.shape[2] = d2;
  a.t.data = data;
  a.t.device.device_type = 1; /* kDLCPU */
  a.t.ndim = ndim;
  a.t.dtype = dtype;
  return a;
}

em_arg em_f32(void* data, int ndim, int64_t d0, int64_t d1, int64_t d2) {
  em_dl_dtype f32 = {2, 32, 1};
  return make_arg(data, f32, ndim, d0, d1, d2);
}

em_arg em_typed(void* data, em_dl_dtype dtype, int ndim, int64_t d0, int64_t d1, int64_t d2) {
  return make_arg(data, dtype, ndim, d0, d1, d2);
}

#define EM_MAX_ARGS 8

int em_kernel_call(em_ffi_fn fn, const char* name, em_arg* args, int n_args, char* err, size_t n) {
  em_ffi_any packed[EM_MAX_ARGS];
  em_ffi_any result;
  memset(packed, 0, sizeof packed);
  memset(&result, 0, sizeof result);
  for (int i = 0; i < n_args; i++) {
    args[i].t.shape = args[i].shape; /* the em_arg may have been copied since it was made */
    packed[i].type_index = EM_FFI_TYPE_DLTENSOR_PTR;
    packed[i].v.v_ptr = &args[i].t;
  }
  if (fn(NULL, packed, n_args, &result) != 0) {
    const char* why = em_take_kernel_error();
    snprintf(err, n, "kernel %s failed: %s", name, *why ? why : "no detail (another TVM runtime in this process took it)");
    return EM_ERR_KERNEL;
  }
  return EM_OK;
}
