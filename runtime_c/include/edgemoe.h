/* EdgeMoE runtime: runs a compiled MoE artifact with the trunk resident in RAM and experts
 * read from storage into a fixed-size expert cache.
 *
 * Every function returning int returns EM_OK (0) or a negative em_status; the message of the
 * last failure is em_error(session) (or the err buffer of em_open). Nothing is allocated after
 * em_open. A session is used by one thread at a time. */
#ifndef EDGEMOE_H
#define EDGEMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  EM_OK = 0,
  EM_ERR_IO = -1,          /* a file could not be opened or read */
  EM_ERR_FORMAT = -2,      /* an artifact file is corrupted, truncated or of another version */
  EM_ERR_BUDGET = -3,      /* the memory budget is below the minimum */
  EM_ERR_ARGUMENT = -4,    /* a bad argument: token out of range, context full, ... */
  EM_ERR_KERNEL = -5,      /* a TVM-generated kernel reported an error or could not be loaded */
  EM_ERR_NOMEM = -6        /* the operating system refused an allocation */
} em_status;

typedef struct em_session em_session;

typedef enum {
  EM_EVICT_LRU = 0,     /* least recently used */
  EM_EVICT_FIFO = 1,    /* first loaded */
  EM_EVICT_EDGEMOE = 2, /* EdgeMoE: highest -f(i,j) / ((S - i + I) mod S) first */
  EM_EVICT_AUTO = 3     /* EdgeMoE where the artifact has expert frequencies, else LRU (the default) */
} em_eviction;

typedef enum {
  EM_PREDICT_NONE = 0,        /* no prefetching: every miss is read on demand */
  EM_PREDICT_PATH_TABLE = 1,  /* the paper's table: next-layer expert probabilities given this layer's experts */
  EM_PREDICT_NEXT_ROUTER = 2, /* the next layer's router applied to the current hidden state */
  EM_PREDICT_WRONG = 3,       /* the experts the next router ranks lowest: for testing that output never depends on it */
  EM_PREDICT_FITTED_ROUTER = 4, /* a linear map fitted on calibration text to the next router's logits, from the
                                   current state and the next layer's input at the previous token */
  EM_PREDICT_AUTO = 5           /* fitted-router where the artifact has its tables, else next-router (the default) */
} em_predictor;

typedef enum {
  EM_STORAGE_PREAD = 0,  /* pread(2); with direct_io, O_DIRECT so the page cache does not hide the storage */
  EM_STORAGE_MMAP = 1    /* copy out of a read-only mapping of the image */
} em_storage_kind;

typedef struct {
  const char* artifact_dir;  /* directory with trunk.bin, experts.bin, kernels.so */
  uint64_t memory_budget;    /* bytes for trunk + KV cache + buffers + expert cache; 0 = every expert resident.
                                It bounds what the session allocates (em_stats.memory_bytes); the process adds
                                its code, kernels.so, thread stacks and libc's own (docs/FORMAT.md, "Memory"). */
  uint32_t max_seq;          /* context length to allocate; 0 = the artifact's maximum */
  int verify_checksums;      /* check each expert record's CRC-32 when it is read */
  em_storage_kind storage;
  int direct_io;             /* EM_STORAGE_PREAD: open with O_DIRECT */
  double emulate_bandwidth;  /* > 0: make each read take at least latency + bytes / bandwidth (bytes/s) */
  double emulate_latency;    /* seconds per read request, with emulate_bandwidth */
  int loader_thread;         /* read experts on a loader thread (needed for prefetching) */
  em_predictor predictor;
  uint32_t prefetch_experts; /* experts to prefetch per layer; 0 = top-k */
  em_eviction eviction;
  uint32_t compute_threads;  /* threads running the kernels' parallel loops, the caller included; 0 = 1 */
  const char* inject_faults; /* testing: faults injected into expert reads, e.g. "eio@3,corrupt@7*2,delay@9:50"
                                (storage.h em_storage_inject_faults); NULL = none */
  uint32_t readers;          /* with loader_thread: reads in flight at once, one reader thread each (1..16;
                                0 = 1); more than one pays where the storage overlaps requests (UFS, NVMe) */
  /* > 0 (all three): emulate a board's compute. Each kernel call lasts at least the board's time for
     it, the larger of its bytes / emulate_memory_bandwidth (bytes/s) and its operations /
     emulate_int8_ops (integer-dot kernels) or / emulate_fp32_flops (the rest), operations/s with a
     multiply-accumulate counting two. 0 = run at this machine's speed. */
  double emulate_memory_bandwidth, emulate_int8_ops, emulate_fp32_flops;
  /* > 0: a confidence-driven number of experts to prefetch per layer: the predicted top-k, then each
     further expert whose predicted score is within this many logits of the k-th's (a path-table
     score: within this factor's natural log), up to prefetch_experts (0 = 2 · top-k). A flat prediction
     names more experts, a sure one top-k alone. 0 = exactly prefetch_experts. At most 100. */
  float prefetch_margin;
  /* 0 (default): records queued together that lie next to each other in experts.bin (a layer's
     misses, a prediction's experts: the compiler places often co-activated experts side by side)
     are read in one request, paying the storage's latency once. 1: one request per record. */
  int one_read_per_record;
  /* Layers with experts a hidden-state predictor (next-router, fitted-router) prefetches ahead, 1..4
     (0 = 1): at each layer it guesses the next layer's experts and, with 2, also the one after within
     the token, from the same residual stream, so its reads have two layers' compute to arrive in
     (storage whose latency is longer than a layer takes to compute: UFS, NVMe on a phone). The
     guess further ahead is less sure; the next layer's guess, made a layer later, adds what it missed. */
  uint32_t prefetch_layers;
  /* Fill the expert cache at open, in runs of adjacent records, with the experts the calibration
     text chose most (by record order without a routing profile), as many as it holds: the first
     tokens find them resident instead of each first use being a miss. em_open takes the reads' time. */
  int preload;
  /* Tokens of a prompt em_prefill runs through each layer together, 1..1024 (0 = 64; 1 on bare-metal
     builds, where RAM is scarcest): an expert several of them chose is read once for all of them,
     instead of again for each token that finds it evicted, and computed for them one after another.
     The logits are the same bits as fed token by token. 1: token by token, as em_decode_step feeds
     them, predicting and prefetching between layers (a study of decode-time prefetching over a text
     wants that: within a batch a layer's experts are known before they are needed). The buffers for a
     batch come out of memory_budget. */
  uint32_t prefill_tokens;
  /* Within a batch the matrices (experts, attention projections, shared expert, dense MLPs) take 4
     tokens per call of their batched kernels where the artifact has them (a hosted target's
     integer-dot kernels), each weight read and decoded once for them. 1: one token per call, as
     decoding (a comparison; the memory plan is the same). The logits are the same bits either way. */
  int single_token_kernels;
} em_params;

