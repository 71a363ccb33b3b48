/* BERT WordPiece tokenization (BertNormalizer + BertPreTokenizer + WordPiece + [CLS] $A [SEP]) in plain C.
 *
 * No Python C-API: one shared library serves any Python through ctypes (dll/wordpiece.py). Everything
 * Unicode-specific comes from tables that dll/wordpiece_tables.py builds by asking Hugging Face `tokenizers`
 * about every code point, so this file holds no Unicode data of its own:
 *
 *   map[cp]    int32: >= 0 the single code point cp normalizes to; -1 cp vanishes; <= -2 the output is
 *              pool[-2 - map[cp]] code points stored from pool[-1 - map[cp]] on (a count, then the points)
 *   flags[cp]  uint8: bits 0-1 what cp is to the pre-tokenizer once normalized (0 word char, 1 whitespace,
 *              2 punctuation: a word of its own); bit 2 (reordering normalizers only): cp vanishes but
 *              acts as a starter, so combining marks do not reorder across it
 *   rank[cp]   uint8 (reordering normalizers only): 0 for a starter, else the order of cp's canonical
 *              combining class among the non-starters that survive normalization
 *
 * Normalizers that strip accents decompose (NFD) before dropping nonspacing marks; NFD sorts each run of
 * non-starters by combining class, which is the one context effect: runs are sorted here, stably, by rank.
 *
 * Texts arrive as one UTF-8 buffer with int64 byte offsets; ids go to int32 slots that the caller sized
 * (a per-text capacity), then are packed back to back. Invalid UTF-8 decodes to U+FFFD, one byte at a time.
 * Work is linear in the input: words longer than max_chars are [UNK] without being stored, and the
 * longest-match loop is bounded by the longest vocabulary entry.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FBAS_WP_ABI 1
#define NCP 0x110000
#define CLS_WS 1
#define CLS_PUNCT 2
#define FLAG_BLOCK 4

#define ERR_ARGS -2
#define ERR_NOMEM -3
#define ERR_CAPACITY -4

typedef struct {
  uint64_t hash;
  int64_t off; /* into the vocab blob */
  int32_t len;
  int32_t id; /* -1: empty slot */
} Slot;

typedef struct {
  Slot *slots;
  uint64_t mask;
  int32_t max_chars; /* longest key, in code points */
} Table;

typedef struct {
  int32_t *map;
  uint32_t *pool;
  int64_t pool_len;
  uint8_t *flags;
  uint8_t *rank;
  int reorder;
  uint8_t *blob;
  Table full, cont;
  int32_t unk_id, cls_id, sep_id, max_chars;
  /* added tokens matched on the raw text (non-normalized ones), longest first */
  int32_t n_added;
  uint8_t *added_blob;
  int64_t *added_off;
  int32_t *added_len;
  int32_t *added_id;
  uint8_t added_first[256];
} WP;

