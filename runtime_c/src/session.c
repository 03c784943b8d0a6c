/* The decode loop: one token through every layer, calling the TVM-generated kernels, with the
 * experts each layer's router selects fetched into the expert cache from storage.
 * Everything the session uses is allocated once, in em_open, within the memory budget. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "artifact.h"
#include "crc32.h"
#include "edgemoe.h"
#include "clock.h"
#include "cpu_check.h"
#include "encoder_decoder.h"
#include "expert_lanes.h"
#include "generated/program.h"
#include "memory_plan.h"
#include "mla.h"
#include "predictor.h"
#include "routing.h"
#include "session.h"
#include "trunk_view.h"

/* ---- opening -------------------------------------------------------------------------- */

void em_default_params(em_params* p) {
  memset(p, 0, sizeof *p);
  p->verify_checksums = 1;
  p->loader_thread = 1;
  p->predictor = EM_PREDICT_AUTO;
  p->eviction = EM_EVICT_AUTO;
}

typedef struct {
  char trunk[1024], image[1024], kernels[1024];
} artifact_paths;

static int artifact_paths_make(const char* dir, artifact_paths* ap, char* err, size_t n) {
  if (!dir || !*dir) {
    snprintf(err, n, "no artifact directory given");
    return EM_ERR_ARGUMENT;
  }
  if (snprintf(ap->trunk, sizeof ap->trunk, "%s/trunk.bin", dir) >= (int)sizeof ap->trunk ||
      snprintf(ap->image, sizeof ap->image, "%s/experts.bin", dir) >= (int)sizeof ap->image ||
      snprintf(ap->kernels, sizeof ap->kernels, "%s/kernels.so", dir) >= (int)sizeof ap->kernels) {
    snprintf(err, n, "artifact path too long: %s", dir);
    return EM_ERR_ARGUMENT;
  }
  return EM_OK;
}

/* Reads the headers and the record table of an artifact (files stay closed afterwards). */
static int read_headers(const artifact_paths* ap, em_trunk_header* th, em_image_header* ih, em_record** records,
                        char* err, size_t n) {
  int rc = EM_OK, ifd = -1;
  int tfd = em_open_file(ap->trunk, err, n);
  *records = NULL;
  if (tfd < 0) return tfd;
  rc = em_read_trunk_header(tfd, ap->trunk, th, err, n);
  if (!rc && (ifd = em_open_file(ap->image, err, n)) < 0) rc = ifd;
  if (!rc) rc = em_read_image_header(ifd, ap->image, ih, err, n);
  if (!rc && memcmp(th->compile_id, ih->compile_id, sizeof th->compile_id) != 0) {
    snprintf(err, n, "%s and %s come from different compiles; copy the artifact directory whole or recompile it",
             ap->trunk, ap->image);
    rc = EM_ERR_FORMAT;
  }
  /* experts.bin holds the layers with experts: dense layers have none */
  if (!rc && (ih->layers > th->layers || ih->experts != th->experts || ih->hidden != th->hidden ||
              ih->inter != th->inter)) {
    snprintf(err, n, "%s and %s describe different models; recompile the artifact", ap->trunk, ap->image);
    rc = EM_ERR_FORMAT;
  }
  if (!rc) { /* the table was checked to lie within the file: this is bounded by the file's size */
    *records = (em_record*)calloc(ih->n_records, sizeof(em_record));
    rc = *records ? em_read_image_table(ifd, ap->image, ih, *records, err, n) : EM_ERR_NOMEM;
    if (rc == EM_ERR_NOMEM) snprintf(err, n, "out of memory reading %s", ap->image);
  }
  em_close_file(tfd);
  if (ifd >= 0) em_close_file(ifd);
  if (rc) free(*records), *records = NULL;
  return rc;
}

static void format_mib(char* out, size_t n, uint64_t bytes) {
  snprintf(out, n, "%llu bytes (%.2f MiB)", (unsigned long long)bytes, bytes / 1048576.0);
}

/* Tokens a prompt's batch holds (em_params.prefill_tokens): at most the context. */
static uint32_t prefill_batch(uint32_t requested, uint32_t max_seq) {
  uint32_t n = requested ? requested : EM_DEFAULT_PREFILL_TOKENS;
  return n < max_seq ? n : max_seq;
}

int em_budget_bytes(const char* artifact_dir, uint32_t max_seq, double expert_fraction, uint64_t* out, char* err,
                    size_t err_len) {
  artifact_paths ap;
  em_trunk_header th;
  em_image_header ih;
  em_record* records;
  if (!(expert_fraction >= 0.0 && expert_fraction <= 1.0)) {
    snprintf(err, err_len, "expert fraction %g is not within [0, 1]", expert_fraction);
    return EM_ERR_ARGUMENT;
  }
  int rc = artifact_paths_make(artifact_dir, &ap, err, err_len);
  if (!rc) rc = read_headers(&ap, &th, &ih, &records, err, err_len);
  if (rc) return rc;
  if (!max_seq || max_seq > th.max_positions) max_seq = th.max_positions;
  em_memory_plan p;
  rc = em_plan_memory(&th, &ih, records, max_seq, prefill_batch(0, max_seq),
                      em_program_bytes(th.program_steps, th.layers), &p, err, err_len);
  free(records);
  if (rc) return rc;
  uint64_t cache = (uint64_t)(expert_fraction * (double)p.all_experts);
  *out = p.fixed + (cache > p.min_cache ? cache : p.min_cache);
  return EM_OK;
}

/* Reads the trunk's tensor table into t[n_tensors] and its data region into the block, checked. */
static int load_trunk(em_session* s, const char* path, em_tensor_entry* t) {
  const em_trunk_header* th = &s->th;
  int fd = em_open_file(path, s->err, ERR_LEN);
  if (fd < 0) return fd;
  int rc = em_read_trunk_table(fd, path, th, t, s->err, ERR_LEN);
  uint64_t data_bytes = th->file_bytes - th->data_offset;
  int read_rc = rc ? 0 : em_pread_all(fd, s->block, data_bytes, th->data_offset);
  if (read_rc) {
    snprintf(s->err, ERR_LEN, "%s: reading the trunk weights failed: %s", path, em_read_error(read_rc));
    rc = read_rc == EM_READ_SHORT ? EM_ERR_FORMAT : EM_ERR_IO;
  }
  if (!rc && em_crc32(0, s->block, data_bytes) != th->data_crc) {
    snprintf(s->err, ERR_LEN, "%s: trunk weights checksum mismatch (corrupted file); re-copy or recompile", path);
    rc = EM_ERR_FORMAT;
  }
  em_close_file(fd);
  return rc;
}

/* An optional float32 tensor of the routing profile (edgemoe-compile --calibration writes them). */
static const float* profile_tensor(const em_trunk_view* v, const char* name, uint32_t rows, uint32_t cols, int* ok) {
  uint32_t i = em_tensor_index(v, name);
  if (i == EM_OPERAND_NONE) return NULL;
  const float* p = em_bind_vector(v, i, rows, cols, name);
  if (!p) *ok = 0;
  return p;
}

