/* Getting expert records into cache slots: on demand for the expert the decode loop needs now,
 * and ahead of need for the experts a predictor names, on reader threads that read while the
 * decode thread computes — several reads in flight where the storage overlaps requests (UFS, NVMe
 * command queues), and records queued together that lie side by side in the image read in one
 * request. All cache bookkeeping happens under the loader's lock.
 * Bare-metal (EM_BAREMETAL) there are no threads: one read is in flight at a time, started on the
 * storage and progressed by em_loader_poll, which the decode loop calls between kernels (a DMA
 * transfer completed in the background); waiting for a record drives the reads to it. */
#ifndef EM_LOADER_H
#define EM_LOADER_H

#ifndef EM_BAREMETAL
#include <pthread.h>
#endif
#include <stddef.h>
#include <stdint.h>

#include "artifact.h"
#include "edgemoe.h"
#include "expert_cache.h"
#include "storage.h"

#define EM_MAX_READERS 16 /* reads in flight at once, one reader thread each */

typedef struct {
  int32_t record, slot;
  uint8_t demand; /* 1: the decode loop is waiting for it; 0: a prefetch */
} em_load_request;

typedef struct {
  em_storage* storage;
  em_expert_cache* cache;
  const em_record* records;
  uint32_t experts_per_layer;
  int verify;
  int threaded; /* reader threads (0: reads happen on the decode thread) */
  int coalesce; /* a reader takes queued records adjacent to the one it reads into the same request */
  em_stats* stats; /* counters shared with the session, updated under the lock */

#ifdef EM_BAREMETAL
  em_load_request reading; /* the read in flight, if `in_flight` */
  int in_flight, attempt;
  uint64_t read_started;
#else
  pthread_t thread[EM_MAX_READERS];
  pthread_mutex_t lock;
  pthread_cond_t work; /* the queue got a request, or stop */
  pthread_cond_t done; /* a load finished (ready or failed) */
#endif
  int started, stop; /* started: reader threads running */
  em_load_request* queue; /* ring buffer of n_slots requests: at most one in flight per slot */
  uint32_t q_head, q_len, q_cap;
  int32_t* failed; /* [records]: error of the record's last failed load, 0 = none */
  /* How busy the link to storage has been: reads in flight now and since when one has been, the
     busy time so far, and decayed sums of busy and elapsed time up to the last prefetch decision. */
  uint32_t link_reads;
  uint64_t busy_since, busy_ns, sampled_at, sampled_busy;
  double recent_busy, recent_time;
} em_loader;

enum { EM_LOAD_CHECKSUM = -100000 }; /* failure code: the record read back did not match its CRC-32 */

/* Bytes of bookkeeping em_loader_init places in `meta`. */
size_t em_loader_meta_bytes(uint32_t n_slots, uint32_t n_records);
int em_loader_init(em_loader* l, em_storage* storage, em_expert_cache* cache, const em_record* records,
                   uint32_t experts_per_layer, int verify, int threaded, int coalesce, em_stats* stats, void* meta,
                   char* err, size_t n);
void em_loader_stop(em_loader* l);

/* Declares that the decode loop needs these records (a layer's selected experts) now: each is
 * pinned so nothing evicts it; one not resident is claimed a slot and read on demand (queued ahead
 * of prefetches on the loader thread, or read right here without one). `layer` is the layer being
 * computed, for the eviction policy. On failure none of them is left pinned. */
int em_loader_need(em_loader* l, const uint32_t* records, uint32_t n, uint32_t layer, char* err, size_t errn);
/* The experts `layer` routed one token to (em_cache_routed: EdgeMoE eviction's estimate of use). */
void em_loader_routed(em_loader* l, const uint32_t* records, uint32_t n, uint32_t layer);
/* Waits until a needed record is resident and gives its data. */
int em_loader_wait(em_loader* l, uint32_t record, uint32_t layer, uint8_t** data, char* err, size_t errn);
/* 1 if the record is resident and read (em_loader_wait would not block), else 0. */
int em_loader_ready(em_loader* l, uint32_t record);
/* Unpins a needed record once computed with. */
void em_loader_release(em_loader* l, uint32_t record);
/* Starts loading these records (most wanted first) into slots the policy can spare; skips any that
 * are resident or in flight and stops when no slot can be claimed (em_cache_claim_prefetch, each
 * named with this chance of use). absent[i] is set where records[i] was neither resident nor in flight
 * (what a prefetch would read). `worth`: the share of such records that were used; while the link
 * to storage has lately been busy a larger share of the time it reads none of them
 * (em_stats.prefetch_declined counts them). No-op without a loader thread but for `absent`. */
void em_loader_prefetch(em_loader* l, const uint32_t* records, uint32_t n, uint32_t layer, double chance,
                        double worth, uint8_t* absent);
/* Fills free slots with these records, most wanted first, as far as their size classes have free
 * slots (nothing is evicted), reading them here in runs of adjacent records. A record whose read
 * fails leaves its slot free: a later demand read reports the fault. Returns the records loaded. */
uint32_t em_loader_preload(em_loader* l, const uint32_t* records, uint32_t n);
/* Bare-metal: progresses the read in flight (or starts the next queued one); called between
 * kernels. A no-op where reader threads do the reading. */
void em_loader_poll(em_loader* l);
/* 1 once every record is resident and read: nothing can miss or be evicted from then on. */
int em_loader_holds_all(em_loader* l);
/* A copy of the shared counters. */
void em_loader_stats(em_loader* l, em_stats* out);

#endif
