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

#include "shm_ring.h"

#define ROLE_PRODUCER 0
#define ROLE_CONSUMER 1
#define ROLE_INSPECT 2

static PyObject *CorruptError;  /* a record or the ring header failed validation */

/* -------------------------------------------------------------------------------------- RingCore object */

/* One end for Python: the protocol state is a ring_end (shm_ring.h); this adds the buffer export and role. */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    ring_end r;
    int role;
} RingCore;

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
    uint8_t *base = (uint8_t *)self->view.buf;
    if (((uintptr_t)base & 63u) != 0) {
        PyErr_SetString(PyExc_ValueError, "ring buffer must be 64-byte aligned");
        return -1;
    }
    char why[200];
    if (ring_end_init(&self->r, base, (uint64_t)self->view.len, spin_ns, yield_ns, max_sleep_ns, why,
                      sizeof why) < 0) {
        PyErr_SetString(CorruptError, why);
        return -1;
    }
    self->role = role;
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
        self->r.base = NULL;
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------- producer */

/* try_reserve(nbytes) -> payload offset, or -1 when the ring has no room yet. */
static PyObject *RingCore_try_reserve(RingCore *self, PyObject *arg) {
    if (check_alive(self) < 0) return NULL;
    if (self->role != ROLE_PRODUCER) {
        PyErr_SetString(PyExc_RuntimeError, "try_reserve on a non-producer ring end");
        return NULL;
    }
    unsigned long long nbytes = PyLong_AsUnsignedLongLong(arg);
    if (nbytes == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (ring_slots_for(&self->r, nbytes) == 0) {
        PyErr_Format(PyExc_ValueError, "message of %llu bytes needs %llu slots, the ring has %u", nbytes,
                     (unsigned long long)((nbytes + RECORD_HEADER + self->r.slot_size - 1) / self->r.slot_size),
                     self->r.slot_count);
        return NULL;
    }
    uint64_t off = 0;
    int rc = ring_try_reserve(&self->r, nbytes, &off);
    if (rc < 0) {
        PyErr_SetString(CorruptError, "ring counters are inconsistent (head - tail > slot count)");
        return NULL;
    }
    if (rc == 0) return PyLong_FromLong(-1);
    return PyLong_FromUnsignedLongLong(off);
}

/* commit(type, length) -> record sequence number. Publishes the current reservation. */
static PyObject *RingCore_commit(RingCore *self, PyObject *args) {
    unsigned int type;
    unsigned long long length;
    if (!PyArg_ParseTuple(args, "IK", &type, &length)) return NULL;
    if (check_alive(self) < 0) return NULL;
    if (!self->r.reserved) {
        PyErr_SetString(PyExc_RuntimeError, "commit without a reservation");
        return NULL;
    }
    if (type == 0 || type > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "record type must be in [1, 65535] (0 is PAD)");
        return NULL;
    }
    if (length > self->r.res_capacity) {
        PyErr_Format(PyExc_ValueError, "commit of %llu bytes exceeds the reserved %llu", length,
                     (unsigned long long)self->r.res_capacity);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(ring_commit(&self->r, (uint16_t)type, length));
}

static PyObject *RingCore_cancel(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    self->r.reserved = 0;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------- consumer */

/* try_peek() -> None if empty, else (type, seq, payload_offset, length). Skips PAD records. Raises CorruptError. */
static PyObject *RingCore_try_peek(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    if (self->role != ROLE_CONSUMER) {
        PyErr_SetString(PyExc_RuntimeError, "try_peek on a non-consumer ring end");
        return NULL;
    }
    if (self->r.holding) {
        PyErr_SetString(PyExc_RuntimeError, "release the current record before peeking the next");
        return NULL;
    }
    ring_record rec;
    char why[160];
    int rc = ring_try_peek(&self->r, &rec, why, sizeof why);
    if (rc < 0) {
        PyErr_SetString(CorruptError, why);
        return NULL;
    }
    if (rc == 0) Py_RETURN_NONE;
    return Py_BuildValue("(IKKK)", (unsigned int)rec.type, (unsigned long long)rec.seq,
                         (unsigned long long)rec.offset, (unsigned long long)rec.length);
}

static PyObject *RingCore_release(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    if (!self->r.holding) {
        PyErr_SetString(PyExc_RuntimeError, "release without a peeked record");
        return NULL;
    }
    ring_release(&self->r);
    Py_RETURN_NONE;
}

/* skip_corrupt() -> slots skipped. See ring_skip_corrupt. */
static PyObject *RingCore_skip_corrupt(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    int64_t skipped = ring_skip_corrupt(&self->r);
    if (skipped < 0) {
        PyErr_SetString(CorruptError, "ring counters are inconsistent; the ring cannot be resynchronized");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong((unsigned long long)skipped);
}

/* ------------------------------------------------------------------------------------------------ waiting */

/* wait(which, observed, budget_ns, waited_ns) -> 1 counter changed, 0 budget spent, 2 ring closed.
 * See ring_wait. Releases the GIL. */
static PyObject *RingCore_wait(RingCore *self, PyObject *args) {
    int which;
    unsigned long long observed, budget_ns, waited_ns;
    if (!PyArg_ParseTuple(args, "iKKK", &which, &observed, &budget_ns, &waited_ns)) return NULL;
    if (check_alive(self) < 0) return NULL;
    int result;
    Py_BEGIN_ALLOW_THREADS
    result = ring_wait(&self->r, which, observed, budget_ns, waited_ns, NULL);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(result);
}

/* --------------------------------------------------------------------------------------- misc accessors */

static PyObject *RingCore_counters(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    uint8_t *b = self->r.base;
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
    atomic_fetch_or_explicit(a32(self->r.base, OFF_CLOSED), (uint32_t)bits, memory_order_seq_cst);
    ring_futex_wake(futex_word(self->r.base, OFF_HEAD), 1);
    ring_futex_wake(futex_word(self->r.base, OFF_TAIL), 1);
    Py_RETURN_NONE;
}

static PyObject *RingCore_closed(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    return PyLong_FromUnsignedLong(atomic_load_explicit(a32(self->r.base, OFF_CLOSED), memory_order_acquire));
}

static PyObject *RingCore_set_pid(RingCore *self, PyObject *args) {
    int role;
    unsigned int pid;
    if (!PyArg_ParseTuple(args, "iI", &role, &pid)) return NULL;
    if (check_alive(self) < 0) return NULL;
    atomic_store_explicit(a32(self->r.base, role == ROLE_PRODUCER ? OFF_PRODUCER_PID : OFF_CONSUMER_PID), pid,
                          memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *RingCore_pids(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    unsigned producer = atomic_load_explicit(a32(self->r.base, OFF_PRODUCER_PID), memory_order_acquire);
    unsigned consumer = atomic_load_explicit(a32(self->r.base, OFF_CONSUMER_PID), memory_order_acquire);
    return Py_BuildValue("(II)", producer, consumer);
}

static PyObject *RingCore_address(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    return PyLong_FromVoidPtr(self->r.base);
}

/* prefault(): touch one byte per 4 KiB page so the first messages do not take page faults. Reads only. */
static PyObject *RingCore_prefault(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    if (check_alive(self) < 0) return NULL;
    volatile uint8_t sink = 0;
    for (uint64_t off = 0; off < self->r.size; off += 4096) sink ^= ((volatile uint8_t *)self->r.base)[off];
    (void)sink;
    Py_RETURN_NONE;
}

static PyObject *RingCore_get_slot_size(RingCore *self, void *closure) {
    return PyLong_FromUnsignedLong(self->r.slot_size);
}
static PyObject *RingCore_get_slot_count(RingCore *self, void *closure) {
    return PyLong_FromUnsignedLong(self->r.slot_count);
}
static PyObject *RingCore_get_observed(RingCore *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->r.observed);
}
static PyObject *RingCore_get_holding(RingCore *self, void *closure) { return PyBool_FromLong(self->r.holding); }
static PyObject *RingCore_get_reserved(RingCore *self, void *closure) { return PyBool_FromLong(self->r.reserved); }

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
    uint32_t h = ring_fnv1a32((const uint8_t *)v.buf, (size_t)v.len);
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
