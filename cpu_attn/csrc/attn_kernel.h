/*
 * Internal interface between the decode kernel (attn_kernel.c) and the sidecar's resident team (team.c), two
 * files of the one extension cpu_attn._attn_kernel. Layouts and the meaning of every field: attn_kernel.c.
 */
#ifndef CPU_ATTN_ATTN_KERNEL_H
#define CPU_ATTN_ATTN_KERNEL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

typedef struct {
    char *arena;
    int64_t num_blocks;
    int num_layers;
    int hkv;
    int bs;
    int d;
    int dp;      /* head_dim rounded up to 32 */
    int dtype;
    int esize;
} Geom;

typedef struct {
    int b;          /* sequence index within the batch */
    int h;          /* kv head */
    int blk_begin;  /* block range [blk_begin, blk_end) of the sequence's block table */
    int blk_end;
    int partial;    /* index into the partial-result scratch, or -1 when the item covers the whole context */
} Item;

typedef struct {
    int b, h, first, count; /* partial results [first, first+count) merge into out[b, h*G:(h+1)*G] */
} Merge;

typedef struct {
    const Geom *g;
    int layer;
    const int32_t *table;   /* [rows, table_stride] block ids */
    int64_t table_stride;
    const int64_t *rows;    /* [B] row of each sequence in the table */
    const int64_t *ctx;     /* [B] context lengths */
    const float *q;         /* [B, Hq, D] */
    float *out;             /* [B, Hq, D] */
    int hq;
    int G;
    float scale;
} Job;

/* Per-thread scratch: scaled q [G][D], scores/probabilities [G][BS], accumulator [G][DP], m/l/alpha [G]. */
typedef struct {
    float *qs, *s, *acc, *m, *l, *alpha;
} Scratch;

/* One batch's work items and merges; the buffers grow and are reused across calls. */
typedef struct {
    Item *items;
    Merge *merges;
    float *partials;
    size_t cap_items, cap_merges, cap_partials;
    int64_t n_items, n_merges;
} AttnPlan;

/* Floats of copy scratch one thread needs: a [D][32] tile and one 32-float row. */
#define COPY_SCRATCH_FLOATS(D) ((size_t)(D) * 32 + 32)

/* decode_prepare results */
#define DECODE_OK 0
#define DECODE_BAD (-1)        /* a row or context length the batch may not have */
#define DECODE_UNRESERVED (-2) /* a new token lands beyond its sequence's reserved blocks */

int use_avx512(void);
int attn_scratch_alloc(Scratch *sc, int G, int D, int DP, int BS);
int attn_plan(const Job *job, int B, int nthreads, AttnPlan *p);
void attn_plan_free(AttnPlan *p);
void attn_run_item(const Job *job, const AttnPlan *p, int64_t k, Scratch *sc, int avx);
void attn_run_merge(const Job *job, const AttnPlan *p, int64_t k);
void copy_tokens_serial(const Geom *g, int layer, int64_t n, const int32_t *blocks, const int32_t *offs, float *k,
                        float *v, int store, float *scratch);
int decode_prepare(const Geom *g, const int32_t *table, int64_t stride, int64_t nrows, const int64_t *row_tokens,
                   const int64_t *row_blocks, const int64_t *rows, const int64_t *ctx, int64_t B, int has_kv,
                   int32_t *blocks, int32_t *offs, char *why, size_t whylen);
void decode_advance(int64_t *row_tokens, const int64_t *rows, const int64_t *ctx, int64_t B);
/* (arena, num_blocks, num_layers, num_kv_heads, block_size, head_dim, dtype) -> Geom; -1 with ValueError set. */
int parse_geom(PyObject *t, Geom *g);

/* team.c: adds CacheIndex and Team to the module. */
int team_register(PyObject *module);

#endif /* CPU_ATTN_ATTN_KERNEL_H */
