/* libFuzzer harness: the experts.bin header and record-table parser on arbitrary bytes. */
#include <stdlib.h>

#include "fuzz_input.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t n) {
  uint8_t* b = (uint8_t*)malloc(n ? n : 1);
  memcpy(b, data, n);
  fz_fix_image(b, n);
  int fd = fz_memfd(b, n);
  free(b);
  if (fd < 0) return 0;
  char err[512];
  em_image_header h;
  if (em_read_image_header(fd, "fuzz", &h, err, sizeof err) == 0) {
    em_record* records = (em_record*)calloc(h.n_records, sizeof *records);
    if (records) em_read_image_table(fd, "fuzz", &h, records, err, sizeof err);
    free(records);
  }
  close(fd);
  return 0;
}
