/* Reset, clock and heap of an EdgeMoE firmware on a Cortex-M (Armv7-M / Armv8-M mainline): copies
 * .data, zeroes .bss, enables the FPU, counts time with SysTick and hands out the heap (the session
 * region of the board, sections.ld) until the firmware seals it. Output and exit go through
 * semihosting (newlib's librdimon). */
#include <errno.h>
#include <malloc.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "board.h"

extern uint32_t __data_load[], __data_start[], __data_end[], __bss_start[], __bss_end[], __stack_top[];
extern char __heap_start[], __heap_end[];
extern char __em_cpu_hz[]; /* a linker symbol whose address is the core clock in Hz (memory.ld) */
int main(void);
void exit(int status);
void initialise_monitor_handles(void); /* librdimon: stdin, stdout, stderr over semihosting */

#define SCB_CPACR (*(volatile uint32_t*)0xE000ED88)
#define SYST_CSR (*(volatile uint32_t*)0xE000E010)
#define SYST_RVR (*(volatile uint32_t*)0xE000E014)
#define SYST_CVR (*(volatile uint32_t*)0xE000E018)
#define SYST_PERIOD (1u << 24) /* SysTick is a 24-bit down-counter */

static volatile uint32_t systick_wraps;
static char* heap_top = __heap_start;
static int heap_sealed;
static uint32_t heap_refused;

void reset_handler(void) {
  memcpy(__data_start, __data_load, (size_t)((char*)__data_end - (char*)__data_start));
  memset(__bss_start, 0, (size_t)((char*)__bss_end - (char*)__bss_start));
  SCB_CPACR |= 0xFu << 20; /* CP10 and CP11 (the FPU): full access */
  __asm volatile("dsb\n\tisb");
  SYST_RVR = SYST_PERIOD - 1;
  SYST_CVR = 0;
  SYST_CSR = 7; /* processor clock, interrupt on wrap, enabled */
  initialise_monitor_handles();
  exit(main());
}

static void systick(void) { systick_wraps++; }

static void fault(void) {
  static const char msg[] = "firmware: fault (bad memory access or undefined instruction)\n";
  write(2, msg, sizeof msg - 1);
  _exit(3);
}

static void unused(void) {
  for (;;) {
  }
}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))__stack_top, reset_handler, unused, fault, fault, fault, fault, unused,
    unused, unused, unused, unused, unused, unused, unused, systick};

uint64_t em_board_ticks(void) {
  uint32_t wraps, left;
  do { /* a wrap between the two reads shows as a changed count: read again */
    wraps = systick_wraps;
    left = SYST_CVR;
  } while (wraps != systick_wraps);
  return (uint64_t)wraps * SYST_PERIOD + (SYST_PERIOD - 1 - left);
}

uint32_t em_board_hz(void) { return (uint32_t)(uintptr_t)__em_cpu_hz; }

uint64_t em_board_now_ns(void) {
  uint64_t t = em_board_ticks(), hz = em_board_hz();
  return t / hz * 1000000000ull + t % hz * 1000000000ull / hz;
}

/* newlib's malloc grows its heap through this: the session region, until sealed. */
void* _sbrk(ptrdiff_t incr) {
  if (heap_sealed || incr > __heap_end - heap_top) {
    heap_refused++;
    errno = ENOMEM;
    return (void*)-1;
  }
  char* p = heap_top;
  heap_top += incr;
  return p;
}

void em_board_seal_heap(void) { heap_sealed = 1; }
size_t em_board_heap_used(void) { return (size_t)(heap_top - __heap_start); }
size_t em_board_heap_size(void) { return (size_t)(__heap_end - __heap_start); }
uint32_t em_board_heap_refused(void) { return heap_refused; }

/* POSIX's aligned allocation, which newlib lacks, from its memalign. */
int posix_memalign(void** out, size_t alignment, size_t size) {
  void* p = memalign(alignment, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

/* newlib's exit() runs these; a C firmware has no constructors or destructors */
void _init(void) {}
void _fini(void) {}
