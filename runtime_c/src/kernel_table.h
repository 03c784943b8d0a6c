/* The kernels of a statically linked build (firmware): edgemoe-compile writes kernel_table.c
 * beside kernels.o for a target with kernel_library "static", naming every __tvm_ffi_<symbol>
 * of the object, and the SHA-256 of that object, which trunk.bin records as the kernels' digest. */
#ifndef EM_KERNEL_TABLE_H
#define EM_KERNEL_TABLE_H

#include <stdint.h>

#include "tvm_abi.h"

typedef struct {
  const char* name; /* the kernel's symbol without "__tvm_ffi_": em_rmsnorm, em_expert_gate_up_w4, ... */
  em_ffi_fn fn;
} em_kernel_entry;

extern const em_kernel_entry em_kernel_table[];
extern const uint32_t em_kernel_count;
extern const uint8_t em_kernel_table_sha256[32];

#endif
