/* Text to token ids and back for byte-level BPE tokenizers (tokenizer.bin, written by
 * compiler/tokenizer_file.py): added tokens matched literally, GPT-2's pre-tokenizer split, then
 * the merges applied lowest rank first within each piece, as `tokenizers` does. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "artifact.h"
#include "crc32.h"
#include "edgemoe.h"
#include "generated/unicode_classes.h"

#define HEADER_BYTES 40
#define MAX_TOKENS (1u << 24)

struct em_tokenizer {
  uint32_t n_tokens, n_merges, n_added;
  const uint32_t* span;   /* [n_tokens][2]: offset, length in blob */
  const uint32_t* single; /* [256]: the token of each byte */
  const uint32_t* merges; /* [n_merges][3]: left, right, merged, by rank */
  const uint32_t* added;  /* [n_added] */
  const uint8_t* blob;
  uint32_t* table;        /* open-addressing hash: pair → merge rank + 1 (0 = empty) */
  uint32_t table_mask;
  uint8_t* file;
};

static uint32_t rd32(const uint8_t* p) { return (uint32_t)p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

static uint32_t pair_hash(uint32_t a, uint32_t b) {
  uint64_t h = ((uint64_t)a << 32 | b) * 0x9E3779B97F4A7C15ull;
  return (uint32_t)(h >> 32);
}

/* Rank of the merge of tokens (a, b), or UINT32_MAX. */
static uint32_t merge_rank(const em_tokenizer* t, uint32_t a, uint32_t b) {
  for (uint32_t i = pair_hash(a, b) & t->table_mask;; i = (i + 1) & t->table_mask) {
    uint32_t r = t->table[i];
    if (!r) return UINT32_MAX;
    const uint32_t* m = t->merges + 3 * (r - 1);
    if (m[0] == a && m[1] == b) return r - 1;
  }
}

static int bad(char* err, size_t n, const char* path, const char* why) {
  snprintf(err, n, "%s: %s; recompile the artifact", path, why);
  return EM_ERR_FORMAT;
}

int em_tokenizer_open(const char* artifact_dir, em_tokenizer** out, char* err, size_t n) {
  char path[1100];
  *out = NULL;
  snprintf(path, sizeof path, "%s/tokenizer.bin", artifact_dir);
  int fd = em_open_file(path, err, n);
  if (fd < 0) {
    snprintf(err, n, "%s: no tokenizer the C runtime reads (the compiler writes one for byte-level BPE "
             "tokenizers; see the manifest's \"tokenizer\"); give token ids instead", path);
    return EM_ERR_IO;
  }
  uint8_t h[HEADER_BYTES];
  em_tokenizer* t = (em_tokenizer*)calloc(1, sizeof *t);
  int rc = t ? EM_OK : EM_ERR_NOMEM;
  if (!rc && em_pread_all(fd, h, HEADER_BYTES, 0) != 0) rc = bad(err, n, path, "truncated header");
  if (!rc && (memcmp(h, "EMOTOKEN", 8) || rd32(h + 8) != 1)) rc = bad(err, n, path, "not a version-1 tokenizer file");
  if (!rc && em_crc32(0, h, HEADER_BYTES - 4) != rd32(h + HEADER_BYTES - 4)) rc = bad(err, n, path, "header checksum mismatch");
  uint64_t body = 0;
  if (!rc) {
    t->n_tokens = rd32(h + 12), t->n_merges = rd32(h + 16), t->n_added = rd32(h + 20);
    uint64_t blob = rd32(h + 24);
    if (!t->n_tokens || t->n_tokens > MAX_TOKENS || t->n_merges > MAX_TOKENS || t->n_added > t->n_tokens)
      rc = bad(err, n, path, "counts beyond its limits");
    body = 8ull * t->n_tokens + 4 * 256 + 12ull * t->n_merges + 4ull * t->n_added + blob;
  }
  if (!rc && !(t->file = (uint8_t*)malloc(body ? body : 1))) rc = EM_ERR_NOMEM;
  if (!rc && em_pread_all(fd, t->file, body, HEADER_BYTES) != 0) rc = bad(err, n, path, "truncated");
  if (!rc && em_crc32(0, t->file, body) != rd32(h + 32)) rc = bad(err, n, path, "checksum mismatch (corrupted)");
  close(fd);
  if (!rc) {
    t->span = (const uint32_t*)t->file;
    t->single = t->span + 2 * (uint64_t)t->n_tokens;
    t->merges = t->single + 256;
    t->added = t->merges + 3 * (uint64_t)t->n_merges;
    t->blob = (const uint8_t*)(t->added + t->n_added);
    uint64_t blob = rd32(h + 24);
    for (uint32_t i = 0; !rc && i < t->n_tokens; i++)
      if (t->span[2 * i] > blob || t->span[2 * i + 1] > blob - t->span[2 * i]) rc = bad(err, n, path, "a token outside its blob");
    for (uint32_t i = 0; !rc && i < 256 + 3 * t->n_merges + t->n_added; i++)
      if (t->single[i] >= t->n_tokens) rc = bad(err, n, path, "a token id beyond the vocabulary");
  }
  if (!rc) {
    uint32_t size = 2;
    while (size < 2 * t->n_merges + 2) size *= 2;
    t->table_mask = size - 1;
    if (!(t->table = (uint32_t*)calloc(size, sizeof(uint32_t)))) rc = EM_ERR_NOMEM;
    for (uint32_t r = 0; !rc && r < t->n_merges; r++) {
      const uint32_t* m = t->merges + 3 * r;
      if (merge_rank(t, m[0], m[1]) != UINT32_MAX) continue; /* a repeated merge: the first rank wins */
      uint32_t i = pair_hash(m[0], m[1]) & t->table_mask;
      while (t->table[i]) i = (i + 1) & t->table_mask;
      t->table[i] = r + 1;
    }
  }
  if (rc == EM_ERR_NOMEM) snprintf(err, n, "%s: out of memory", path);
  if (rc) {
    em_tokenizer_close(t);
    return rc;
  }
  *out = t;
  return EM_OK;
}

void em_tokenizer_close(em_tokenizer* t) {
  if (!t) return;
  free(t->table);
  free(t->file);
  free(t);
}

size_t em_token_text(const em_tokenizer* t, int32_t id, const char** bytes) {
  if (id < 0 || (uint32_t)id >= t->n_tokens) return *bytes = "", 0;
  *bytes = (const char*)t->blob + t->span[2 * id];
  return t->span[2 * id + 1];
}

/* ---- GPT-2's pre-tokenizer: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */

static int in_ranges(uint32_t cp, const uint32_t (*r)[2], size_t n) {
  size_t lo = 0, hi = n;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (cp < r[mid][0]) hi = mid;
    else if (cp > r[mid][1]) lo = mid + 1;
    else return 1;
  }
  return 0;
}