/* Binds the layer program and the routing profile to the loaded trunk (kernels loaded). */
static int bind_trunk(em_session* s, const em_tensor_entry* t, void* program_storage) {
  const em_trunk_header* th = &s->th;
  em_trunk_view v = {t, th->n_tensors, s->block, th->data_offset, (th->flags & EM_TRUNK_FLAG_TILES) != 0,
                     th->flags & EM_TRUNK_FLAG_INT4_INTEGER ? EM_GRID_INTEGER : EM_GRID_HALF, s->err, ERR_LEN};
  uint32_t EL = s->ih.layers; /* the layers with experts: the profile's */
  int rc = em_program_bind(&v, th, EL, &s->k, program_storage, &s->prog);
  if (rc) return rc;
  for (uint32_t l = 0; l < EL; l++) /* the records hold the matrices of the activation the program runs */
    if (s->prog.moe[l]->expert_act != s->ih.act) {
      snprintf(s->err, ERR_LEN, "experts.bin holds experts of activation %u but trunk.bin's layer program runs "
               "expert layer %u with activation %u; the two files come from different compiles, recompile", s->ih.act,
               l, s->prog.moe[l]->expert_act);
      return EM_ERR_FORMAT;
    }
  uint32_t LE = EL * th->experts, H = th->hidden;
  int ok = 1;
  s->path_table = profile_tensor(&v, EM_TENSOR_PATH_TABLE, LE, th->experts, &ok);
  s->frequency = profile_tensor(&v, EM_TENSOR_FREQUENCY, EL, th->experts, &ok);
  s->fitted_router = profile_tensor(&v, EM_TENSOR_FITTED_ROUTER, LE, H, &ok);
  s->fitted_prev = profile_tensor(&v, EM_TENSOR_FITTED_ROUTER_PREV, LE, H, &ok);
  s->fitted_bias = profile_tensor(&v, EM_TENSOR_FITTED_ROUTER_BIAS, EL, th->experts, &ok);
  s->ahead_router = profile_tensor(&v, EM_TENSOR_FITTED_AHEAD, LE, H, &ok);
  s->ahead_prev = profile_tensor(&v, EM_TENSOR_FITTED_AHEAD_PREV, LE, H, &ok);
  s->ahead_bias = profile_tensor(&v, EM_TENSOR_FITTED_AHEAD_BIAS, EL, th->experts, &ok);
  if (!(s->ahead_router && s->ahead_prev && s->ahead_bias)) s->ahead_router = s->ahead_prev = s->ahead_bias = NULL;
  return ok ? EM_OK : EM_ERR_FORMAT;
}

/* Hands out consecutive 64-byte-aligned float buffers from the block. */
static float* carve(uint8_t** cursor, uint64_t count) {
  float* p = (float*)*cursor;
  *cursor += em_align_up(count * sizeof(float), EM_ALIGN_BUF);
  return p;
}

/* Refuses parameters out of range rather than reading them as something else. */
static int check_params(const em_params* p, char* err, size_t n) {
  const char* why = NULL;
  if ((unsigned)p->storage > EM_STORAGE_MMAP) why = "storage is not an em_storage_kind";
  else if ((unsigned)p->predictor > EM_PREDICT_AUTO) why = "predictor is not an em_predictor";
  else if ((unsigned)p->eviction > EM_EVICT_AUTO) why = "eviction is not an em_eviction";
  else if (!(p->emulate_bandwidth >= 0.0) || !(p->emulate_bandwidth < 1e15))
    why = "emulate_bandwidth must be a finite number of bytes/s >= 0 (0 = no emulation)";
  else if (!(p->emulate_latency >= 0.0) || !(p->emulate_latency < 1e3))
    why = "emulate_latency must be a finite number of seconds >= 0";
  else if (p->emulate_latency > 0.0 && p->emulate_bandwidth == 0.0)
    why = "emulate_latency needs emulate_bandwidth > 0";
  else if (p->compute_threads > 1024) why = "compute_threads is above 1024";
  else if (p->readers > EM_MAX_READERS) why = "readers is above 16";
  else if (!(p->prefetch_margin >= 0.0f) || !(p->prefetch_margin <= 100.0f))
    why = "prefetch_margin must be within [0, 100] (0 = a fixed number of experts)";
  else if (p->prefetch_layers > 4) why = "prefetch_layers must be within [0, 4] (0 = 1: the next layer)";
  else if (p->prefill_tokens > EM_MAX_PREFILL_TOKENS)
    why = "prefill_tokens must be within [0, 1024] (0 = the default; 1 = token by token)";
  else if (em_pacer_init(&(em_pacer){0}, p->emulate_memory_bandwidth, p->emulate_int8_ops, p->emulate_fp32_flops))
    why = "emulate_memory_bandwidth, emulate_int8_ops and emulate_fp32_flops must all be finite and > 0 (or all 0: "
          "no compute emulation)";
  if (why) snprintf(err, n, "bad parameter: %s", why);
  return why ? EM_ERR_ARGUMENT : EM_OK;
}

typedef struct {
  float frequency;
  uint32_t record;
} ranked_record;

static int more_frequent(const void* a, const void* b) { /* ties: record order */
  const ranked_record *x = (const ranked_record*)a, *y = (const ranked_record*)b;
  if (x->frequency != y->frequency) return x->frequency < y->frequency ? 1 : -1;
  return (x->record > y->record) - (x->record < y->record);
}

/* em_params.preload: every record ranked by its profiled frequency (most chosen first; record order
 * without a profile) and loaded as far as the cache has room. */
static int preload(em_session* s) {
  uint32_t n = s->ih.n_records;
  ranked_record* ranked = (ranked_record*)malloc((size_t)n * sizeof *ranked);
  uint32_t* order = (uint32_t*)malloc((size_t)n * sizeof *order);
  if (!ranked || !order) {
    free(ranked), free(order);
    snprintf(s->err, ERR_LEN, "out of memory ranking experts to preload");
    return EM_ERR_NOMEM;
  }
  for (uint32_t i = 0; i < n; i++) ranked[i] = (ranked_record){s->frequency ? s->frequency[i] : 0.0f, i};
  qsort(ranked, n, sizeof *ranked, more_frequent);
  for (uint32_t i = 0; i < n; i++) order[i] = ranked[i].record;
  s->st.preloaded = em_loader_preload(&s->loader, order, n);
  free(ranked), free(order);
  return EM_OK;
}