static uint64_t hash_bytes(const uint8_t *s, int64_t n) {
  uint64_t h = 1469598103934665603ULL;
  for (int64_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ULL;
  return h ^ (h >> 29);
}

static int32_t count_chars(const uint8_t *s, int64_t n) {
  int32_t c = 0;
  for (int64_t i = 0; i < n; i++) c += (s[i] & 0xC0) != 0x80;
  return c;
}

static int table_init(Table *t, int64_t n) {
  uint64_t cap = 16;
  while (cap < (uint64_t)n * 2 + 16) cap <<= 1;
  t->slots = (Slot *)malloc(cap * sizeof(Slot));
  if (!t->slots) return ERR_NOMEM;
  for (uint64_t i = 0; i < cap; i++) t->slots[i].id = -1;
  t->mask = cap - 1;
  t->max_chars = 0;
  return 0;
}

static void table_put(Table *t, const uint8_t *blob, int64_t off, int32_t len, int32_t id) {
  uint64_t h = hash_bytes(blob + off, len);
  uint64_t i = h & t->mask;
  while (t->slots[i].id >= 0) {
    Slot *s = &t->slots[i];
    if (s->hash == h && s->len == len && memcmp(blob + s->off, blob + off, (size_t)len) == 0) return;
    i = (i + 1) & t->mask;
  }
  t->slots[i].hash = h;
  t->slots[i].off = off;
  t->slots[i].len = len;
  t->slots[i].id = id;
  int32_t c = count_chars(blob + off, len);
  if (c > t->max_chars) t->max_chars = c;
}

static int32_t table_get(const Table *t, const uint8_t *blob, const uint8_t *key, int32_t len) {
  uint64_t h = hash_bytes(key, len);
  uint64_t i = h & t->mask;
  while (t->slots[i].id >= 0) {
    const Slot *s = &t->slots[i];
    if (s->hash == h && s->len == len && memcmp(blob + s->off, key, (size_t)len) == 0) return s->id;
    i = (i + 1) & t->mask;
  }
  return -1;
}

int fbas_wp_abi_version(void) { return FBAS_WP_ABI; }

void fbas_wp_free(void *handle) {
  WP *w = (WP *)handle;
  if (!w) return;
  free(w->map);
  free(w->pool);
  free(w->flags);
  free(w->rank);
  free(w->blob);
  free(w->full.slots);
  free(w->cont.slots);
  free(w->added_blob);
  free(w->added_off);
  free(w->added_len);
  free(w->added_id);
  free(w);
}

static void *dup_bytes(const void *src, size_t n) {
  void *p = malloc(n ? n : 1);
  if (p && n) memcpy(p, src, n);
  return p;
}

/* A tokenizer from its tables (copied: the caller's arrays may go) and its vocabulary: vocab_blob holds
 * every token's UTF-8 bytes, token k at [vocab_off[k], vocab_off[k+1]) with id vocab_ids[k]. Tokens that
 * start with prefix also enter the continuation table without it. Added tokens likewise (added_*).
 * Returns NULL on bad arguments or when memory runs out. */
void *fbas_wp_new(const int32_t *map, const uint32_t *pool, int64_t pool_len, const uint8_t *flags,
                  const uint8_t *rank, int reorder, const uint8_t *vocab_blob, const int64_t *vocab_off,
                  const int32_t *vocab_ids, int64_t n_vocab, const uint8_t *prefix, int32_t prefix_len,
                  const uint8_t *added_blob, const int64_t *added_off, const int32_t *added_ids, int32_t n_added,
                  int32_t unk_id, int32_t cls_id, int32_t sep_id, int32_t max_chars) {
  if (!map || !flags || n_vocab < 0 || pool_len < 0 || prefix_len < 0 || n_added < 0 || max_chars < 0 ||
      max_chars > (1 << 20))
    return NULL;
  if (reorder && !rank) return NULL;
  for (int64_t k = 0; k < n_vocab; k++)
    if (vocab_off[k + 1] < vocab_off[k] || vocab_off[k + 1] - vocab_off[k] > INT32_MAX) return NULL;
  for (int32_t k = 0; k < n_added; k++)
    if (added_off[k + 1] <= added_off[k]) return NULL; /* an empty added token would match everywhere */
  /* every output is a code point, and every pool reference stays inside the pool */
  for (int64_t cp = 0; cp < NCP; cp++) {
    if (map[cp] >= NCP) return NULL;
    if (map[cp] <= -2) {
      int64_t at = -2 - (int64_t)map[cp];
      if (at >= pool_len || (int64_t)pool[at] > pool_len - at - 1) return NULL;
      for (int64_t k = 1; k <= (int64_t)pool[at]; k++)
        if (pool[at + k] >= NCP) return NULL;
    }
  }
  WP *w = (WP *)calloc(1, sizeof(WP));
  if (!w) return NULL;
  int64_t blob_len = n_vocab ? vocab_off[n_vocab] : 0;
  int64_t added_len = n_added ? added_off[n_added] : 0;
  w->map = (int32_t *)dup_bytes(map, NCP * sizeof(int32_t));
  w->pool = (uint32_t *)dup_bytes(pool, (size_t)pool_len * sizeof(uint32_t));
  w->pool_len = pool_len;
  w->flags = (uint8_t *)dup_bytes(flags, NCP);
  w->rank = reorder ? (uint8_t *)dup_bytes(rank, NCP) : NULL;
  w->reorder = reorder;
  w->blob = (uint8_t *)dup_bytes(vocab_blob, (size_t)blob_len);
  w->added_blob = (uint8_t *)dup_bytes(added_blob, (size_t)added_len);
  w->added_off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n_added + 1));
  w->added_len = (int32_t *)malloc(sizeof(int32_t) * (size_t)(n_added + 1));
  w->added_id = (int32_t *)malloc(sizeof(int32_t) * (size_t)(n_added + 1));
  if (!w->map || !w->pool || !w->flags || (reorder && !w->rank) || !w->blob || !w->added_blob || !w->added_off ||
      !w->added_len || !w->added_id || table_init(&w->full, n_vocab) || table_init(&w->cont, n_vocab)) {
    fbas_wp_free(w);
    return NULL;
  }
  for (int64_t k = 0; k < n_vocab; k++) {
    int64_t off = vocab_off[k];
    int32_t len = (int32_t)(vocab_off[k + 1] - off);
    if (len == 0) continue;
    table_put(&w->full, w->blob, off, len, vocab_ids[k]);
    if (len > prefix_len && memcmp(w->blob + off, prefix, (size_t)prefix_len) == 0)
      table_put(&w->cont, w->blob, off + prefix_len, len - prefix_len, vocab_ids[k]);
  }
  /* added tokens, longest first, so the first match at a position is the longest one there */
  int32_t *order = (int32_t *)malloc(sizeof(int32_t) * (size_t)(n_added + 1));
  if (!order) {
    fbas_wp_free(w);
    return NULL;
  }
  for (int32_t k = 0; k < n_added; k++) order[k] = k;
  for (int32_t a = 1; a < n_added; a++) {
    int32_t v = order[a], b = a;
    int64_t lv = added_off[v + 1] - added_off[v];
    while (b > 0 && added_off[order[b - 1] + 1] - added_off[order[b - 1]] < lv) {
      order[b] = order[b - 1];
      b--;
    }
    order[b] = v;
  }
  for (int32_t k = 0; k < n_added; k++) {
    int32_t src = order[k];
    w->added_off[k] = added_off[src];
    w->added_len[k] = (int32_t)(added_off[src + 1] - added_off[src]);
    w->added_id[k] = added_ids[src];
    w->added_first[w->added_blob[added_off[src]]] = 1;
  }
  free(order);
  w->n_added = n_added;
  w->unk_id = unk_id;
  w->cls_id = cls_id;
  w->sep_id = sep_id;
  w->max_chars = max_chars;
  return w;
}

