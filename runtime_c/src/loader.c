#define _POSIX_C_SOURCE 200809L
#include "loader.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "crc32.h"

#ifdef EM_BAREMETAL
/* No threads: nothing to lock, and waiting for a load to finish is doing the reading. */
#define LOCK(l) ((void)0)
#define UNLOCK(l) ((void)0)
#define SIGNAL_WORK(l) ((void)0)
#define BROADCAST_DONE(l) ((void)0)
#define WAIT_DONE(l) complete_one(l)
static int complete_one(em_loader* l);
#else
#define LOCK(l) pthread_mutex_lock(&(l)->lock)
#define UNLOCK(l) pthread_mutex_unlock(&(l)->lock)
#define SIGNAL_WORK(l) pthread_cond_signal(&(l)->work)
#define BROADCAST_DONE(l) pthread_cond_broadcast(&(l)->done)
#define WAIT_DONE(l) (pthread_cond_wait(&(l)->done, &(l)->lock), 1)
static void* loader_main(void* arg);
#endif

size_t em_loader_meta_bytes(uint32_t n_slots, uint32_t n_records) {
  return (size_t)n_slots * sizeof(em_load_request) + (size_t)n_records * sizeof(int32_t);
}

int em_loader_init(em_loader* l, em_storage* storage, em_expert_cache* cache, const em_record* records,
                   uint32_t experts_per_layer, int verify, int threaded, int coalesce, em_stats* stats, void* meta,
                   char* err, size_t n) {
  memset(l, 0, sizeof *l);
  l->storage = storage;
  l->cache = cache;
  l->records = records;
  l->experts_per_layer = experts_per_layer;
  l->verify = verify;
  l->threaded = threaded;
  l->coalesce = coalesce;
  l->stats = stats;
  l->queue = (em_load_request*)meta;
  l->q_cap = cache->n_slots;
  l->failed = (int32_t*)(l->queue + l->q_cap);
  for (uint32_t i = 0; i < cache->n_records; i++) l->failed[i] = 0;
  if (threaded > EM_MAX_READERS) {
    snprintf(err, n, "%d reader threads asked for, at most %d", threaded, EM_MAX_READERS);
    return EM_ERR_ARGUMENT;
  }
#ifdef EM_BAREMETAL
  (void)err, (void)n;
  l->threaded = threaded > 0; /* reads progressed between kernels; one in flight */
  if (l->threaded && (!storage->start || !storage->poll)) l->threaded = 0;
  return EM_OK;
#else
  pthread_mutex_init(&l->lock, NULL);
  pthread_cond_init(&l->work, NULL);
  pthread_cond_init(&l->done, NULL);
  for (int i = 0; i < threaded; i++) {
    int rc = pthread_create(&l->thread[i], NULL, loader_main, l);
    if (rc) {
      snprintf(err, n, "cannot start a loader thread: %s", strerror(rc));
      return EM_ERR_NOMEM;
    }
    l->started = i + 1;
  }
  return EM_OK;
#endif
}

void em_loader_stop(em_loader* l) {
#ifdef EM_BAREMETAL
  while (l->in_flight) em_loader_poll(l); /* the transfer writes into a slot: let it end first */
#else
  if (l->started) {
    LOCK(l);
    l->stop = 1;
    pthread_cond_broadcast(&l->work);
    UNLOCK(l);
    for (int i = 0; i < l->started; i++) pthread_join(l->thread[i], NULL);
    l->started = 0;
  }
  pthread_cond_destroy(&l->work);
  pthread_cond_destroy(&l->done);
  pthread_mutex_destroy(&l->lock);
#endif
}

/* A read started or ended on the link (lock held): the link is busy while any read is in flight. */
static void link_started(em_loader* l) {
  if (l->link_reads++ == 0) l->busy_since = em_now_ns();
}

static void link_ended(em_loader* l) {
  if (--l->link_reads == 0) l->busy_ns += em_now_ns() - l->busy_since;
}

