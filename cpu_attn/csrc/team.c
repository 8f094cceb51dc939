/*
 * The sidecar's resident team: a fixed set of pthreads, started once, that serve the data plane's attention
 * requests with no Python and no OpenMP fork per call.
 *
 * Why: a sidecar call cost ~0.1-0.3 ms of fixed overhead (the Python data-plane loop, message parsing, an
 * OpenMP fork) around a kernel of ~0.05 ms. Here thread 0, the leader, polls the request ring in C, parses the
 * fixed-layout ATTN record (cpu_attn/messages.py), appends the new K/V, runs the attention with the other
 * threads and writes the ATTN_OUT record straight into the response ring. Threads spin for spin_ns after their
 * last work, then park on a futex (the leader on the ring's head word, woken by the producer's publish).
 *
 * Division of labour with Python (cpu_attn/server.py):
 *   - ATTN records whose sequences hold the blocks they need: the leader, start to end.
 *   - every other record (KV_UPLOAD, KV_DOWNLOAD, unknown types) and ATTN records that need a new block
 *     reserved, or that arrive after a Configure retired the cache they were bound to: "punted". The leader
 *     keeps the record held, hands it to the Python data-plane thread (wait_punt), parks until Python has
 *     answered it (punt_done), then releases it. So responses stay in request order, and exactly one side
 *     uses each ring end at any time.
 *   - corrupt records: the leader skips them and answers ERROR(CORRUPT, tag 0), as the Python loop does.
 *
 * Ordering with the control plane (create/free sequences, uploads, stats, Configure): CacheIndex.mu. The leader
 * holds it from the moment it looks up a batch's sequences until its kernel has finished; Python holds it
 * (through SidecarState.lock) around every change of the cache's bookkeeping. So a free that races an
 * attention call either happens first (the call answers UNKNOWN_SEQUENCE) or waits until the kernel is done
 * with the sequence's blocks: a block is never recycled under a running kernel. The response slot is reserved
 * before the lock is taken, so a client that is slow to drain responses never stalls its own control calls.
 */
#define _GNU_SOURCE
#include "attn_kernel.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "shm_ring.h"

/* cpu_attn/messages.py: record types, error codes and layouts (tests check the two agree). */
#define MSG_ATTN 1
#define MSG_ATTN_OUT 2
#define MSG_ERROR 7
#define ERR_INTERNAL 1
#define ERR_INVALID 2
#define ERR_UNKNOWN_SEQUENCE 3
#define ERR_CORRUPT 5
#define MSG_HEADER 64
#define MSG_MAX_DIM 65536u
#define MSG_MAX_ERROR_TEXT 4096

#define PUNT_IDLE 0u
#define PUNT_WAITING 1u /* a record is with Python */
#define PUNT_DONE 2u    /* Python answered it */

#define LEADER_WAIT_NS 20000000ull /* the leader re-checks its stop flag at least this often */
/* NOTE: a parallel job's item count shares one 64-bit word with its generation and claim counter (see
 * team_parallel), so it must stay below 2^24; bigger jobs run on the leader alone. */
#define WORK_BITS 24
#define WORK_MASK ((1ull << WORK_BITS) - 1)

static inline uint64_t align64(uint64_t n) { return (n + 63) / 64 * 64; }

/* ------------------------------------------------------------------------------------------ CacheIndex */

/*
 * What the team must know of a CpuKVCache (cpu_attn/kv_cache.py keeps it current): the arena's geometry, its
 * block table / tokens / blocks-held arrays (numpy, rebound when they grow) and seq_id -> row. The mutex is the
 * ordering rule above. Not thread-safe by itself: callers hold `mu` (the sidecar) or own the cache alone.
 */
typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    Geom g;
    PyObject *owner; /* keeps the arena mapping alive while a team may read it */
    Py_buffer table, tokens, blocks;
    int bound;
    int64_t stride, nrows;
    int64_t *keys, *vals; /* seq ids, sorted, and their rows */
    int64_t n, cap;
    int retired; /* a Configure replaced this cache: the team punts every request */
} CacheIndex;

