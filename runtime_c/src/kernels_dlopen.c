/* An artifact's kernels.so: checked against the SHA-256 trunk.bin records, then dlopen'ed, and its
 * calls back into the runtime (workspace, parallel launch) pointed at ours. */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "artifact.h"
#include "edgemoe.h"
#include "kernels.h"
#include "sha256.h"
#include "thread_pool.h"
#include "tvm_backend.h"

/* Points a weak function-pointer variable of the generated code at our implementation. */
static void hook(void* lib, const char* var, void* fn) {
  void** slot = (void**)dlsym(lib, var);
  if (slot) *slot = fn;
}

/* SHA-256 of the open file. */
static int digest_file(int fd, const char* path, uint8_t out[32], char* err, size_t n) {
  uint8_t buf[1 << 14];
  em_sha256 c;
  em_sha256_init(&c);
  for (uint64_t at = 0;;) {
    ssize_t got = pread(fd, buf, sizeof buf, (off_t)at);
    if (got < 0) {
      snprintf(err, n, "reading %s failed: %s", path, em_read_error(-errno));
      return EM_ERR_IO;
    }
    if (got == 0) break;
    em_sha256_update(&c, buf, (size_t)got);
    at += (uint64_t)got;
  }
  em_sha256_final(&c, out);
  return EM_OK;
}

int em_kernels_open(em_kernels* k, const char* path, const uint8_t sha256[32], char* err, size_t n) {
  int fd = em_open_file(path, err, n);
  if (fd < 0) return fd;
  uint8_t digest[32];
  int rc = digest_file(fd, path, digest, err, n);
  if (!rc && memcmp(digest, sha256, 32) != 0) {
    snprintf(err, n, "%s does not match the SHA-256 trunk.bin records for it (modified, truncated or from another "
             "compile); not loading it: re-copy the artifact whole or recompile it", path);
    rc = EM_ERR_KERNEL;
  }
  if (!rc) {
    /* load the very file just hashed (its descriptor), not whatever the path names by now */
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    k->lib = dlopen(access(self, R_OK) == 0 ? self : path, RTLD_NOW | RTLD_LOCAL);
    if (!k->lib) {
      snprintf(err, n, "cannot load kernels %s: %s", path, dlerror());
      rc = EM_ERR_KERNEL;
    }
  }
  close(fd);
  if (rc) return rc;
  hook(k->lib, "__TVMBackendAllocWorkspace", (void*)em_workspace_alloc);
  hook(k->lib, "__TVMBackendFreeWorkspace", (void*)em_workspace_free);
  hook(k->lib, "__TVMBackendParallelLaunch", (void*)em_parallel_launch);
  return EM_OK;
}

em_ffi_fn em_kernels_symbol(const em_kernels* k, const char* symbol) {
  void* p = dlsym(k->lib, symbol);
  em_ffi_fn fn;
  memcpy(&fn, &p, sizeof p); /* object pointer → function pointer, as POSIX dlsym requires */
  return fn;
}

void em_kernels_unload(em_kernels* k) {
  if (k->lib) dlclose(k->lib);
  k->lib = NULL;
}

