/*
 * The shared-memory SPSC ring protocol in plain C, with no Python in it: one end's local state (`ring_end`) and
 * the operations on it. neoserve/csrc/shm.c wraps it for Python (neoserve._shm.RingCore); the sidecar's resident
 * team (cpu_attn/csrc/team.c) runs it on its own threads. Byte layout and ordering rules: see shm.c's header.
 *
 * NOTE: a header of static functions, so both extensions compile the one implementation of the protocol (two
 * copies of a lock-free protocol drift apart); each end still runs in exactly one thread at a time.
 */
#ifndef NEOSERVE_SHM_RING_H
#define NEOSERVE_SHM_RING_H

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
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

/* ring_wait results */
#define RING_WAIT_BUDGET 0 /* budget spent, nothing changed */
#define RING_WAIT_MOVED 1  /* the watched counter moved */
#define RING_WAIT_CLOSED 2 /* a closed bit is set */
#define RING_WAIT_STOP 3   /* the caller's stop flag is set */

/* One end's local state over a mapped segment. The shared counters live in the segment; this holds only what
 * the end itself has reserved or is holding. */
typedef struct {
    uint8_t *base;
    uint64_t size;
    uint32_t slot_size, slot_count, mask;
    /* producer: a reservation is [res_start, res_start + res_nslots) in slot-counter space */
    int reserved;
    uint64_t res_start;
    uint32_t res_nslots;
    uint64_t res_capacity;
    /* consumer: the record being held (peeked, not yet released) */
    int holding;
    uint32_t hold_nslots;
    /* the counter value the last unsuccessful try_reserve (tail) / try_peek (head) saw: what to wait on */
    uint64_t observed;
    /* wait policy */
    uint64_t spin_ns, yield_ns, max_sleep_ns;
} ring_end;

static inline uint64_t ring_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void ring_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static inline uint32_t ring_fnv1a32(const uint8_t *p, size_t n) {
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

/* NOTE: not FUTEX_PRIVATE: ring words live in a mapping shared between processes (`shared` = 1); words private
 * to one process (the team's) pass 0 and take the cheaper private futex. */
static inline void ring_futex_wait(void *addr, uint32_t expected, uint64_t timeout_ns, int shared) {
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000ull);
    ts.tv_nsec = (long)(timeout_ns % 1000000000ull);
    syscall(SYS_futex, addr, shared ? FUTEX_WAIT : FUTEX_WAIT_PRIVATE, expected, &ts, NULL, 0);
}