/* ---- per-thread state for one text ---- */

typedef struct {
  const WP *w;
  /* the current word: UTF-8 bytes of its first max_chars code points, their starts, its full length */
  uint8_t *word;
  int32_t *starts; /* max_chars + 1 entries */
  int32_t wbytes, wchars;
  int32_t *pieces; /* max_chars entries */
  /* pending run of non-starters (reordering normalizers) */
  uint32_t *run;
  int64_t run_len, run_cap;
  uint32_t *run_tmp;
  int64_t run_tmp_cap;
  /* output of the current text */
  int32_t *out;
  int64_t cap;     /* slots for this text */
  int64_t count;   /* tokens so far, [CLS] included, [SEP] not */
  int32_t limit;   /* max_seq_len - 1: tokens kept before [SEP] */
  int err;
} Ctx;

static int ctx_init(Ctx *c, const WP *w) {
  memset(c, 0, sizeof(*c));
  c->w = w;
  c->word = (uint8_t *)malloc((size_t)w->max_chars * 4 + 4);
  c->starts = (int32_t *)malloc(sizeof(int32_t) * ((size_t)w->max_chars + 2));
  c->pieces = (int32_t *)malloc(sizeof(int32_t) * ((size_t)w->max_chars + 1));
  c->run_cap = 64;
  c->run = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)c->run_cap);
  if (!c->word || !c->starts || !c->pieces || !c->run) return ERR_NOMEM;
  return 0;
}

