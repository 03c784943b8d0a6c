#define _XOPEN_SOURCE 700
#include "artifact.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32.h"
#include "edgemoe.h"

#define TRUNK_HEADER_CRC_AT 112
#define IMAGE_HEADER_CRC_AT 80
#define TRUNK_VERSION 2
#define IMAGE_VERSION 4 /* 2: sub-8-bit codes interleaved; 3: layout field; 4: CRC-32C records (docs/FORMAT.md) */
#define TENSOR_ENTRY_BYTES 96
#define RECORD_ENTRY_BYTES 64

static uint32_t le32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t le64(const uint8_t* p) { return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32); }
static float lef32(const uint8_t* p) {
  uint32_t u = le32(p);
  float f;
  memcpy(&f, &u, 4);
  return f;
}

int em_pread_all(int fd, void* buf, uint64_t len, uint64_t offset) {
  uint8_t* p = (uint8_t*)buf;
  while (len > 0) {
    ssize_t got = pread(fd, p, (size_t)len, (off_t)offset);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return got < 0 ? -errno : -EIO; /* 0 = end of file: shorter than the table says */
    p += got;
    len -= (uint64_t)got;
    offset += (uint64_t)got;
  }
  return 0;
}

static uint64_t file_size(int fd) {
  struct stat st;
  return fstat(fd, &st) == 0 ? (uint64_t)st.st_size : 0;
}

static int check_size(int fd, const char* path, uint64_t expected, char* err, size_t n) {
  uint64_t actual = file_size(fd);
  if (actual >= expected) return EM_OK;
  snprintf(err, n, "%s: truncated: %llu bytes, header says %llu; re-copy or recompile the artifact", path,
           (unsigned long long)actual, (unsigned long long)expected);
  return EM_ERR_FORMAT;
}

/* Reads a fixed header of `len` bytes whose CRC-32 is stored right after it, and checks magic and version. */
static int read_checked_header(int fd, const char* path, const char* magic, uint32_t version, const char* what,
                               uint8_t* b, size_t len, char* err, size_t n) {
  if (em_pread_all(fd, b, len + 4, 0) != 0) {
    snprintf(err, n, "%s: truncated header; recompile the model", path);
    return EM_ERR_FORMAT;
  }
  if (memcmp(b, magic, 8) != 0) {
    snprintf(err, n, "%s: not an EdgeMoE %s (bad magic)", path, what);
    return EM_ERR_FORMAT;
  }
  if (le32(b + 8) != version) {
    snprintf(err, n, "%s: %s format version %u, this runtime reads version %u; recompile the model", path, what,
             le32(b + 8), version);
    return EM_ERR_FORMAT;
  }
  if (em_crc32(0, b, len) != le32(b + len)) {
    snprintf(err, n, "%s: header checksum mismatch (corrupted header)", path);
    return EM_ERR_FORMAT;
  }
  return EM_OK;
}

/* Reads a table of `count` entries of `entry_bytes` at `offset` and checks its CRC-32; the caller frees *out. */
static int read_checked_table(int fd, const char* path, const char* what, uint64_t offset, uint32_t count,
                              size_t entry_bytes, uint32_t crc, uint8_t** out, char* err, size_t n) {
  size_t bytes = (size_t)count * entry_bytes;
  *out = (uint8_t*)malloc(bytes);
  if (!*out) {
    snprintf(err, n, "out of memory reading %s", path);
    return EM_ERR_NOMEM;
  }
  if (em_pread_all(fd, *out, bytes, offset) != 0 || em_crc32(0, *out, bytes) != crc) {
    snprintf(err, n, "%s: %s table truncated or corrupted (checksum mismatch)", path, what);
    free(*out);
    *out = NULL;
    return EM_ERR_FORMAT;
  }
  return EM_OK;
}

int em_read_trunk_header(int fd, const char* path, em_trunk_header* h, char* err, size_t n) {
  uint8_t b[TRUNK_HEADER_CRC_AT + 4];
  int rc = read_checked_header(fd, path, "EMOTRUNK", TRUNK_VERSION, "trunk file", b, TRUNK_HEADER_CRC_AT, err, n);
  if (rc) return rc;
  h->vocab = le32(b + 16);
  h->hidden = le32(b + 20);
  h->layers = le32(b + 24);
  h->heads = le32(b + 28);
  h->kv_heads = le32(b + 32);
  h->head_dim = le32(b + 36);
  h->experts = le32(b + 40);
  h->top_k = le32(b + 44);
  h->inter = le32(b + 48);
  h->max_positions = le32(b + 52);
  h->rope_theta = lef32(b + 56);
  h->norm_eps = lef32(b + 60);
  h->flags = le32(b + 64);
  h->bos = (int32_t)le32(b + 68);
  h->eos = (int32_t)le32(b + 72);
  h->n_tensors = le32(b + 76);
  h->table_offset = le64(b + 80);
  h->data_offset = le64(b + 88);
  h->file_bytes = le64(b + 96);
  h->table_crc = le32(b + 104);
  h->data_crc = le32(b + 108);
  if (h->heads == 0 || h->kv_heads == 0 || h->heads % h->kv_heads || h->top_k == 0 || h->top_k > h->experts ||
      h->n_tensors == 0 || h->n_tensors > 4096 || h->data_offset > h->file_bytes) {
    snprintf(err, n, "%s: inconsistent hyper-parameters in the header", path);
    return EM_ERR_FORMAT;
  }
  return check_size(fd, path, h->file_bytes, err, n);
}

