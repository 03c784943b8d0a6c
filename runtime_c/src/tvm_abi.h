/* The slice of TVM's C ABI that TVM-generated kernels use: DLPack tensors passed through the
 * FFI packed-call convention. Declared here (layouts from dlpack.h / tvm/ffi/c_api.h) so the
 * runtime needs no TVM headers or libraries and builds for a microcontroller too. */
#ifndef EM_TVM_ABI_H
#define EM_TVM_ABI_H

#include <stdint.h>

typedef struct {
  int32_t device_type; /* 1 = CPU */
  int32_t device_id;
} em_dl_device;

typedef struct {
  uint8_t code; /* 0 int, 1 uint, 2 float */
  uint8_t bits;
  uint16_t lanes;
} em_dl_dtype;

typedef struct {
  void* data;
  em_dl_device device;
  int32_t ndim;
  em_dl_dtype dtype;
  int64_t* shape;
  int64_t* strides; /* NULL: compact row-major */
  uint64_t byte_offset;
} em_dl_tensor;

enum { EM_FFI_TYPE_DLTENSOR_PTR = 7 };

typedef struct {
  int32_t type_index;
  uint32_t zero_padding;
  union {
    int64_t v_int64;
    double v_float64;
    void* v_ptr;
  } v;
} em_ffi_any;

/* __tvm_ffi_<name>(self, args, num_args, result) */
typedef int32_t (*em_ffi_fn)(void* self, const em_ffi_any* args, int32_t num_args, em_ffi_any* result);

typedef struct {
  void* sync_handle;
  int32_t num_task;
} em_parallel_env;
typedef int (*em_parallel_lambda)(int task_id, em_parallel_env* penv, void* cdata);

#endif