int em_open(const em_params* params, em_session** out, char* err, size_t err_len) {
  *out = NULL;
  em_crc32(0, NULL, 0); /* build the CRC tables before any other thread could */
  artifact_paths ap;
  int rc = check_params(params, err, err_len);
  if (!rc) rc = artifact_paths_make(params->artifact_dir, &ap, err, err_len);
  if (rc) return rc;
  em_session* s = (em_session*)calloc(1, sizeof *s);
  if (!s) {
    snprintf(err, err_len, "out of memory");
    return EM_ERR_NOMEM;
  }
  rc = read_headers(&ap, &s->th, &s->ih, &s->records, err, err_len);
  if (rc) {
    free(s);
    return rc;
  }
  const em_trunk_header* th = &s->th;
  if (th->top_k > MAX_TOP_K) {
    snprintf(err, err_len, "top-k %u exceeds this runtime's limit of %d", th->top_k, MAX_TOP_K);
    free(s->records);
    free(s);
    return EM_ERR_FORMAT;
  }
  s->max_seq = params->max_seq && params->max_seq < th->max_positions ? params->max_seq : th->max_positions;
  s->q_dim = th->heads * th->head_dim;
  s->kv_dim = th->kv_heads * th->head_dim;
  s->predictor = params->loader_thread ? params->predictor : EM_PREDICT_NONE; /* prefetching needs the thread */
  em_pacer_init(&s->pacer, params->emulate_memory_bandwidth, params->emulate_int8_ops, params->emulate_fp32_flops);
  s->n_predict = params->prefetch_experts ? params->prefetch_experts
                                           : params->prefetch_margin > 0.0f ? 2 * th->top_k : th->top_k;
  s->prefetch_margin = params->prefetch_margin;
  s->prefetch_layers = params->prefetch_layers ? params->prefetch_layers : 1;
  if (s->n_predict > th->experts) s->n_predict = th->experts;
  s->prefill_tokens = prefill_batch(params->prefill_tokens, s->max_seq);
  uint32_t chosen = s->prefill_tokens * th->top_k; /* a batch's experts, one per token and choice */
  em_memory_plan p;
  rc = em_plan_memory(th, &s->ih, s->records, s->max_seq, s->prefill_tokens,
                      em_program_bytes(th->program_steps, th->layers), &p, err, err_len);
  if (rc) {
    free(s->records);
    free(s);
    return rc;
  }
  uint64_t min_budget = p.fixed + p.min_cache;
  if (params->memory_budget) {
    if (params->memory_budget < min_budget) {
      char have[64], need[64];
      format_mib(have, sizeof have, params->memory_budget);
      format_mib(need, sizeof need, min_budget);
      snprintf(err, err_len,
               "memory budget %s is below the minimum %s for this artifact at a context of %u tokens and "
               "prompts run %u tokens at a time (trunk + KV cache + buffers + %u experts of one layer); raise "
               "the budget, or lower max_seq or prefill_tokens",
               have, need, s->max_seq, s->prefill_tokens, th->top_k);
      free(s->records);
      free(s);
      return EM_ERR_BUDGET;
    }
  }
  uint64_t slots[EM_MAX_SIZE_CLASSES], n_slots = 0, slot_bytes_total = 0, slot_meta_total = 0;
  em_slots_for_budget(&p, params->memory_budget, slots);
  for (uint32_t c = 0; c < p.n_classes; c++) {
    n_slots += slots[c];
    slot_bytes_total += slots[c] * p.classes[c].slot_bytes;
    slot_meta_total += slots[c] * (p.per_slot[c] - p.classes[c].slot_bytes);
    if (p.classes[c].slot_bytes > s->record_bytes) s->record_bytes = p.classes[c].slot_bytes;
    p.classes[c].count = (uint32_t)slots[c]; /* from here on: slots of the class */
  }
  uint64_t block_bytes = p.trunk + p.kv + p.buffers + p.arena + slot_bytes_total;
  size_t cache_meta = em_cache_meta_bytes((uint32_t)n_slots, s->ih.n_records);
  size_t loader_meta = em_loader_meta_bytes((uint32_t)n_slots, s->ih.n_records);
  void* block = NULL;
  uint8_t* meta = NULL;
  /* bookkeeping: cache slots, loader queue, predictions and record classes, the bound program */
  size_t predict_at = em_align_up(cache_meta, EM_ALIGN_BUF) + loader_meta;
  size_t program_at = em_align_up(predict_at + (size_t)s->prefetch_layers * th->layers * (s->n_predict * 4 + 2) +
                                      s->ih.n_records, EM_ALIGN_BUF);
  size_t blocks_at = em_align_up(program_at + em_program_bytes(th->program_steps, th->layers), EM_ALIGN_BUF);
  if (posix_memalign(&block, EM_ALIGN_PAGE, block_bytes) != 0 ||
      !(meta = (uint8_t*)malloc(blocks_at + em_batch_meta_bytes(s->prefill_tokens, th->top_k)))) {
    snprintf(err, err_len, "cannot allocate %llu bytes", (unsigned long long)block_bytes);
    free(block);
    free(meta);
    free(s->records);
    free(s);
    return EM_ERR_NOMEM;
  }
  s->block = (uint8_t*)block;
  memset(s->block + p.trunk, 0, p.kv + p.buffers + p.arena); /* touch now: the budget is real memory */

  uint8_t* cur = s->block + p.trunk;
  em_kv_cache* kv = &s->kv;
  em_kv_rows(th, &kv->k_row, &kv->v_row);
  uint32_t element = em_kv_element_bytes(th->flags); /* carved in floats: as memory_plan.c sizes the cache */
  kv->max_seq = s->max_seq, kv->dtype = (em_dl_dtype){2, (uint8_t)(8 * element), 1};
  kv->k = (uint8_t*)carve(&cur, ((uint64_t)th->kv_layers * s->max_seq * kv->k_row * element + 3) / 4);
  kv->v = (uint8_t*)carve(&cur, ((uint64_t)th->kv_layers * s->max_seq * kv->v_row * element + 3) / 4);
  s->cross_k = carve(&cur, (uint64_t)th->cross_layers * s->max_seq * s->kv_dim);
  s->cross_v = carve(&cur, (uint64_t)th->cross_layers * s->max_seq * s->kv_dim);
  cur = s->block + p.trunk + p.kv;
  s->x = carve(&cur, th->hidden);
  s->x2 = carve(&cur, th->hidden);
  s->xn = carve(&cur, th->hidden);
  s->qkv = carve(&cur, s->q_dim + 2 * s->kv_dim);
  s->qkv2 = carve(&cur, s->q_dim + 2 * s->kv_dim);
  s->q = carve(&cur, s->q_dim);
  s->att = carve(&cur, s->q_dim);
  s->h = carve(&cur, em_ffn_floats(th));
  s->router_logits = carve(&cur, th->experts);
  s->logits = carve(&cur, th->vocab);
  s->expert_weight = carve(&cur, 1);
  s->shared_logit = carve(&cur, 1);
  s->pred_xn = carve(&cur, th->hidden);
  s->pred_scores = carve(&cur, th->experts);
  s->pred_prev = carve(&cur, th->experts);
  s->prev_xn = carve(&cur, (uint64_t)th->layers * th->hidden);
  s->route_scratch = carve(&cur, 3ull * th->experts);
  uint64_t heads = th->heads, latent = th->kv_lora != 0; /* as memory_plan.c sizes them */
  s->mla.q = carve(&cur, latent * heads * (th->qk_nope + th->head_dim));
  s->mla.q_a = carve(&cur, th->q_lora);
  s->mla.q_a_norm = carve(&cur, th->q_lora);
  s->mla.ckv = carve(&cur, latent * (th->kv_lora + th->head_dim));
  s->mla.q_lat = carve(&cur, heads * th->kv_lora);
  s->mla.q_rot = carve(&cur, latent * heads * th->head_dim);
  s->mla.o_lat = carve(&cur, heads * th->kv_lora);
  s->mla.att = carve(&cur, heads * th->v_head);
  s->taken = (uint32_t*)carve(&cur, th->experts);
  s->pos_bias = carve(&cur, (uint64_t)th->heads * s->max_seq);
  s->enc_x = carve(&cur, th->cross_layers ? (uint64_t)s->max_seq * th->hidden : 0);
  s->enc_q = carve(&cur, th->cross_layers ? (uint64_t)s->max_seq * s->q_dim : 0);
  s->expert_out = carve(&cur, (uint64_t)chosen * th->hidden);
  s->expert_weights = carve(&cur, chosen);
  uint64_t rows = em_batch_rows(s->prefill_tokens), R = rows > 1 ? rows : 0, qkv = s->q_dim + 2 * s->kv_dim;
  s->zero = carve(&cur, rows * th->hidden);
  s->batch_x = carve(&cur, (uint64_t)s->prefill_tokens * th->hidden);
  s->batch_xn = carve(&cur, (uint64_t)s->prefill_tokens * th->hidden);
  s->rows.xn = carve(&cur, R * th->hidden);
  s->rows.qkv = carve(&cur, R * qkv);
  s->rows.res = carve(&cur, R * (qkv > th->hidden ? qkv : th->hidden));
  s->rows.att = carve(&cur, R * s->q_dim);
  s->rows.y = carve(&cur, R * th->hidden);
  s->rows.h = carve(&cur, R * em_ffn_floats(th));
  s->rows.w = carve(&cur, R);
  kv->stage = carve(&cur, element == 2 ? kv->k_row + kv->v_row : 0);
  s->arena.base = s->block + p.trunk + p.kv + p.buffers;
  s->arena.size = p.arena;
  s->predicted = (uint32_t*)(meta + predict_at);
  s->expert_blocks = (em_ffn_block*)(meta + blocks_at);
  s->expert_tasks = (em_expert_task*)em_align_up((uintptr_t)(s->expert_blocks + chosen), EM_ALIGN_BUF);
  s->batch_experts = (uint32_t*)(s->expert_tasks + chosen);
  s->batch_records = s->batch_experts + chosen;
  s->batch_order = s->batch_records + chosen;
  s->batch_counts = s->batch_order + chosen;
  s->expert_runs = (em_task_run*)em_align_up((uintptr_t)(s->batch_counts + s->prefill_tokens), EM_ALIGN_BUF);
  s->named = (uint16_t*)(s->predicted + (size_t)s->prefetch_layers * th->layers * s->n_predict);
  memset(s->named, 0, (size_t)s->prefetch_layers * th->layers * sizeof *s->named);
  uint8_t* record_class = (uint8_t*)(s->named + (size_t)s->prefetch_layers * th->layers);
  em_size_class unused[EM_MAX_SIZE_CLASSES];
  uint32_t n_classes;
  em_size_classes(s->records, s->ih.n_records, unused, &n_classes, record_class);

  /* the tensor table: transient, until the program and the profile are bound */
  em_tensor_entry* table = (em_tensor_entry*)calloc(th->n_tensors, sizeof *table);
  rc = table ? load_trunk(s, ap.trunk, table) : EM_ERR_NOMEM;
  if (!table) snprintf(s->err, ERR_LEN, "out of memory reading %s", ap.trunk);
  if (!rc) rc = em_check_cpu(th->machine, th->cpu_features, s->err, ERR_LEN);
  if (!rc)
    rc = em_kernels_load(&s->k, ap.kernels, th->kernels_sha256, (th->flags & EM_TRUNK_FLAG_KV_FLOAT16) != 0, s->err,
                         ERR_LEN);
  if (!rc) rc = bind_trunk(s, table, meta + program_at);
  free(table);
  /* The defaults: the best predictor and eviction the artifact's routing profile allows
     (docs/BENCHMARKS.md §§3-4). */
  int has_fit = s->fitted_router && s->fitted_prev && s->fitted_bias;
  if (s->predictor == EM_PREDICT_AUTO) s->predictor = has_fit ? EM_PREDICT_FITTED_ROUTER : EM_PREDICT_NEXT_ROUTER;
  s->eviction = params->eviction == EM_EVICT_AUTO ? (s->frequency ? EM_EVICT_EDGEMOE : EM_EVICT_LRU) : params->eviction;
  if (!rc && s->predictor == EM_PREDICT_FITTED_ROUTER && !has_fit) {
    snprintf(s->err, ERR_LEN, "the fitted-router predictor needs the routing profile of this version: compile with "
             "calibration text (--calibration)");
    rc = EM_ERR_ARGUMENT;
  }
  if (!rc && s->predictor == EM_PREDICT_PATH_TABLE && !s->path_table) {
    snprintf(s->err, ERR_LEN, "the path-table predictor needs the routing profile: compile with calibration text (--calibration)");
    rc = EM_ERR_ARGUMENT;
  }
  if (!rc && s->eviction == EM_EVICT_EDGEMOE && !s->frequency) {
    snprintf(s->err, ERR_LEN, "EdgeMoE eviction needs expert frequencies: compile with calibration text (--calibration)");
    rc = EM_ERR_ARGUMENT;
  }
  em_cache_init(&s->cache, s->block + p.trunk + p.kv + p.buffers + p.arena, p.classes, p.n_classes, record_class, meta,
                s->ih.layers, th->experts, s->eviction, s->frequency);
  if (!rc && !(s->experts = em_storage_open(params, ap.image, s->err, ERR_LEN))) rc = EM_ERR_IO;
  for (uint32_t i = 0; !rc && i < s->ih.n_records; i++) {
    uint32_t b = s->records[i].bits, act = s->prog.moe[i / th->experts]->expert_act;
    if (b > EM_MAX_BITS || !s->k.gate_up[act][b] || !s->k.down[act][b]) {
      snprintf(s->err, ERR_LEN, "expert record %u is %u-bit but kernels.so has no %u-bit expert kernels; recompile",
               i, b, b);
      rc = EM_ERR_FORMAT;
    }
  }
  if (!rc) rc = em_pool_create((int)(params->compute_threads ? params->compute_threads : 1), &s->pool, s->err, ERR_LEN);
  /* a batch's tokens go through an expert EM_BATCH_ROWS at a time where every expert's kernels have
     a batched form (the memory plan made lanes room for it) */
  s->batch_rows = params->single_token_kernels ? 1 : em_batch_rows(s->prefill_tokens);
  /* an emulated board paces the kernels of the decode thread only: one expert at a time there */
  s->expert_lanes = em_pacer_on(&s->pacer) ? 1
                    : em_expert_lanes((uint32_t)em_pool_threads(s->pool), th->top_k, s->arena.size, th->hidden,
                                      th->inter, em_batch_rows(s->prefill_tokens));
  if (!rc) {
    rc = em_loader_init(&s->loader, s->experts, &s->cache, s->records, th->experts, params->verify_checksums,
                        params->loader_thread ? (params->readers ? (int)params->readers : 1) : 0,
                        !params->one_read_per_record, &s->st,
                        meta + em_align_up(cache_meta, EM_ALIGN_BUF), s->err, ERR_LEN);
    s->loader_ready = 1;
  }
  if (!rc && params->preload) rc = preload(s);
  if (rc) {
    snprintf(err, err_len, "%s", s->err);
    em_close(s);
    return rc;
  }
  s->st.memory_bytes = p.fixed + slot_bytes_total + slot_meta_total;
  s->st.trunk_bytes = p.trunk;
  s->st.kv_cache_bytes = p.kv;
  s->st.expert_cache_bytes = slot_bytes_total;
  s->st.cache_slots = (uint32_t)n_slots;
  s->st.record_bytes = (uint32_t)s->record_bytes;
  *out = s;
  return EM_OK;
}