enum { LETTER, NUMBER, SPACE, OTHER };

/* The code point at s[i] (malformed UTF-8: one byte, as OTHER) and its length. */
static uint32_t decode(const uint8_t* s, size_t n, size_t i, size_t* len) {
  uint8_t c = s[i];
  int k = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
  if (k < 0 || i + k >= n + (k ? 0 : 1)) return *len = 1, 0xFFFD;
  uint32_t cp = k ? c & (0x3F >> k) : c;
  for (int j = 1; j <= k; j++) {
    if ((s[i + j] & 0xC0) != 0x80) return *len = 1, 0xFFFD;
    cp = cp << 6 | (s[i + j] & 0x3F);
  }
  *len = (size_t)k + 1;
  return cp;
}

static int class_at(const uint8_t* s, size_t n, size_t i, size_t* len) {
  uint32_t cp = decode(s, n, i, len);
  if (in_ranges(cp, EM_UNICODE_WHITE_SPACE, EM_UNICODE_WHITE_SPACE_COUNT)) return SPACE;
  if (in_ranges(cp, EM_UNICODE_LETTER, EM_UNICODE_LETTER_COUNT)) return LETTER;
  if (in_ranges(cp, EM_UNICODE_NUMBER, EM_UNICODE_NUMBER_COUNT)) return NUMBER;
  return OTHER;
}

