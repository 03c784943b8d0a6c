/* Whether this machine can run an artifact's kernels: their architecture and the CPU features
 * they were compiled to use (the table is generated/cpu_features.h, from compiler/cpu_features.py). */
#ifndef EM_CPU_CHECK_H
#define EM_CPU_CHECK_H

#include <stddef.h>
#include <stdint.h>

/* EM_OK, or EM_ERR_KERNEL naming the architecture or the missing features. `machine` is an ELF
 * e_machine (0: unknown, not checked). */
int em_check_cpu(uint32_t machine, uint32_t features, char* err, size_t n);

#endif
