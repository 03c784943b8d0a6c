#include "artifact.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crc32.h"
#include "edgemoe.h"
#include "generated/program.h"

#define TRUNK_VERSION 6 /* 3: compile id, kernels' SHA-256, machine and CPU features; 4: MLA and dense sizes;
                           5: KV and cross layers, decoder start, program ops; 6: the INT4 grid flag */
#define IMAGE_VERSION 7 /* 2: sub-8-bit codes interleaved; 3: layout field; 4: CRC-32C records; 5: compile id;
                           6: the experts' activation; 7: the INT4 grid */
#define TENSOR_ALIGN 64
#define PART_ALIGN 64

/* What this runtime accepts of a model's shapes. Generous for every published MoE, and small
 * enough that every size the session derives from them (KV cache, buffers, tables) fits 64 bits. */
#define MAX_LAYERS (1u << 10)
#define MAX_EXPERTS (1u << 12)
#define MAX_HIDDEN (1u << 16)
#define MAX_INTER (1u << 18)
#define MAX_VOCAB (1u << 22)
#define MAX_POSITIONS (1u << 22)
#define MAX_ATTN_DIM (1u << 16) /* heads x head_dim, kv_heads x head_dim */

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

/* Whether [offset, offset + len) lies within [lo, hi), without overflow. */
static int range_within(uint64_t offset, uint64_t len, uint64_t lo, uint64_t hi) {
  return offset >= lo && offset <= hi && len <= hi - offset;
}

static int check_size(int fd, const char* path, uint64_t expected, char* err, size_t n) {
  uint64_t actual = em_file_size(fd);
  if (actual >= expected) return EM_OK;
  snprintf(err, n, "%s: truncated: %llu bytes, header says %llu; re-copy or recompile the artifact", path,
           (unsigned long long)actual, (unsigned long long)expected);
  return EM_ERR_FORMAT;
}