void em_close(em_session* s) {
  if (!s) return;
  if (s->loader_ready) em_loader_stop(&s->loader);
  em_pool_destroy(s->pool);
  if (s->experts) s->experts->close(s->experts);
  em_kernels_unload(&s->k);
  free(s->cache.slot); /* the bookkeeping allocation starts with the slot array */
  free(s->block);
  free(s->records);
  free(s);
}

/* ---- decoding ------------------------------------------------------------------------- */

/* Calls a kernel, then lets a read in flight progress (bare-metal, where reads advance between
 * kernels; a no-op where reader threads do the reading). */
int em_session_kernel(em_session* s, em_ffi_fn fn, const char* name, const em_kernel_arg* args, int n_args) {
  int rc = em_kernel_invoke(fn, name, args, n_args, s->err, ERR_LEN);
  em_loader_poll(&s->loader);
  return rc;
}

int em_session_matvec(em_session* s, em_ffi_fn fn, const char* name, const em_matrix* w, float* x, float* res,
                      float* y) {
  return em_matvec(fn, name, w, x, res, y, s->err, ERR_LEN);
}

/* A feed-forward block on s->xn added to the residual stream: x += weight · block(xn). */
static int ffn_into_residual(em_session* s, const em_ffn_block* f, float weight) {
  *s->expert_weight = weight;
  int rc = em_ffn_call(f, s->xn, s->h, s->x, s->expert_weight, s->x2, s->err, ERR_LEN);
  em_loader_poll(&s->loader);
  if (!rc) em_swap(&s->x, &s->x2);
  return rc;
}

int em_apply_norm(em_session* s, const em_step* st, const float* x, float* out) {
  int64_t H = s->th.hidden;
  em_kernel_arg a[EM_SIG_NORM_BIAS_ARGS] = {0};
  if (st->norm_kind == EM_NORM_LAYER) {
    BIND(a, NORM_BIAS, X, T(x, 1, H, 0, 0));
    BIND(a, NORM_BIAS, W, T(st->norm, 1, H, 0, 0));
    BIND(a, NORM_BIAS, B, T(st->norm_bias, 1, H, 0, 0));
    BIND(a, NORM_BIAS, Y, T(out, 1, H, 0, 0));
    return INVOKE(s->k.layernorm, EM_KERNEL_LAYERNORM, a, NORM_BIAS);
  }
  BIND(a, NORM, X, T(x, 1, H, 0, 0));
  BIND(a, NORM, W, T(st->norm, 1, H, 0, 0));
  BIND(a, NORM, Y, T(out, 1, H, 0, 0));
  return INVOKE(s->k.rmsnorm, EM_KERNEL_RMSNORM, a, NORM);
}

/* Predictors that read the residual stream (rather than the path table). */
static int uses_hidden_state(em_predictor p) {
  return p == EM_PREDICT_NEXT_ROUTER || p == EM_PREDICT_FITTED_ROUTER || p == EM_PREDICT_WRONG;
}