/* The share of recent time the link was busy (lock held): busy and elapsed time since the last call
 * added to sums that lose an eighth at each call, so the last few layers' decisions weigh most. */
static double link_busy_share(em_loader* l) {
  uint64_t now = em_now_ns(), busy = l->busy_ns + (l->link_reads ? now - l->busy_since : 0);
  if (l->sampled_at) {
    l->recent_busy = l->recent_busy * 0.875 + (double)(busy - l->sampled_busy);
    l->recent_time = l->recent_time * 0.875 + (double)(now - l->sampled_at);
  }
  l->sampled_at = now;
  l->sampled_busy = busy;
  return l->recent_time > 0.0 ? l->recent_busy / l->recent_time : 0.0;
}

/* Reads and checks one record into its slot, one request. */
static int read_once(em_loader* l, int32_t record, int32_t slot) {
  const em_record* r = &l->records[record];
  uint8_t* dst = em_cache_slot(l->cache, slot);
  int rc = l->storage->read(l->storage, dst, r->length, r->offset);
  if (!rc && l->verify && em_crc32c(0, dst, r->length) != r->crc) rc = EM_LOAD_CHECKSUM;
  return rc;
}

/* Records the outcome of a read, under the lock; `requests`: the storage requests it took. */
static void finish_load(em_loader* l, int32_t record, int32_t slot, int rc, uint64_t ns, int retried,
                        uint32_t requests) {
  l->stats->read_ns += ns;
  l->stats->read_retries += (uint64_t)retried;
  l->stats->read_requests += requests;
  if (rc == 0) {
    l->stats->bytes_read += l->records[record].length;
    l->stats->records_read++;
    em_cache_ready(l->cache, slot);
  } else {
    l->failed[record] = rc;
    em_cache_release(l->cache, slot);
  }
  BROADCAST_DONE(l);
}

/* Reads a run of adjacent records (one or more) in one request, then checks each; runs without the
 * lock (the slots are LOADING: only the reader touches their memory). A record that failed (the
 * request, or its checksum) is read once more on its own: storage that failed once (an I/O error, an
 * interrupted call, a bit flipped on the way) often reads right the second time; a fault that
 * persists fails both. */
static void read_run(em_loader* l, const em_load_request* run, uint32_t n, int* rc, int* retried, uint64_t* ns) {
  em_span spans[EM_MAX_SPANS];
  uint64_t t0 = em_now_ns();
  for (uint32_t i = 0; i < n; i++) spans[i] = (em_span){em_cache_slot(l->cache, run[i].slot), l->records[run[i].record].length};
  int all = em_storage_readv(l->storage, spans, n, l->records[run[0].record].offset);
  for (uint32_t i = 0; i < n; i++) {
    const em_record* r = &l->records[run[i].record];
    rc[i] = all ? all : l->verify && em_crc32c(0, (const uint8_t*)spans[i].dst, r->length) != r->crc ? EM_LOAD_CHECKSUM : 0;
    retried[i] = rc[i] != 0;
    if (rc[i]) rc[i] = read_once(l, run[i].record, run[i].slot);
  }
  *ns = em_now_ns() - t0;
}

#ifdef EM_BAREMETAL
/* Starts the read of the request at the head of the queue; 0 if there is none. */
static int start_next(em_loader* l) {
  if (l->q_len == 0) return 0;
  l->reading = l->queue[l->q_head];
  l->q_head = (l->q_head + 1) % l->q_cap;
  l->q_len--;
  l->in_flight = 1;
  l->attempt = 0;
  l->read_started = em_now_ns();
  link_started(l);
  const em_record* r = &l->records[l->reading.record];
  int rc = l->storage->start(l->storage, em_cache_slot(l->cache, l->reading.slot), r->length, r->offset);
  if (rc < 0) l->in_flight = rc; /* failed at once: the next poll reports it */
  return 1;
}

