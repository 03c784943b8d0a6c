/* The kernels of a firmware: TVM's object for the board linked in, found through the kernel table
 * edgemoe-compile generated with it (kernel_table.h). The table carries the SHA-256 of that
 * kernels.o, which the flash image's trunk.bin must record: firmware and flash image come from one
 * compile. */
#include <stdio.h>
#include <string.h>

#include "edgemoe.h"
#include "kernel_table.h"
#include "kernels.h"
#include "thread_pool.h"
#include "tvm_backend.h"

/* The kernels' calls into the runtime, as function-pointer variables TVM's object defines where it
 * makes such calls (weak: absent when no kernel does). */
extern void* (*__TVMBackendAllocWorkspace)(int, int, uint64_t, int, int) __attribute__((weak));
extern int (*__TVMBackendFreeWorkspace)(int, int, void*) __attribute__((weak));
extern int (*__TVMBackendParallelLaunch)(em_parallel_lambda, void*, int) __attribute__((weak));

int em_kernels_open(em_kernels* k, const char* path, const uint8_t sha256[32], char* err, size_t n) {
  (void)path;
  if (memcmp(em_kernel_table_sha256, sha256, 32) != 0) {
    snprintf(err, n, "the flash image's trunk.bin was compiled with other kernels than this firmware's; build the "
             "firmware from the artifact the flash image came from (or write that artifact's flash image)");
    return EM_ERR_KERNEL;
  }
  if (&__TVMBackendAllocWorkspace) __TVMBackendAllocWorkspace = em_workspace_alloc;
  if (&__TVMBackendFreeWorkspace) __TVMBackendFreeWorkspace = em_workspace_free;
  if (&__TVMBackendParallelLaunch) __TVMBackendParallelLaunch = em_parallel_launch;
  k->lib = NULL;
  return EM_OK;
}

em_ffi_fn em_kernels_symbol(const em_kernels* k, const char* symbol) {
  (void)k;
  const char* name = symbol + strlen("__tvm_ffi_");
  for (uint32_t i = 0; i < em_kernel_count; i++)
    if (strcmp(em_kernel_table[i].name, name) == 0) return em_kernel_table[i].fn;
  return NULL;
}

void em_kernels_unload(em_kernels* k) { (void)k; }