/* Length of the pre-token starting at s[i]. */
static size_t pretoken(const uint8_t* s, size_t n, size_t i) {
  static const char* const suffixes[] = {"s", "t", "re", "ve", "m", "ll", "d"};
  if (s[i] == '\'')
    for (int k = 0; k < 7; k++) {
      size_t l = strlen(suffixes[k]);
      if (i + 1 + l <= n && !memcmp(s + i + 1, suffixes[k], l)) return 1 + l;
    }
  size_t len, j = i;
  if (s[i] == ' ' && i + 1 < n && class_at(s, n, i + 1, &len) != SPACE) j = i + 1; /* " ?" */
  int c = class_at(s, n, j, &len);
  if (c != SPACE) { /* a run of letters, of numbers, or of anything else but those and space */
    size_t e = j + len;
    while (e < n) {
      int d = class_at(s, n, e, &len);
      if (c == OTHER ? d != OTHER : d != c) break;
      e += len;
    }
    return e - i;
  }
  size_t e = i, last = i; /* white space: all of it, but the last character of a run before a non-space */
  while (e < n && class_at(s, n, e, &len) == SPACE) last = e, e += len;
  return e < n && last > i ? last - i : e - i;
}

/* BPE over one pre-token, appending its ids to ids[*count..cap). */
static int encode_piece(const em_tokenizer* t, const uint8_t* s, size_t n, int32_t* ids, size_t cap, size_t* count) {
  if (*count + n > cap) return EM_ERR_ARGUMENT;
  int32_t* w = ids + *count;
  for (size_t i = 0; i < n; i++) w[i] = (int32_t)t->single[s[i]];
  size_t len = n;
  for (;;) {
    uint32_t best = UINT32_MAX;
    size_t at = 0;
    for (size_t i = 0; i + 1 < len; i++) {
      uint32_t r = merge_rank(t, (uint32_t)w[i], (uint32_t)w[i + 1]);
      if (r < best) best = r, at = i;
    }
    if (best == UINT32_MAX) break;
    w[at] = (int32_t)t->merges[3 * best + 2];
    memmove(w + at + 1, w + at + 2, (len - at - 2) * sizeof *w);
    len--;
  }
  *count += len;
  return EM_OK;
}

/* The longest added token at s[i], or -1. */
static int32_t added_at(const em_tokenizer* t, const uint8_t* s, size_t n, size_t i, size_t* len) {
  int32_t best = -1;
  *len = 0;
  for (uint32_t k = 0; k < t->n_added; k++) {
    uint32_t id = t->added[k], l = t->span[2 * id + 1];
    if (l > *len && i + l <= n && !memcmp(s + i, t->blob + t->span[2 * id], l)) best = (int32_t)id, *len = l;
  }
  return best;
}

int em_tokenize(const em_tokenizer* t, const char* text, int32_t* ids, size_t cap, size_t* n_out) {
  const uint8_t* s = (const uint8_t*)text;
  size_t n = strlen(text), i = 0, count = 0, start = 0;
  *n_out = 0;
  while (i <= n) {
    size_t alen = 0;
    int32_t special = i < n ? added_at(t, s, n, i, &alen) : -1;
    if (i == n || special >= 0) { /* the plain text before it, pre-tokenized */
      for (size_t p = start; p < i;) {
        size_t l = pretoken(s + start, i - start, p - start);
        if (encode_piece(t, s + p, l, ids, cap, &count)) return EM_ERR_ARGUMENT;
        p += l;
      }
      if (i == n) break;
      if (count == cap) return EM_ERR_ARGUMENT;
      ids[count++] = special;
      i += alen;
      start = i;
      continue;
    }
    i++;
  }
  *n_out = count;
  return EM_OK;
}
