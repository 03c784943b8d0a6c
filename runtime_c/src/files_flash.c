/* The artifact's files in a flash image (bare-metal builds): em_open_file finds a file by name in
 * the image's directory and em_pread_all reads it through the mounted flash, memory-mapped or by
 * the board's block-read routine. The directory is checked as the artifact's headers are: magic,
 * version, CRC-32, every file within the image and the image within the flash. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "artifact.h"
#include "crc32.h"
#include "edgemoe.h"
#include "flash.h"

#define FLASH_MAGIC "EMOFLASH"
#define FLASH_VERSION 1
#define FLASH_HEADER_BYTES 24
#define FLASH_ENTRY_BYTES 48 /* name[32], offset u64, length u64 */
#define FLASH_NAME_BYTES 32
#define FLASH_MAX_FILES 16

static struct {
  int mounted;
  const uint8_t* base;     /* memory-mapped flash, or NULL with a driver */
  em_flash_driver driver;
  uint32_t n_files;
  char name[FLASH_MAX_FILES][FLASH_NAME_BYTES + 1];
  uint32_t offset[FLASH_MAX_FILES], length[FLASH_MAX_FILES];
  uint8_t* dst; /* the memory-mapped transfer in progress */
  const uint8_t* src;
  uint32_t left;
} flash;

static uint32_t le32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t le64(const uint8_t* p) { return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32); }

int em_flash_start(void* dst, uint32_t len, uint32_t offset) {
  if (!flash.base) return flash.driver.start(flash.driver.ctx, dst, len, offset);
  flash.dst = (uint8_t*)dst, flash.src = flash.base + offset, flash.left = len;
  return 0;
}

int em_flash_poll(void) {
  if (!flash.base) return flash.driver.poll(flash.driver.ctx);
  uint32_t n = flash.left < EM_FLASH_BURST ? flash.left : EM_FLASH_BURST;
  memcpy(flash.dst, flash.src, n);
  flash.dst += n, flash.src += n, flash.left -= n;
  return flash.left == 0;
}

/* A whole transfer, waited for. */
static int flash_read(void* dst, uint32_t len, uint32_t offset) {
  int rc = em_flash_start(dst, len, offset);
  while (rc == 0) rc = em_flash_poll();
  return rc < 0 ? rc : 0;
}

static int bad_image(const char* why, char* err, size_t n) {
  snprintf(err, n, "flash image: %s; write the flash image edgemoe-compile made for this firmware", why);
  return EM_ERR_FORMAT;
}

static int mount(uint32_t size, char* err, size_t n) {
  uint8_t b[FLASH_HEADER_BYTES + FLASH_MAX_FILES * FLASH_ENTRY_BYTES + 4];
  flash.mounted = 0;
  if (size < FLASH_HEADER_BYTES + 4) return bad_image("the flash is smaller than a header", err, n);
  int rc = flash_read(b, FLASH_HEADER_BYTES, 0);
  if (rc) {
    snprintf(err, n, "flash image: reading the header failed (%d)", rc);
    return EM_ERR_IO;
  }
  if (memcmp(b, FLASH_MAGIC, 8) != 0) return bad_image("no EdgeMoE flash image at the flash address (bad magic)", err, n);
  if (le32(b + 8) != FLASH_VERSION) return bad_image("another version of the format", err, n);
  uint32_t files = le32(b + 12);
  uint64_t image_bytes = le64(b + 16);
  if (files == 0 || files > FLASH_MAX_FILES) return bad_image("a directory of no files or too many", err, n);
  if (image_bytes > size) return bad_image("the image is larger than the flash (truncated when written?)", err, n);
  uint32_t dir_bytes = FLASH_HEADER_BYTES + files * FLASH_ENTRY_BYTES;
  if ((rc = flash_read(b, dir_bytes + 4, 0)) != 0) {
    snprintf(err, n, "flash image: reading the directory failed (%d)", rc);
    return EM_ERR_IO;
  }
  if (em_crc32(0, b, dir_bytes) != le32(b + dir_bytes)) return bad_image("directory checksum mismatch", err, n);
  for (uint32_t i = 0; i < files; i++) {
    const uint8_t* e = b + FLASH_HEADER_BYTES + i * FLASH_ENTRY_BYTES;
    uint64_t off = le64(e + FLASH_NAME_BYTES), len = le64(e + FLASH_NAME_BYTES + 8);
    if (off < dir_bytes + 4 || off > image_bytes || len > image_bytes - off)
      return bad_image("a file lies outside the image", err, n);
    memcpy(flash.name[i], e, FLASH_NAME_BYTES);
    flash.name[i][FLASH_NAME_BYTES] = 0;
    flash.offset[i] = (uint32_t)off, flash.length[i] = (uint32_t)len;
  }
  flash.n_files = files;
  flash.mounted = 1;
  return EM_OK;
}

int em_flash_mount_mapped(const void* base, uint32_t size, char* err, size_t n) {
  memset(&flash, 0, sizeof flash);
  flash.base = (const uint8_t*)base;
  return mount(size, err, n);
}

int em_flash_mount_driver(const em_flash_driver* driver, uint32_t size, char* err, size_t n) {
  memset(&flash, 0, sizeof flash);
  flash.driver = *driver;
  return mount(size, err, n);
}

int em_flash_file_range(int fd, uint32_t* offset, uint32_t* length) {
  if (!flash.mounted || fd < 0 || (uint32_t)fd >= flash.n_files) return EM_ERR_ARGUMENT;
  *offset = flash.offset[fd], *length = flash.length[fd];
  return EM_OK;
}

int em_open_file(const char* path, char* err, size_t n) {
  if (!flash.mounted) {
    snprintf(err, n, "cannot open %s: no flash image mounted (em_flash_mount_mapped or _driver first)", path);
    return EM_ERR_IO;
  }
  const char* name = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
  for (uint32_t i = 0; i < flash.n_files; i++)
    if (strcmp(flash.name[i], name) == 0) return (int)i;
  snprintf(err, n, "cannot open %s: the flash image has no %s (is it the image compiled for this firmware?)", path,
           name);
  return EM_ERR_IO;
}

uint64_t em_file_size(int fd) {
  uint32_t off, len;
  return em_flash_file_range(fd, &off, &len) ? 0 : len;
}

void em_close_file(int fd) { (void)fd; }

int em_pread_all(int fd, void* buf, uint64_t len, uint64_t offset) {
  uint32_t off, flen;
  if (em_flash_file_range(fd, &off, &flen)) return -EBADF;
  if (offset > flen || len > flen - offset) return EM_READ_SHORT;
  return flash_read(buf, (uint32_t)len, off + (uint32_t)offset);
}

const char* em_read_error(int code) {
  return code == EM_READ_SHORT ? "the file ends before it (truncated?)" : "the flash driver reported an error";
}