/* The read in flight ended with rc (0: the bytes are in the slot): check it, read once more after
 * a failure (as read_run does), else record the outcome. */
static void read_ended(em_loader* l, int rc) {
  const em_record* r = &l->records[l->reading.record];
  uint8_t* dst = em_cache_slot(l->cache, l->reading.slot);
  if (!rc && l->verify && em_crc32c(0, dst, r->length) != r->crc) rc = EM_LOAD_CHECKSUM;
  if (rc && l->attempt == 0) {
    l->attempt = 1;
    int again = l->storage->start(l->storage, dst, r->length, r->offset);
    l->in_flight = again < 0 ? again : 1;
    return;
  }
  l->in_flight = 0;
  link_ended(l);
  finish_load(l, l->reading.record, l->reading.slot, rc, em_now_ns() - l->read_started, l->attempt,
              1u + (uint32_t)l->attempt);
}

void em_loader_poll(em_loader* l) {
  if (!l->threaded || (!l->in_flight && !start_next(l))) return;
  if (l->in_flight < 0) { /* start() refused it */
    read_ended(l, l->in_flight);
    return;
  }
  int rc = l->storage->poll(l->storage);
  if (rc) read_ended(l, rc > 0 ? 0 : rc);
}

/* Drives the reads until one load has finished; 0 if none was queued or in flight. */
static int complete_one(em_loader* l) {
  if (!l->in_flight && !start_next(l)) return 0;
  while (l->in_flight) em_loader_poll(l);
  return 1;
}
#else
void em_loader_poll(em_loader* l) { (void)l; /* reader threads read */ }

/* Takes the request at the head of the queue and, coalescing, every queued one whose record lies
 * right before or after those taken in the image, as one run of records in file order. Lock held. */
static uint32_t take_run(em_loader* l, em_load_request* run) {
  run[0] = l->queue[l->q_head];
  l->q_head = (l->q_head + 1) % l->q_cap;
  l->q_len--;
  uint32_t n = 1;
  uint64_t lo = l->records[run[0].record].offset, hi = lo + l->records[run[0].record].length;
  for (uint32_t i = 0; l->coalesce && i < l->q_len && n < EM_MAX_SPANS; i++) {
    em_load_request req = l->queue[(l->q_head + i) % l->q_cap];
    const em_record* r = &l->records[req.record];
    int after = r->offset == hi, before = r->offset + r->length == lo;
    if (!after && !before) continue;
    for (uint32_t j = i; j + 1 < l->q_len; j++) /* out of the queue, the order of the rest kept */
      l->queue[(l->q_head + j) % l->q_cap] = l->queue[(l->q_head + j + 1) % l->q_cap];
    l->q_len--;
    if (after) {
      run[n++] = req;
      hi += r->length;
    } else {
      memmove(run + 1, run, n++ * sizeof *run);
      run[0] = req;
      lo = r->offset;
    }
    i = (uint32_t)-1; /* the run grew: a request passed over may now adjoin it */
  }
  return n;
}

static void* loader_main(void* arg) {
  em_loader* l = (em_loader*)arg;
  LOCK(l);
  for (;;) {
    while (!l->stop && l->q_len == 0) pthread_cond_wait(&l->work, &l->lock);
    if (l->stop) break;
    em_load_request run[EM_MAX_SPANS];
    int rc[EM_MAX_SPANS], retried[EM_MAX_SPANS];
    uint32_t n = take_run(l, run);
    link_started(l);
    UNLOCK(l);
    uint64_t ns;
    read_run(l, run, n, rc, retried, &ns);
    LOCK(l);
    link_ended(l);
    for (uint32_t i = 0; i < n; i++) /* the run's request and time counted once, with its first record */
      finish_load(l, run[i].record, run[i].slot, rc[i], i ? 0 : ns, retried[i], (i == 0) + (uint32_t)retried[i]);
  }
  UNLOCK(l);
  return NULL;
}
#endif