static void ctx_free(Ctx *c) {
  free(c->word);
  free(c->starts);
  free(c->pieces);
  free(c->run);
  free(c->run_tmp);
}

static inline void emit(Ctx *c, int32_t id) {
  if (c->out && c->count < c->limit) {
    if (c->count >= c->cap - 1)
      c->err = ERR_CAPACITY; /* the caller's capacity bound was wrong: never write past it */
    else
      c->out[c->count] = id;
  }
  c->count++;
}

static void word_end(Ctx *c) {
  const WP *w = c->w;
  int32_t n = c->wchars;
  if (n == 0) return;
  c->wchars = 0;
  c->wbytes = 0;
  if (n > w->max_chars) {
    emit(c, w->unk_id);
    return;
  }
  int32_t np = 0, start = 0;
  while (start < n) {
    const Table *t = start == 0 ? &w->full : &w->cont;
    int32_t end = start + t->max_chars < n ? start + t->max_chars : n;
    int32_t found = -1;
    for (; end > start; end--) {
      found = table_get(t, w->blob, c->word + c->starts[start], c->starts[end] - c->starts[start]);
      if (found >= 0) break;
    }
    if (found < 0) {
      emit(c, w->unk_id);
      return;
    }
    c->pieces[np++] = found;
    start = end;
  }
  for (int32_t k = 0; k < np; k++) emit(c, c->pieces[k]);
}