static int64_t index_find(const CacheIndex *ix, int64_t key) {
    int64_t lo = 0, hi = ix->n;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (ix->keys[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static void index_unbind(CacheIndex *ix) {
    if (!ix->bound) return;
    PyBuffer_Release(&ix->table);
    PyBuffer_Release(&ix->tokens);
    PyBuffer_Release(&ix->blocks);
    ix->bound = 0;
}

static int CacheIndex_init(CacheIndex *self, PyObject *args, PyObject *kwds) {
    PyObject *geom, *owner;
    if (!PyArg_ParseTuple(args, "OO", &geom, &owner)) return -1;
    if (parse_geom(geom, &self->g) < 0) return -1;
    pthread_mutex_init(&self->mu, NULL);
    Py_XSETREF(self->owner, Py_NewRef(owner));
    return 0;
}

static void CacheIndex_dealloc(CacheIndex *self) {
    index_unbind(self);
    free(self->keys);
    free(self->vals);
    Py_XDECREF(self->owner);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* bind(table int32 [rows, stride], tokens int64 [rows], blocks_held int64 [rows]): the arrays the team reads. */
static PyObject *CacheIndex_bind(CacheIndex *self, PyObject *args) {
    PyObject *table, *tokens, *blocks;
    long long stride;
    if (!PyArg_ParseTuple(args, "OLOO", &table, &stride, &tokens, &blocks)) return NULL;
    Py_buffer bt, bk, bb;
    if (PyObject_GetBuffer(table, &bt, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(tokens, &bk, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&bt);
        return NULL;
    }
    if (PyObject_GetBuffer(blocks, &bb, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&bt);
        PyBuffer_Release(&bk);
        return NULL;
    }
    if (stride <= 0 || bk.len != bb.len || bt.len < (Py_ssize_t)(bk.len / 8 * stride * 4)) {
        PyBuffer_Release(&bt);
        PyBuffer_Release(&bk);
        PyBuffer_Release(&bb);
        PyErr_SetString(PyExc_ValueError, "bind: table, tokens and blocks_held do not agree");
        return NULL;
    }
    index_unbind(self);
    self->table = bt;
    self->tokens = bk;
    self->blocks = bb;
    self->stride = stride;
    self->nrows = bk.len / 8;
    self->bound = 1;
    Py_RETURN_NONE;
}

/* set(seq_id, row) */
static PyObject *CacheIndex_set(CacheIndex *self, PyObject *args) {
    long long key, row;
    if (!PyArg_ParseTuple(args, "LL", &key, &row)) return NULL;
    int64_t at = index_find(self, key);
    if (at < self->n && self->keys[at] == key) {
        self->vals[at] = row;
        Py_RETURN_NONE;
    }
    if (self->n == self->cap) {
        int64_t cap = self->cap ? 2 * self->cap : 64;
        int64_t *keys = realloc(self->keys, sizeof(int64_t) * (size_t)cap);
        if (!keys) return PyErr_NoMemory();
        self->keys = keys;
        int64_t *vals = realloc(self->vals, sizeof(int64_t) * (size_t)cap);
        if (!vals) return PyErr_NoMemory();
        self->vals = vals;
        self->cap = cap;
    }
    memmove(self->keys + at + 1, self->keys + at, sizeof(int64_t) * (size_t)(self->n - at));
    memmove(self->vals + at + 1, self->vals + at, sizeof(int64_t) * (size_t)(self->n - at));
    self->keys[at] = key;
    self->vals[at] = row;
    self->n++;
    Py_RETURN_NONE;
}

/* discard(seq_id) */
static PyObject *CacheIndex_discard(CacheIndex *self, PyObject *arg) {
    long long key = PyLong_AsLongLong(arg);
    if (key == -1 && PyErr_Occurred()) return NULL;
    int64_t at = index_find(self, key);
    if (at < self->n && self->keys[at] == key) {
        memmove(self->keys + at, self->keys + at + 1, sizeof(int64_t) * (size_t)(self->n - at - 1));
        memmove(self->vals + at, self->vals + at + 1, sizeof(int64_t) * (size_t)(self->n - at - 1));
        self->n--;
    }
    Py_RETURN_NONE;
}

/* row(seq_id) -> row or -1 (tests). */
static PyObject *CacheIndex_row(CacheIndex *self, PyObject *arg) {
    long long key = PyLong_AsLongLong(arg);
    if (key == -1 && PyErr_Occurred()) return NULL;
    int64_t at = index_find(self, key);
    return PyLong_FromLongLong(at < self->n && self->keys[at] == key ? self->vals[at] : -1);
}

static PyObject *CacheIndex_lock(CacheIndex *self, PyObject *Py_UNUSED(ignored)) {
    /* NOTE: the GIL is let go only when the team holds the mutex, so an uncontended lock costs no GIL hand-off. */
    if (pthread_mutex_trylock(&self->mu) != 0) {
        Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&self->mu);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *CacheIndex_unlock(CacheIndex *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

static PyObject *CacheIndex_retire(CacheIndex *self, PyObject *Py_UNUSED(ignored)) {
    self->retired = 1;
    Py_RETURN_NONE;
}

static PyMethodDef CacheIndex_methods[] = {
    {"bind", (PyCFunction)CacheIndex_bind, METH_VARARGS, "bind(table, stride, tokens, blocks_held)"},
    {"set", (PyCFunction)CacheIndex_set, METH_VARARGS, "set(seq_id, row)"},
    {"discard", (PyCFunction)CacheIndex_discard, METH_O, "discard(seq_id)"},
    {"row", (PyCFunction)CacheIndex_row, METH_O, "row(seq_id) -> row or -1"},
    {"lock", (PyCFunction)CacheIndex_lock, METH_NOARGS, "take the cache mutex (GIL released while blocked)"},
    {"unlock", (PyCFunction)CacheIndex_unlock, METH_NOARGS, "release the cache mutex"},
    {"retire", (PyCFunction)CacheIndex_retire, METH_NOARGS, "the cache is replaced: teams punt from now on"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CacheIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cpu_attn._attn_kernel.CacheIndex",
    .tp_basicsize = sizeof(CacheIndex),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "CacheIndex(geom, owner): a CpuKVCache's bookkeeping as the resident team reads it",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CacheIndex_init,
    .tp_dealloc = (destructor)CacheIndex_dealloc,
    .tp_methods = CacheIndex_methods,
};

/* ------------------------------------------------------------------------------------------------ Team */

typedef struct Team Team;

typedef struct {
    Team *team;
    int tid;
    pthread_t thread;
    int started;
    Scratch sc;
} Worker;

struct Team {
    PyObject_HEAD
    CacheIndex *index;
    Py_buffer req_view, resp_view;
    int has_views;
    ring_end req, resp;
    int hq;
    float scale;
    int nthreads;
    Worker *workers;
    int *cpus;
    int ncpus;
    uint64_t spin_ns;
    int running;
    _Atomic uint32_t stop;
    _Atomic uint32_t exited;
    char exit_reason[256];
    /* the punt hand-off (see the file comment) */
    _Atomic uint32_t punt;
    ring_record punt_rec;
    /* parallel jobs: work = generation (16 bits) | item count (24) | next unclaimed item (24) */
    _Atomic uint64_t work;
    _Atomic int64_t done;
    _Atomic uint32_t wake_seq, sleepers;
    const Job *job;
    AttnPlan plan;
    int phase; /* 0: attention items, 1: merges */
    int avx;
    /* per-call buffers of the leader, grown on demand */
    int64_t *rows;
    int32_t *blocks, *offs;
    int64_t cap_batch;
    uint8_t *seen;
    int64_t cap_seen;
    float *copy_scratch;
    /* counters for Stats */
    _Atomic uint64_t handled, errors, punted, busy_ns;
};

static void team_exit(Team *t, const char *why) {
    if (!t->exit_reason[0]) snprintf(t->exit_reason, sizeof t->exit_reason, "%s", why);
}

/* Claims and runs items of the current job until none is left; returns whether it ran any. */
static int team_work(Team *t, Worker *w) {
    int ran = 0;
    for (;;) {
        uint64_t cur = atomic_load_explicit(&t->work, memory_order_acquire);
        uint64_t n = (cur >> WORK_BITS) & WORK_MASK, next = cur & WORK_MASK;
        if (next >= n) return ran;
        /* NOTE: the claim compares the whole word, generation included, so a thread that read an older job's
         * word can never claim an item of a newer one; the job's fields were written before the word (release)
         * and stay unchanged until every claimed item is done. */
        if (!atomic_compare_exchange_weak_explicit(&t->work, &cur, cur + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        if (t->phase == 0) attn_run_item(t->job, &t->plan, (int64_t)next, &w->sc, t->avx);
        else attn_run_merge(t->job, &t->plan, (int64_t)next);
        atomic_fetch_add_explicit(&t->done, 1, memory_order_release);
        ran = 1;
    }
}

/* Leader: runs n items of `phase` across the team (itself included) and returns when all are done. */
static void team_parallel(Team *t, int phase, int64_t n) {
    if (n <= 0) return;
    t->phase = phase;
    atomic_store_explicit(&t->done, 0, memory_order_relaxed);
    uint64_t gen = ((atomic_load_explicit(&t->work, memory_order_relaxed) >> (2 * WORK_BITS)) + 1) & 0xffff;
    /* NOTE: seq_cst store, then seq_cst wake_seq bump and sleepers load, against the worker's sleepers bump and
     * work load: one side sees the other, so a parking worker never misses a job. */
    atomic_store_explicit(&t->work, (gen << (2 * WORK_BITS)) | ((uint64_t)n << WORK_BITS), memory_order_seq_cst);
    atomic_fetch_add_explicit(&t->wake_seq, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&t->sleepers, memory_order_seq_cst)) ring_futex_wake(&t->wake_seq, 0);
    team_work(t, &t->workers[0]);
    while (atomic_load_explicit(&t->done, memory_order_acquire) < n) ring_cpu_relax();
}

static void pin_thread(Team *t, int tid) {
    if (t->ncpus <= 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(t->cpus[tid % t->ncpus], &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *worker_main(void *arg) {
    Worker *w = arg;
    Team *t = w->team;
    pin_thread(t, w->tid);
    uint64_t idle_since = ring_now_ns();
    while (!atomic_load_explicit(&t->stop, memory_order_relaxed)) {
        if (team_work(t, w)) idle_since = ring_now_ns();
        uint64_t cur = atomic_load_explicit(&t->work, memory_order_acquire);
        if ((cur & WORK_MASK) < ((cur >> WORK_BITS) & WORK_MASK)) continue;
        if (ring_now_ns() - idle_since < t->spin_ns) {
            for (int i = 0; i < 64; i++) ring_cpu_relax();
            continue;
        }
        uint32_t seq = atomic_load_explicit(&t->wake_seq, memory_order_acquire);
        atomic_fetch_add_explicit(&t->sleepers, 1, memory_order_seq_cst);
        cur = atomic_load_explicit(&t->work, memory_order_seq_cst);
        if ((cur & WORK_MASK) >= ((cur >> WORK_BITS) & WORK_MASK) && !atomic_load(&t->stop))
            ring_futex_wait(&t->wake_seq, seq, LEADER_WAIT_NS, 0);
        atomic_fetch_sub_explicit(&t->sleepers, 1, memory_order_seq_cst);
        idle_since = ring_now_ns();
    }
    return NULL;
}

/* Blocks until `nbytes` fit the response ring: 0 with the payload offset, or -1 (stop, closed, corrupt). */
static int reserve_response(Team *t, uint64_t nbytes, uint64_t *off) {
    uint64_t waited = 0;
    for (;;) {
        int rc = ring_try_reserve(&t->resp, nbytes, off);
        if (rc == 1) return 0;
        if (rc < 0) {
            team_exit(t, "response ring counters are inconsistent");
            return -1;
        }
        uint64_t t0 = ring_now_ns();
        int w = ring_wait(&t->resp, 1, t->resp.observed, LEADER_WAIT_NS, waited, &t->stop);
        waited += ring_now_ns() - t0;
        if (w == RING_WAIT_CLOSED) {
            team_exit(t, "the response ring was closed by the peer");
            return -1;
        }
        if (w == RING_WAIT_STOP) return -1;
    }
}

/* Answers with an ERROR record; 0, or -1 when the team must stop. */
static int reply_error(Team *t, uint64_t tag, uint32_t code, const char *text) {
    size_t n = strlen(text);
    if (n > MSG_MAX_ERROR_TEXT) n = MSG_MAX_ERROR_TEXT;
    uint64_t off;
    t->resp.reserved = 0;
    if (reserve_response(t, MSG_HEADER + n, &off) < 0) return -1;
    uint8_t *p = t->resp.base + off;
    put_u64(p, tag);
    put_u32(p + 8, code);
    put_u32(p + 12, (uint32_t)n);
    memcpy(p + MSG_HEADER, text, n);
    ring_commit(&t->resp, MSG_ERROR, MSG_HEADER + n);
    atomic_fetch_add_explicit(&t->errors, 1, memory_order_relaxed);
    return 0;
}

static int grow_batch(Team *t, int64_t B, int64_t nrows) {
    if (B > t->cap_batch) {
        int64_t *rows = realloc(t->rows, sizeof(int64_t) * (size_t)B);
        if (!rows) return -1;
        t->rows = rows;
        int32_t *blocks = realloc(t->blocks, sizeof(int32_t) * (size_t)B);
        if (!blocks) return -1;
        t->blocks = blocks;
        int32_t *offs = realloc(t->offs, sizeof(int32_t) * (size_t)B);
        if (!offs) return -1;
        t->offs = offs;
        t->cap_batch = B;
    }
    if (nrows > t->cap_seen) {
        uint8_t *seen = realloc(t->seen, (size_t)nrows);
        if (!seen) return -1;
        memset(seen + t->cap_seen, 0, (size_t)(nrows - t->cap_seen));
        t->seen = seen;
        t->cap_seen = nrows;
    }
    return 0;
}

enum { HANDLED = 0, PUNT = 1, STOPPED = 2 };

/*
 * One ATTN record (layout: cpu_attn/messages.py): checks as the Python handler does, append + attention with the
 * output written in place in the response slot, ATTN_OUT committed. A refused request gets an ERROR record.
 */
static int handle_attn(Team *t, const ring_record *rec) {
    const uint8_t *p = t->req.base + rec->offset;
    char why[320];
    uint64_t tag = rec->length >= 8 ? get_u64(p) : 0;
    uint32_t code = ERR_INVALID;
    if (rec->length < MSG_HEADER) {
        snprintf(why, sizeof why, "ATTN payload of %llu bytes is shorter than its header",
                 (unsigned long long)rec->length);
        return reply_error(t, tag, code, why) < 0 ? STOPPED : HANDLED;
    }
    const uint32_t layer = get_u32(p + 8), B = get_u32(p + 12), hq = get_u32(p + 16), hkv = get_u32(p + 20),
                   D = get_u32(p + 24), has_kv = get_u32(p + 28) & 1u;
    const uint32_t dims[4] = {B, hq, hkv, D};
    static const char *names[4] = {"batch", "num_heads", "num_kv_heads", "head_dim"};
    for (int i = 0; i < 4; i++) {
        if (dims[i] == 0 || dims[i] > MSG_MAX_DIM) {
            snprintf(why, sizeof why, "%s=%u is out of range (1..%u)", names[i], dims[i], MSG_MAX_DIM);
            return reply_error(t, tag, code, why) < 0 ? STOPPED : HANDLED;
        }
    }
    const uint64_t off_ctx = align64(MSG_HEADER + 8ull * B), off_q = align64(off_ctx + 8ull * B);
    const uint64_t off_k = align64(off_q + 4ull * B * hq * D), off_v = align64(off_k + 4ull * B * hkv * D);
    const uint64_t nbytes = has_kv ? off_v + 4ull * B * hkv * D : off_k;
    if (nbytes != rec->length) {
        snprintf(why, sizeof why, "ATTN payload is %llu bytes, its header describes %llu",
                 (unsigned long long)rec->length, (unsigned long long)nbytes);
        return reply_error(t, tag, code, why) < 0 ? STOPPED : HANDLED;
    }
    const uint64_t out_bytes = MSG_HEADER + 4ull * B * hq * D;
    if (ring_slots_for(&t->resp, out_bytes) == 0) {
        /* NOTE: the Python data plane's wording (neoserve/shm_ring.py), so an answer is refused alike on both. */
        snprintf(why, sizeof why, "an answer of %llu bytes exceeds the ring's maximum message size; "
                 "split the batch", (unsigned long long)out_bytes);
        return reply_error(t, tag, code, why) < 0 ? STOPPED : HANDLED;
    }
    uint64_t out_off;
    if (reserve_response(t, out_bytes, &out_off) < 0) return STOPPED;
    uint8_t *out = t->resp.base + out_off;
    const int64_t *seq_ids = (const int64_t *)(p + MSG_HEADER), *ctx = (const int64_t *)(p + off_ctx);

    CacheIndex *ix = t->index;
    pthread_mutex_lock(&ix->mu);
    const uint64_t start = ring_now_ns();
    const Geom *g = &ix->g;
    int outcome = -1; /* -1: refused with `code`/`why`; otherwise HANDLED or PUNT */
    if (ix->retired || !ix->bound) {
        outcome = PUNT;
    } else if (layer >= (uint32_t)g->num_layers) {
        snprintf(why, sizeof why, "layer %u is outside [0, %d)", layer, g->num_layers);
    } else if ((int)hq != t->hq || (int)hkv != g->hkv || (int)D != g->d) {
        snprintf(why, sizeof why, "batch shape (Hq=%u, Hkv=%u, D=%u) does not match the configured (%d, %d, %d)",
                 hq, hkv, D, t->hq, g->hkv, g->d);
    } else if (grow_batch(t, B, ix->nrows) < 0) {
        code = ERR_INTERNAL;
        snprintf(why, sizeof why, "out of memory");
    } else {
        outcome = HANDLED;
        for (uint32_t b = 0; b < B && outcome == HANDLED; b++) {
            int64_t at = index_find(ix, seq_ids[b]);
            if (at >= ix->n || ix->keys[at] != seq_ids[b]) {
                code = ERR_UNKNOWN_SEQUENCE;
                snprintf(why, sizeof why, "unknown sequence %lld", (long long)seq_ids[b]);
                outcome = -1;
            } else {
                t->rows[b] = ix->vals[at];
            }
        }
        /* NOTE: a byte per table row marks the rows seen, then is cleared: duplicates in O(B). */
        for (uint32_t b = 0; b < B && outcome == HANDLED; b++) {
            if (t->seen[t->rows[b]]) {
                snprintf(why, sizeof why, "a sequence appears twice in one batch");
                outcome = -1;
            }
            t->seen[t->rows[b]] = 1;
        }
        for (uint32_t b = 0; b < B && t->rows && b < t->cap_batch; b++)
            if (t->rows[b] >= 0 && t->rows[b] < t->cap_seen) t->seen[t->rows[b]] = 0;
    }
    if (outcome == HANDLED) {
        int64_t *row_tokens = ix->tokens.buf;
        int rc = decode_prepare(g, ix->table.buf, ix->stride, ix->nrows, row_tokens, ix->blocks.buf, t->rows, ctx,
                                B, (int)has_kv, t->blocks, t->offs, why, sizeof why);
        if (rc == DECODE_UNRESERVED) outcome = PUNT; /* Python reserves the block (CpuKVCache.decode) */
        else if (rc != DECODE_OK) outcome = -1;
    }
    if (outcome != HANDLED) {
        pthread_mutex_unlock(&ix->mu);
        t->resp.reserved = 0;
        if (outcome == PUNT) return PUNT;
        return reply_error(t, tag, code, why) < 0 ? STOPPED : HANDLED;
    }
    if (has_kv) {
        copy_tokens_serial(g, (int)layer, B, t->blocks, t->offs, (float *)(p + off_k), (float *)(p + off_v), 1,
                           t->copy_scratch);
        decode_advance(ix->tokens.buf, t->rows, ctx, B);
    }
    Job job = {g, (int)layer, ix->table.buf, ix->stride, t->rows, ctx, (const float *)(p + off_q),
               (float *)(out + MSG_HEADER), (int)hq, (int)(hq / hkv), t->scale};
    int ok = attn_plan(&job, (int)B, t->nthreads, &t->plan) == 0;
    if (ok) {
        t->job = &job;
        if (t->nthreads > 1 && t->plan.n_items > 1 && t->plan.n_items < (int64_t)WORK_MASK) {
            team_parallel(t, 0, t->plan.n_items);
            team_parallel(t, 1, t->plan.n_merges);
        } else {
            for (int64_t k = 0; k < t->plan.n_items; k++) attn_run_item(&job, &t->plan, k, &t->workers[0].sc, t->avx);
            for (int64_t k = 0; k < t->plan.n_merges; k++) attn_run_merge(&job, &t->plan, k);
        }
        t->job = NULL;
    }
    const uint64_t end = ring_now_ns();
    pthread_mutex_unlock(&ix->mu);
    if (!ok) {
        t->resp.reserved = 0;
        return reply_error(t, tag, ERR_INTERNAL, "out of memory planning the attention") < 0 ? STOPPED : HANDLED;
    }
    put_u64(out, tag);
    put_u32(out + 8, layer);
    put_u32(out + 12, B);
    put_u32(out + 16, hq);
    put_u32(out + 20, D);
    put_u64(out + 24, start);
    put_u64(out + 32, end);
    ring_commit(&t->resp, MSG_ATTN_OUT, out_bytes);
    atomic_fetch_add_explicit(&t->handled, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&t->busy_ns, end - start, memory_order_relaxed);
    return HANDLED;
}

/* Hands the held record to the Python thread and parks until it has answered; HANDLED or STOPPED. */
static int punt(Team *t, const ring_record *rec) {
    t->punt_rec = *rec;
    atomic_store_explicit(&t->punt, PUNT_WAITING, memory_order_release);
    ring_futex_wake(&t->punt, 0);
    atomic_fetch_add_explicit(&t->punted, 1, memory_order_relaxed);
    const uint64_t t0 = ring_now_ns();
    for (;;) {
        uint32_t v = atomic_load_explicit(&t->punt, memory_order_acquire);
        if (v == PUNT_DONE) break;
        if (atomic_load_explicit(&t->stop, memory_order_relaxed)) return STOPPED;
        if (ring_now_ns() - t0 < t->spin_ns) ring_cpu_relax();
        else ring_futex_wait(&t->punt, v, LEADER_WAIT_NS, 0);
    }
    atomic_store_explicit(&t->punt, PUNT_IDLE, memory_order_relaxed);
    return HANDLED;
}

static void *leader_main(void *arg) {
    Worker *w = arg;
    Team *t = w->team;
    pin_thread(t, 0);
    uint64_t waited = 0;
    char why[200], text[300];
    while (!atomic_load_explicit(&t->stop, memory_order_relaxed)) {
        ring_record rec;
        int rc = ring_try_peek(&t->req, &rec, why, sizeof why);
        if (rc == 0) {
            uint64_t t0 = ring_now_ns();
            int r = ring_wait(&t->req, 0, t->req.observed, LEADER_WAIT_NS, waited, &t->stop);
            waited += ring_now_ns() - t0;
            if (r == RING_WAIT_CLOSED) {
                team_exit(t, "the request ring was closed by the peer");
                break;
            }
            continue;
        }
        waited = 0;
        if (rc < 0) {
            int64_t skipped = ring_skip_corrupt(&t->req);
            if (skipped < 0) {
                team_exit(t, "request ring counters are inconsistent; the ring cannot be resynchronized");
                break;
            }
            snprintf(text, sizeof text, "request ring: %s; skipped %lld slot(s)", why, (long long)skipped);
            if (reply_error(t, 0, ERR_CORRUPT, text) < 0) break;
            continue;
        }
        int r = rec.type == MSG_ATTN ? handle_attn(t, &rec) : PUNT;
        if (r == PUNT) r = punt(t, &rec);
        if (r == STOPPED) break;
        ring_release(&t->req);
    }
    team_exit(t, "stopped");
    atomic_store_explicit(&t->exited, 1, memory_order_release);
    ring_futex_wake(&t->punt, 0);
    return NULL;
}

static void team_stop(Team *t) {
    if (!t->running) return;
    atomic_store_explicit(&t->stop, 1, memory_order_seq_cst);
    /* NOTE: wake every place a team thread may sleep: the rings' counter words (shared futexes), the job word
     * and the punt word (private ones). */
    ring_futex_wake(futex_word(t->req.base, OFF_HEAD), 1);
    ring_futex_wake(futex_word(t->resp.base, OFF_TAIL), 1);
    ring_futex_wake(&t->wake_seq, 0);
    ring_futex_wake(&t->punt, 0);
    for (int i = 0; i < t->nthreads; i++)
        if (t->workers[i].started) {
            pthread_join(t->workers[i].thread, NULL);
            t->workers[i].started = 0;
        }
    t->running = 0;
}

static void team_free_buffers(Team *t) {
    if (t->workers)
        for (int i = 0; i < t->nthreads; i++) free(t->workers[i].sc.qs);
    free(t->workers);
    free(t->cpus);
    free(t->rows);
    free(t->blocks);
    free(t->offs);
    free(t->seen);
    free(t->copy_scratch);
    attn_plan_free(&t->plan);
    t->workers = NULL;
    t->cpus = NULL;
    t->rows = NULL;
    t->blocks = t->offs = NULL;
    t->seen = NULL;
    t->copy_scratch = NULL;
}

static void team_release_views(Team *t) {
    if (!t->has_views) return;
    PyBuffer_Release(&t->req_view);
    PyBuffer_Release(&t->resp_view);
    t->has_views = 0;
}

/* Team(index, request_mapping, response_mapping, num_heads, scale, threads, cpus, spin_ns): not started yet. */
static int Team_init(Team *self, PyObject *args, PyObject *kwds) {
    PyObject *index, *req, *resp, *cpus;
    int hq, nthreads;
    float scale;
    unsigned long long spin_ns;
    if (!PyArg_ParseTuple(args, "O!OOifiOK", &CacheIndexType, &index, &req, &resp, &hq, &scale, &nthreads, &cpus,
                          &spin_ns))
        return -1;
    if (self->running || self->has_views) {
        PyErr_SetString(PyExc_RuntimeError, "a Team is initialised once");
        return -1;
    }
    CacheIndex *ix = (CacheIndex *)index;
    if (nthreads < 1 || nthreads > 1024 || hq <= 0 || hq % ix->g.hkv != 0) {
        PyErr_SetString(PyExc_ValueError, "Team: threads must be in [1, 1024] and num_heads a multiple of Hkv");
        return -1;
    }
    PyObject *seq = PySequence_Fast(cpus, "cpus must be a sequence of ints");
    if (!seq) return -1;
    self->ncpus = (int)PySequence_Fast_GET_SIZE(seq);
    self->cpus = calloc((size_t)(self->ncpus ? self->ncpus : 1), sizeof(int));
    for (int i = 0; i < self->ncpus && self->cpus; i++)
        self->cpus[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
    Py_DECREF(seq);
    if (!self->cpus || PyErr_Occurred()) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return -1;
    }
    if (PyObject_GetBuffer(req, &self->req_view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (PyObject_GetBuffer(resp, &self->resp_view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&self->req_view);
        return -1;
    }
    self->has_views = 1;
    char why[200];
    if (ring_end_init(&self->req, self->req_view.buf, (uint64_t)self->req_view.len, spin_ns, 200000, 2000000, why,
                      sizeof why) < 0 ||
        ring_end_init(&self->resp, self->resp_view.buf, (uint64_t)self->resp_view.len, spin_ns, 200000, 2000000,
                      why, sizeof why) < 0) {
        team_release_views(self);
        PyErr_SetString(PyExc_ValueError, why);
        return -1;
    }
    Py_XSETREF(self->index, (CacheIndex *)Py_NewRef(index));
    self->hq = hq;
    self->scale = scale;
    self->nthreads = nthreads;
    self->spin_ns = spin_ns;
    self->avx = use_avx512();
    const Geom *g = &ix->g;
    self->workers = calloc((size_t)nthreads, sizeof(Worker));
    self->copy_scratch = malloc(sizeof(float) * COPY_SCRATCH_FLOATS(g->d));
    if (!self->workers || !self->copy_scratch) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < nthreads; i++) {
        self->workers[i].team = self;
        self->workers[i].tid = i;
        if (attn_scratch_alloc(&self->workers[i].sc, hq / g->hkv, g->d, g->dp, g->bs) < 0) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static PyObject *Team_start(Team *self, PyObject *Py_UNUSED(ignored)) {
    if (self->running || !self->workers) {
        PyErr_SetString(PyExc_RuntimeError, "the team is running or was never initialised");
        return NULL;
    }
    self->running = 1;
    for (int i = 0; i < self->nthreads; i++) {
        int rc = pthread_create(&self->workers[i].thread, NULL, i == 0 ? leader_main : worker_main,
                                &self->workers[i]);
        if (rc != 0) {
            team_stop(self);
            PyErr_Format(PyExc_OSError, "cannot start team thread %d: %s", i, strerror(rc));
            return NULL;
        }
        self->workers[i].started = 1;
    }
    Py_RETURN_NONE;
}

/* stop(): stops and joins every thread (requests not yet answered stay unanswered), then lets go of the rings. */
static PyObject *Team_stop(Team *self, PyObject *Py_UNUSED(ignored)) {
    Py_BEGIN_ALLOW_THREADS team_stop(self);
    Py_END_ALLOW_THREADS
    team_release_views(self);
    Py_RETURN_NONE;
}

/* wait_punt(timeout_s) -> (type, seq, payload_offset, length) of a record for Python, or None (timeout, or the
 * leader has exited: see exit_reason()). Releases the GIL. */
static PyObject *Team_wait_punt(Team *self, PyObject *arg) {
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    int got = 0;
    Py_BEGIN_ALLOW_THREADS
    const uint64_t deadline = ring_now_ns() + (uint64_t)(timeout > 0 ? timeout * 1e9 : 0);
    for (;;) {
        uint32_t v = atomic_load_explicit(&self->punt, memory_order_acquire);
        if (v == PUNT_WAITING) { got = 1; break; }
        if (atomic_load_explicit(&self->exited, memory_order_acquire)) break;
        uint64_t now = ring_now_ns();
        if (now >= deadline) break;
        ring_futex_wait(&self->punt, v, deadline - now, 0);
    }
    Py_END_ALLOW_THREADS
    if (!got) Py_RETURN_NONE;
    const ring_record *r = &self->punt_rec;
    return Py_BuildValue("(IKKK)", (unsigned)r->type, (unsigned long long)r->seq, (unsigned long long)r->offset,
                         (unsigned long long)r->length);
}

/* punt_done(): Python has answered the punted record; the leader releases it and goes on. */
static PyObject *Team_punt_done(Team *self, PyObject *Py_UNUSED(ignored)) {
    if (atomic_load_explicit(&self->punt, memory_order_acquire) != PUNT_WAITING) {
        PyErr_SetString(PyExc_RuntimeError, "punt_done without a punted record");
        return NULL;
    }
    atomic_store_explicit(&self->punt, PUNT_DONE, memory_order_release);
    ring_futex_wake(&self->punt, 0);
    Py_RETURN_NONE;
}

/* exit_reason() -> None while the leader serves, else why it stopped. */
static PyObject *Team_exit_reason(Team *self, PyObject *Py_UNUSED(ignored)) {
    if (!atomic_load_explicit(&self->exited, memory_order_acquire)) Py_RETURN_NONE;
    return PyUnicode_FromString(self->exit_reason);
}

static PyObject *Team_stats(Team *self, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("{sKsKsKsK}", "handled", (unsigned long long)atomic_load(&self->handled), "errors",
                         (unsigned long long)atomic_load(&self->errors), "punted",
                         (unsigned long long)atomic_load(&self->punted), "busy_ns",
                         (unsigned long long)atomic_load(&self->busy_ns));
}

static PyObject *Team_get_running(Team *self, void *closure) { return PyBool_FromLong(self->running); }

static void Team_dealloc(Team *self) {
    /* NOTE: team threads never take the GIL, so joining them while holding it cannot deadlock. */
    team_stop(self);
    team_release_views(self);
    team_free_buffers(self);
    Py_XDECREF(self->index);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Team_methods[] = {
    {"start", (PyCFunction)Team_start, METH_NOARGS, "start the threads"},
    {"stop", (PyCFunction)Team_stop, METH_NOARGS, "stop and join the threads, let go of the rings"},
    {"wait_punt", (PyCFunction)Team_wait_punt, METH_O, "wait_punt(timeout_s) -> (type, seq, offset, length) | None"},
    {"punt_done", (PyCFunction)Team_punt_done, METH_NOARGS, "the punted record is answered"},
    {"exit_reason", (PyCFunction)Team_exit_reason, METH_NOARGS, "None while serving, else why it stopped"},
    {"stats", (PyCFunction)Team_stats, METH_NOARGS, "{handled, errors, punted, busy_ns}"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Team_getset[] = {
    {"running", (getter)Team_get_running, NULL, "threads started and not yet joined", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TeamType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cpu_attn._attn_kernel.Team",
    .tp_basicsize = sizeof(Team),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Team(index, request_mapping, response_mapping, num_heads, scale, threads, cpus, spin_ns)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Team_init,
    .tp_dealloc = (destructor)Team_dealloc,
    .tp_methods = Team_methods,
    .tp_getset = Team_getset,
};

int team_register(PyObject *m) {
    if (PyType_Ready(&CacheIndexType) < 0 || PyType_Ready(&TeamType) < 0) return -1;
    Py_INCREF(&CacheIndexType);
    if (PyModule_AddObject(m, "CacheIndex", (PyObject *)&CacheIndexType) < 0) return -1;
    Py_INCREF(&TeamType);
    if (PyModule_AddObject(m, "Team", (PyObject *)&TeamType) < 0) return -1;
    /* for the test that checks them against cpu_attn/messages.py */
    PyModule_AddIntConstant(m, "MSG_ATTN", MSG_ATTN);
    PyModule_AddIntConstant(m, "MSG_ATTN_OUT", MSG_ATTN_OUT);
    PyModule_AddIntConstant(m, "MSG_ERROR", MSG_ERROR);
    PyModule_AddIntConstant(m, "ERR_INTERNAL", ERR_INTERNAL);
    PyModule_AddIntConstant(m, "ERR_INVALID", ERR_INVALID);
    PyModule_AddIntConstant(m, "ERR_UNKNOWN_SEQUENCE", ERR_UNKNOWN_SEQUENCE);
    PyModule_AddIntConstant(m, "ERR_CORRUPT", ERR_CORRUPT);
    PyModule_AddIntConstant(m, "MSG_HEADER", MSG_HEADER);
    PyModule_AddIntConstant(m, "MSG_MAX_DIM", MSG_MAX_DIM);
    return 0;
}
