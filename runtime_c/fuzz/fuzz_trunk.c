/* libFuzzer harness: the trunk.bin header and tensor-table parser on arbitrary bytes. */
#include <stdlib.h>

#include "fuzz_input.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t n) {
  uint8_t* b = (uint8_t*)malloc(n ? n : 1);
  memcpy(b, data, n);
  fz_fix_trunk(b, n);
  int fd = fz_memfd(b, n);
  free(b);
  if (fd < 0) return 0;
  char err[512];
  em_trunk_header h;
  if (em_read_trunk_header(fd, "fuzz", &h, err, sizeof err) == 0) {
    em_tensor_entry* t = (em_tensor_entry*)calloc(h.n_tensors, sizeof *t);
    if (t) em_read_trunk_table(fd, "fuzz", &h, t, err, sizeof err);
    free(t);
  }
  close(fd);
  return 0;
}