/* Queues a load; demand loads go ahead of prefetches. Called with the lock held; the queue never
 * overflows since every entry owns a distinct LOADING slot. */
static void enqueue(em_loader* l, int32_t record, int32_t slot, int demand) {
  em_load_request req = {record, slot, (uint8_t)demand};
  if (demand) {
    l->q_head = (l->q_head + l->q_cap - 1) % l->q_cap;
    l->queue[l->q_head] = req;
  } else {
    l->queue[(l->q_head + l->q_len) % l->q_cap] = req;
  }
  l->q_len++;
  SIGNAL_WORK(l);
}

static void format_failure(const em_loader* l, uint32_t record, int rc, char* err, size_t n) {
  const em_record* r = &l->records[record];
  if (rc == EM_LOAD_CHECKSUM)
    snprintf(err, n,
             "expert record %u (layer %u, expert %u) failed its checksum: experts.bin is corrupted; "
             "re-copy or recompile the artifact", record, r->layer, r->expert);
  else
    snprintf(err, n, "reading expert record %u (layer %u, expert %u, %llu bytes at offset %llu) failed twice: %s",
             record, r->layer, r->expert, (unsigned long long)r->length, (unsigned long long)r->offset,
             em_read_error(rc));
}

/* Claims a slot for a demand load of `record`, waiting while every slot is loading. Lock held. */
static int32_t claim_for_demand(em_loader* l, uint32_t record, uint32_t layer) {
  for (;;) {
    int wasted;
    int32_t slot = em_cache_claim(l->cache, record, layer, 0, &wasted);
    if (slot >= 0) {
      l->stats->prefetch_wasted += (uint64_t)wasted;
      return slot;
    }
    if (!l->threaded) return -1; /* nothing in flight can free a slot */
    uint64_t t0 = em_now_ns();
    int waited = WAIT_DONE(l);
    l->stats->stall_ns += em_now_ns() - t0;
    if (!waited) return -1;
  }
}

/* Moves a queued prefetch of `record` to the front of the queue: the decode loop needs it now. */
static void promote(em_loader* l, uint32_t record) {
  for (uint32_t i = 0; i < l->q_len; i++) {
    uint32_t at = (l->q_head + i) % l->q_cap;
    if (l->queue[at].record != (int32_t)record) continue;
    em_load_request req = l->queue[at];
    for (uint32_t j = i; j > 0; j--)
      l->queue[(l->q_head + j) % l->q_cap] = l->queue[(l->q_head + j - 1) % l->q_cap];
    req.demand = 1;
    l->queue[l->q_head] = req;
    return;
  }
}

/* Starts a demand load of a record that is not resident. Lock held; without a loader thread the
 * read happens here. */
static int demand_load(em_loader* l, uint32_t record, uint32_t layer, char* err, size_t errn) {
  int32_t slot = claim_for_demand(l, record, layer);
  if (slot < 0) {
    snprintf(err, errn, "no expert cache slot can be freed for record %u (every slot is pinned)", record);
    return EM_ERR_BUDGET;
  }
  l->cache->slot[slot].pins = 1;
  l->failed[record] = 0;
  if (l->threaded) {
    enqueue(l, (int32_t)record, slot, 1);
    return EM_OK;
  }
  em_load_request one = {(int32_t)record, slot, 1};
  uint64_t ns;
  int rc, retried;
  UNLOCK(l);
  read_run(l, &one, 1, &rc, &retried, &ns);
  LOCK(l);
  l->stats->stall_ns += ns;
  finish_load(l, (int32_t)record, slot, rc, ns, retried, 1u + (uint32_t)retried);
  if (rc) format_failure(l, record, rc, err, errn);
  return rc ? (rc == EM_LOAD_CHECKSUM ? EM_ERR_FORMAT : EM_ERR_IO) : EM_OK;
}

/* Drops queued prefetches of `layer`'s experts that its routing did not choose: once a layer has
 * routed they can only be useful a whole pass later, and reading them now would hold up the reads
 * that the next layers wait for. Their slots are freed. Lock held. */