/* Reads a fixed header of `len` bytes whose CRC-32 is stored right after it, and checks magic and version. */
static int read_checked_header(int fd, const char* path, const char* magic, uint32_t version, const char* what,
                               uint8_t* b, size_t len, char* err, size_t n) {
  int rc = em_pread_all(fd, b, len + 4, 0);
  if (rc == EM_READ_SHORT && em_file_size(fd) >= 12 && em_pread_all(fd, b, 12, 0) == 0 && !memcmp(b, magic, 8) &&
      le32(b + 8) != version)
    rc = 0; /* a shorter header of another version: say so below */
  if (rc == EM_READ_SHORT) {
    snprintf(err, n, "%s: truncated header; recompile the model", path);
    return EM_ERR_FORMAT;
  }
  if (rc) {
    snprintf(err, n, "%s: reading the header failed: %s", path, em_read_error(rc));
    return EM_ERR_IO;
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

/* Reads a table of `count` entries of `entry_bytes` at `offset` (already checked to lie within the
 * file) and checks its CRC-32; the caller frees *out. */
static int read_checked_table(int fd, const char* path, const char* what, uint64_t offset, uint32_t count,
                              size_t entry_bytes, uint32_t crc, uint8_t** out, char* err, size_t n) {
  size_t bytes = (size_t)count * entry_bytes;
  *out = (uint8_t*)malloc(bytes ? bytes : 1);
  if (!*out) {
    snprintf(err, n, "out of memory reading %s", path);
    return EM_ERR_NOMEM;
  }
  int rc = em_pread_all(fd, *out, bytes, offset);
  if (rc && rc != EM_READ_SHORT) {
    snprintf(err, n, "%s: reading the %s table failed: %s", path, what, em_read_error(rc));
    rc = EM_ERR_IO;
  } else if (rc || em_crc32(0, *out, bytes) != crc) {
    snprintf(err, n, "%s: %s table truncated or corrupted (checksum mismatch)", path, what);
    rc = EM_ERR_FORMAT;
  }
  if (rc) free(*out), *out = NULL;
  return rc;
}

static int bad_header(const char* path, const char* why, char* err, size_t n) {
  snprintf(err, n, "%s: inconsistent header (%s); recompile the artifact", path, why);
  return EM_ERR_FORMAT;
}

int em_read_trunk_header(int fd, const char* path, em_trunk_header* h, char* err, size_t n) {
  uint8_t b[EM_TRUNK_HEADER_CRC_AT + 4];
  int rc = read_checked_header(fd, path, "EMOTRUNK", TRUNK_VERSION, "trunk file", b, EM_TRUNK_HEADER_CRC_AT, err, n);
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
  memcpy(h->compile_id, b + 112, 16);
  memcpy(h->kernels_sha256, b + 128, 32);
  h->machine = le32(b + 160);
  h->cpu_features = le32(b + 164);
  h->shared_inter = le32(b + 168);
  h->q_lora = le32(b + 172);
  h->kv_lora = le32(b + 176);
  h->qk_nope = le32(b + 180);
  h->v_head = le32(b + 184);
  h->dense_inter = le32(b + 188);
  h->kv_layers = le32(b + 192);
  h->cross_layers = le32(b + 196);
  h->decoder_start = (int32_t)le32(b + 200);
  h->program_steps = le32(b + 204);
  if (!h->vocab || h->vocab > MAX_VOCAB || !h->hidden || h->hidden > MAX_HIDDEN || !h->layers ||
      h->layers > MAX_LAYERS || !h->experts || h->experts > MAX_EXPERTS || !h->inter || h->inter > MAX_INTER ||
      !h->max_positions || h->max_positions > MAX_POSITIONS || h->shared_inter > MAX_INTER ||
      !h->kv_layers || h->kv_layers > h->layers || h->dense_inter > MAX_INTER)
    return bad_header(path, "a model dimension is zero or beyond this runtime's limits", err, n);
  /* latent attention: all four sizes or none; each head's dims within the attention limit */
  if ((h->kv_lora != 0) != (h->v_head != 0) || (!h->kv_lora && (h->q_lora || h->qk_nope)) ||
      h->q_lora > MAX_HIDDEN || h->kv_lora > MAX_HIDDEN ||
      (uint64_t)h->heads * ((uint64_t)h->qk_nope + h->head_dim + h->v_head) > MAX_ATTN_DIM ||
      (uint64_t)h->heads * h->kv_lora > MAX_ATTN_DIM)
    return bad_header(path, "latent attention sizes", err, n);
  if (h->cross_layers ? h->cross_layers != h->kv_layers || h->decoder_start < 0 || h->decoder_start >= (int32_t)h->vocab
                      : h->decoder_start != -1 || h->kv_layers != h->layers)
    return bad_header(path, "encoder-decoder fields (KV and cross-attention layers, decoder start token)", err, n);
  /* EMBED, FINAL, each layer's attention and feed-forward, an encoder's own: within 4 per layer slot */
  if (h->program_steps < 3 || h->program_steps > 4 * MAX_LAYERS + 8)
    return bad_header(path, "the layer program's op count", err, n);
  if (!h->heads || !h->kv_heads || h->heads % h->kv_heads || !h->head_dim || h->head_dim % 2 ||
      (uint64_t)h->heads * h->head_dim > MAX_ATTN_DIM)
    return bad_header(path, "attention heads", err, n);
  if (!h->top_k || h->top_k > h->experts) return bad_header(path, "top-k", err, n);
  if (h->flags & ~EM_TRUNK_FLAGS_KNOWN) return bad_header(path, "unknown flags", err, n);
  if ((h->flags & EM_TRUNK_FLAG_KV_FLOAT16) && h->cross_layers) /* the compiler refuses it too */
    return bad_header(path, "a float16 KV cache in an encoder-decoder model", err, n);
  if (h->bos < -1 || h->bos >= (int32_t)h->vocab || h->eos < -1 || h->eos >= (int32_t)h->vocab)
    return bad_header(path, "BOS or EOS id outside the vocabulary", err, n);
  if (!h->n_tensors || h->n_tensors > 16 * MAX_LAYERS + 64 || h->table_offset < EM_TRUNK_HEADER_CRC_AT + 4 ||
      !range_within(h->table_offset, (uint64_t)h->n_tensors * EM_TENSOR_ENTRY_BYTES, 0, h->data_offset) ||
      h->data_offset > h->file_bytes)
    return bad_header(path, "tensor table or data region outside the file", err, n);
  return check_size(fd, path, h->file_bytes, err, n);
}

static const uint32_t DTYPE_BYTES[] = {4, 2, 1, 4}; /* float32, float16, int8, uint32 (docs/FORMAT.md) */

int em_read_trunk_table(int fd, const char* path, const em_trunk_header* h, em_tensor_entry* entries, char* err,
                        size_t n) {
  uint8_t* t;
  int rc = read_checked_table(fd, path, "tensor", h->table_offset, h->n_tensors, EM_TENSOR_ENTRY_BYTES, h->table_crc, &t,
                              err, n);
  if (rc) return rc;
  for (uint32_t i = 0; rc == EM_OK && i < h->n_tensors; i++) {
    const uint8_t* e = t + (size_t)i * EM_TENSOR_ENTRY_BYTES;
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
    /* the bytes must be exactly the shape's: every dimension <= 2^32, so a product of four is
       checked by division, not trusted */
    int ok = d->dtype < 4 && d->ndim >= 1 && d->ndim <= 4;
    uint64_t count = ok ? DTYPE_BYTES[d->dtype] : 0;
    for (uint32_t k = 0; ok && k < d->ndim; k++) {
      ok = d->shape[k] && count <= UINT64_MAX / d->shape[k];
      count *= d->shape[k];
    }
    if (!ok || count != d->nbytes) {
      snprintf(err, n, "%s: tensor '%s' has an invalid type or shape for its %llu bytes; recompile the artifact", path,
               d->name, (unsigned long long)d->nbytes);
      rc = EM_ERR_FORMAT;
    } else if (!range_within(d->offset, d->nbytes, h->data_offset, h->file_bytes) || d->offset % TENSOR_ALIGN) {
      snprintf(err, n, "%s: tensor '%s' lies outside the data region", path, d->name);
      rc = EM_ERR_FORMAT;
    }
  }
  free(t);
  return rc;
}

int em_read_image_header(int fd, const char* path, em_image_header* h, char* err, size_t n) {
  uint8_t b[EM_IMAGE_HEADER_CRC_AT + 4];
  int rc = read_checked_header(fd, path, "EMOEXPRT", IMAGE_VERSION, "expert image", b, EM_IMAGE_HEADER_CRC_AT, err, n);
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
  memcpy(h->compile_id, b + 80, 16);
  h->act = le32(b + 96);
  h->int4_grid = le32(b + 100);
  if (h->int4_grid > EM_GRID_INTEGER) {
    snprintf(err, n, "%s: unknown INT4 grid %u; recompile the model", path, h->int4_grid);
    return EM_ERR_FORMAT;
  }
  if (h->act >= EM_ACT_COUNT) {
    snprintf(err, n, "%s: unknown expert activation %u; recompile the model", path, h->act);
    return EM_ERR_FORMAT;
  }
  if (h->layout > EM_LAYOUT_TILES) {
    snprintf(err, n, "%s: unknown weight layout %u; recompile the model", path, h->layout);
    return EM_ERR_FORMAT;
  }
  if (!h->layers || h->layers > MAX_LAYERS || !h->experts || h->experts > MAX_EXPERTS ||
      h->n_records != h->layers * h->experts || le32(b + 28) != EM_RECORD_ENTRY_BYTES) {
    snprintf(err, n, "%s: inconsistent header (%u records for %u layers x %u experts)", path, h->n_records, h->layers,
             h->experts);
    return EM_ERR_FORMAT;
  }
  if (!h->hidden || h->hidden > MAX_HIDDEN || !h->inter || h->inter > MAX_INTER)
    return bad_header(path, "hidden or intermediate size", err, n);
  if (!h->group || h->hidden % h->group || h->inter % h->group)
    return bad_header(path, "quantization group does not divide the hidden and intermediate sizes", err, n);
  if (h->align < PART_ALIGN || h->align > (1u << 24) || (h->align & (h->align - 1)))
    return bad_header(path, "record alignment", err, n);
  if (h->table_offset < EM_IMAGE_HEADER_CRC_AT + 4 ||
      !range_within(h->table_offset, (uint64_t)h->n_records * EM_RECORD_ENTRY_BYTES, 0, h->data_offset) ||
      h->data_offset > h->file_bytes)
    return bad_header(path, "record table or data region outside the file", err, n);
  return check_size(fd, path, h->file_bytes, err, n);
}

/* The parts of an expert record at `bits` (SwiGLU: gate codes, gate scales, up codes, up scales,
 * down codes, down scales; ReLU: the four of up and down) and their bytes: what the kernels read
 * for the model's shapes; 0 if the bitwidth is not one the format defines for the layout. */
static int part_sizes(const em_image_header* h, uint32_t bits, uint64_t size[6], int* n_parts) {
  if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8 || (bits == 16 && h->layout == EM_LAYOUT_ROWS))) return 0;
  uint64_t H = h->hidden, I = h->inter, G = h->group;
  uint64_t swiglu[3][2] = {{I, H}, {I, H}, {H, I}}, relu[2][2] = {{I, H}, {H, I}};
  int n_matrices = h->act == EM_ACT_RELU ? 2 : 3;
  *n_parts = 2 * n_matrices;
  for (int m = 0; m < n_matrices; m++) {
    uint64_t rows = n_matrices == 2 ? relu[m][0] : swiglu[m][0], cols = n_matrices == 2 ? relu[m][1] : swiglu[m][1];
    if (rows * cols * bits % 8) return 0;
    size[2 * m] = rows * cols * bits / 8;
    size[2 * m + 1] = bits == 16 ? 0 : rows * (cols / G) * 2; /* float16 scales per group */
  }
  return 1;
}

