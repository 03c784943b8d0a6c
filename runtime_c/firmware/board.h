/* What the firmware's startup (startup_cortex_m.c) gives main. */
#ifndef EM_FIRMWARE_BOARD_H
#define EM_FIRMWARE_BOARD_H

#include <stddef.h>
#include <stdint.h>

/* Core clock ticks since reset (SysTick, 64-bit), and the core clock. Under qemu -icount shift=0 the
 * emulated clock advances one nanosecond per instruction: instructions = ticks × 1e9 / hz. */
uint64_t em_board_ticks(void);
uint32_t em_board_hz(void);
uint64_t em_board_now_ns(void);

/* The heap is the board's session region; once sealed (after em_open) every request is refused and
 * counted: nothing is allocated after start-up. */
void em_board_seal_heap(void);
size_t em_board_heap_used(void);
size_t em_board_heap_size(void);
uint32_t em_board_heap_refused(void);

#endif
