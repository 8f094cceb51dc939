/*
 * neoserve._shm: the hot path of the shared-memory SPSC ring (see neoserve/shm_ring.py for the Python API).
 *
 * Why C: the ordering guarantees must be real C11 acquire/release operations, not "plain Python stores that
 * happened to work on x86". A consumer must never read a payload before it has observed, with an acquire
 * load, the producer's release store of the head counter that published it; the producer must never
 * overwrite a slot before it has observed, with an acquire load, the consumer's release store of the tail
 * counter that freed it. Python code that touches payload bytes (numpy views) only does so between a C
 * call that performed the acquire and a C call that performs the release, which orders it correctly on
 * every architecture: the hardware orders program-order accesses around LDAR/STLR (or x86 TSO), and the
 * compiler cannot move accesses across the opaque call into this module.
 *
 * Segment layout (all integers little-endian, offsets in bytes; mirrored in neoserve/shm_ring.py):
 *
 *   0    u8[8]  magic "NEOSHMRB"
 *   8    u32    version (1)
 *   12   u32    header_size (256): offset of slot 0
 *   16   u32    slot_size (multiple of 64, >= 128)
 *   20   u32    slot_count (power of two)
 *   24   u64    total_size = header_size + slot_size * slot_count
 *   32   u32    owner_pid
 *   36   u32    reserved
 *   40   u64    owner_start_time (clock ticks since boot, /proc/<pid>/stat field 22)
 *   48   u64    created_unix_ns
 *   -- cache line 1 (written only by the producer)
 *   64   u64    head: slots published (monotonic; release-stored by producer, acquire-loaded by consumer)
 *   72   u64    records published (the next record's sequence number)
 *   -- cache line 2 (written only by the consumer)
 *   128  u64    tail: slots released (monotonic; release-stored by consumer, acquire-loaded by producer)
 *   136  u64    records consumed (the sequence number the consumer expects next)
 *   -- cache line 3 (rarely written)
 *   192  u32    consumer_waiting: consumer is (about to be) asleep in futex_wait on head
 *   196  u32    producer_waiting: producer is (about to be) asleep in futex_wait on tail
 *   200  u32    producer_pid
 *   204  u32    consumer_pid
 *   208  u32    closed flags (bit 0 producer closed, bit 1 consumer closed, bit 2 owner closed)
 *   256  slots
 *
 * A record starts at a slot boundary and spans `nslots` consecutive slots that never wrap past the end of
 * the slot array (a PAD record fills the tail end instead), so every payload is one contiguous range and can
 * be viewed zero-copy. Record header (64 bytes, at the start of its first slot):
 *
 *   0    u32    magic 0x4345524E ("NREC")
 *   4    u16    type (0 = PAD, skipped by the consumer; other values are the caller's)
 *   6    u16    flags (0)
 *   8    u32    nslots (slots this record spans, >= 1)
 *   12   u32    reserved (0)
 *   16   u64    seq (record sequence number; PAD records carry the next message's number)
 *   24   u64    length (payload bytes, <= nslots * slot_size - 64)
 *   32   u32    checksum: FNV-1a 32 of header bytes [0, 32)
 *   36   u8[28] reserved (0)
 *   64   payload
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RING_MAGIC "NEOSHMRB"
#define RING_VERSION 1u
#define HEADER_SIZE 256u
#define RECORD_MAGIC 0x4345524Eu
#define RECORD_HEADER 64u

#define OFF_HEAD 64
#define OFF_PUB_SEQ 72
#define OFF_TAIL 128
#define OFF_CON_SEQ 136
#define OFF_CONSUMER_WAITING 192
#define OFF_PRODUCER_WAITING 196
#define OFF_PRODUCER_PID 200
#define OFF_CONSUMER_PID 204
#define OFF_CLOSED 208

#define ROLE_PRODUCER 0
#define ROLE_CONSUMER 1
#define ROLE_INSPECT 2

static PyObject *CorruptError;  /* a record or the ring header failed validation */

/* ------------------------------------------------------------------------------------------------ helpers */

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static uint32_t fnv1a32(const uint8_t *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h;
}

