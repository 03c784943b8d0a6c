#include "storage.h"

/* The backend the session parameters ask for. */
em_storage* em_storage_open(const em_params* p, const char* path, char* err, size_t err_len) {
  em_storage* s = p->storage == EM_STORAGE_MMAP ? em_storage_open_mmap(path, err, err_len)
                                                 : em_storage_open_pread(path, p->direct_io, err, err_len);
  if (s && p->inject_faults && *p->inject_faults) s = em_storage_inject_faults(s, p->inject_faults, err, err_len);
  if (s && p->emulate_bandwidth > 0) s = em_storage_emulate(s, p->emulate_bandwidth, p->emulate_latency, err, err_len);
  return s;
}