static inline void word_add(Ctx *c, uint32_t cp) {
  if (c->wchars < c->w->max_chars) {
    uint8_t *p = c->word + c->wbytes;
    int32_t k;
    if (cp < 0x80) {
      p[0] = (uint8_t)cp;
      k = 1;
    } else if (cp < 0x800) {
      p[0] = (uint8_t)(0xC0 | (cp >> 6));
      p[1] = (uint8_t)(0x80 | (cp & 0x3F));
      k = 2;
    } else if (cp < 0x10000) {
      p[0] = (uint8_t)(0xE0 | (cp >> 12));
      p[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
      p[2] = (uint8_t)(0x80 | (cp & 0x3F));
      k = 3;
    } else {
      p[0] = (uint8_t)(0xF0 | (cp >> 18));
      p[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
      p[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
      p[3] = (uint8_t)(0x80 | (cp & 0x3F));
      k = 4;
    }
    c->starts[c->wchars] = c->wbytes;
    c->wbytes += k;
    c->starts[c->wchars + 1] = c->wbytes;
  }
  if (c->wchars <= c->w->max_chars) c->wchars++; /* past max_chars the word is [UNK]: stop counting */
}

/* one normalized code point into the pre-tokenizer */
static inline void pretok(Ctx *c, uint32_t cp) {
  uint8_t cls = c->w->flags[cp] & 3;
  if (cls == CLS_WS) {
    word_end(c);
  } else if (cls == CLS_PUNCT) {
    word_end(c);
    word_add(c, cp);
    word_end(c);
  } else {
    word_add(c, cp);
  }
}

static void run_flush(Ctx *c) {
  int64_t n = c->run_len;
  if (n == 0) return;
  const uint8_t *rank = c->w->rank;
  uint32_t *r = c->run;
  if (n <= 32) { /* stable insertion sort */
    for (int64_t i = 1; i < n; i++) {
      uint32_t v = r[i];
      int64_t j = i;
      while (j > 0 && rank[r[j - 1]] > rank[v]) {
        r[j] = r[j - 1];
        j--;
      }
      r[j] = v;
    }
  } else { /* stable counting sort: linear however long the run */
    if (c->run_tmp_cap < n) {
      free(c->run_tmp);
      c->run_tmp = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)n);
      c->run_tmp_cap = c->run_tmp ? n : 0;
      if (!c->run_tmp) {
        c->err = ERR_NOMEM;
        c->run_len = 0;
        return;
      }
    }
    int64_t counts[257] = {0};
    for (int64_t i = 0; i < n; i++) counts[rank[r[i]] + 1]++;
    for (int k = 1; k < 257; k++) counts[k] += counts[k - 1];
    for (int64_t i = 0; i < n; i++) c->run_tmp[counts[rank[r[i]]]++] = r[i];
    memcpy(r, c->run_tmp, sizeof(uint32_t) * (size_t)n);
  }
  c->run_len = 0;
  for (int64_t i = 0; i < n; i++) pretok(c, r[i]);
}

static inline void normalized(Ctx *c, uint32_t cp) {
  if (!c->w->reorder) {
    pretok(c, cp);
  } else if (c->w->rank[cp] == 0) {
    run_flush(c);
    pretok(c, cp);
  } else {
    if (c->run_len == c->run_cap) {
      uint32_t *grown = (uint32_t *)realloc(c->run, sizeof(uint32_t) * (size_t)c->run_cap * 2);
      if (!grown) {
        c->err = ERR_NOMEM;
        return;
      }
      c->run = grown;
      c->run_cap *= 2;
    }
    c->run[c->run_len++] = cp;
  }
}

static inline void input_cp(Ctx *c, uint32_t cp) {
  const WP *w = c->w;
  int32_t m = w->map[cp];
  if (m >= 0) {
    normalized(c, (uint32_t)m);
  } else if (m == -1) {
    if (w->reorder && (w->flags[cp] & FLAG_BLOCK)) run_flush(c);
  } else {
    const uint32_t *p = w->pool + (-2 - (int64_t)m);
    for (uint32_t k = 1; k <= p[0]; k++) normalized(c, p[k]);
  }
}

/* the next code point of s[*i..n); invalid or truncated sequences give U+FFFD and advance one byte */
static inline uint32_t decode(const uint8_t *s, int64_t n, int64_t *i) {
  int64_t at = *i;
  uint32_t b0 = s[at];
  if (b0 < 0x80) {
    *i = at + 1;
    return b0;
  }
  int need;
  uint32_t cp, lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F; /* no surrogates */
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    *i = at + 1;
    return 0xFFFD;
  }
  if (n - at - 1 < need) {
    *i = at + 1;
    return 0xFFFD;
  }
  for (int k = 1; k <= need; k++) {
    uint32_t b = s[at + k];
    if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) {
      *i = at + 1;
      return 0xFFFD;
    }
    cp = (cp << 6) | (b & 0x3F);
  }
  *i = at + 1 + need;
  return cp;
}

/* the added token starting at s[i], longest first, or -1 */
static inline int32_t added_at(const WP *w, const uint8_t *s, int64_t n, int64_t i) {
  if (!w->added_first[s[i]]) return -1;
  for (int32_t k = 0; k < w->n_added; k++) {
    int32_t len = w->added_len[k];
    if (len <= n - i && memcmp(s + i, w->added_blob + w->added_off[k], (size_t)len) == 0) return k;
  }
  return -1;
}

/* one text: returns tokens written (after truncation); *full gets the untruncated count */
static int32_t encode_one(Ctx *c, const uint8_t *s, int64_t n, int32_t *out, int64_t cap, int32_t *full) {
  const WP *w = c->w;
  c->out = out;
  c->cap = cap;
  c->count = 0;
  c->wchars = 0;
  c->wbytes = 0;
  c->run_len = 0;
  emit(c, w->cls_id);
  int64_t i = 0;
  while (i < n && !c->err) {
    if (w->n_added) {
      int32_t k = added_at(w, s, n, i);
      if (k >= 0) {
        run_flush(c);
        word_end(c);
        emit(c, w->added_id[k]);
        i += w->added_len[k];
        continue;
      }
    }
    input_cp(c, decode(s, n, &i));
  }
  run_flush(c);
  word_end(c);
  int64_t kept = c->count < c->limit ? c->count : c->limit;
  if (out) {
    if (kept >= cap)
      c->err = ERR_CAPACITY;
    else
      out[kept] = w->sep_id;
  }
  int64_t total = c->count + 1;
  *full = total > INT32_MAX ? INT32_MAX : (int32_t)total;
  return (int32_t)(kept + 1);
}

