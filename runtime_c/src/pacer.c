#define _POSIX_C_SOURCE 200809L
#include "pacer.h"

#include <math.h>
#include <string.h>

#include "clock.h"

#ifdef EM_BAREMETAL /* one thread, and nothing to emulate: the firmware runs on the board itself */
static em_pacer* current;
#else
static _Thread_local em_pacer* current;
#endif

static int usable(double v) { return v > 0 && isfinite(v); }

int em_pacer_init(em_pacer* p, double memory_bandwidth, double int8_ops, double fp32_flops) {
  memset(p, 0, sizeof *p);
  if (memory_bandwidth == 0 && int8_ops == 0 && fp32_flops == 0) return 0;
  if (!usable(memory_bandwidth) || !usable(int8_ops) || !usable(fp32_flops)) return -1;
  p->memory_bandwidth = memory_bandwidth, p->int8_ops = int8_ops, p->fp32_flops = fp32_flops;
  return 0;
}

int em_pacer_on(const em_pacer* p) { return p && p->memory_bandwidth > 0; }

static double elements(const em_arg* a) {
  double numel = a->t.dtype.lanes;
  for (int d = 0; d < a->t.ndim; d++) numel *= (double)a->shape[d];
  return numel;
}

double em_pacer_board_ns(const em_pacer* p, const em_kernel_arg* args, int n) {
  double bytes = 0, int8_ops = 0, fp32_ops = 0, rows = 1;
  for (int i = 0; i < n; i++) /* a batched kernel's inputs are rows: each goes through its matrices */
    if (!args[i].matrix && args[i].tensor.t.ndim == 2 && (double)args[i].tensor.shape[0] > rows)
      rows = (double)args[i].tensor.shape[0];
  for (int i = 0; i < n; i++) {
    const em_matrix* m = args[i].matrix;
    if (m) {
      double weights = (double)m->rows * m->cols;
      bytes += weights * m->bits / 8.0 + (m->bits < 16 ? weights / m->group * 2.0 : 0);
      if (m->tiled && m->bits <= 8)
        int8_ops += 2 * weights * rows;
      else
        fp32_ops += 2 * weights * rows;
    } else {
      double numel = elements(&args[i].tensor);
      bytes += numel * args[i].tensor.t.dtype.bits / 8.0;
      fp32_ops += 2 * numel;
    }
  }
  double by_memory = bytes / p->memory_bandwidth, by_ops = int8_ops / p->int8_ops + fp32_ops / p->fp32_flops;
  return 1e9 * (by_memory > by_ops ? by_memory : by_ops);
}

em_pacer* em_pacer_enter(em_pacer* p) {
  em_pacer* previous = current;
  current = p;
  return previous;
}

em_pacer* em_pacer_current(void) { return current; }

static void sleep_off(em_pacer* p, int64_t at_least) {
#ifdef EM_BAREMETAL
  (void)p, (void)at_least;
#else
  if (p->debt_ns < at_least) return;
  uint64_t t0 = em_now_ns();
  em_sleep_s((double)p->debt_ns * 1e-9);
  uint64_t slept = em_now_ns() - t0;
  p->debt_ns -= (int64_t)slept;
  p->added_ns += slept;
#endif
}

void em_pacer_leave(em_pacer* previous) {
  if (em_pacer_on(current)) sleep_off(current, 1);
  current = previous;
}

void em_pacer_account(em_pacer* p, const em_kernel_arg* args, int n, uint64_t host_ns) {
  double board = em_pacer_board_ns(p, args, n);
  if (board > (double)host_ns) p->debt_ns += (int64_t)(board - (double)host_ns);
  sleep_off(p, EM_PACE_MIN_SLEEP_NS);
}