static inline void ring_futex_wake(void *addr, int shared) {
    syscall(SYS_futex, addr, shared ? FUTEX_WAKE : FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static inline void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint32_t get_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint16_t get_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline void put_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

static inline void write_record_header(uint8_t *rec, uint16_t type, uint32_t nslots, uint64_t seq,
                                       uint64_t length) {
    memset(rec, 0, RECORD_HEADER);
    put_u32(rec + 0, RECORD_MAGIC);
    put_u16(rec + 4, type);
    put_u16(rec + 6, 0);
    put_u32(rec + 8, nslots);
    put_u32(rec + 12, 0);
    put_u64(rec + 16, seq);
    put_u64(rec + 24, length);
    put_u32(rec + 32, ring_fnv1a32(rec, 32));
}

/* Checks a segment header; 0, or -1 with the reason in `why`. */
static inline int ring_validate_header(const uint8_t *b, uint64_t buflen, char *why, size_t whylen) {
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

/* Binds an end to a validated segment; 0, or -1 with the reason in `why`. */
static inline int ring_end_init(ring_end *r, uint8_t *base, uint64_t size, uint64_t spin_ns, uint64_t yield_ns,
                                uint64_t max_sleep_ns, char *why, size_t whylen) {
    if (((uintptr_t)base & 63u) != 0) {
        snprintf(why, whylen, "ring buffer must be 64-byte aligned");
        return -1;
    }
    if (ring_validate_header(base, size, why, whylen) < 0) return -1;
    memset(r, 0, sizeof *r);
    r->base = base;
    r->size = size;
    r->slot_size = get_u32(base + 16);
    r->slot_count = get_u32(base + 20);
    r->mask = r->slot_count - 1;
    r->spin_ns = spin_ns;
    r->yield_ns = yield_ns;
    r->max_sleep_ns = max_sleep_ns > 0 ? max_sleep_ns : 1000;
    return 0;
}

static inline uint8_t *ring_slot_ptr(const ring_end *r, uint64_t counter) {
    return r->base + HEADER_SIZE + (uint64_t)(counter & r->mask) * r->slot_size;
}

/* ---------------------------------------------------------------------------------------------- producer */

/* Publishes slots up to `new_head`: release store, then wake a sleeping consumer. */
static inline void ring_publish(ring_end *r, uint64_t new_head, uint64_t new_seq) {
    atomic_store_explicit(a64(r->base, OFF_PUB_SEQ), new_seq, memory_order_relaxed);
    atomic_store_explicit(a64(r->base, OFF_HEAD), new_head, memory_order_release);
    /* NOTE: store(head) ; fence(seq_cst) ; load(waiting) pairs with the waiter's store(waiting) ; fence(seq_cst) ;
     * load(head): at least one side sees the other's store, so a wake-up is never lost. */
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(a32(r->base, OFF_CONSUMER_WAITING), memory_order_relaxed))
        ring_futex_wake(futex_word(r->base, OFF_HEAD), 1);
}

/* Slots a message of `nbytes` needs, or 0 when it can never fit the ring. */
static inline uint32_t ring_slots_for(const ring_end *r, uint64_t nbytes) {
    uint64_t need = (nbytes + RECORD_HEADER + r->slot_size - 1) / r->slot_size;
    return need > r->slot_count ? 0 : (uint32_t)need;
}

/* Reserves room for `nbytes`: 1 with the payload offset in *off, 0 when the ring has no room yet, -1 when the
 * counters are corrupt. The caller checked ring_slots_for(nbytes) != 0. Re-reserving replaces an uncommitted
 * reservation (same start). */
static inline int ring_try_reserve(ring_end *r, uint64_t nbytes, uint64_t *off) {
    uint32_t need = ring_slots_for(r, nbytes);
    r->reserved = 0;
    uint64_t head = atomic_load_explicit(a64(r->base, OFF_HEAD), memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(a64(r->base, OFF_TAIL), memory_order_acquire);
    if (head - tail > r->slot_count) return -1;
    uint64_t free_slots = r->slot_count - (head - tail);
    uint32_t idx = (uint32_t)(head & r->mask);
    if (idx + need > r->slot_count) {
        /* The record would wrap: fill the end of the slot array with a PAD record, published on its own so a
         * record of up to slot_count slots always fits once the consumer catches up. */
        uint32_t pad = r->slot_count - idx;
        if (free_slots < pad) { r->observed = tail; return 0; }
        uint64_t seq = atomic_load_explicit(a64(r->base, OFF_PUB_SEQ), memory_order_relaxed);
        write_record_header(ring_slot_ptr(r, head), 0, pad, seq, 0);
        head += pad;
        free_slots -= pad;
        ring_publish(r, head, seq);
    }
    if (free_slots < need) { r->observed = tail; return 0; }
    r->reserved = 1;
    r->res_start = head;
    r->res_nslots = need;
    r->res_capacity = (uint64_t)need * r->slot_size - RECORD_HEADER;
    *off = (uint64_t)(ring_slot_ptr(r, head) - r->base) + RECORD_HEADER;
    return 1;
}

/* Publishes the current reservation as a record of `type` (1..65535) with `length` (<= res_capacity) bytes;
 * returns its sequence number. */
static inline uint64_t ring_commit(ring_end *r, uint16_t type, uint64_t length) {
    uint64_t seq = atomic_load_explicit(a64(r->base, OFF_PUB_SEQ), memory_order_relaxed);
    write_record_header(ring_slot_ptr(r, r->res_start), type, r->res_nslots, seq, length);
    r->reserved = 0;
    ring_publish(r, r->res_start + r->res_nslots, seq + 1);
    return seq;
}

/* ---------------------------------------------------------------------------------------------- consumer */

static inline int ring_record_ok(const ring_end *r, uint64_t at, uint64_t head, const char **why) {
    const uint8_t *rec = ring_slot_ptr(r, at);
    uint32_t idx = (uint32_t)(at & r->mask);
    if (get_u32(rec) != RECORD_MAGIC) { *why = "bad record magic"; return 0; }
    if (get_u32(rec + 32) != ring_fnv1a32(rec, 32)) { *why = "record header checksum mismatch"; return 0; }
    uint32_t nslots = get_u32(rec + 8);
    if (nslots == 0 || nslots > r->slot_count - idx) {
        *why = "record spans past the end of the slot array";
        return 0;
    }
    if (nslots > head - at) { *why = "record spans past the published head"; return 0; }
    uint64_t length = get_u64(rec + 24);
    if (length > (uint64_t)nslots * r->slot_size - RECORD_HEADER) {
        *why = "record length runs past its slots";
        return 0;
    }
    return 1;
}

static inline void ring_advance_tail(ring_end *r, uint64_t new_tail, uint64_t new_seq) {
    atomic_store_explicit(a64(r->base, OFF_CON_SEQ), new_seq, memory_order_relaxed);
    /* NOTE: release orders every earlier read of the record's payload before the producer may reuse it. */
    atomic_store_explicit(a64(r->base, OFF_TAIL), new_tail, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(a32(r->base, OFF_PRODUCER_WAITING), memory_order_relaxed))
        ring_futex_wake(futex_word(r->base, OFF_TAIL), 1);
}

/* A published record to read in place, skipping PAD records. */
typedef struct {
    uint16_t type;
    uint64_t seq, offset, length;
} ring_record;

/* 1: *rec holds the next record (now held until ring_release); 0: the ring is empty; -1: corrupt, with the
 * reason in `why` (whylen bytes). The caller is not holding a record. */
static inline int ring_try_peek(ring_end *r, ring_record *out, char *why, size_t whylen) {
    for (;;) {
        uint64_t tail = atomic_load_explicit(a64(r->base, OFF_TAIL), memory_order_relaxed);
        uint64_t head = atomic_load_explicit(a64(r->base, OFF_HEAD), memory_order_acquire);
        if (head == tail) { r->observed = head; return 0; }
        if (head - tail > r->slot_count) {
            snprintf(why, whylen, "ring counters are inconsistent (head - tail > slot count)");
            return -1;
        }
        const char *reason = NULL;
        if (!ring_record_ok(r, tail, head, &reason)) {
            snprintf(why, whylen, "%s", reason);
            return -1;
        }
        const uint8_t *rec = ring_slot_ptr(r, tail);
        uint16_t type = get_u16(rec + 4);
        uint32_t nslots = get_u32(rec + 8);
        uint64_t seq = get_u64(rec + 16);
        uint64_t expected = atomic_load_explicit(a64(r->base, OFF_CON_SEQ), memory_order_relaxed);
        if (type == 0) {  /* PAD: release it (waking a producer waiting for room) and look again */
            ring_advance_tail(r, tail + nslots, expected);
            continue;
        }
        if (seq != expected) {
            snprintf(why, whylen, "record sequence number %llu, expected %llu", (unsigned long long)seq,
                     (unsigned long long)expected);
            return -1;
        }
        r->holding = 1;
        r->hold_nslots = nslots;
        out->type = type;
        out->seq = seq;
        out->offset = (uint64_t)(rec - r->base) + RECORD_HEADER;
        out->length = get_u64(rec + 24);
        return 1;
    }
}

/* Frees the held record's slots for the producer. */
static inline void ring_release(ring_end *r) {
    uint64_t tail = atomic_load_explicit(a64(r->base, OFF_TAIL), memory_order_relaxed);
    uint64_t seq = atomic_load_explicit(a64(r->base, OFF_CON_SEQ), memory_order_relaxed);
    r->holding = 0;
    ring_advance_tail(r, tail + r->hold_nslots, seq + 1);
}

/* After a corrupt peek: move the tail to the next slot (below head) whose header is a valid record, or to head.
 * Everything below head is published, so the scan never races. Returns the slots skipped, or -1 when the
 * counters are inconsistent and the ring cannot be resynchronised. */
static inline int64_t ring_skip_corrupt(ring_end *r) {
    r->holding = 0;
    uint64_t tail = atomic_load_explicit(a64(r->base, OFF_TAIL), memory_order_relaxed);
    uint64_t head = atomic_load_explicit(a64(r->base, OFF_HEAD), memory_order_acquire);
    uint64_t expected = atomic_load_explicit(a64(r->base, OFF_CON_SEQ), memory_order_relaxed);
    if (head - tail > r->slot_count) return -1;
    uint64_t at = tail + 1;
    uint64_t new_seq = expected;
    for (; at < head; at++) {
        const char *why;
        if (ring_record_ok(r, at, head, &why)) {
            uint64_t seq = get_u64(ring_slot_ptr(r, at) + 16);
            if (seq >= expected) {
                new_seq = seq;
                break;
            }
        }
    }
    if (at >= head) {
        at = head;
        new_seq = atomic_load_explicit(a64(r->base, OFF_PUB_SEQ), memory_order_relaxed);
    }
    ring_advance_tail(r, at, new_seq);
    return (int64_t)(at - tail);
}

/* ------------------------------------------------------------------------------------------------ waiting */

/* Waits for a counter to move: which = 0: head != observed (consumer); 1: tail != observed (producer).
 * Spins for spin_ns, then sched_yield()s until spin_ns + yield_ns, then sleeps in futex_wait with a timeout that
 * doubles up to max_sleep_ns (the peer's futex_wake ends it at once). `waited_ns` is the time already spent
 * waiting in earlier calls, so the phase carries on across calls. `stop` (may be NULL) is a flag of the caller's
 * that ends the wait too. Returns one of RING_WAIT_*. Call without the GIL. */
static inline int ring_wait(ring_end *r, int which, uint64_t observed, uint64_t budget_ns, uint64_t waited_ns,
                            _Atomic uint32_t *stop) {
    size_t counter_off = which == 0 ? OFF_HEAD : OFF_TAIL;
    size_t waiting_off = which == 0 ? OFF_CONSUMER_WAITING : OFF_PRODUCER_WAITING;
    uint8_t *base = r->base;
    _Atomic uint64_t *counter = a64(base, counter_off);
    _Atomic uint32_t *waiting = a32(base, waiting_off);
    _Atomic uint32_t *closed = a32(base, OFF_CLOSED);
    uint32_t *fw = futex_word(base, counter_off);
    int result = RING_WAIT_BUDGET;
    uint64_t start = ring_now_ns();
    uint64_t sleep_ns = 20000;
    for (;;) {
        uint64_t spent = ring_now_ns() - start;
        uint64_t phase = spent + waited_ns;
        if (phase < r->spin_ns) {
            /* NOTE: read the clock only every 64 polls; one poll + pause is a few tens of ns. */
            for (int i = 0; i < 64; i++) {
                if (atomic_load_explicit(counter, memory_order_acquire) != observed) { result = RING_WAIT_MOVED; break; }
                ring_cpu_relax();
            }
            if (result) break;
        } else if (phase < r->spin_ns + r->yield_ns) {
            if (atomic_load_explicit(counter, memory_order_acquire) != observed) { result = RING_WAIT_MOVED; break; }
            sched_yield();
        } else {
            atomic_store_explicit(waiting, 1, memory_order_relaxed);
            atomic_thread_fence(memory_order_seq_cst);
            if (atomic_load_explicit(counter, memory_order_acquire) != observed) {
                atomic_store_explicit(waiting, 0, memory_order_relaxed);
                result = RING_WAIT_MOVED;
                break;
            }
            if (atomic_load_explicit(closed, memory_order_relaxed)) {
                atomic_store_explicit(waiting, 0, memory_order_relaxed);
                result = RING_WAIT_CLOSED;
                break;
            }
            uint64_t left = spent < budget_ns ? budget_ns - spent : 0;
            if (left == 0) { atomic_store_explicit(waiting, 0, memory_order_relaxed); break; }
            /* The kernel re-checks the word against `observed` atomically, so a publish that lands between our
             * check and the sleep makes futex_wait return at once instead of losing the wake-up. */
            ring_futex_wait(fw, (uint32_t)observed, sleep_ns < left ? sleep_ns : left, 1);
            atomic_store_explicit(waiting, 0, memory_order_relaxed);
            sleep_ns = sleep_ns * 2 < r->max_sleep_ns ? sleep_ns * 2 : r->max_sleep_ns;
        }
        if (atomic_load_explicit(counter, memory_order_acquire) != observed) { result = RING_WAIT_MOVED; break; }
        if (atomic_load_explicit(closed, memory_order_relaxed)) { result = RING_WAIT_CLOSED; break; }
        if (stop && atomic_load_explicit(stop, memory_order_relaxed)) { result = RING_WAIT_STOP; break; }
        if (ring_now_ns() - start >= budget_ns) break;
    }
    return result;
}

#endif /* NEOSERVE_SHM_RING_H */