/* How many of the ranked guesses to prefetch with a margin: the top k, then those scoring within
 * `margin` logits of the k-th (path-table scores are probabilities: within a factor e^margin). */
static uint32_t confident_count(const float* scores, const uint32_t* guess, uint32_t n, uint32_t k, float margin,
                                int probabilities) {
  if (n <= k) return n;
  float edge = scores[guess[k - 1]];
  float floor = probabilities ? edge * expf(-margin) : edge - margin;
  uint32_t count = k;
  while (count < n && scores[guess[count]] >= floor) count++;
  return count;
}

/* Predicts the experts of `layer` and starts loading them. `x` is the residual stream now;
 * `selected` the experts the layer before chose (for the path table); `current` the last layer with
 * experts to have routed, for the eviction policy. */
static int predict_and_prefetch(em_session* s, uint32_t layer, const float* x, const uint32_t* selected,
                                uint32_t n_selected, uint32_t current, uint32_t ahead) {
  if (s->holds_all) return EM_OK; /* every expert is resident: nothing to fetch */
  uint32_t EL = s->prog.expert_layers, E = s->th.experts, H = s->th.hidden, prev = (layer + EL - 1) % EL;
  size_t at = (size_t)(ahead - 1) * s->th.layers + layer;
  uint32_t* guess = s->predicted + at * s->n_predict;
  switch (s->predictor) {
    case EM_PREDICT_PATH_TABLE:
      if (!selected) return EM_OK;
      em_path_scores(s->path_table, E, prev, selected, n_selected, s->pred_scores);
      em_top_n(s->pred_scores, E, s->n_predict, 0, guess);
      break;
    case EM_PREDICT_NEXT_ROUTER:
    case EM_PREDICT_FITTED_ROUTER:
    case EM_PREDICT_WRONG: {
      const em_step* moe = s->prog.moe[layer];
      int rc = em_apply_norm(s, moe, x, s->pred_xn);
      if (rc) return rc;
      int fitted = s->predictor == EM_PREDICT_FITTED_ROUTER;
      /* beyond the next layer, the maps fitted from one layer further back where the artifact has them */
      int far = fitted && ahead > 1 && s->ahead_router;
      const float* bias = far ? s->ahead_bias : s->fitted_bias;
      const em_matrix* router = &moe->m[EM_M_ROUTER];
      em_matrix fit, fit_prev;
      if (fitted) {
        fit = (em_matrix){(far ? s->ahead_router : s->fitted_router) + (size_t)layer * E * H, NULL, 32, E, H, 0, 0,
                          EM_GRID_HALF};
        fit_prev = (em_matrix){(far ? s->ahead_prev : s->fitted_prev) + (size_t)layer * E * H, NULL, 32, E, H, 0, 0,
                               EM_GRID_HALF};
        router = &fit;
      }
      if (!fitted && moe->router_logit_bias) /* the next router as it will run, its logit bias included */
        rc = em_session_matvec(s, s->k.router_bias, EM_KERNEL_ROUTER_BIAS, router, s->pred_xn,
                               (float*)moe->router_logit_bias, s->pred_scores);
      else
        rc = em_session_matvec(s, s->k.router, "em_router", router, s->pred_xn, NULL, s->pred_scores);
      if (!rc && fitted)
        rc = em_session_matvec(s, s->k.router, "em_router", &fit_prev, s->prev_xn + (size_t)layer * H, NULL, s->pred_prev);
      if (rc) return rc;
      for (uint32_t e = 0; fitted && e < E; e++)
        s->pred_scores[e] += s->pred_prev[e] + bias[(size_t)layer * E + e];
      em_top_n(s->pred_scores, E, s->n_predict, s->predictor == EM_PREDICT_WRONG, guess);
      break;
    }
    default:
      return EM_OK;
  }
  uint32_t n = s->n_predict;
  if (s->prefetch_margin > 0.0f && s->predictor != EM_PREDICT_WRONG)
    n = confident_count(s->pred_scores, guess, s->n_predict, s->th.top_k, s->prefetch_margin,
                        s->predictor == EM_PREDICT_PATH_TABLE);
  uint32_t records[MAX_TOP_K * 4];
  if (n > MAX_TOP_K * 4) n = MAX_TOP_K * 4;
  for (uint32_t i = 0; i < n; i++) records[i] = em_record_of(s, layer, guess[i]);
  /* the precision measured at this distance so far, from an even prior: of all guesses, and of those
     a prefetch would read (neither resident nor in flight when named), marked until scored */
  double chance = (double)(s->named_used[ahead - 1] + 1) / (double)(s->named_total[ahead - 1] + 2);
  double worth = (double)(s->absent_used[ahead - 1] + 1) / (double)(s->absent_total[ahead - 1] + 2);
  uint8_t absent[MAX_TOP_K * 4];
  em_loader_prefetch(&s->loader, records, n, current, chance, worth, absent);
  for (uint32_t i = 0; i < n; i++) guess[i] |= absent[i] ? EM_GUESS_ABSENT : 0u;
  s->named[at] = (uint16_t)n;
  s->st.predictions++;
  s->st.prefetch_named += n;
  return EM_OK;
}

/* Counts how many of the layer's chosen experts its last predictions named: the next-layer one in
 * the stats, each distance's in its precision. */
static void score_prediction(em_session* s, uint32_t layer, const uint32_t* idx) {
  for (uint32_t a = 0; a < s->prefetch_layers; a++) {
    size_t at = (size_t)a * s->th.layers + layer;
    if (!s->named[at]) continue;
    const uint32_t* guess = s->predicted + at * s->n_predict;
    uint32_t hits = 0, absent = 0, absent_hits = 0;
    for (uint32_t j = 0; j < s->named[at]; j++) absent += (guess[j] & EM_GUESS_ABSENT) != 0;
    for (uint32_t k = 0; k < s->th.top_k; k++)
      for (uint32_t j = 0; j < s->named[at]; j++)
        if ((guess[j] & ~EM_GUESS_ABSENT) == idx[k]) {
          hits++;
          absent_hits += (guess[j] & EM_GUESS_ABSENT) != 0;
          break;
        }
    s->named_total[a] += s->named[at];
    s->named_used[a] += hits;
    s->absent_total[a] += absent;
    s->absent_used[a] += absent_hits;
    if (a == 0) {
      s->st.predicted_hits += hits;
      s->st.predicted += s->th.top_k;
    } else {
      s->st.predicted_ahead_hits += hits;
      s->st.predicted_ahead += s->th.top_k;
    }
    s->named[at] = 0;
  }
}

int em_chosen_expert(em_session* s, const em_step* st, uint32_t expert, em_ffn_block* out) {
  uint32_t layer = st->expert_layer, ri = em_record_of(s, layer, expert);
  uint8_t* rec;
  int rc = em_loader_wait(&s->loader, ri, layer, &rec, s->err, ERR_LEN);
  if (rc) return rc;
  const em_record* r = &s->records[ri];
  uint32_t H = s->th.hidden, I = s->th.inter, G = s->ih.group, b = r->bits;
  const uint8_t* part[6];
  for (int i = 0; i < 6; i++) part[i] = rec + r->part_offset[i];
  uint32_t tiled = s->ih.layout == EM_LAYOUT_TILES, grid = s->ih.int4_grid, relu = s->ih.act == EM_ACT_RELU,
           d = relu ? 2 : 4;
  /* SwiGLU records: gate, up, down; ReLU records: up, down */
  *out = (em_ffn_block){s->k.gate_up[st->expert_act][b], s->k.down[st->expert_act][b], "em_expert_gate_up",
                        "em_expert_down", {part[0], (const uint16_t*)part[1], b, I, H, G, tiled, grid},
                        {part[d - 2], (const uint16_t*)part[d - 1], b, I, H, G, tiled, grid},
                        {part[d], (const uint16_t*)part[d + 1], b, H, I, G, tiled, grid}, !relu, NULL, NULL, NULL,
                        NULL, NULL};
  if (s->batch_rows > 1) {
    out->gate_up_batch = s->k.gate_up_batch[st->expert_act][b];
    out->down_batch = s->k.down_batch[st->expert_act][b];
  }
  if (st->expert_gate_bias) { /* the expert's row of each bias */
    out->gate_bias = st->expert_gate_bias + (size_t)expert * I;
    out->up_bias = st->expert_up_bias + (size_t)expert * I;
    out->down_bias = st->expert_down_bias + (size_t)expert * H;
  }
  return EM_OK;
}

