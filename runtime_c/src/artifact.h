/* Reading the artifact's binary files: trunk.bin (hyper-parameters + resident tensors) and the
 * header and record table of experts.bin. Formats: docs/FORMAT.md. */
#ifndef EM_ARTIFACT_H
#define EM_ARTIFACT_H

#include <stddef.h>
#include <stdint.h>

/* Where each header's CRC-32 sits (it covers the bytes before it), and table entry sizes. */
#define EM_TRUNK_HEADER_CRC_AT 208
#define EM_IMAGE_HEADER_CRC_AT 104
#define EM_TENSOR_ENTRY_BYTES 96
#define EM_RECORD_ENTRY_BYTES 64

typedef struct {
  uint32_t vocab, hidden, layers, heads, kv_heads, head_dim, experts, top_k, inter, max_positions;
  float rope_theta, norm_eps;
  uint32_t flags;
  int32_t bos, eos;
  uint32_t n_tensors;
  uint64_t table_offset, data_offset, file_bytes;
  uint32_t table_crc, data_crc;
  uint8_t compile_id[16];      /* the same in experts.bin: the files come from one compile */
  uint8_t kernels_sha256[32];  /* of kernels.so, checked before it is loaded */
  uint32_t machine;            /* ELF e_machine of the kernels */
  uint32_t cpu_features;       /* generated/cpu_features.h bits the kernels need */
  uint32_t shared_inter;       /* a shared expert's intermediate size (0: none) */
  /* multi-head latent attention's sizes (all 0 without it; head_dim is then the rotated part) */
  uint32_t q_lora, kv_lora, qk_nope, v_head;
  uint32_t dense_inter;        /* dense layers' MLP intermediate size (0: none) */
  uint32_t kv_layers;          /* self-attention KV-cache slots (the decoder's layers) */
  uint32_t cross_layers;       /* cross-attention caches over the encoder's output (0: decoder-only) */
  int32_t decoder_start;       /* an encoder-decoder's first decoder token (-1: decoder-only) */
  uint32_t program_steps;      /* ops in the layer program */
} em_trunk_header;

/* How quantized matrices are laid out (compiler/quantize.py): rows for the float-dequantizing
 * kernels, 16-row tiles for the integer-dot kernels. */
enum { EM_LAYOUT_ROWS = 0, EM_LAYOUT_TILES = 1 };
/* INT4 levels (expert_image.GRID_CODES): half-integers ±1/2…±15/2, or -8…7 (GGUF Q4_0's). The expert
 * image's header says which its experts are on (only the kernels compute with them; the runtime checks
 * the field), trunk.bin's flags which its matrices are on (the embedding lookup dequantizes them). */
enum { EM_GRID_HALF = 0, EM_GRID_INTEGER = 1 };

typedef struct {
  char name[49];
  uint32_t dtype, ndim;
  uint32_t shape[4];
  uint64_t offset, nbytes; /* offset from the start of the file */
  uint32_t crc;
  uint32_t bits; /* of a quantized matrix's codes; 0 for a plain tensor */
} em_tensor_entry;

typedef struct {
  uint32_t layer, expert, bits, crc;
  uint64_t offset, length;
  uint32_t part_offset[6]; /* gate_q, gate_s, up_q, up_s, down_q, down_s within the record (SwiGLU);
                              up_q, up_s, down_q, down_s, 0, 0 (ReLU) */
  uint32_t payload_bytes;
} em_record;

typedef struct {
  uint32_t layers, experts, n_records, align, hidden, inter, group;
  uint64_t table_offset, data_offset, file_bytes;
  uint32_t table_crc, layout;
  uint8_t compile_id[16];
  uint32_t act; /* the experts' activation, EM_ACT_*: which parts a record has */
  uint32_t int4_grid; /* EM_GRID_* */
} em_image_header;

/* Every size, count and offset these read is checked, overflow-safe, against the file's size and
 * against what the model's shapes allow, before anything is allocated or read from it.
 * Each returns 0 or a negative em_status with a message in err. */
int em_read_trunk_header(int fd, const char* path, em_trunk_header* h, char* err, size_t n);
int em_read_trunk_table(int fd, const char* path, const em_trunk_header* h, em_tensor_entry* entries, char* err, size_t n);
int em_read_image_header(int fd, const char* path, em_image_header* h, char* err, size_t n);
/* records[h->n_records], stored at index layer * experts + expert */
int em_read_image_table(int fd, const char* path, const em_image_header* h, em_record* records, char* err, size_t n);

/* A read that found the end of the file before the bytes the artifact says are there. */
#define EM_READ_SHORT (-100001)

/* pread the whole range: 0, -errno, or EM_READ_SHORT. */
int em_pread_all(int fd, void* buf, uint64_t len, uint64_t offset);
/* The message for a failed read's code. */
const char* em_read_error(int code);

/* Opens an artifact file for reading: a descriptor, or a negative em_status with the reason in err
 * (missing, a directory, a FIFO or device rather than a regular file, no permission). Never blocks.
 * These four are files_posix.c's on Linux and files_flash.c's (files of a flash image) bare-metal. */
int em_open_file(const char* path, char* err, size_t n);
/* The size of an open file (0 if unknown), and closing it. */
uint64_t em_file_size(int fd);
void em_close_file(int fd);

#endif
