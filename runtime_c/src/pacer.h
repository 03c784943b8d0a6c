/* Board-faithful compute timing: each kernel call is stretched to what it would take on the
 * emulated board, the larger of its time here and the board's bytes ÷ memory bandwidth and
 * operations ÷ throughput (int8 for the integer-dot kernels, fp32 for the rest), so that an
 * emulated board's compute : I/O ratio is the board's and not this host's. The shortfall is
 * accumulated and slept off in pieces of at least EM_PACE_MIN_SLEEP_NS (a sleep overshoots by
 * tens of microseconds; the overshoot is credited against later kernels).
 * Kernels are called on the decode thread: the session makes its pacer current for that thread
 * while it decodes (em_pacer_enter / em_pacer_leave), and em_kernel_invoke paces every call. */
#ifndef EM_PACER_H
#define EM_PACER_H

#include <stdint.h>

#include "matrix.h"

#define EM_PACE_MIN_SLEEP_NS 100000

typedef struct {
  double memory_bandwidth; /* bytes/s; the pacer is off unless this and both throughputs are > 0 */
  double int8_ops, fp32_flops; /* operations/s, a multiply-accumulate counting two */
  int64_t debt_ns;  /* board time not yet spent here (negative: slept beyond it) */
  uint64_t added_ns; /* time slept so far to match the board */
} em_pacer;

/* 0, or -1 where the figures are not all > 0 and finite (all 0: no pacing, also 0). */
int em_pacer_init(em_pacer* p, double memory_bandwidth, double int8_ops, double fp32_flops);
int em_pacer_on(const em_pacer* p);

/* The board's time for one kernel call with these arguments: matrices count their codes and scales
 * and two operations per weight (int8 where the matrix is in the integer-dot tiles layout), other
 * tensors their bytes and two fp32 operations per element. */
double em_pacer_board_ns(const em_pacer* p, const em_kernel_arg* args, int n);

/* Makes p the calling thread's pacer (NULL: none) and returns the previous one. */
em_pacer* em_pacer_enter(em_pacer* p);
/* Sleeps off what is owed and restores `previous` as the thread's pacer. */
void em_pacer_leave(em_pacer* previous);
/* The calling thread's pacer, or NULL. */
em_pacer* em_pacer_current(void);
/* After a kernel call that took host_ns here: owes the difference to the board's time, sleeping once
 * enough is owed. */
void em_pacer_account(em_pacer* p, const em_kernel_arg* args, int n, uint64_t host_ns);

#endif