/* Runs chosen experts [first, first + n) of the layer (their records resident), each into its row of
 * expert_out. */
static int compute_experts(em_session* s, uint32_t first, uint32_t n) {
  uint32_t H = s->th.hidden;
  for (uint32_t k = 0; k < n; k++)
    s->expert_tasks[k] = (em_expert_task){&s->expert_blocks[first + k], s->xn, &s->expert_weights[first + k],
                                          s->expert_out + (size_t)(first + k) * H};
  return em_run_expert_tasks(s, s->expert_tasks, n);
}

int em_run_expert_tasks(em_session* s, const em_expert_task* tasks, uint32_t n) {
  if ((n > 1 && s->expert_lanes > 1) || (s->batch_rows > 1 && n >= s->batch_rows))
    return em_experts_run(tasks, n, s->expert_lanes, s->batch_rows, s->expert_runs, &s->arena, s->zero, s->th.hidden,
                          s->th.inter, &s->st.batched_calls, s->err, ERR_LEN);
  for (uint32_t k = 0; k < n; k++) {
    int rc = em_ffn_call(tasks[k].f, tasks[k].x, s->h, s->zero, tasks[k].weight, tasks[k].out, s->err, ERR_LEN);
    em_loader_poll(&s->loader);
    if (rc) return rc;
  }
  return EM_OK;
}

/* The layer's chosen experts, added to the residual stream in the order chosen. Each runs as soon
 * as its record is read; those already resident when one arrives run together with it. */
static int routed_experts(em_session* s, const em_step* st, const uint32_t* idx, const float* wts, uint32_t n) {
  uint32_t H = s->th.hidden, layer = st->expert_layer;
  /* The experts resident now run first, those still being read after them (each group in routing
     order): reads finish while the resident ones compute. Outputs are summed in routing order, so
     the result does not depend on which read finished first. */
  uint32_t order[MAX_TOP_K], at[MAX_TOP_K], m = 0;
  uint8_t ready[MAX_TOP_K];
  for (uint32_t k = 0; k < n; k++) ready[k] = (uint8_t)(em_loader_ready(&s->loader, em_record_of(s, layer, idx[k])) != 0);
  for (int pass = 1; pass >= 0; pass--)
    for (uint32_t k = 0; k < n; k++)
      if (ready[k] == pass) at[k] = m, order[m++] = k;
  for (uint32_t j = 0; j < n;) {
    uint32_t end = j;
    do {
      int rc = em_chosen_expert(s, st, idx[order[end]], &s->expert_blocks[end]);
      if (rc) return rc;
      s->expert_weights[end] = wts[order[end]];
      end++;
    } while (end < n && s->expert_lanes > 1 && em_loader_ready(&s->loader, em_record_of(s, layer, idx[order[end]])));
    int rc = compute_experts(s, j, end - j);
    if (rc) return rc;
    j = end;
  }
  for (uint32_t k = 0; k < n; k++) {
    const float* y = s->expert_out + (size_t)at[k] * H;
    for (uint32_t i = 0; i < H; i++) s->x[i] += y[i];
    em_loader_release(&s->loader, em_record_of(s, layer, idx[k]));
  }
  return EM_OK;
}

em_ffn_block em_resident_block(const em_session* s, const em_step* st) {
  const em_kernels* k = &s->k;
  int dense = st->op == EM_OP_DENSE_FFN, relu = dense && st->act == EM_ACT_RELU;
  em_ffn_block f = {dense ? (relu ? k->dense_up_relu : k->dense_gate_up) : k->shared_gate_up,
                    dense ? k->dense_down : k->shared_down,
                    dense ? (relu ? EM_KERNEL_DENSE_UP_RELU : EM_KERNEL_DENSE_GATE_UP) : EM_KERNEL_SHARED_GATE_UP,
                    dense ? EM_KERNEL_DENSE_DOWN : EM_KERNEL_SHARED_DOWN, st->m[EM_M_SHARED_GATE_PROJ],
                    st->m[EM_M_SHARED_UP], st->m[EM_M_SHARED_DOWN], !relu, NULL, NULL, NULL, NULL, NULL};
  if (s->batch_rows > 1) {
    f.gate_up_batch = dense ? (relu ? k->dense_up_relu_batch : k->dense_gate_up_batch) : k->shared_gate_up_batch;
    f.down_batch = dense ? k->dense_down_batch : k->shared_down_batch;
    if (!f.gate_up_batch || !f.down_batch) f.gate_up_batch = f.down_batch = NULL;
  }
  return f;
}

int em_shared_weight(em_session* s, const em_step* st, const float* xn, float* weight) {
  *weight = 1.0f;
  if (!st->shared_gated) return EM_OK;
  int rc = em_session_matvec(s, s->k.shared_gate, EM_KERNEL_SHARED_GATE, &st->m[EM_M_SHARED_GATE], (float*)xn, NULL,
                             s->shared_logit);
  if (!rc) *weight = 1.0f / (1.0f + expf(-s->shared_logit[0]));
  return rc;
}

int em_shared_expert(em_session* s, const em_step* st) {
  float weight;
  int rc = em_shared_weight(s, st, s->xn, &weight);
  if (rc) return rc;
  const em_ffn_block f = em_resident_block(s, st);
  return ffn_into_residual(s, &f, weight);
}

int em_dense_ffn(em_session* s, const em_step* st) {
  int rc = em_apply_norm(s, st, s->x, s->xn);
  if (rc) return rc;
  const em_ffn_block f = em_resident_block(s, st);
  return ffn_into_residual(s, &f, 1.0f);
}

int em_moe_route(em_session* s, const em_step* st, uint32_t trace_row, uint32_t* idx, float* wts, uint32_t* n_out) {
  const em_trunk_header* th = &s->th;
  uint32_t l = st->expert_layer, EL = s->prog.expert_layers;
  int64_t H = th->hidden;
  int rc = em_apply_norm(s, st, s->x, s->xn);
  if (rc) return rc;
  /* this layer has been predicted for this token; its input now stands for the context at the next */
  memcpy(s->prev_xn + (size_t)l * H, s->xn, H * sizeof(float));
  rc = st->router_logit_bias
           ? em_session_matvec(s, s->k.router_bias, EM_KERNEL_ROUTER_BIAS, &st->m[EM_M_ROUTER], s->xn,
                               (float*)st->router_logit_bias, s->router_logits)
           : em_session_matvec(s, s->k.router, EM_KERNEL_ROUTER, &st->m[EM_M_ROUTER], s->xn, NULL, s->router_logits);
  if (rc) return rc;
  em_route(st, s->router_logits, th->experts, th->top_k, s->route_scratch, idx, wts);
  score_prediction(s, l, idx);
  if (s->route_trace && trace_row < s->trace_max && !s->in_encoder)
    memcpy(s->route_trace + ((size_t)trace_row * EL + l) * th->top_k, idx, th->top_k * sizeof(uint32_t));
  /* expert capacity: a choice beyond the tokens its expert takes in this pass is skipped */
  uint32_t n = 0;
  for (uint32_t k = 0; k < th->top_k; k++)
    if (!st->capacity || ++s->taken[idx[k]] <= st->capacity) idx[n] = idx[k], wts[n++] = wts[k];
  *n_out = n;
  return EM_OK;
}

/* The MoE half of a layer: route, pin the chosen experts (reading missing ones), prefetch the
 * next layer's predicted experts, run the shared expert while the reads are in flight, then the
 * chosen ones as they arrive. Layers, records and predictions count the layers with experts. */
