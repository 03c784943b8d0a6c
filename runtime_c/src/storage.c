#include "storage.h"

/* The backend the session parameters ask for. */
em_storage* em_storage_open(const em_params* p, const char* path, char* err, size_t err_len) {
  em_storage* s = p->storage == EM_STORAGE_MMAP ? em_storage_open_mmap(path, err, err_len)
                                                 : em_storage_open_pread(path, p->direct_io, err, err_len);
  if (s && p->inject_faults && *p->inject_faults) s = em_storage_inject_faults(s, p->inject_faults, err, err_len);
  if (s && p->emulate_bandwidth > 0) s = em_storage_emulate(s, p->emulate_bandwidth, p->emulate_latency, err, err_len);
  return s;
}

int em_storage_readv(em_storage* s, const em_span* spans, uint32_t n, uint64_t offset) {
  if (s->readv) return s->readv(s, spans, n, offset);
  for (uint32_t i = 0; i < n; offset += spans[i].len, i++) {
    int rc = s->read(s, spans[i].dst, spans[i].len, offset);
    if (rc) return rc;
  }
  return 0;
}