static void cancel_stale_prefetches(em_loader* l, const uint32_t* records, uint32_t n, uint32_t layer) {
  uint32_t kept = 0;
  for (uint32_t i = 0; i < l->q_len; i++) {
    em_load_request req = l->queue[(l->q_head + i) % l->q_cap];
    int stale = !req.demand && l->records[req.record].layer == layer;
    for (uint32_t k = 0; stale && k < n; k++)
      if ((uint32_t)req.record == records[k]) stale = 0;
    if (stale) {
      em_cache_release(l->cache, req.slot);
      l->stats->prefetch_wasted++;
    } else {
      l->queue[(l->q_head + kept++) % l->q_cap] = req;
    }
  }
  l->q_len = kept;
}

int em_loader_need(em_loader* l, const uint32_t* records, uint32_t n, uint32_t layer, char* err, size_t errn) {
  int rc = EM_OK;
  uint32_t i;
  LOCK(l);
  cancel_stale_prefetches(l, records, n, layer);
  for (i = 0; i < n && rc == EM_OK; i++) {
    int32_t slot = em_cache_lookup(l->cache, records[i]);
    if (slot >= 0) { /* resident, or a prefetch of it is in flight: the predictor was right */
      em_slot* s = &l->cache->slot[slot];
      l->stats->expert_hits++;
      l->stats->prefetch_used += s->prefetched;
      em_cache_touch(l->cache, slot);
      s->pins++;
      if (s->state == EM_SLOT_LOADING) promote(l, records[i]);
    } else {
      l->stats->expert_misses++;
      rc = demand_load(l, records[i], layer, err, errn);
    }
  }
  /* a failure leaves nothing pinned (the failed record's slot was freed): the session stays usable */
  for (uint32_t j = 0; rc != EM_OK && j + 1 < i; j++) {
    int32_t slot = em_cache_lookup(l->cache, records[j]);
    if (slot >= 0 && l->cache->slot[slot].pins) l->cache->slot[slot].pins--;
  }
  UNLOCK(l);
  return rc;
}

void em_loader_routed(em_loader* l, const uint32_t* records, uint32_t n, uint32_t layer) {
  LOCK(l);
  em_cache_routed(l->cache, layer, records, n);
  UNLOCK(l);
}

int em_loader_wait(em_loader* l, uint32_t record, uint32_t layer, uint8_t** data, char* err, size_t errn) {
  int rc = EM_OK, retried = 0;
  uint64_t t0 = 0;
  LOCK(l);
  for (;;) {
    int32_t slot = em_cache_lookup(l->cache, record);
    if (slot >= 0 && l->cache->slot[slot].state == EM_SLOT_READY) {
      *data = em_cache_slot(l->cache, slot);
      break;
    }
    if (slot < 0) { /* its load failed (and released the slot) */
      int why = l->failed[record];
      if (retried) {
        format_failure(l, record, why, err, errn);
        rc = why == EM_LOAD_CHECKSUM ? EM_ERR_FORMAT : EM_ERR_IO;
        break;
      }
      retried = 1; /* the failed read may have been a prefetch: read it once more on demand */
      rc = demand_load(l, record, layer, err, errn);
      if (rc) break;
      continue;
    }
    if (!t0) t0 = em_now_ns();
    (void)WAIT_DONE(l);
  }
  if (t0) l->stats->stall_ns += em_now_ns() - t0;
  UNLOCK(l);
  return rc;
}

int em_loader_ready(em_loader* l, uint32_t record) {
  LOCK(l);
  int32_t slot = em_cache_lookup(l->cache, record);
  int ready = slot >= 0 && l->cache->slot[slot].state == EM_SLOT_READY;
  UNLOCK(l);
  return ready;
}