typedef struct {
  uint64_t tokens;           /* tokens run (prompt and generated) */
  uint64_t expert_hits;      /* expert uses served from the cache (within a prompt's batch, an expert
                                several of its tokens chose is one use) */
  uint64_t expert_misses;    /* expert uses that had to be read from storage */
  uint64_t bytes_read;       /* bytes read from the expert image */
  uint64_t read_ns;          /* time spent reading experts */
  uint64_t compute_ns;       /* time spent in kernels */
  uint64_t memory_bytes;     /* bytes the session allocated (<= budget) */
  uint64_t trunk_bytes;      /* of which resident trunk weights */
  uint64_t expert_cache_bytes; /* of which expert cache slots */
  uint64_t stall_ns;         /* time the decode loop waited for an expert to arrive */
  uint64_t prefetch_issued;  /* expert reads started ahead of need */
  uint64_t prefetch_used;    /* of which the expert was used before eviction */
  uint64_t prefetch_wasted;  /* of which the expert was evicted unused, or cancelled unread */
  uint64_t predicted;        /* experts a layer really selected, where a prediction was made */
  uint64_t predicted_hits;   /* of which the predictor had named */
  uint32_t cache_slots;      /* number of expert cache slots */
  uint32_t record_bytes;     /* bytes of the largest expert record (one read) */
  uint64_t read_retries;     /* expert reads that failed once and were read again */
  uint64_t records_read;     /* expert records read from the image (demand and prefetch) */
  uint64_t board_wait_ns;    /* of compute_ns, time added to kernels to last as long as on the emulated board */
  uint64_t predictions;      /* layer predictions made */
  uint64_t prefetch_named;   /* experts those predictions named (prefetch_margin: how many it chose) */
  uint64_t read_requests;    /* storage requests those records took (adjacent records coalesced into one) */
  uint64_t preloaded;        /* of records_read, those em_open read into the cache (em_params.preload) */
  uint64_t predicted_ahead;  /* as predicted, for guesses made two or more layers ahead (prefetch_layers > 1) */
  uint64_t predicted_ahead_hits; /* of which those guesses had named */
  uint64_t prefetch_declined; /* experts named, neither resident nor in flight, but not prefetched: the link to
                                 storage was lately busier than such guesses were used (em_loader_prefetch) */
  uint64_t batched_calls;    /* kernel calls that took EM_BATCH_ROWS of a prompt's tokens at once (batched
                                kernels; em_params.single_token_kernels) */
  uint64_t kv_cache_bytes;   /* of memory_bytes, the KV cache: keys and values of max_seq positions, float16 where
                                the artifact was compiled so (edgemoe-compile --kv-cache) */
} em_stats;

