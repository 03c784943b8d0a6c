#define _GNU_SOURCE
#include "cpu_check.h"

#include <stdio.h>
#include <string.h>

#include "edgemoe.h"
#include "generated/cpu_features.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1 << 10)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#ifndef HWCAP_SVE
#define HWCAP_SVE (1 << 22)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1 << 13)
#endif
#endif

static const char* machine_name(uint32_t m) {
  switch (m) {
    case EM_ELF_MACHINE_X86_64: return "x86_64";
    case EM_ELF_MACHINE_AARCH64: return "aarch64";
    case EM_ELF_MACHINE_ARM: return "arm";
    case EM_ELF_MACHINE_RISCV64: return "riscv64";
    default: return "an unknown architecture";
  }
}

#if defined(__x86_64__)
#define THIS_MACHINE EM_ELF_MACHINE_X86_64
#elif defined(__aarch64__)
#define THIS_MACHINE EM_ELF_MACHINE_AARCH64
#elif defined(__arm__)
#define THIS_MACHINE EM_ELF_MACHINE_ARM
#elif defined(__riscv) && __riscv_xlen == 64
#define THIS_MACHINE EM_ELF_MACHINE_RISCV64
#else
#define THIS_MACHINE 0
#endif

/* The table's features this CPU has, and the names of all the table's features by bit. */
static uint32_t cpu_features(const char* names[32]) {
  uint32_t have = 0;
#define NAME_X86(bit, llvm, probe) names[bit] = llvm;
#define NAME_ARM(bit, llvm, word, hwcap) names[bit] = llvm;
  EM_CPU_FEATURES_X86_64(NAME_X86)
  EM_CPU_FEATURES_AARCH64(NAME_ARM)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#define HAVE_X86(bit, llvm, probe) \
  if (__builtin_cpu_supports(probe)) have |= 1u << (bit);
  EM_CPU_FEATURES_X86_64(HAVE_X86)
#elif defined(__aarch64__) && defined(__linux__)
#define HAVE_ARM(bit, llvm, word, hwcap) \
  if (getauxval(word) & (hwcap)) have |= 1u << (bit);
  EM_CPU_FEATURES_AARCH64(HAVE_ARM)
#endif
  return have;
}

int em_check_cpu(uint32_t machine, uint32_t features, char* err, size_t n) {
#if THIS_MACHINE == 0
  (void)machine, (void)features, (void)err, (void)n;
  return EM_OK; /* an architecture this table does not know: nothing to check against */
#else
  if (machine && machine != THIS_MACHINE) {
    snprintf(err, n,
             "the artifact's kernels are built for %s and this machine is %s: compile it for this machine "
             "(edgemoe-compile --target host) or run it on the board it was compiled for",
             machine_name(machine), machine_name(THIS_MACHINE));
    return EM_ERR_KERNEL;
  }
  const char* names[32] = {0};
  uint32_t missing = features & ~cpu_features(names);
  if (!missing) return EM_OK;
  size_t used = (size_t)snprintf(err, n, "the artifact's kernels use CPU features this CPU lacks:");
  for (int b = 0; b < 32 && used < n; b++)
    if (missing >> b & 1)
      used += names[b] ? (size_t)snprintf(err + used, n - used, " %s", names[b])
                       : (size_t)snprintf(err + used, n - used, " #%d (unknown to this runtime: update it)", b);
  if (used < n)
    snprintf(err + used, n - used, "; compile it for this CPU (edgemoe-compile --target host on this machine, or a "
             "target without them such as x86-avx2)");
  return EM_ERR_KERNEL;
#endif
}
