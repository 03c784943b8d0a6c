#ifndef EM_CLOCK_H
#define EM_CLOCK_H
#include <errno.h>
#include <stdint.h>
#include <time.h>

#ifdef EM_BAREMETAL
/* The board's clock: nanoseconds since reset (the firmware's SysTick count; under qemu -icount
 * shift=0, one per instruction). */
uint64_t em_board_now_ns(void);
static inline uint64_t em_now_ns(void) { return em_board_now_ns(); }
#else
/* Monotonic nanoseconds (needs _POSIX_C_SOURCE >= 199309L in the including file). */
static inline uint64_t em_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Sleeps for `seconds`, resuming after a signal. */
static inline void em_sleep_s(double seconds) {
  if (!(seconds > 0)) return;
  struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}
#endif
#endif