static inline _Atomic uint64_t *a64(uint8_t *base, size_t off) { return (_Atomic uint64_t *)(base + off); }
static inline _Atomic uint32_t *a32(uint8_t *base, size_t off) { return (_Atomic uint32_t *)(base + off); }

/* The futex word is the low 32 bits of a 64-bit counter: it changes whenever the counter does. */
static inline uint32_t *futex_word(uint8_t *base, size_t counter_off) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return (uint32_t *)(base + counter_off);
#else
    return (uint32_t *)(base + counter_off + 4);
#endif
}

static void futex_wait(uint32_t *addr, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000ull);
    ts.tv_nsec = (long)(timeout_ns % 1000000000ull);
    /* NOTE: not FUTEX_PRIVATE: the word lives in a mapping shared between processes. */
    syscall(SYS_futex, addr, FUTEX_WAIT, expected, &ts, NULL, 0);
}

static void futex_wake(uint32_t *addr) { syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0); }

static inline void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint32_t get_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint16_t get_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline void put_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

static void write_record_header(uint8_t *rec, uint16_t type, uint32_t nslots, uint64_t seq, uint64_t length) {
    memset(rec, 0, RECORD_HEADER);
    put_u32(rec + 0, RECORD_MAGIC);
    put_u16(rec + 4, type);
    put_u16(rec + 6, 0);
    put_u32(rec + 8, nslots);
    put_u32(rec + 12, 0);
    put_u64(rec + 16, seq);
    put_u64(rec + 24, length);
    put_u32(rec + 32, fnv1a32(rec, 32));
}

/* -------------------------------------------------------------------------------------- RingCore object */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    uint8_t *base;
    uint64_t size;
    uint32_t slot_size, slot_count, mask;
    int role;
    /* producer state: a reservation is [res_start, res_start + res_nslots) in slot-counter space */
    int reserved;
    uint64_t res_start;
    uint32_t res_nslots;
    uint64_t res_capacity;
    /* consumer state: the record being held (peeked, not yet released) */
    int holding;
    uint32_t hold_nslots;
    /* the counter value the last unsuccessful try_reserve (tail) / try_peek (head) saw: what to wait on */
    uint64_t observed;
    /* wait policy */
    uint64_t spin_ns, yield_ns, max_sleep_ns;
} RingCore;

static int validate_header(const uint8_t *b, uint64_t buflen, char *why, size_t whylen) {
    if (buflen < HEADER_SIZE) {
        snprintf(why, whylen, "segment is %llu bytes, smaller than the %u-byte header", (unsigned long long)buflen,
                 HEADER_SIZE);
        return -1;
    }
    if (memcmp(b, RING_MAGIC, 8) != 0) {
        snprintf(why, whylen, "bad ring magic (not a neoserve ring segment)");
        return -1;
    }
    uint32_t version = get_u32(b + 8), hsize = get_u32(b + 12), ssize = get_u32(b + 16), count = get_u32(b + 20);
    uint64_t total = get_u64(b + 24);
    if (version != RING_VERSION) {
        snprintf(why, whylen, "ring version %u, this build speaks %u", version, RING_VERSION);
        return -1;
    }
    if (hsize != HEADER_SIZE || ssize < 128 || ssize % 64 != 0 || count == 0 || (count & (count - 1)) != 0) {
        snprintf(why, whylen, "inconsistent ring geometry (header %u, slot size %u, slot count %u)", hsize, ssize,
                 count);
        return -1;
    }
    if (total != (uint64_t)HEADER_SIZE + (uint64_t)ssize * count || total > buflen) {
        snprintf(why, whylen, "ring total size %llu does not match geometry or segment size %llu",
                 (unsigned long long)total, (unsigned long long)buflen);
        return -1;
    }
    return 0;
}