int em_moe_layer(em_session* s, const em_step* st) {
  uint32_t l = st->expert_layer, n, idx[MAX_TOP_K], records[MAX_TOP_K];
  float wts[MAX_TOP_K];
  int rc = em_moe_route(s, st, s->trace_tokens, idx, wts, &n);
  if (rc) return rc;
  for (uint32_t k = 0; k < n; k++) records[k] = em_record_of(s, l, idx[k]);
  rc = n ? em_loader_need(&s->loader, records, n, l, s->err, ERR_LEN) : EM_OK;
  if (rc) return rc;
  if (n) em_loader_routed(&s->loader, records, n, l);
  /* The path table needs only this layer's choice: predict now, while the experts compute. */
  if (s->predictor == EM_PREDICT_PATH_TABLE && !s->in_encoder)
    rc = predict_and_prefetch(s, (l + 1) % s->prog.expert_layers, s->x, idx, n, l, 1);
  if (!rc && st->shared) rc = em_shared_expert(s, st);
  if (!rc) rc = routed_experts(s, st, idx, wts, n);
  if (rc) /* unpin what an error left pinned, so the session stays usable */
    for (uint32_t k = 0; k < n; k++) em_loader_release(&s->loader, records[k]);
  return rc;
}

/* The attention half of a layer with latent attention: norm, mla.c's step into the latent cache,
 * output projection added to the residual stream. */
static int mla_attention_layer(em_session* s, const em_step* st) {
  int rc = em_apply_norm(s, st, s->x, s->xn);
  if (!rc) rc = em_mla_attention(&s->k, &s->th, st, &s->mla, s->xn, &s->kv, s->pos, s->err, ERR_LEN);
  if (!rc) rc = em_session_matvec(s, s->k.o_proj, EM_KERNEL_O_PROJ, &st->m[EM_M_WO], s->mla.att, s->x, s->x2);
  if (!rc) em_swap(&s->x, &s->x2);
  return rc;
}

int em_attention_core(em_session* s, const em_step* st, float* qkv_in, float* att) {
  const em_trunk_header* th = &s->th;
  int64_t hq = th->heads, hkv = th->kv_heads, d = th->head_dim, pos = s->pos, qkv = s->q_dim + 2 * s->kv_dim;
  const em_kv_cache* kv = &s->kv;
  int rc;
  float* rope_in = qkv_in;
  em_kernel_arg a[EM_SIG_ROPE_ARGS] = {0};
  if (st->kind != EM_QK_NORM_NONE) {
    BIND(a, QK_NORM, QKV, T(qkv_in, 1, qkv, 0, 0));
    BIND(a, QK_NORM, QW, T(st->q_norm, 1, st->kind == EM_QK_NORM_HEAD ? d : s->q_dim, 0, 0));
    BIND(a, QK_NORM, KW, T(st->k_norm, 1, st->kind == EM_QK_NORM_HEAD ? d : s->kv_dim, 0, 0));
    BIND(a, QK_NORM, Y, T(s->qkv2, 1, qkv, 0, 0));
    if ((rc = INVOKE(s->k.qk_norm, EM_KERNEL_QK_NORM, a, QK_NORM))) return rc;
    rope_in = s->qkv2;
  }
  BIND(a, ROPE, QKV, T(rope_in, 1, qkv, 0, 0));
  BIND(a, ROPE, COS, T(st->rope_cos + pos * (d / 2), 1, d / 2, 0, 0));
  BIND(a, ROPE, SIN, T(st->rope_sin + pos * (d / 2), 1, d / 2, 0, 0));
  BIND(a, ROPE, Q, T(s->q, 2, hq, d, 0));
  BIND(a, ROPE, K, T(em_kv_key_out(kv, st->layer, pos), 2, hkv, d, 0));
  BIND(a, ROPE, V, T(em_kv_value_out(kv, st->layer, pos), 2, hkv, d, 0));
  if ((rc = INVOKE(s->k.rope, EM_KERNEL_ROPE, a, ROPE))) return rc;
  em_kv_commit(kv, st->layer, pos);
  /* a sliding window attends to its last `window` positions alone: the rows before it are not passed */
  int64_t first = st->window && pos + 1 > st->window ? pos + 1 - st->window : 0, rows = pos + 1 - first;
  const void *kw = em_kv_key(kv, st->layer, first), *vw = em_kv_value(kv, st->layer, first);
  if (st->sinks) {
    BIND(a, ATTENTION_SINKS, Q, T(s->q, 2, hq, d, 0));
    BIND(a, ATTENTION_SINKS, KC, em_kv_arg(kv, kw, rows, hkv, d));
    BIND(a, ATTENTION_SINKS, VC, em_kv_arg(kv, vw, rows, hkv, d));
    BIND(a, ATTENTION_SINKS, SINK, T(st->sinks, 1, hq, 0, 0));
    BIND(a, ATTENTION_SINKS, O, T(att, 2, hq, d, 0));
    rc = INVOKE(s->k.attention_sinks, EM_KERNEL_ATTENTION_SINKS, a, ATTENTION_SINKS);
  } else {
    BIND(a, ATTENTION, Q, T(s->q, 2, hq, d, 0));
    BIND(a, ATTENTION, KC, em_kv_arg(kv, kw, rows, hkv, d));
    BIND(a, ATTENTION, VC, em_kv_arg(kv, vw, rows, hkv, d));
    BIND(a, ATTENTION, O, T(att, 2, hq, d, 0));
    rc = INVOKE(s->k.attention, EM_KERNEL_ATTENTION, a, ATTENTION);
  }
  return rc;
}

int em_output_residual(em_session* s, const em_step* st, float* x, float* scratch, float** res) {
  *res = x;
  if (!st->o_bias) return EM_OK;
  int64_t H = s->th.hidden;
  em_kernel_arg a[EM_SIG_ADD_ARGS] = {0};
  BIND(a, ADD, A, T(x, 1, H, 0, 0));
  BIND(a, ADD, B, T(st->o_bias, 1, H, 0, 0));
  BIND(a, ADD, Y, T(scratch, 1, H, 0, 0));
  *res = scratch;
  return INVOKE(s->k.add, EM_KERNEL_ADD, a, ADD);
}

/* The attention half of a layer: norm, qkv (+ bias), em_attention_core, output projection (+ bias)
 * added to the residual stream. */
static int attention_layer(em_session* s, const em_step* st) {
  int rc = em_apply_norm(s, st, s->x, s->xn);
  if (rc) return rc;
  rc = st->bias ? em_session_matvec(s, s->k.qkv_bias, EM_KERNEL_QKV_BIAS, &st->m[EM_M_QKV], s->xn, (float*)st->bias, s->qkv)
                : em_session_matvec(s, s->k.qkv, EM_KERNEL_QKV, &st->m[EM_M_QKV], s->xn, NULL, s->qkv);
  if (!rc) rc = em_attention_core(s, st, s->qkv, s->att);
  float* res;
  if (!rc) rc = em_output_residual(s, st, s->x, s->xn, &res); /* xn is free again */
  if (!rc) rc = em_session_matvec(s, s->k.o_proj, EM_KERNEL_O_PROJ, &st->m[EM_M_WO], s->att, res, s->x2);
  if (!rc) em_swap(&s->x, &s->x2);
  return rc;
}

int em_check_tokens(em_session* s, const int32_t* tokens, size_t n) {
  const em_trunk_header* th = &s->th;
  for (size_t i = 0; i < n; i++)
    if (tokens[i] < 0 || (uint32_t)tokens[i] >= th->vocab) {
      if (n == 1) snprintf(s->err, ERR_LEN, "token id %d out of range [0, %u)", tokens[i], th->vocab);
      else snprintf(s->err, ERR_LEN, "token id %d out of range [0, %u) at prompt position %zu", tokens[i], th->vocab, i);
      return EM_ERR_ARGUMENT;
    }
  if (n > s->max_seq - s->pos) {
    if (n == 1) snprintf(s->err, ERR_LEN, "context full: %u tokens (open with a larger max_seq, or reset)", s->max_seq);
    else snprintf(s->err, ERR_LEN, "context full: a prompt of %zu tokens after %u does not fit in %u (open with a larger "
                  "max_seq, or reset)", n, s->pos, s->max_seq);
    return EM_ERR_ARGUMENT;
  }
  if (th->cross_layers && !s->enc_len) {
    snprintf(s->err, ERR_LEN, "an encoder-decoder model decodes after em_prefill has run its encoder over an input");
    return EM_ERR_ARGUMENT;
  }
  return EM_OK;
}

