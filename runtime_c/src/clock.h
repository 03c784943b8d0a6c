#ifndef EM_CLOCK_H
#define EM_CLOCK_H
#include <stdint.h>
#include <time.h>

/* Monotonic nanoseconds (needs _POSIX_C_SOURCE >= 199309L in the including file). */
static inline uint64_t em_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
#endif