int em_read_trunk_table(int fd, const char* path, const em_trunk_header* h, em_tensor_entry* entries, char* err,
                        size_t n) {
  uint8_t* t;
  int rc = read_checked_table(fd, path, "tensor", h->table_offset, h->n_tensors, TENSOR_ENTRY_BYTES, h->table_crc, &t,
                              err, n);
  if (rc) return rc;
  for (uint32_t i = 0; rc == EM_OK && i < h->n_tensors; i++) {
    const uint8_t* e = t + (size_t)i * TENSOR_ENTRY_BYTES;
    em_tensor_entry* d = &entries[i];
    memcpy(d->name, e, 48);
    d->name[48] = 0;
    d->dtype = le32(e + 48);
    d->ndim = le32(e + 52);
    for (int k = 0; k < 4; k++) d->shape[k] = le32(e + 56 + 4 * k);
    d->offset = le64(e + 72);
    d->nbytes = le64(e + 80);
    d->crc = le32(e + 88);
    d->bits = le32(e + 92);
    if (d->offset < h->data_offset || d->offset + d->nbytes > h->file_bytes || d->offset % 64) {
      snprintf(err, n, "%s: tensor '%s' lies outside the data region", path, d->name);
      rc = EM_ERR_FORMAT;
    }
  }
  free(t);
  return rc;
}

int em_read_image_header(int fd, const char* path, em_image_header* h, char* err, size_t n) {
  uint8_t b[IMAGE_HEADER_CRC_AT + 4];
  int rc = read_checked_header(fd, path, "EMOEXPRT", IMAGE_VERSION, "expert image", b, IMAGE_HEADER_CRC_AT, err, n);
  if (rc) return rc;
  h->layers = le32(b + 16);
  h->experts = le32(b + 20);
  h->n_records = le32(b + 24);
  h->align = le32(b + 32);
  h->hidden = le32(b + 36);
  h->inter = le32(b + 40);
  h->group = le32(b + 44);
  h->table_offset = le64(b + 48);
  h->data_offset = le64(b + 56);
  h->file_bytes = le64(b + 64);
  h->table_crc = le32(b + 72);
  h->layout = le32(b + 76);
  if (h->layout > EM_LAYOUT_TILES) {
    snprintf(err, n, "%s: unknown weight layout %u; recompile the model", path, h->layout);
    return EM_ERR_FORMAT;
  }
  if (le32(b + 28) != RECORD_ENTRY_BYTES || h->n_records != h->layers * h->experts || h->align == 0) {
    snprintf(err, n, "%s: inconsistent header (%u records for %u layers x %u experts)", path, h->n_records, h->layers,
             h->experts);
    return EM_ERR_FORMAT;
  }
  return check_size(fd, path, h->file_bytes, err, n);
}

int em_read_image_table(int fd, const char* path, const em_image_header* h, em_record* records, char* err, size_t n) {
  uint8_t* t;
  int rc = read_checked_table(fd, path, "record", h->table_offset, h->n_records, RECORD_ENTRY_BYTES, h->table_crc, &t,
                              err, n);
  if (rc) return rc;
  for (uint32_t i = 0; rc == EM_OK && i < h->n_records; i++) {
    const uint8_t* e = t + (size_t)i * RECORD_ENTRY_BYTES;
    em_record* r = &records[i];
    r->layer = le32(e);
    r->expert = le32(e + 4);
    r->bits = le32(e + 8);
    r->crc = le32(e + 12);
    r->offset = le64(e + 16);
    r->length = le64(e + 24);
    for (int k = 0; k < 6; k++) r->part_offset[k] = le32(e + 32 + 4 * k);
    r->payload_bytes = le32(e + 56);
    int bad = r->layer * h->experts + r->expert != i || r->offset % h->align || r->offset < h->data_offset ||
              r->offset + r->length > h->file_bytes || r->payload_bytes > r->length;
    for (int k = 0; k < 6; k++) bad |= r->part_offset[k] % 64 || r->part_offset[k] > r->payload_bytes; /* float16: no scales */
    if (bad) {
      snprintf(err, n, "%s: record %u (layer %u, expert %u) is out of order, misaligned or outside the file", path, i,
               r->layer, r->expert);
      rc = EM_ERR_FORMAT;
    }
  }
  free(t);
  return rc;
}