static int RingCore_init(RingCore *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"buffer", "role", "spin_ns", "yield_ns", "max_sleep_ns", NULL};
    PyObject *buffer;
    int role;
    unsigned long long spin_ns = 50000, yield_ns = 200000, max_sleep_ns = 2000000;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oi|KKK", kwlist, &buffer, &role, &spin_ns, &yield_ns,
                                     &max_sleep_ns))
        return -1;
    if (role < ROLE_PRODUCER || role > ROLE_INSPECT) {
        PyErr_SetString(PyExc_ValueError, "role must be 0 (producer), 1 (consumer) or 2 (inspect)");
        return -1;
    }
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    self->has_view = 1;
    self->base = (uint8_t *)self->view.buf;
    self->size = (uint64_t)self->view.len;
    if (((uintptr_t)self->base & 63u) != 0) {
        PyErr_SetString(PyExc_ValueError, "ring buffer must be 64-byte aligned");
        return -1;
    }
    char why[200];
    if (validate_header(self->base, self->size, why, sizeof why) < 0) {
        PyErr_SetString(CorruptError, why);
        return -1;
    }
    self->slot_size = get_u32(self->base + 16);
    self->slot_count = get_u32(self->base + 20);
    self->mask = self->slot_count - 1;
    self->role = role;
    self->reserved = 0;
    self->holding = 0;
    self->spin_ns = spin_ns;
    self->yield_ns = yield_ns;
    self->max_sleep_ns = max_sleep_ns > 0 ? max_sleep_ns : 1000;
    return 0;
}

static void RingCore_dealloc(RingCore *self) {
    if (self->has_view) PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_alive(RingCore *self) {
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "ring is detached");
        return -1;
    }
    return 0;
}

static PyObject *RingCore_detach(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
        self->base = NULL;
    }
    Py_RETURN_NONE;
}

static inline uint8_t *slot_ptr(RingCore *self, uint64_t counter) {
    return self->base + HEADER_SIZE + (uint64_t)(counter & self->mask) * self->slot_size;
}

/* ---------------------------------------------------------------------------------------------- producer */

/* Publishes `nslots` slots starting at the current head: release store, then wake a sleeping consumer. */
static void publish(RingCore *self, uint64_t new_head, uint64_t new_seq) {
    atomic_store_explicit(a64(self->base, OFF_PUB_SEQ), new_seq, memory_order_relaxed);
    atomic_store_explicit(a64(self->base, OFF_HEAD), new_head, memory_order_release);
    /* NOTE: store(head) ; fence(seq_cst) ; load(waiting) pairs with the waiter's store(waiting) ; fence(seq_cst) ;
     * load(head): at least one side sees the other's store, so a wake-up is never lost. */
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(a32(self->base, OFF_CONSUMER_WAITING), memory_order_relaxed))
        futex_wake(futex_word(self->base, OFF_HEAD));
}