typedef struct {
  uint32_t vocab_size, hidden_size, num_layers, num_experts, top_k, max_seq;
  int32_t bos_token_id, eos_token_id;
  em_predictor predictor; /* in use, after resolving EM_PREDICT_AUTO (none without a loader thread) */
  em_eviction eviction;   /* in use, after resolving EM_EVICT_AUTO */
  uint32_t num_expert_layers; /* the layers with experts (dense layers have none): experts.bin's layers */
  uint32_t expert_lanes; /* a layer's chosen experts computed at once, one per compute thread (1: in turn) */
  uint32_t kv_cache_bits; /* bits of a KV-cache element: 32, or 16 (the artifact compiled with --kv-cache float16) */
} em_model_info;

void em_default_params(em_params* p);
int em_open(const em_params* p, em_session** out, char* err, size_t err_len);
void em_close(em_session* s);

/* The budget whose expert cache holds this fraction of the artifact's expert bytes, at max_seq
 * (0 = the artifact's maximum); never less than the minimum, which expert_fraction = 0 asks for:
 * trunk + KV cache + buffers + one layer's top-k experts (per record size class). */
int em_budget_bytes(const char* artifact_dir, uint32_t max_seq, double expert_fraction, uint64_t* out, char* err,
                    size_t err_len);

int em_model_info_get(const em_session* s, em_model_info* out);
/* Forget the context (KV cache); the expert cache and statistics stay. */
void em_reset(em_session* s);
/* Feed n tokens; on success the logits after the last one are in em_logits(s). On failure the context
 * is as before the call (the prompt can be fed again whole). An encoder-decoder
 * model (Switch Transformers) runs its encoder over the n tokens instead, as a new input (the
 * decoder starts again), and feeds the decoder its start token: em_logits(s) then holds the
 * first output token's logits, and em_decode_step continues the decoder. */
int em_prefill(em_session* s, const int32_t* tokens, size_t n);
/* Feed one token at the next position; logits[vocab_size] may be NULL. */
int em_decode_step(em_session* s, int32_t token, float* logits);
const float* em_logits(const em_session* s);
int em_stats_get(const em_session* s, em_stats* out);
const char* em_error(const em_session* s);
/* Records the experts each MoE layer selects from now on (for cache studies: Belady's bound): the
 * t-th token fed after this call, expert layer l (num_expert_layers of them), its top_k expert ids at
 * out[(t * num_expert_layers + l) * top_k ...],
 * for up to max_tokens tokens; the caller keeps out alive until the next call. out = NULL stops. */
void em_route_trace(em_session* s, uint32_t* out, uint32_t max_tokens);
/* Tokens recorded since em_route_trace (at most its max_tokens). */
uint32_t em_route_trace_tokens(const em_session* s);

/* ---- sampling ---------------------------------------------------------------------------- */

typedef struct {
  float temperature;        /* 0 = greedy (the most likely token); else logits / temperature */
  uint32_t top_k;           /* sample among the k most likely tokens; 0 = all */
  float top_p;              /* ... and among the fewest whose probability reaches top_p; 1 = all */
  float repetition_penalty; /* > 1 makes tokens of the context less likely (CTRL's rule); 1 = none */
  uint64_t seed;            /* the random sequence: the same seed, the same tokens */
} em_sampling;

typedef struct em_sampler em_sampler;

void em_default_sampling(em_sampling* p);
/* A sampler over vocab_size tokens (allocates its scratch once); EM_ERR_ARGUMENT names a bad parameter. */
int em_sampler_create(const em_sampling* p, uint32_t vocab_size, em_sampler** out, char* err, size_t err_len);
/* The next token given the logits (not modified) and the tokens of the context so far (for the
 * repetition penalty). */
int32_t em_sample(em_sampler* s, const float* logits, const int32_t* history, size_t n_history);
void em_sampler_free(em_sampler* s);

/* ---- text ------------------------------------------------------------------------------- */

/* The artifact's tokenizer.bin (byte-level BPE tokenizers; the compiler writes it where it can). */
typedef struct em_tokenizer em_tokenizer;

int em_tokenizer_open(const char* artifact_dir, em_tokenizer** out, char* err, size_t err_len);
/* UTF-8 text into at most cap token ids (*n_out of them); EM_ERR_ARGUMENT if they do not fit. */
int em_tokenize(const em_tokenizer* t, const char* text, int32_t* ids, size_t cap, size_t* n_out);
/* The bytes a token stands for (*bytes, not NUL-terminated; a text is its tokens' bytes in order). */
size_t em_token_text(const em_tokenizer* t, int32_t id, const char** bytes);
void em_tokenizer_close(em_tokenizer* t);

#ifdef __cplusplus
}
#endif
#endif
