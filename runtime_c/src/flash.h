/* The flash device of a bare-metal build: an EdgeMoE flash image (docs/FORMAT.md, "Flash image":
 * a directory of the artifact's files, then the files) read either through the memory-mapped
 * (XIP) window of the flash, or through the board's block-read routine, which starts a transfer
 * and is polled for its end: the shape of a QSPI/OctoSPI controller driven by DMA. */
#ifndef EM_FLASH_H
#define EM_FLASH_H

#include <stddef.h>
#include <stdint.h>

/* A board's flash driver. start() begins reading len bytes at a flash offset into dst; poll()
 * returns 1 once that transfer is complete, 0 while it runs, or a negative errno-style code. One
 * transfer at a time. */
typedef struct {
  int (*start)(void* ctx, void* dst, uint32_t len, uint32_t offset);
  int (*poll)(void* ctx);
  void* ctx;
} em_flash_driver;

/* Bytes a memory-mapped read copies per poll: the progress one DMA burst makes between two kernels. */
#define EM_FLASH_BURST 4096u

/* Mounts the flash image at `base` (memory-mapped, `size` bytes of flash), or read through `driver`.
 * Checks the image's header and directory; 0, or a negative em_status with the reason in err. */
int em_flash_mount_mapped(const void* base, uint32_t size, char* err, size_t n);
int em_flash_mount_driver(const em_flash_driver* driver, uint32_t size, char* err, size_t n);

/* Where an open file (em_open_file) lies in the flash, for a storage back end reading it. */
int em_flash_file_range(int fd, uint32_t* offset, uint32_t* length);

/* A transfer of the mounted flash: started, then polled (1 done, 0 running, < 0 failed). */
int em_flash_start(void* dst, uint32_t len, uint32_t offset);
int em_flash_poll(void);

#endif