/* try_reserve(nbytes) -> payload offset, or -1 when the ring has no room yet. */
static PyObject *RingCore_try_reserve(RingCore *self, PyObject *arg) {
    if (check_alive(self) < 0) return NULL;
    if (self->role != ROLE_PRODUCER) {
        PyErr_SetString(PyExc_RuntimeError, "try_reserve on a non-producer ring end");
        return NULL;
    }
    unsigned long long nbytes = PyLong_AsUnsignedLongLong(arg);
    if (nbytes == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    uint64_t need64 = (nbytes + RECORD_HEADER + self->slot_size - 1) / self->slot_size;
    if (need64 > self->slot_count) {
        PyErr_Format(PyExc_ValueError, "message of %llu bytes needs %llu slots, the ring has %u", nbytes,
                     (unsigned long long)need64, self->slot_count);
        return NULL;
    }
    uint32_t need = (uint32_t)need64;
    if (self->reserved) {
        /* Re-reserving replaces an uncommitted reservation (same start). */
        self->reserved = 0;
    }
    uint64_t head = atomic_load_explicit(a64(self->base, OFF_HEAD), memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(a64(self->base, OFF_TAIL), memory_order_acquire);
    if (head - tail > self->slot_count) {
        PyErr_SetString(CorruptError, "ring counters are inconsistent (head - tail > slot count)");
        return NULL;
    }
    uint64_t free_slots = self->slot_count - (head - tail);
    uint32_t idx = (uint32_t)(head & self->mask);
    if (idx + need > self->slot_count) {
        /* The record would wrap: fill the end of the slot array with a PAD record, published on its own so a
         * record of up to slot_count slots always fits once the consumer catches up. */
        uint32_t pad = self->slot_count - idx;
        if (free_slots < pad) { self->observed = tail; return PyLong_FromLong(-1); }
        uint64_t seq = atomic_load_explicit(a64(self->base, OFF_PUB_SEQ), memory_order_relaxed);
        write_record_header(slot_ptr(self, head), 0, pad, seq, 0);
        head += pad;
        free_slots -= pad;
        publish(self, head, seq);
    }
    if (free_slots < need) { self->observed = tail; return PyLong_FromLong(-1); }
    self->reserved = 1;
    self->res_start = head;
    self->res_nslots = need;
    self->res_capacity = (uint64_t)need * self->slot_size - RECORD_HEADER;
    uint64_t off = (uint64_t)(slot_ptr(self, head) - self->base) + RECORD_HEADER;
    return PyLong_FromUnsignedLongLong(off);
}

/* commit(type, length) -> record sequence number. Publishes the current reservation. */
static PyObject *RingCore_commit(RingCore *self, PyObject *args) {
    unsigned int type;
    unsigned long long length;
    if (!PyArg_ParseTuple(args, "IK", &type, &length)) return NULL;
    if (check_alive(self) < 0) return NULL;
    if (!self->reserved) {
        PyErr_SetString(PyExc_RuntimeError, "commit without a reservation");
        return NULL;
    }
    if (type == 0 || type > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "record type must be in [1, 65535] (0 is PAD)");
        return NULL;
    }
    if (length > self->res_capacity) {
        PyErr_Format(PyExc_ValueError, "commit of %llu bytes exceeds the reserved %llu", length,
                     (unsigned long long)self->res_capacity);
        return NULL;
    }
    uint64_t seq = atomic_load_explicit(a64(self->base, OFF_PUB_SEQ), memory_order_relaxed);
    write_record_header(slot_ptr(self, self->res_start), (uint16_t)type, self->res_nslots, seq, length);
    self->reserved = 0;
    publish(self, self->res_start + self->res_nslots, seq + 1);
    return PyLong_FromUnsignedLongLong(seq);
}

static PyObject *RingCore_cancel(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    self->reserved = 0;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------- consumer */

static int record_ok(RingCore *self, uint64_t at, uint64_t head, const char **why) {
    const uint8_t *rec = slot_ptr(self, at);
    uint32_t idx = (uint32_t)(at & self->mask);
    if (get_u32(rec) != RECORD_MAGIC) { *why = "bad record magic"; return 0; }
    if (get_u32(rec + 32) != fnv1a32(rec, 32)) { *why = "record header checksum mismatch"; return 0; }
    uint32_t nslots = get_u32(rec + 8);
    if (nslots == 0 || nslots > self->slot_count - idx) {
        *why = "record spans past the end of the slot array";
        return 0;
    }
    if (nslots > head - at) { *why = "record spans past the published head"; return 0; }
    uint64_t length = get_u64(rec + 24);
    if (length > (uint64_t)nslots * self->slot_size - RECORD_HEADER) {
        *why = "record length runs past its slots";
        return 0;
    }
    return 1;
}

static void advance_tail(RingCore *self, uint64_t new_tail, uint64_t new_seq) {
    atomic_store_explicit(a64(self->base, OFF_CON_SEQ), new_seq, memory_order_relaxed);
    /* NOTE: release orders every earlier read of the record's payload before the producer may reuse it. */
    atomic_store_explicit(a64(self->base, OFF_TAIL), new_tail, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(a32(self->base, OFF_PRODUCER_WAITING), memory_order_relaxed))
        futex_wake(futex_word(self->base, OFF_TAIL));
}

/* try_peek() -> None if empty, else (type, seq, payload_offset, length). Skips PAD records. Raises CorruptError. */
static PyObject *RingCore_try_peek(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    if (self->role != ROLE_CONSUMER) {
        PyErr_SetString(PyExc_RuntimeError, "try_peek on a non-consumer ring end");
        return NULL;
    }
    if (self->holding) {
        PyErr_SetString(PyExc_RuntimeError, "release the current record before peeking the next");
        return NULL;
    }
    for (;;) {
        uint64_t tail = atomic_load_explicit(a64(self->base, OFF_TAIL), memory_order_relaxed);
        uint64_t head = atomic_load_explicit(a64(self->base, OFF_HEAD), memory_order_acquire);
        if (head == tail) { self->observed = head; Py_RETURN_NONE; }
        if (head - tail > self->slot_count) {
            PyErr_SetString(CorruptError, "ring counters are inconsistent (head - tail > slot count)");
            return NULL;
        }
        const char *why = NULL;
        if (!record_ok(self, tail, head, &why)) {
            PyErr_SetString(CorruptError, why);
            return NULL;
        }
        const uint8_t *rec = slot_ptr(self, tail);
        uint16_t type = get_u16(rec + 4);
        uint32_t nslots = get_u32(rec + 8);
        uint64_t seq = get_u64(rec + 16);
        uint64_t length = get_u64(rec + 24);
        uint64_t expected = atomic_load_explicit(a64(self->base, OFF_CON_SEQ), memory_order_relaxed);
        if (type == 0) {  /* PAD: release it (waking a producer waiting for room) and look again */
            advance_tail(self, tail + nslots, expected);
            continue;
        }
        if (seq != expected) {
            PyErr_Format(CorruptError, "record sequence number %llu, expected %llu", (unsigned long long)seq,
                         (unsigned long long)expected);
            return NULL;
        }
        self->holding = 1;
        self->hold_nslots = nslots;
        uint64_t off = (uint64_t)(rec - self->base) + RECORD_HEADER;
        return Py_BuildValue("(IKKK)", (unsigned int)type, (unsigned long long)seq, (unsigned long long)off,
                             (unsigned long long)length);
    }
}

static PyObject *RingCore_release(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    if (!self->holding) {
        PyErr_SetString(PyExc_RuntimeError, "release without a peeked record");
        return NULL;
    }
    uint64_t tail = atomic_load_explicit(a64(self->base, OFF_TAIL), memory_order_relaxed);
    uint64_t seq = atomic_load_explicit(a64(self->base, OFF_CON_SEQ), memory_order_relaxed);
    self->holding = 0;
    advance_tail(self, tail + self->hold_nslots, seq + 1);
    Py_RETURN_NONE;
}

/* skip_corrupt() -> slots skipped. After a CorruptError: move the tail to the next slot (below head) whose
 * header is a valid record, or to head. Everything below head is published, so the scan never races. */
static PyObject *RingCore_skip_corrupt(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    self->holding = 0;
    uint64_t tail = atomic_load_explicit(a64(self->base, OFF_TAIL), memory_order_relaxed);
    uint64_t head = atomic_load_explicit(a64(self->base, OFF_HEAD), memory_order_acquire);
    uint64_t expected = atomic_load_explicit(a64(self->base, OFF_CON_SEQ), memory_order_relaxed);
    if (head - tail > self->slot_count) {
        PyErr_SetString(CorruptError, "ring counters are inconsistent; the ring cannot be resynchronized");
        return NULL;
    }
    uint64_t at = tail + 1;
    uint64_t new_seq = expected;
    for (; at < head; at++) {
        const char *why;
        if (record_ok(self, at, head, &why)) {
            uint64_t seq = get_u64(slot_ptr(self, at) + 16);
            if (seq >= expected) {
                new_seq = seq;
                break;
            }
        }
    }
    if (at >= head) {
        at = head;
        new_seq = atomic_load_explicit(a64(self->base, OFF_PUB_SEQ), memory_order_relaxed);
    }
    advance_tail(self, at, new_seq);
    return PyLong_FromUnsignedLongLong(at - tail);
}

/* ------------------------------------------------------------------------------------------------ waiting */

/* wait(which, observed, budget_ns, waited_ns) -> 1 counter changed, 0 budget spent, 2 ring closed.
 * which = 0: wait for head != observed (consumer); 1: wait for tail != observed (producer).
 * Spins for spin_ns, then sched_yield()s until spin_ns + yield_ns, then sleeps in futex_wait with a timeout
 * that doubles up to max_sleep_ns (the peer's futex_wake ends it at once). `waited_ns` is the time already
 * spent waiting in earlier calls, so the phase carries on across calls. Releases the GIL. */
static PyObject *RingCore_wait(RingCore *self, PyObject *args) {
    int which;
    unsigned long long observed, budget_ns, waited_ns;
    if (!PyArg_ParseTuple(args, "iKKK", &which, &observed, &budget_ns, &waited_ns)) return NULL;
    if (check_alive(self) < 0) return NULL;
    size_t counter_off = which == 0 ? OFF_HEAD : OFF_TAIL;
    size_t waiting_off = which == 0 ? OFF_CONSUMER_WAITING : OFF_PRODUCER_WAITING;
    uint8_t *base = self->base;
    _Atomic uint64_t *counter = a64(base, counter_off);
    _Atomic uint32_t *waiting = a32(base, waiting_off);
    _Atomic uint32_t *closed = a32(base, OFF_CLOSED);
    uint32_t *fw = futex_word(base, counter_off);
    int result = 0;
    Py_BEGIN_ALLOW_THREADS
    uint64_t start = now_ns();
    uint64_t sleep_ns = 20000;
    for (;;) {
        uint64_t spent = now_ns() - start;
        uint64_t phase = spent + waited_ns;
        if (phase < self->spin_ns) {
            /* NOTE: read the clock only every 64 polls; one poll + pause is a few tens of ns. */
            for (int i = 0; i < 64; i++) {
                if (atomic_load_explicit(counter, memory_order_acquire) != observed) { result = 1; break; }
                cpu_relax();
            }
            if (result) break;
        } else if (phase < self->spin_ns + self->yield_ns) {
            if (atomic_load_explicit(counter, memory_order_acquire) != observed) { result = 1; break; }
            sched_yield();
        } else {
            atomic_store_explicit(waiting, 1, memory_order_relaxed);
            atomic_thread_fence(memory_order_seq_cst);
            if (atomic_load_explicit(counter, memory_order_acquire) != observed) {
                atomic_store_explicit(waiting, 0, memory_order_relaxed);
                result = 1;
                break;
            }
            if (atomic_load_explicit(closed, memory_order_relaxed)) {
                atomic_store_explicit(waiting, 0, memory_order_relaxed);
                result = 2;
                break;
            }
            uint64_t left = spent < budget_ns ? budget_ns - spent : 0;
            if (left == 0) { atomic_store_explicit(waiting, 0, memory_order_relaxed); break; }
            /* The kernel re-checks the word against `observed` atomically, so a publish that lands between our
             * check and the sleep makes futex_wait return at once instead of losing the wake-up. */
            futex_wait(fw, (uint32_t)observed, sleep_ns < left ? sleep_ns : left);
            atomic_store_explicit(waiting, 0, memory_order_relaxed);
            sleep_ns = sleep_ns * 2 < self->max_sleep_ns ? sleep_ns * 2 : self->max_sleep_ns;
        }
        if (atomic_load_explicit(counter, memory_order_acquire) != observed) { result = 1; break; }
        if (atomic_load_explicit(closed, memory_order_relaxed)) { result = 2; break; }
        if (now_ns() - start >= budget_ns) break;
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(result);
}

/* --------------------------------------------------------------------------------------- misc accessors */

static PyObject *RingCore_counters(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    uint8_t *b = self->base;
    return Py_BuildValue("(KKKK)",
                         (unsigned long long)atomic_load_explicit(a64(b, OFF_HEAD), memory_order_acquire),
                         (unsigned long long)atomic_load_explicit(a64(b, OFF_TAIL), memory_order_acquire),
                         (unsigned long long)atomic_load_explicit(a64(b, OFF_PUB_SEQ), memory_order_relaxed),
                         (unsigned long long)atomic_load_explicit(a64(b, OFF_CON_SEQ), memory_order_relaxed));
}

static PyObject *RingCore_set_closed(RingCore *self, PyObject *arg) {
    if (check_alive(self) < 0) return NULL;
    long bits = PyLong_AsLong(arg);
    if (bits == -1 && PyErr_Occurred()) return NULL;
    atomic_fetch_or_explicit(a32(self->base, OFF_CLOSED), (uint32_t)bits, memory_order_seq_cst);
    futex_wake(futex_word(self->base, OFF_HEAD));
    futex_wake(futex_word(self->base, OFF_TAIL));
    Py_RETURN_NONE;
}

static PyObject *RingCore_closed(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    return PyLong_FromUnsignedLong(atomic_load_explicit(a32(self->base, OFF_CLOSED), memory_order_acquire));
}

static PyObject *RingCore_set_pid(RingCore *self, PyObject *args) {
    int role;
    unsigned int pid;
    if (!PyArg_ParseTuple(args, "iI", &role, &pid)) return NULL;
    if (check_alive(self) < 0) return NULL;
    atomic_store_explicit(a32(self->base, role == ROLE_PRODUCER ? OFF_PRODUCER_PID : OFF_CONSUMER_PID), pid,
                          memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *RingCore_pids(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    unsigned producer = atomic_load_explicit(a32(self->base, OFF_PRODUCER_PID), memory_order_acquire);
    unsigned consumer = atomic_load_explicit(a32(self->base, OFF_CONSUMER_PID), memory_order_acquire);
    return Py_BuildValue("(II)", producer, consumer);
}

static PyObject *RingCore_address(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    return PyLong_FromVoidPtr(self->base);
}

/* prefault(): touch one byte per 4 KiB page so the first messages do not take page faults. Reads only. */
static PyObject *RingCore_prefault(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    volatile uint8_t sink = 0;
    for (uint64_t off = 0; off < self->size; off += 4096) sink ^= ((volatile uint8_t *)self->base)[off];
    (void)sink;
    Py_RETURN_NONE;
}

static PyObject *RingCore_get_slot_size(RingCore *self, void *closure) {
    return PyLong_FromUnsignedLong(self->slot_size);
}
static PyObject *RingCore_get_slot_count(RingCore *self, void *closure) {
    return PyLong_FromUnsignedLong(self->slot_count);
}
static PyObject *RingCore_get_observed(RingCore *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->observed);
}
static PyObject *RingCore_get_holding(RingCore *self, void *closure) { return PyBool_FromLong(self->holding); }
static PyObject *RingCore_get_reserved(RingCore *self, void *closure) { return PyBool_FromLong(self->reserved); }

static PyMethodDef RingCore_methods[] = {
    {"try_reserve", (PyCFunction)RingCore_try_reserve, METH_O, "try_reserve(nbytes) -> payload offset or -1"},
    {"commit", (PyCFunction)RingCore_commit, METH_VARARGS, "commit(type, length) -> record seq"},
    {"cancel", (PyCFunction)RingCore_cancel, METH_NOARGS, "drop the current reservation"},
    {"try_peek", (PyCFunction)RingCore_try_peek, METH_NOARGS, "try_peek() -> None | (type, seq, offset, length)"},
    {"release", (PyCFunction)RingCore_release, METH_NOARGS, "release the peeked record"},
    {"skip_corrupt", (PyCFunction)RingCore_skip_corrupt, METH_NOARGS, "resync past a corrupt record"},
    {"wait", (PyCFunction)RingCore_wait, METH_VARARGS, "wait(which, observed, budget_ns, waited_ns) -> 0/1/2"},
    {"counters", (PyCFunction)RingCore_counters, METH_NOARGS, "(head, tail, published, consumed)"},
    {"set_closed", (PyCFunction)RingCore_set_closed, METH_O, "or bits into the closed word and wake waiters"},
    {"closed", (PyCFunction)RingCore_closed, METH_NOARGS, "closed bits"},
    {"set_pid", (PyCFunction)RingCore_set_pid, METH_VARARGS, "set_pid(role, pid)"},
    {"pids", (PyCFunction)RingCore_pids, METH_NOARGS, "(producer_pid, consumer_pid)"},
    {"address", (PyCFunction)RingCore_address, METH_NOARGS, "base address of the mapping"},
    {"prefault", (PyCFunction)RingCore_prefault, METH_NOARGS, "touch every page"},
    {"detach", (PyCFunction)RingCore_detach, METH_NOARGS, "release the buffer export"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef RingCore_getset[] = {
    {"slot_size", (getter)RingCore_get_slot_size, NULL, NULL, NULL},
    {"slot_count", (getter)RingCore_get_slot_count, NULL, NULL, NULL},
    {"holding", (getter)RingCore_get_holding, NULL, NULL, NULL},
    {"observed", (getter)RingCore_get_observed, NULL, "counter value seen by the last failed try", NULL},
    {"reserved", (getter)RingCore_get_reserved, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "neoserve._shm.RingCore",
    .tp_basicsize = sizeof(RingCore),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One end (producer, consumer or inspector) of a shared-memory SPSC ring over a writable buffer.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RingCore_init,
    .tp_dealloc = (destructor)RingCore_dealloc,
    .tp_methods = RingCore_methods,
    .tp_getset = RingCore_getset,
};

/* -------------------------------------------------------------------------------------- module functions */

/* init_segment(buffer, slot_size, slot_count, owner_pid, owner_start_time, created_ns): writes a fresh header. */
static PyObject *shm_init_segment(PyObject *mod, PyObject *args) {
    PyObject *buffer;
    unsigned int slot_size, slot_count, pid;
    unsigned long long start_time, created_ns;
    if (!PyArg_ParseTuple(args, "OIIIKK", &buffer, &slot_size, &slot_count, &pid, &start_time, &created_ns))
        return NULL;
    if (slot_size < 128 || slot_size % 64 != 0 || slot_count == 0 || (slot_count & (slot_count - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "slot_size must be a multiple of 64 >= 128; slot_count a power of two");
        return NULL;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(buffer, &v, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    uint64_t total = (uint64_t)HEADER_SIZE + (uint64_t)slot_size * slot_count;
    if ((uint64_t)v.len < total) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "buffer is smaller than the ring");
        return NULL;
    }
    uint8_t *b = (uint8_t *)v.buf;
    memset(b, 0, HEADER_SIZE);
    memcpy(b, RING_MAGIC, 8);
    put_u32(b + 8, RING_VERSION);
    put_u32(b + 12, HEADER_SIZE);
    put_u32(b + 16, slot_size);
    put_u32(b + 20, slot_count);
    put_u64(b + 24, total);
    put_u32(b + 32, pid);
    put_u64(b + 40, start_time);
    put_u64(b + 48, created_ns);
    atomic_thread_fence(memory_order_seq_cst);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *shm_header_size(PyObject *mod, PyObject *Py_UNUSED(ignored)) { return PyLong_FromLong(HEADER_SIZE); }
static PyObject *shm_record_header_size(PyObject *mod, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(RECORD_HEADER);
}

/* fnv1a32(buffer) -> int: the record-header checksum, exposed for tests and tools. */
static PyObject *shm_fnv1a32(PyObject *mod, PyObject *arg) {
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    uint32_t h = fnv1a32((const uint8_t *)v.buf, (size_t)v.len);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLong(h);
}

static PyMethodDef shm_methods[] = {
    {"init_segment", shm_init_segment, METH_VARARGS, "write a fresh ring header"},
    {"header_size", shm_header_size, METH_NOARGS, "segment header size"},
    {"record_header_size", shm_record_header_size, METH_NOARGS, "record header size"},
    {"fnv1a32", shm_fnv1a32, METH_O, "FNV-1a 32-bit hash"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef shm_module = {
    PyModuleDef_HEAD_INIT, "neoserve._shm", "Shared-memory SPSC ring primitives (C11 atomics, futex waits).", -1,
    shm_methods,
};

PyMODINIT_FUNC PyInit__shm(void) {
    if (PyType_Ready(&RingCoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&shm_module);
    if (!m) return NULL;
    Py_INCREF(&RingCoreType);
    if (PyModule_AddObject(m, "RingCore", (PyObject *)&RingCoreType) < 0) return NULL;
    CorruptError = PyErr_NewException("neoserve._shm.CorruptError", PyExc_ValueError, NULL);
    if (!CorruptError || PyModule_AddObject(m, "CorruptError", CorruptError) < 0) return NULL;
    PyModule_AddIntConstant(m, "ROLE_PRODUCER", ROLE_PRODUCER);
    PyModule_AddIntConstant(m, "ROLE_CONSUMER", ROLE_CONSUMER);
    PyModule_AddIntConstant(m, "ROLE_INSPECT", ROLE_INSPECT);
    PyModule_AddIntConstant(m, "CLOSED_PRODUCER", 1);
    PyModule_AddIntConstant(m, "CLOSED_CONSUMER", 2);
    PyModule_AddIntConstant(m, "CLOSED_OWNER", 4);
    return m;
}