void em_pass_begin(em_session* s, em_pass* p) {
  p->t_start = em_now_ns();
  em_loader_stats(&s->loader, &p->before);
  if (!s->holds_all && s->predictor != EM_PREDICT_NONE) s->holds_all = em_loader_holds_all(&s->loader);
  em_arena_bind(&s->arena);
  em_pool_bind(s->pool);
}

void em_pass_end(em_session* s, const em_pass* p, uint32_t tokens) {
  em_stats after;
  s->pos += tokens;
  if (s->route_trace)
    s->trace_tokens = s->trace_max - s->trace_tokens < tokens ? s->trace_max : s->trace_tokens + tokens;
  em_loader_stats(&s->loader, &after);
  s->st.tokens += tokens;
  s->st.compute_ns += (em_now_ns() - p->t_start) - (after.stall_ns - p->before.stall_ns);
}

int em_token_step(em_session* s, const em_step* st, int32_t token, int want_logits) {
  const em_trunk_header* th = &s->th;
  int64_t H = th->hidden;
  int rc = EM_OK;
  switch (st->op) {
    case EM_OP_EMBED:
      em_matrix_row(&st->m[EM_M_EMBED], (uint32_t)token, s->x);
      if (st->scale != 1.0f) em_scale_vector(s->x, H, st->scale);
      break;
    case EM_OP_ATTENTION:
    case EM_OP_MLA_ATTENTION:
    case EM_OP_REL_ATTENTION:
      /* A layer with experts is predicted from the residual stream entering it, as its router
         will read it after the attention: measured on held-out text, 82% of the layer's experts
         named from there against 70% from the state one layer earlier (docs/BENCHMARKS.md §4).
         The reads overlap this attention (and the previous layer's experts finishing). */
      /* With prefetch_layers > 1 the layers after it within the token are guessed from the same
         state, nearest first: their reads queue behind the nearer layer's. */
      for (uint32_t a = 0; st->next_moe != EM_OPERAND_NONE && uses_hidden_state(s->predictor) && !s->batched && !rc &&
                           a < s->prefetch_layers && st->next_moe + a < s->prog.expert_layers; a++)
        rc = predict_and_prefetch(s, st->next_moe + a, s->x, NULL, 0,
                                  (st->next_moe + s->prog.expert_layers - 1) % s->prog.expert_layers, a + 1);
      if (!rc)
        rc = st->op == EM_OP_ATTENTION       ? attention_layer(s, st)
             : st->op == EM_OP_MLA_ATTENTION ? mla_attention_layer(s, st)
                                             : em_rel_attention(s, st);
      break;
    case EM_OP_CROSS_ATTENTION: rc = em_cross_attention(s, st); break;
    case EM_OP_DENSE_FFN: rc = em_dense_ffn(s, st); break;
    case EM_OP_MOE: /* one token is this pass of the expert capacity */
      memset(s->taken, 0, th->experts * sizeof *s->taken);
      rc = em_moe_layer(s, st);
      break;
    case EM_OP_FINAL:
      if (!want_logits) break;
      rc = em_apply_norm(s, st, s->x, s->xn);
      if (!rc)
        rc = st->bias ? em_session_matvec(s, s->k.lm_head_bias, EM_KERNEL_LM_HEAD_BIAS, &st->m[0], s->xn, (float*)st->bias,
                               s->logits)
                      : em_session_matvec(s, s->k.lm_head, EM_KERNEL_LM_HEAD, &st->m[0], s->xn, NULL, s->logits);
      if (!rc && st->scale != 1.0f) em_scale_vector(s->logits, th->vocab, st->scale);
      break;
  }
  return rc;
}

/* One token through the layer program. */
static int forward_token(em_session* s, int32_t token, int want_logits) {
  int rc = em_check_tokens(s, &token, 1);
  if (rc) return rc;
  em_pass pass;
  em_pass_begin(s, &pass);
  for (uint32_t i = s->prog.decoder_first; !rc && i < s->prog.n_steps; i++)
    rc = em_token_step(s, &s->prog.steps[i], token, want_logits);
  if (!rc) em_pass_end(s, &pass, 1);
  return rc;
}

/* One token through the layer program, its kernels paced to the emulated board (if any). */
static int forward(em_session* s, int32_t token, int want_logits) {
  em_pacer* previous = em_pacer_enter(&s->pacer);
  int rc = forward_token(s, token, want_logits);
  em_pacer_leave(previous);
  return rc;
}

int em_decode_step(em_session* s, int32_t token, float* logits) {
  int rc = forward(s, token, 1);
  if (!rc && logits) memcpy(logits, s->logits, s->th.vocab * sizeof(float));
  return rc;
}

int em_prefill(em_session* s, const int32_t* tokens, size_t n) {
  if (n == 0) {
    snprintf(s->err, ERR_LEN, "empty prompt");
    return EM_ERR_ARGUMENT;
  }
  em_pacer* previous = em_pacer_enter(&s->pacer);
  int rc;
  if (s->th.cross_layers) { /* the encoder over the input, then the decoder's start token */
    rc = em_run_encoder(s, tokens, n);
    if (!rc) rc = forward_token(s, s->th.decoder_start, 1);
  } else if (!(rc = em_check_tokens(s, tokens, n))) { /* checked whole: a bad prompt changes nothing */
    uint32_t pos = s->pos, traced = s->trace_tokens;
    for (size_t i = 0; !rc && i < n; i += s->prefill_tokens) {
      uint32_t batch = n - i < s->prefill_tokens ? (uint32_t)(n - i) : s->prefill_tokens;
      rc = batch > 1 ? em_prefill_batch(s, tokens + i, batch, i + batch == n) : forward_token(s, tokens[i], i + 1 == n);
    }
    if (rc) s->pos = pos, s->trace_tokens = traced; /* a failed read: the prompt can be fed again whole */
  }
  em_pacer_leave(previous);
  return rc;
}

void em_reset(em_session* s) {
  s->pos = 0;
  s->enc_len = 0;
  memset(s->prev_xn, 0, (size_t)s->th.layers * s->th.hidden * sizeof(float));
}

const float* em_logits(const em_session* s) { return s->logits; }

void em_route_trace(em_session* s, uint32_t* out, uint32_t max_tokens) {
  s->route_trace = out;
  s->trace_max = out ? max_tokens : 0;
  s->trace_tokens = 0;
}

uint32_t em_route_trace_tokens(const em_session* s) {
  return s->trace_tokens;
}

int em_stats_get(const em_session* s, em_stats* out) {
  em_loader_stats((em_loader*)&s->loader, out);
  out->board_wait_ns = s->pacer.added_ns;
  return EM_OK;
}

int em_model_info_get(const em_session* s, em_model_info* out) {
  out->vocab_size = s->th.vocab;
  out->hidden_size = s->th.hidden;
  out->num_layers = s->th.layers;
  out->num_expert_layers = s->prog.expert_layers;
  out->expert_lanes = s->expert_lanes;
  out->kv_cache_bits = s->kv.dtype.bits;
  out->num_experts = s->th.experts;
  out->top_k = s->th.top_k;
  out->max_seq = s->max_seq;
  out->bos_token_id = s->th.bos;
  out->eos_token_id = s->th.eos;
  out->predictor = s->predictor;
  out->eviction = s->eviction;
  return EM_OK;
}

const char* em_error(const em_session* s) { return s ? s->err : "no session"; }