int em_read_image_table(int fd, const char* path, const em_image_header* h, em_record* records, char* err, size_t n) {
  uint8_t* t;
  int rc = read_checked_table(fd, path, "record", h->table_offset, h->n_records, EM_RECORD_ENTRY_BYTES, h->table_crc, &t,
                              err, n);
  if (rc) return rc;
  for (uint32_t i = 0; rc == EM_OK && i < h->n_records; i++) {
    const uint8_t* e = t + (size_t)i * EM_RECORD_ENTRY_BYTES;
    em_record* r = &records[i];
    r->layer = le32(e);
    r->expert = le32(e + 4);
    r->bits = le32(e + 8);
    r->crc = le32(e + 12);
    r->offset = le64(e + 16);
    r->length = le64(e + 24);
    for (int k = 0; k < 6; k++) r->part_offset[k] = le32(e + 32 + 4 * k);
    r->payload_bytes = le32(e + 56);
    const char* why = NULL;
    uint64_t size[6];
    int n_parts = 0;
    if (r->layer >= h->layers || r->expert >= h->experts || r->layer * h->experts + r->expert != i)
      why = "is out of order";
    else if (!part_sizes(h, r->bits, size, &n_parts))
      why = "has a bitwidth the format does not define for this layout";
    else if (r->length % h->align || r->length < r->payload_bytes || r->length - r->payload_bytes >= h->align)
      why = "has a length that is not its payload padded to the alignment";
    else if (r->offset % h->align || !range_within(r->offset, r->length, h->data_offset, h->file_bytes))
      why = "is misaligned or lies outside the file";
    for (int k = n_parts; !why && k < 6; k++)
      if (r->part_offset[k]) why = "has a part its expert activation does not have";
    for (uint64_t k = 0, end = 0; !why && k < (uint64_t)n_parts; k++) {
      /* each part where the previous one ended (or later), aligned, and whole within the payload */
      if (r->part_offset[k] % PART_ALIGN || r->part_offset[k] < end ||
          !range_within(r->part_offset[k], size[k], 0, r->payload_bytes))
        why = "has a part that overlaps another or does not fit its payload for the model's shapes";
      end = r->part_offset[k] + size[k];
    }
    if (why) {
      snprintf(err, n, "%s: record %u (layer %u, expert %u, %u-bit) %s; recompile the artifact", path, i, r->layer,
               r->expert, r->bits, why);
      rc = EM_ERR_FORMAT;
    }
  }
  free(t);
  return rc;
}