typedef struct {
  const WP *w;
  const uint8_t *buf;
  const int64_t *offs;
  int64_t lo, hi;
  int32_t max_seq_len;
  int32_t *out;
  const int64_t *slots;
  int32_t *lengths, *full;
  int err;
} Job;

static void *run_job(void *arg) {
  Job *j = (Job *)arg;
  Ctx c;
  j->err = ctx_init(&c, j->w);
  if (!j->err) {
    c.limit = j->max_seq_len - 1;
    for (int64_t t = j->lo; t < j->hi && !c.err; t++) {
      int32_t *out = j->out ? j->out + j->slots[t] : NULL;
      int64_t cap = j->out ? j->slots[t + 1] - j->slots[t] : 0;
      j->lengths[t] = encode_one(&c, j->buf + j->offs[t], j->offs[t + 1] - j->offs[t], out, cap, &j->full[t]);
    }
    j->err = c.err;
  }
  ctx_free(&c);
  return NULL;
}

/* Tokenize n texts: text t is buf[offs[t], offs[t+1]). With out_ids, text t's ids go first to
 * out_ids[slots[t], slots[t+1]) (at least min(max_seq_len, tokens) entries; never written past), then all
 * are packed back to back from out_ids[0]; out_ids may be NULL to count only. lengths[t] gets the tokens
 * kept ([CLS] + the first max_seq_len - 2 pieces + [SEP] when truncated), full[t] the tokens before
 * truncation. Returns the number of ids packed (0 without out_ids), or a negative error. */
int64_t fbas_wp_encode(const void *handle, const uint8_t *buf, int64_t buf_len, const int64_t *offs, int64_t n,
                       int32_t max_seq_len, int32_t *out_ids, const int64_t *slots, int32_t *lengths, int32_t *full,
                       int32_t n_threads) {
  const WP *w = (const WP *)handle;
  if (!w || n < 0 || max_seq_len < 1 || !lengths || !full || (n && (!offs || !buf)) || (out_ids && !slots))
    return ERR_ARGS;
  for (int64_t t = 0; t < n; t++)
    if (offs[t] < 0 || offs[t + 1] < offs[t] || offs[t + 1] > buf_len) return ERR_ARGS;
  if (out_ids)
    for (int64_t t = 0; t < n; t++)
      if (slots[t] < 0 || slots[t + 1] < slots[t]) return ERR_ARGS;
  if (n_threads > 256) n_threads = 256;
  if (n_threads > n) n_threads = (int32_t)n;
  if (n_threads < 1) n_threads = 1;
  Job jobs[256];
  pthread_t tids[256];
  int started[256] = {0};
  for (int32_t k = 0; k < n_threads; k++) {
    jobs[k] = (Job){w, buf, offs, n * k / n_threads, n * (k + 1) / n_threads, max_seq_len, out_ids, slots,
                    lengths, full, 0};
  }
  for (int32_t k = 1; k < n_threads; k++) started[k] = pthread_create(&tids[k], NULL, run_job, &jobs[k]) == 0;
  run_job(&jobs[0]);
  for (int32_t k = 1; k < n_threads; k++) {
    if (started[k])
      pthread_join(tids[k], NULL);
    else
      run_job(&jobs[k]); /* no thread to be had: do its share here */
  }
  for (int32_t k = 0; k < n_threads; k++)
    if (jobs[k].err) return jobs[k].err;
  if (!out_ids) return 0;
  int64_t pos = 0;
  for (int64_t t = 0; t < n; t++) {
    if (pos != slots[t]) memmove(out_ids + pos, out_ids + slots[t], sizeof(int32_t) * (size_t)lengths[t]);
    pos += lengths[t];
  }
  return pos;
}