void em_loader_release(em_loader* l, uint32_t record) {
  LOCK(l);
  int32_t slot = em_cache_lookup(l->cache, record);
  if (slot >= 0 && l->cache->slot[slot].pins) l->cache->slot[slot].pins--;
  UNLOCK(l);
}

void em_loader_prefetch(em_loader* l, const uint32_t* records, uint32_t n, uint32_t layer, double chance,
                        double worth, uint8_t* absent) {
  LOCK(l);
  uint32_t missing = 0;
  for (uint32_t i = 0; i < n; i++) missing += absent[i] = em_cache_lookup(l->cache, records[i]) < 0;
  /* A wasted prefetch costs the link its read, which the reads a layer waits for may then queue
     behind; a used one saves a wait only where the link had time to spare. With the link busy a
     share u of the time, prefetching pays when the share q of such guesses used has
     q (1 - u) > (1 - q) u: q > u. */
  if (!l->threaded || !missing || worth <= link_busy_share(l)) {
    if (l->threaded) l->stats->prefetch_declined += missing;
    UNLOCK(l);
    return;
  }
  for (uint32_t i = 0; i < n; i++) {
    if (!absent[i]) continue;
    int wasted;
    int32_t slot = em_cache_claim_prefetch(l->cache, records[i], layer, chance, &wasted);
    if (slot < 0) break;
    l->stats->prefetch_wasted += (uint64_t)wasted;
    l->stats->prefetch_issued++;
    enqueue(l, (int32_t)records[i], slot, 0);
  }
  UNLOCK(l);
}

typedef struct {
  uint64_t offset;
  em_load_request req;
} placed_request;

static int by_offset(const void* a, const void* b) {
  uint64_t x = ((const placed_request*)a)->offset, y = ((const placed_request*)b)->offset;
  return (x > y) - (x < y);
}

uint32_t em_loader_preload(em_loader* l, const uint32_t* records, uint32_t n) {
  placed_request* claimed = (placed_request*)malloc((size_t)n * sizeof *claimed);
  uint32_t count = 0, loaded = 0;
  if (!claimed) return 0;
  LOCK(l);
  for (uint32_t i = 0; i < n; i++) {
    int wasted;
    if (em_cache_lookup(l->cache, records[i]) >= 0 || !em_cache_has_free(l->cache, records[i])) continue;
    int32_t slot = em_cache_claim(l->cache, records[i], 0, 0, &wasted); /* a free slot: nothing evicted */
    claimed[count++] = (placed_request){l->records[records[i]].offset, {(int32_t)records[i], slot, 0}};
  }
  qsort(claimed, count, sizeof *claimed, by_offset); /* file order, then runs of adjacent records */
  for (uint32_t at = 0; at < count;) {
    em_load_request run[EM_MAX_SPANS];
    uint32_t len = 0;
    do {
      run[len] = claimed[at + len].req;
      len++;
    } while (at + len < count && len < EM_MAX_SPANS &&
             claimed[at + len].offset == claimed[at + len - 1].offset + l->records[run[len - 1].record].length);
    int rc[EM_MAX_SPANS], retried[EM_MAX_SPANS];
    uint64_t ns;
    UNLOCK(l);
    read_run(l, run, len, rc, retried, &ns);
    LOCK(l);
    for (uint32_t i = 0; i < len; i++) {
      finish_load(l, run[i].record, run[i].slot, rc[i], i ? 0 : ns, retried[i], (i == 0) + (uint32_t)retried[i]);
      if (rc[i]) l->failed[run[i].record] = 0; /* not asked for yet: a demand read will tell */
      loaded += rc[i] == 0;
    }
    at += len;
  }
  UNLOCK(l);
  free(claimed);
  return loaded;
}

int em_loader_holds_all(em_loader* l) {
  LOCK(l);
  int all = l->cache->n_ready == l->cache->n_records;
  UNLOCK(l);
  return all;
}

void em_loader_stats(em_loader* l, em_stats* out) {
  LOCK(l);
  *out = *l->stats;
  UNLOCK(l);
}
