/*
 * cpu_attn._attn_kernel: batched paged decode attention over the CPU KV cache, plus the copy-in/copy-out
 * paths of that cache and a streaming-read probe used by the benchmarks.
 *
 * Why C: decode attention is memory-bandwidth bound. Off-the-shelf torch ops over paged KV stop at about half
 * of the machine's read bandwidth (see issue 3); a hand-written loop over a layout built for streaming reaches
 * it. Shapes (head_dim, head counts, block size) are run-time arguments, so one build serves every model.
 *
 * The Python wrapper (cpu_attn/kernel.py) validates every shape and passes raw buffer addresses; this file
 * trusts them. All entry points release the GIL while they run.
 *
 * ---------------------------------------------------------------------------------------------------------
 * Arena layout (one preallocated buffer; "block" = block_size consecutive tokens of one sequence, all layers):
 *
 *   arena[num_layers][num_blocks][num_kv_heads] -> one head-block = K part then V part, both element type T
 *     K part: [block_size/32][head_dim][32]            element (t, d) at ((t>>5)*D + d)*32 + lane(t&31)
 *     V part: [head_dim_pad/32][block_size][32]        element (t, d) at ((d>>5)*BS + t)*32 + lane(d&31)
 *   head_dim_pad = head_dim rounded up to 32 (pad lanes of V are never written and never read back).
 *   lane(u) = u for fp32/fp16; for bf16 lane(u) = 2*(u&15) + (u>>4), see below.
 *
 * NOTE: both parts are "32-lane tiled" so that every inner loop of the kernel is a handful of purely
 * sequential streams with no horizontal reductions: scores for 16 tokens are one vector FMA per element of
 * head_dim (K tile is d-major), and the P.V product for 16 output lanes is one vector FMA per token (V tile is
 * token-major). Each head-block is contiguous (K then V), which keeps the hardware prefetchers on one region.
 * Token-major [tokens, heads, dim] blocks measured 2x slower here.
 * NOTE: the bf16 lane order pairs element i with element 16+i in one 32-bit word, so one 64-byte load becomes
 * the fp32 vectors of elements 0-15 (word << 16) and 16-31 (word & 0xffff0000): one ALU op per 16 values
 * instead of a widening shuffle plus a shift; the conversion was a third of the kernel's ALU work.
 * ---------------------------------------------------------------------------------------------------------
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__x86_64__) || defined(__i386__)
#define ATTN_X86 1
#include <immintrin.h>
#else
#define ATTN_X86 0
#endif

#include "attn_kernel.h"

static inline size_t head_block_elems(const Geom *g) { return (size_t)g->bs * (size_t)(g->d + g->dp); }

static inline char *kv_head_block(const Geom *g, int layer, int64_t blk, int h) {
    size_t idx = (((size_t)layer * (size_t)g->num_blocks + (size_t)blk) * (size_t)g->hkv + (size_t)h);
    return g->arena + idx * head_block_elems(g) * (size_t)g->esize;
}

static inline size_t lane32(const Geom *g, int u) { return g->dtype == DT_BF16 ? 2 * (u & 15) + (u >> 4) : u; }

static inline size_t k_index(const Geom *g, int t, int d) {
    return ((size_t)(t >> 5) * (size_t)g->d + (size_t)d) * 32 + lane32(g, t & 31);
}
static inline size_t v_index(const Geom *g, int t, int d) {
    return ((size_t)(d >> 5) * (size_t)g->bs + (size_t)t) * 32 + lane32(g, d & 31);
}

/* ------------------------------------------------------------------------------------------------------ */
/* Scalar element conversions (portable; round-to-nearest-even like torch's .to()).                       */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u; /* canonical quiet NaN, as torch */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
/* Exact fp16 -> fp32 with integer ops only (F. Giesen's half_to_float): the portable kernel's hot path. */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t u = ((uint32_t)h & 0x7fffu) << 13;
    const uint32_t exp = shifted_exp & u;
    float f;
    u += (uint32_t)(127 - 15) << 23;
    if (exp == shifted_exp) {
        u += (uint32_t)(128 - 16) << 23; /* Inf / NaN */
        memcpy(&f, &u, 4);
    } else if (exp == 0) {
        u += 1u << 23; /* zero / subnormal: renormalise */
        memcpy(&f, &u, 4);
        f -= 6.103515625e-05f; /* 2^-14 */
    } else {
        memcpy(&f, &u, 4);
    }
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits |= ((uint32_t)h & 0x8000u) << 16;
    memcpy(&f, &bits, 4);
    return f;
}
/* NOTE: _Float16 (gcc >= 12 on x86-64) rounds correctly in software when F16C is not enabled. */
static inline uint16_t f32_to_f16(float f) {
    _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, 2);
    return h;
}

static inline float load_elem(const char *base, size_t i, int dtype) {
    if (dtype == DT_F32) return ((const float *)base)[i];
    if (dtype == DT_BF16) return bf16_to_f32(((const uint16_t *)base)[i]);
    return f16_to_f32(((const uint16_t *)base)[i]);
}
static inline void store_elem(char *base, size_t i, int dtype, float x) {
    if (dtype == DT_F32) ((float *)base)[i] = x;
    else if (dtype == DT_BF16) ((uint16_t *)base)[i] = f32_to_bf16(x);
    else ((uint16_t *)base)[i] = f32_to_f16(x);
}

/* ------------------------------------------------------------------------------------------------------ */
/* Work decomposition shared by both kernel paths.                                                         */


int attn_scratch_alloc(Scratch *sc, int G, int D, int DP, int BS) {
    size_t n = (size_t)G * D + (size_t)G * BS + (size_t)G * DP + 3 * (size_t)G + 64;
    float *p = NULL;
    if (posix_memalign((void **)&p, 64, n * sizeof(float)) != 0) return -1;
    sc->qs = p;
    sc->s = sc->qs + (size_t)G * D;
    sc->acc = sc->s + (size_t)G * BS;
    sc->m = sc->acc + (size_t)G * DP;
    sc->l = sc->m + G;
    sc->alpha = sc->l + G;
    return 0;
}

/* Writes one finished item: either the normalised output or the (m, l, acc) partial for the merge pass. */
static void finish_item(const Job *job, const Item *it, const Scratch *sc, float *partials) {
    const int G = job->G, D = job->g->d, DP = job->g->dp;
    if (it->partial < 0) {
        float *o = job->out + ((size_t)it->b * job->hq + (size_t)it->h * G) * D;
        for (int i = 0; i < G; i++) {
            float inv = 1.0f / sc->l[i];
            for (int d = 0; d < D; d++) o[(size_t)i * D + d] = sc->acc[(size_t)i * DP + d] * inv;
        }
    } else {
        float *p = partials + (size_t)it->partial * (size_t)G * (2 + (size_t)D);
        for (int i = 0; i < G; i++) {
            p[2 * i] = sc->m[i];
            p[2 * i + 1] = sc->l[i];
        }
        float *pa = p + 2 * G;
        for (int i = 0; i < G; i++)
            for (int d = 0; d < D; d++) pa[(size_t)i * D + d] = sc->acc[(size_t)i * DP + d];
    }
}

/* Log-sum-exp merge of the split-KV partial results of one (sequence, kv head). */
static void merge_partials(const Job *job, const Merge *mg, const float *partials) {
    const int G = job->G, D = job->g->d;
    const size_t pstride = (size_t)G * (2 + (size_t)D);
    float *o = job->out + ((size_t)mg->b * job->hq + (size_t)mg->h * G) * D;
    for (int i = 0; i < G; i++) {
        float M = -INFINITY;
        for (int s = 0; s < mg->count; s++) {
            const float *p = partials + (size_t)(mg->first + s) * pstride;
            if (p[2 * i] > M) M = p[2 * i];
        }
        float L = 0.0f;
        for (int d = 0; d < D; d++) o[(size_t)i * D + d] = 0.0f;
        for (int s = 0; s < mg->count; s++) {
            const float *p = partials + (size_t)(mg->first + s) * pstride;
            float w = expf(p[2 * i] - M);
            L += p[2 * i + 1] * w;
            const float *pa = p + 2 * G + (size_t)i * D;
            for (int d = 0; d < D; d++) o[(size_t)i * D + d] += pa[d] * w;
        }
        float inv = 1.0f / L;
        for (int d = 0; d < D; d++) o[(size_t)i * D + d] *= inv;
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* Portable path: plain C over the same layout (auto-vectorised where gcc can).                           */

/* One 32-lane row of the layout -> 32 floats in logical order (portable, vectorisable per dtype). */
static inline void row32_load_portable(const char *src, float *dst, int DT) {
    const uint16_t *h = (const uint16_t *)src;
    if (DT == DT_F32) {
        memcpy(dst, src, 32 * sizeof(float));
    } else if (DT == DT_BF16) {
        for (int u = 0; u < 16; u++) {
            dst[u] = bf16_to_f32(h[2 * u]);
            dst[16 + u] = bf16_to_f32(h[2 * u + 1]);
        }
    } else {
        for (int u = 0; u < 32; u++) dst[u] = f16_to_f32(h[u]);
    }
}

/*
 * One work item without intrinsics, over the same layout and in the same order of operations as the AVX-512
 * path (32-lane rows, online softmax per block). The inner loops are 32-wide so gcc vectorises them; the
 * "arch=haswell" clone (AVX2/FMA, no AVX-512, no AMX) is picked at load time where the CPU has it.
 */
__attribute__((target_clones("arch=haswell", "default"))) static void item_portable(const Job *job, const Item *it,
                                                                                    Scratch *sc) {
    const Geom *g = job->g;
    const int G = job->G, D = g->d, DP = g->dp, BS = g->bs, DT = g->dtype, ES = g->esize;
    const int ntok = job->ctx[it->b];
    const int32_t *trow = job->table + (size_t)job->rows[it->b] * (size_t)job->table_stride;
    const float *q = job->q + ((size_t)it->b * job->hq + (size_t)it->h * G) * D;
    float row[32];

    for (int i = 0; i < G * D; i++) sc->qs[i] = q[i] * job->scale;
    for (int i = 0; i < G; i++) {
        sc->m[i] = -INFINITY;
        sc->l[i] = 0.0f;
    }
    memset(sc->acc, 0, sizeof(float) * (size_t)G * DP);

    for (int blk = it->blk_begin; blk < it->blk_end; blk++) {
        const int n = ntok - blk * BS < BS ? ntok - blk * BS : BS;
        const int ntiles = (n + 31) / 32;
        const char *K = kv_head_block(g, job->layer, trow[blk], it->h);
        const char *V = K + (size_t)BS * D * ES;
        for (int i = 0; i < G; i++) memset(sc->s + (size_t)i * BS, 0, sizeof(float) * 32 * (size_t)ntiles);
        for (int tile = 0; tile < ntiles; tile++) {
            for (int d = 0; d < D; d++) {
                row32_load_portable(K + (((size_t)tile * D + d) * 32) * ES, row, DT);
                for (int i = 0; i < G; i++) {
                    const float qv = sc->qs[(size_t)i * D + d];
                    float *si = sc->s + (size_t)i * BS + (size_t)tile * 32;
                    for (int u = 0; u < 32; u++) si[u] += qv * row[u];
                }
            }
        }
        for (int i = 0; i < G; i++) {
            float *s = sc->s + (size_t)i * BS;
            float mx = -INFINITY;
            for (int t = 0; t < n; t++) mx = s[t] > mx ? s[t] : mx;
            const float m_new = mx > sc->m[i] ? mx : sc->m[i];
            float sum = 0.0f;
            for (int t = 0; t < n; t++) {
                s[t] = expf(s[t] - m_new);
                sum += s[t];
            }
            sc->alpha[i] = expf(sc->m[i] - m_new);
            sc->l[i] = sc->l[i] * sc->alpha[i] + sum;
            sc->m[i] = m_new;
            float *a = sc->acc + (size_t)i * DP;
            for (int d = 0; d < DP; d++) a[d] *= sc->alpha[i];
        }
        for (int t = 0; t < n; t++) {
            for (int c = 0; c < DP; c += 32) {
                row32_load_portable(V + (((size_t)(c >> 5) * BS + t) * 32) * ES, row, DT);
                for (int i = 0; i < G; i++) {
                    const float p = sc->s[(size_t)i * BS + t];
                    float *a = sc->acc + (size_t)i * DP + c;
                    for (int u = 0; u < 32; u++) a[u] += p * row[u];
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* AVX-512 path. Compiled for AVX-512F/BW/VL/DQ + FMA + F16C only (never AMX); chosen at run time.         */

#if ATTN_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")

/* NOTE: software prefetch into L2 of the same offset one block ahead (blocks are scattered; see item_avx512). */
#ifndef PF
#define PF(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
#endif

/* One 32-lane row of type DT (in the lane order of the layout) -> lanes 0-15 and 16-31 as floats. */
static inline __attribute__((always_inline)) void ld32(const char *p, const int DT, __m512 *lo, __m512 *hi) {
    if (DT == DT_F32) {
        *lo = _mm512_loadu_ps((const float *)p);
        *hi = _mm512_loadu_ps((const float *)p + 16);
    } else if (DT == DT_BF16) {
        __m512i x = _mm512_loadu_si512((const void *)p);
        *lo = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        *hi = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000u)));
    } else {
        *lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        *hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p + 1));
    }
}

/* Prefetch one 32-lane row (two lines for fp32). */
static inline __attribute__((always_inline)) void pf32(const char *p, const int DT) {
    PF(p);
    if (DT == DT_F32) PF(p + 64);
}

/* exp(x) for x <= ~88: Cephes expf polynomial after range reduction, scaled with vscalefps. ~1 ulp. */
static inline __attribute__((always_inline)) __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    __m512 r2 = _mm512_mul_ps(r, r);
    __m512 y = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

static inline __mmask16 tail_mask(int left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

/*
 * Scores of GT query heads against 32*NP tokens starting at token t0 (a multiple of 32) of a K part:
 * S[i][t0 + t] = sum_d qs[i][d] * K[t][d]. GT, NP and DT are compile-time constants after inlining, so the
 * GT*2*NP accumulators live in registers; the NP 32-token K tiles are NP sequential streams of 32*D elements.
 */
static inline __attribute__((always_inline)) void scores_tile(const char *K, int D, const float *qs, float *S,
                                                               int ld_s, int t0, ptrdiff_t pf, const int GT,
                                                               const int NP, const int DT) {
    const int es = DT == DT_F32 ? 4 : 2;
    __m512 acc[8][4];
#pragma GCC unroll 8
    for (int i = 0; i < GT; i++)
#pragma GCC unroll 4
        for (int j = 0; j < 2 * NP; j++) acc[i][j] = _mm512_setzero_ps();
    const char *kt = K + (size_t)(t0 >> 5) * (size_t)D * 32 * es;
    for (int d = 0; d < D; d++) {
        __m512 kv[4];
#pragma GCC unroll 2
        for (int p = 0; p < NP; p++) {
            const char *a = kt + ((size_t)p * D + d) * 32 * es;
            pf32(a + pf, DT);
            ld32(a, DT, &kv[2 * p], &kv[2 * p + 1]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < GT; i++) {
            __m512 qb = _mm512_set1_ps(qs[(size_t)i * D + d]);
#pragma GCC unroll 4
            for (int j = 0; j < 2 * NP; j++) acc[i][j] = _mm512_fmadd_ps(qb, kv[j], acc[i][j]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < GT; i++)
#pragma GCC unroll 4
        for (int j = 0; j < 2 * NP; j++) _mm512_storeu_ps(S + (size_t)i * ld_s + t0 + 16 * j, acc[i][j]);
}

/*
 * acc[i][d0 : d0+32*NP] = alpha[i] * acc[i][...] + sum_{t<n} P[i][t] * V[t][d0 : d0+32*NP] for GT heads
 * (d0 a multiple of 32). The NP 32-lane V tiles are NP sequential streams over the tokens.
 */
static inline __attribute__((always_inline)) void pv_tile(const char *V, int BS, const float *P, int ld_p, int n,
                                                           float *acc, int ld_acc, const float *alpha, int d0,
                                                           ptrdiff_t pf, const int GT, const int NP, const int DT) {
    const int es = DT == DT_F32 ? 4 : 2;
    __m512 a[8][4];
    const char *vt = V + (size_t)(d0 >> 5) * (size_t)BS * 32 * es;
#pragma GCC unroll 8
    for (int i = 0; i < GT; i++) {
        __m512 al = _mm512_set1_ps(alpha[i]);
#pragma GCC unroll 4
        for (int j = 0; j < 2 * NP; j++)
            a[i][j] = _mm512_mul_ps(al, _mm512_loadu_ps(acc + (size_t)i * ld_acc + d0 + 16 * j));
    }
    for (int t = 0; t < n; t++) {
        __m512 vv[4];
#pragma GCC unroll 2
        for (int p = 0; p < NP; p++) {
            const char *ad = vt + ((size_t)p * BS + t) * 32 * es;
            pf32(ad + pf, DT);
            ld32(ad, DT, &vv[2 * p], &vv[2 * p + 1]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < GT; i++) {
            __m512 pb = _mm512_set1_ps(P[(size_t)i * ld_p + t]);
#pragma GCC unroll 4
            for (int j = 0; j < 2 * NP; j++) a[i][j] = _mm512_fmadd_ps(pb, vv[j], a[i][j]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < GT; i++)
#pragma GCC unroll 4
        for (int j = 0; j < 2 * NP; j++) _mm512_storeu_ps(acc + (size_t)i * ld_acc + d0 + 16 * j, a[i][j]);
}

/* NOTE: up to 4 heads use 2 tiles of 32 tokens/lanes (<= 16 accumulators), 5-8 heads use 1 (<= 16). */
#define NP_FOR(GT) ((GT) <= 4 ? 2 : 1)

#define SCORES_CASE(GT, DT)                                                                          \
    case (DT) * 16 + (GT): {                                                                         \
        int t0 = 0;                                                                                  \
        for (; t0 + 32 * NP_FOR(GT) <= n; t0 += 32 * NP_FOR(GT))                                     \
            scores_tile(K, D, qs, S, ld_s, t0, pf, GT, NP_FOR(GT), DT);                              \
        for (; t0 < n; t0 += 32) scores_tile(K, D, qs, S, ld_s, t0, pf, GT, 1, DT);                  \
        break;                                                                                       \
    }
#define SCORES_CASES(DT)                                                                             \
    SCORES_CASE(1, DT) SCORES_CASE(2, DT) SCORES_CASE(3, DT) SCORES_CASE(4, DT) SCORES_CASE(5, DT)   \
    SCORES_CASE(6, DT) SCORES_CASE(7, DT) SCORES_CASE(8, DT)

/*
 * Scores of GT (<= 8) heads for the first n tokens of a K part: whole tiles, then 32-token tiles for the rest
 * (lanes past n hold scores of unwritten slots; the softmax masks them off).
 */
static void scores_block(const char *K, int D, const float *qs, float *S, int ld_s, int n, ptrdiff_t pf, int GT,
                         int DT) {
    switch (DT * 16 + GT) {
        SCORES_CASES(DT_F32)
        SCORES_CASES(DT_BF16)
        SCORES_CASES(DT_F16)
        default: break;
    }
}

#define PV_CASE(GT, DT)                                                                              \
    case (DT) * 16 + (GT): {                                                                         \
        int d0 = 0;                                                                                  \
        for (; d0 + 32 * NP_FOR(GT) <= DP; d0 += 32 * NP_FOR(GT))                                    \
            pv_tile(V, BS, P, ld_p, n, acc, ld_acc, alpha, d0, pf, GT, NP_FOR(GT), DT);              \
        for (; d0 < DP; d0 += 32) pv_tile(V, BS, P, ld_p, n, acc, ld_acc, alpha, d0, pf, GT, 1, DT); \
        break;                                                                                       \
    }
#define PV_CASES(DT)                                                                                 \
    PV_CASE(1, DT) PV_CASE(2, DT) PV_CASE(3, DT) PV_CASE(4, DT) PV_CASE(5, DT) PV_CASE(6, DT)        \
    PV_CASE(7, DT) PV_CASE(8, DT)

static void pv_block(const char *V, int BS, int DP, const float *P, int ld_p, int n, float *acc, int ld_acc,
                     const float *alpha, ptrdiff_t pf, int GT, int DT) {
    switch (DT * 16 + GT) {
        PV_CASES(DT_F32)
        PV_CASES(DT_BF16)
        PV_CASES(DT_F16)
        default: break;
    }
}

/* Online-softmax update of one head over the n scores in s (in place: s becomes exp(s - m_new)). */
static void softmax_update(float *s, int n, float *m, float *l, float *alpha) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int t = 0; t < n; t += 16) {
        __mmask16 k = tail_mask(n - t);
        vmax = _mm512_mask_max_ps(vmax, k, vmax, _mm512_maskz_loadu_ps(k, s + t));
    }
    float mx = _mm512_reduce_max_ps(vmax);
    float m_new = mx > *m ? mx : *m;
    __m512 vm = _mm512_set1_ps(m_new);
    __m512 vsum = _mm512_setzero_ps();
    for (int t = 0; t < n; t += 16) {
        __mmask16 k = tail_mask(n - t);
        __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), vm));
        _mm512_mask_storeu_ps(s + t, k, p);
        vsum = _mm512_mask_add_ps(vsum, k, vsum, p);
    }
    *alpha = expf(*m - m_new);
    *l = *l * *alpha + _mm512_reduce_add_ps(vsum);
    *m = m_new;
}

static void item_avx512(const Job *job, const Item *it, Scratch *sc) {
    const Geom *g = job->g;
    const int G = job->G, D = g->d, DP = g->dp, BS = g->bs, DT = g->dtype;
    const int ntok = job->ctx[it->b];
    const int32_t *trow = job->table + (size_t)job->rows[it->b] * (size_t)job->table_stride;
    const float *q = job->q + ((size_t)it->b * job->hq + (size_t)it->h * G) * D;

    for (int i = 0; i < G * D; i++) sc->qs[i] = q[i] * job->scale;
    for (int i = 0; i < G; i++) {
        sc->m[i] = -INFINITY;
        sc->l[i] = 0.0f;
    }
    memset(sc->acc, 0, sizeof(float) * (size_t)G * DP);

    for (int blk = it->blk_begin; blk < it->blk_end; blk++) {
        int n = ntok - blk * BS;
        if (n > BS) n = BS;
        const char *K = kv_head_block(g, job->layer, trow[blk], it->h);
        const char *V = K + (size_t)BS * D * g->esize;
        /* NOTE: blocks of a sequence are scattered, so the hardware prefetchers stop at each block's end; every
         * load also prefetches the same offset of the item's next block (into L2), one block ahead. */
        ptrdiff_t pf = blk + 1 < it->blk_end ? kv_head_block(g, job->layer, trow[blk + 1], it->h) - K : 0;
        for (int h0 = 0; h0 < G; h0 += 8) {
            int gt = G - h0 < 8 ? G - h0 : 8;
            scores_block(K, D, sc->qs + (size_t)h0 * D, sc->s + (size_t)h0 * BS, BS, n, pf, gt, DT);
        }
        for (int i = 0; i < G; i++) softmax_update(sc->s + (size_t)i * BS, n, &sc->m[i], &sc->l[i], &sc->alpha[i]);
        for (int h0 = 0; h0 < G; h0 += 8) {
            int gt = G - h0 < 8 ? G - h0 : 8;
            pv_block(V, BS, DP, sc->s + (size_t)h0 * BS, BS, n, sc->acc + (size_t)h0 * DP, DP, sc->alpha + h0, pf,
                     gt, DT);
        }
    }
}

/* Streaming read of n bytes (n multiple of 256) for the bandwidth probe. */
static double stream_read_avx512(const char *p, size_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < n; i += 256) {
        a0 = _mm512_add_ps(a0, _mm512_load_ps((const float *)(p + i)));
        a1 = _mm512_add_ps(a1, _mm512_load_ps((const float *)(p + i + 64)));
        a2 = _mm512_add_ps(a2, _mm512_load_ps((const float *)(p + i + 128)));
        a3 = _mm512_add_ps(a3, _mm512_load_ps((const float *)(p + i + 192)));
    }
    return (double)_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

#pragma GCC pop_options
#endif /* ATTN_X86 */

static double stream_read_portable(const char *p, size_t n) {
    const float *f = (const float *)p;
    size_t m = n / sizeof(float);
    float a[16] = {0};
    for (size_t i = 0; i < m; i += 16)
        for (int j = 0; j < 16; j++) a[j] += f[i + j];
    double s = 0;
    for (int j = 0; j < 16; j++) s += a[j];
    return s;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Dispatch.                                                                                               */

static int g_force_portable = 0;

int use_avx512(void) {
#if ATTN_X86
    if (g_force_portable) return 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static int cmp_items_desc(const void *a, const void *b) {
    const Item *x = a, *y = b;
    return (y->blk_end - y->blk_begin) - (x->blk_end - x->blk_begin);
}

/*
 * Split every (sequence, kv head) into chunks of whole blocks so that there are about 8 work items per thread
 * even at batch 1; chunks of one (sequence, head) are merged afterwards with log-sum-exp. Longest items go
 * first so that a dynamic schedule ends evenly. The plan's buffers grow and are kept for the next call.
 * Returns 0, or -1 when out of memory.
 */
int attn_plan(const Job *job, int B, int nthreads, AttnPlan *p) {
    const Geom *g = job->g;
    const int BS = g->bs, HKV = g->hkv, G = job->G;
    int64_t total_units = 0;
    for (int b = 0; b < B; b++) total_units += (int64_t)((job->ctx[b] + BS - 1) / BS) * HKV;
    int64_t chunk = INT32_MAX;
    if (nthreads > 1) {
        int64_t target = (int64_t)nthreads * 8;
        chunk = (total_units + target - 1) / target;
        if (chunk < 1) chunk = 1;
    }
    int64_t n_items = 0, n_partials = 0, n_merges = 0;
    for (int b = 0; b < B; b++) {
        int64_t nb = (job->ctx[b] + BS - 1) / BS;
        int64_t ns = (nb + chunk - 1) / chunk;
        n_items += ns * HKV;
        if (ns > 1) {
            n_partials += ns * HKV;
            n_merges += HKV;
        }
    }
    const size_t partial_floats = (size_t)(n_partials ? n_partials : 1) * (size_t)G * (2 + (size_t)g->d);
    if ((size_t)n_items > p->cap_items) {
        Item *items = realloc(p->items, sizeof(Item) * (size_t)n_items);
        if (!items) return -1;
        p->items = items;
        p->cap_items = (size_t)n_items;
    }
    if ((size_t)(n_merges ? n_merges : 1) > p->cap_merges) {
        Merge *merges = realloc(p->merges, sizeof(Merge) * (size_t)(n_merges ? n_merges : 1));
        if (!merges) return -1;
        p->merges = merges;
        p->cap_merges = (size_t)(n_merges ? n_merges : 1);
    }
    if (partial_floats > p->cap_partials) {
        float *partials = realloc(p->partials, sizeof(float) * partial_floats);
        if (!partials) return -1;
        p->partials = partials;
        p->cap_partials = partial_floats;
    }
    int64_t ii = 0, pi = 0, mi = 0;
    for (int b = 0; b < B; b++) {
        int nb = (job->ctx[b] + BS - 1) / BS;
        int ns = (int)((nb + chunk - 1) / chunk);
        for (int h = 0; h < HKV; h++) {
            if (ns > 1) p->merges[mi++] = (Merge){b, h, (int)pi, ns};
            for (int s = 0; s < ns; s++) {
                int b0 = (int)(s * chunk), b1 = (int)((s + 1) * chunk);
                if (b1 > nb) b1 = nb;
                p->items[ii++] = (Item){b, h, b0, b1, ns > 1 ? (int)pi++ : -1};
            }
        }
    }
    if (chunk != INT32_MAX) qsort(p->items, (size_t)n_items, sizeof(Item), cmp_items_desc);
    p->n_items = n_items;
    p->n_merges = n_merges;
    return 0;
}

void attn_plan_free(AttnPlan *p) {
    free(p->items);
    free(p->merges);
    free(p->partials);
    memset(p, 0, sizeof *p);
}

void attn_run_item(const Job *job, const AttnPlan *p, int64_t k, Scratch *sc, int avx) {
#if ATTN_X86
    if (avx)
        item_avx512(job, &p->items[k], sc);
    else
#endif
        item_portable(job, &p->items[k], sc);
    finish_item(job, &p->items[k], sc, p->partials);
    (void)avx;
}

void attn_run_merge(const Job *job, const AttnPlan *p, int64_t k) { merge_partials(job, &p->merges[k], p->partials); }

/* The OpenMP path (direct calls from Python): plan, items with a dynamic schedule, then merges. */
static int run_attention(const Job *job, int B, int nthreads) {
    const Geom *g = job->g;
    AttnPlan plan = {0};
    if (attn_plan(job, B, nthreads, &plan) < 0) {
        attn_plan_free(&plan);
        return -1;
    }
    const int avx = use_avx512();
    const int64_t n_items = plan.n_items, n_merges = plan.n_merges;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && n_items > 1)
    {
        Scratch sc;
        int ok = attn_scratch_alloc(&sc, job->G, g->d, g->dp, g->bs) == 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < n_items; k++) {
            if (ok) attn_run_item(job, &plan, k, &sc, avx);
        }
#pragma omp for schedule(static)
        for (int64_t k = 0; k < n_merges; k++) attn_run_merge(job, &plan, k);
        if (ok) free(sc.qs);
    }
    attn_plan_free(&plan);
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Copy-in / copy-out (prefill copy-out, decode append, swap-in/out): fp32 rows on the Python side.        */

/* One 32-lane row: 32 floats in logical order <-> storage type in the layout's lane order. */
static void row32_to_storage_portable(const float *src, char *dst, int DT) {
    for (int u = 0; u < 32; u++) {
        size_t l = DT == DT_BF16 ? (size_t)(2 * (u & 15) + (u >> 4)) : (size_t)u;
        store_elem(dst, l, DT, src[u]);
    }
}
static void row32_from_storage_portable(const char *src, float *dst, int DT) {
    for (int u = 0; u < 32; u++) {
        size_t l = DT == DT_BF16 ? (size_t)(2 * (u & 15) + (u >> 4)) : (size_t)u;
        dst[u] = load_elem(src, l, DT);
    }
}

#if ATTN_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")
/* fp32 -> bf16 bits in the upper half of each 32-bit lane, round-to-nearest-even, NaN -> canonical quiet NaN
 * (the same results as torch's .to(torch.bfloat16)). */
static inline __m512i f32x16_to_bf16_hi(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc00000));
    return _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
}
static void row32_to_storage_avx512(const float *src, char *dst, int DT) {
    __m512 lo = _mm512_loadu_ps(src), hi = _mm512_loadu_ps(src + 16);
    if (DT == DT_F32) {
        _mm512_storeu_ps((float *)dst, lo);
        _mm512_storeu_ps((float *)dst + 16, hi);
    } else if (DT == DT_BF16) {
        __m512i w = _mm512_or_si512(f32x16_to_bf16_hi(hi), _mm512_srli_epi32(f32x16_to_bf16_hi(lo), 16));
        _mm512_storeu_si512((void *)dst, w);
    } else {
        _mm256_storeu_si256((__m256i *)dst, _mm512_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm256_storeu_si256((__m256i *)dst + 1, _mm512_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}
/* n floats -> n storage elements in plain order (the K column of one token before its strided store). */
static void row_to_storage_avx512(const float *src, char *dst, int n, int DT) {
    int i = 0;
    if (DT == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(src + i);
        __m256i h = DT == DT_BF16 ? _mm512_cvtepi32_epi16(_mm512_srli_epi32(f32x16_to_bf16_hi(x), 16))
                                  : _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256((__m256i *)(dst + (size_t)i * 2), h);
    }
    for (; i < n; i++) store_elem(dst, (size_t)i, DT, src[i]);
}
static void row32_from_storage_avx512(const char *src, float *dst, int DT) {
    __m512 lo, hi;
    switch (DT) {
        case DT_F32: ld32(src, DT_F32, &lo, &hi); break;
        case DT_BF16: ld32(src, DT_BF16, &lo, &hi); break;
        default: ld32(src, DT_F16, &lo, &hi); break;
    }
    _mm512_storeu_ps(dst, lo);
    _mm512_storeu_ps(dst + 16, hi);
}
#pragma GCC pop_options
#endif

static void row_to_storage(const float *src, char *dst, int n, int DT, int avx) {
#if ATTN_X86
    if (avx) {
        row_to_storage_avx512(src, dst, n, DT);
        return;
    }
#endif
    (void)avx;
    for (int i = 0; i < n; i++) store_elem(dst, (size_t)i, DT, src[i]);
}
static void row32_to_storage(const float *src, char *dst, int DT, int avx) {
#if ATTN_X86
    if (avx) {
        row32_to_storage_avx512(src, dst, DT);
        return;
    }
#endif
    (void)avx;
    row32_to_storage_portable(src, dst, DT);
}
static void row32_from_storage(const char *src, float *dst, int DT, int avx) {
#if ATTN_X86
    if (avx) {
        row32_from_storage_avx512(src, dst, DT);
        return;
    }
#endif
    (void)avx;
    row32_from_storage_portable(src, dst, DT);
}

/* Tokens [i, i+32) fill one whole 32-token K tile: same block, slots off..off+31 with off % 32 == 0. */
static int is_k_group(int64_t i, int64_t n, const int32_t *blocks, const int32_t *offs) {
    if (offs[i] % 32 != 0 || i + 32 > n) return 0;
    for (int u = 1; u < 32; u++)
        if (blocks[i + u] != blocks[i] || offs[i + u] != offs[i] + u) return 0;
    return 1;
}

/* Per-thread buffers of the copy paths: a [D][32] fp32 tile and one 32-float row. */
typedef struct {
    float *tile, *row;
} CopyScratch;

/*
 * The V row of one token (padded to 32 lanes with zeros) <-> its row in every [BS][32] V tile of the block
 * (store != 0: into the arena).
 */
static void copy_v_row(const Geom *g, char *V, int t, float *row_buf, float *vrow, int store, int avx) {
    const int D = g->d, ES = g->esize, BS = g->bs;
    for (int c = 0; c < g->dp; c += 32) {
        int w = D - c < 32 ? D - c : 32;
        char *dst = V + (((size_t)(c >> 5) * BS + t) * 32) * ES;
        if (w == 32) {
            if (store) row32_to_storage(vrow + c, dst, g->dtype, avx);
            else row32_from_storage(dst, vrow + c, g->dtype, avx);
        } else if (store) {
            memcpy(row_buf, vrow + c, (size_t)w * 4);
            memset(row_buf + w, 0, (size_t)(32 - w) * 4);
            row32_to_storage(row_buf, dst, g->dtype, avx);
        } else {
            row32_from_storage(dst, row_buf, g->dtype, avx);
            memcpy(vrow + c, row_buf, (size_t)w * 4);
        }
    }
}

/*
 * Copy tokens between fp32 rows k, v ([n, Hkv, D]) and slot offs[i] of block blocks[i] (store: into the
 * arena, else out of it). K of 32 consecutive tokens that fill a tile goes through a [D][32] transpose in L1
 * and whole-row conversions (bulk swap-in/out); lone tokens (decode append) go element by element.
 * NOTE: work units are whole groups of 32 tokens, so no K tile is split between threads.
 */
static void copy_unit(const Geom *g, int layer, int64_t n, const int32_t *blocks, const int32_t *offs, float *k,
                      float *v, int store, int avx, CopyScratch *cs, int64_t unit) {
    const int D = g->d, HKV = g->hkv, BS = g->bs, DT = g->dtype, ES = g->esize;
    const size_t tok_stride = (size_t)HKV * D;
    int64_t i = unit * 32, iend = i + 32 < n ? i + 32 : n;
    while (i < iend) {
        const int grouped = is_k_group(i, n, blocks, offs);
        const int64_t cnt = grouped ? 32 : 1;
        for (int h = 0; h < HKV; h++) {
            char *K = kv_head_block(g, layer, blocks[i], h);
            char *V = K + (size_t)BS * D * ES;
            if (grouped) {
                char *kt = K + ((size_t)(offs[i] >> 5) * D * 32) * ES;
                if (store) {
                    for (int u = 0; u < 32; u++) {
                        const float *src = k + (size_t)(i + u) * tok_stride + (size_t)h * D;
                        for (int d = 0; d < D; d++) cs->tile[(size_t)d * 32 + u] = src[d];
                    }
                    for (int d = 0; d < D; d++)
                        row32_to_storage(cs->tile + (size_t)d * 32, kt + (size_t)d * 32 * ES, DT, avx);
                } else {
                    for (int d = 0; d < D; d++)
                        row32_from_storage(kt + (size_t)d * 32 * ES, cs->tile + (size_t)d * 32, DT, avx);
                    for (int u = 0; u < 32; u++) {
                        float *dst = k + (size_t)(i + u) * tok_stride + (size_t)h * D;
                        for (int d = 0; d < D; d++) dst[d] = cs->tile[(size_t)d * 32 + u];
                    }
                }
            } else {
                float *row = k + (size_t)i * tok_stride + (size_t)h * D;
                const size_t kb = k_index(g, offs[i], 0);
                if (store && ES == 2) {
                    /* NOTE: convert the row with vector ops first; only the strided stores stay scalar. */
                    uint16_t *conv = (uint16_t *)cs->tile;
                    row_to_storage(row, (char *)conv, D, DT, avx);
                    for (int d = 0; d < D; d++) ((uint16_t *)K)[kb + (size_t)d * 32] = conv[d];
                } else if (store) {
                    for (int d = 0; d < D; d++) ((float *)K)[kb + (size_t)d * 32] = row[d];
                } else {
                    for (int d = 0; d < D; d++) row[d] = load_elem(K, kb + (size_t)d * 32, DT);
                }
            }
            for (int64_t u = 0; u < cnt; u++)
                copy_v_row(g, V, offs[i + u], cs->row, v + (size_t)(i + u) * tok_stride + (size_t)h * D,
                           store, avx);
        }
        i += cnt;
    }
}

/* All units on the calling thread, with the caller's scratch of COPY_SCRATCH_FLOATS(D) floats (the team). */
void copy_tokens_serial(const Geom *g, int layer, int64_t n, const int32_t *blocks, const int32_t *offs, float *k,
                        float *v, int store, float *scratch) {
    CopyScratch cs = {scratch, scratch + (size_t)g->d * 32};
    const int avx = use_avx512();
    for (int64_t unit = 0; unit < (n + 31) / 32; unit++) copy_unit(g, layer, n, blocks, offs, k, v, store, avx, &cs, unit);
}

/* Parallel over units when the copy is large (direct calls from Python). */
static void copy_tokens(const Geom *g, int layer, int64_t n, const int32_t *blocks, const int32_t *offs, float *k,
                        float *v, int nthreads, int store) {
    const int avx = use_avx512();
    const int64_t nunits = (n + 31) / 32;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && n * g->hkv * g->d >= (1 << 18))
    {
        CopyScratch cs;
        cs.tile = malloc(sizeof(float) * COPY_SCRATCH_FLOATS(g->d));
        cs.row = cs.tile + (size_t)g->d * 32;
#pragma omp for schedule(static)
        for (int64_t unit = 0; unit < nunits; unit++) copy_unit(g, layer, n, blocks, offs, k, v, store, avx, &cs, unit);
        free(cs.tile);
    }
}

/*
 * The checks of one decode call (the Python binding's and the team's): every row exists; with new k/v
 * (has_kv) ctx[b] is row_tokens + 1 (the step's first layer appends) or row_tokens (a later layer finds the token
 * counted already) and position ctx[b] - 1 lies in the row's reserved blocks, whose block and slot go to
 * blocks[b] / offs[b]; without, 1 <= ctx[b] <= row_tokens. Returns DECODE_OK, or DECODE_BAD /
 * DECODE_UNRESERVED with a message naming the batch index in `why`. Writes nothing but blocks/offs.
 */
int decode_prepare(const Geom *g, const int32_t *tb, int64_t stride, int64_t nrows, const int64_t *rt,
                   const int64_t *rb, const int64_t *rw, const int64_t *cx, int64_t B, int has_kv, int32_t *blocks,
                   int32_t *offs, char *why, size_t whylen) {
    for (int64_t b = 0; b < B; b++) {
        if (rw[b] < 0 || rw[b] >= nrows) {
            snprintf(why, whylen, "batch entry %lld: no such sequence row %lld", (long long)b, (long long)rw[b]);
            return DECODE_BAD;
        }
        const int64_t have = rt[rw[b]], n = cx[b];
        if (!has_kv) {
            if (n < 1 || n > have) {
                snprintf(why, whylen, "batch entry %lld: context_len %lld is outside [1, %lld] (the tokens stored "
                         "for that sequence)", (long long)b, (long long)n, (long long)have);
                return DECODE_BAD;
            }
            continue;
        }
        if (n < 1 || (n != have && n != have + 1)) {
            snprintf(why, whylen, "batch entry %lld: context_len %lld with new k/v, but the sequence holds %lld "
                     "tokens (expected %lld or %lld)", (long long)b, (long long)n, (long long)have,
                     (long long)have + 1, (long long)have);
            return DECODE_BAD;
        }
        const int64_t pos = n - 1, held = rb[rw[b]] < stride ? rb[rw[b]] : stride;
        if (pos / g->bs >= held || tb[rw[b] * stride + pos / g->bs] < 0 ||
            tb[rw[b] * stride + pos / g->bs] >= g->num_blocks) {
            snprintf(why, whylen, "batch entry %lld: position %lld is beyond the sequence's reserved blocks",
                     (long long)b, (long long)pos);
            return DECODE_UNRESERVED;
        }
        blocks[b] = tb[rw[b] * stride + pos / g->bs];
        offs[b] = (int32_t)(pos % g->bs);
    }
    return DECODE_OK;
}

/* After a decode's append: each row holds at least its context length. */
void decode_advance(int64_t *rt, const int64_t *rw, const int64_t *cx, int64_t B) {
    for (int64_t b = 0; b < B; b++)
        if (rt[rw[b]] < cx[b]) rt[rw[b]] = cx[b];
}

/* ------------------------------------------------------------------------------------------------------ */
/* Python bindings. Addresses are passed as integers (tensor.data_ptr()); kernel.py checks shapes.         */

int parse_geom(PyObject *t, Geom *g) {
    unsigned long long arena;
    long long nb;
    if (!PyArg_ParseTuple(t, "KLiiiii", &arena, &nb, &g->num_layers, &g->hkv, &g->bs, &g->d, &g->dtype)) return -1;
    g->arena = (char *)(uintptr_t)arena;
    g->num_blocks = nb;
    g->dp = (g->d + 31) / 32 * 32;
    if (g->dtype < DT_F32 || g->dtype > DT_F16 || g->bs <= 0 || g->bs % 64 != 0 || g->d <= 0 || g->hkv <= 0 ||
        g->num_layers <= 0 || g->num_blocks <= 0) {
        PyErr_SetString(PyExc_ValueError, "invalid cache geometry (block_size must be a positive multiple of 64)");
        return -1;
    }
    g->esize = g->dtype == DT_F32 ? 4 : 2;
    return 0;
}

/* Runs a checked attention batch with the GIL released; 0, or -1 with MemoryError set. */
static int attend(const Geom *g, int layer, const int32_t *table, int64_t stride, const int64_t *rows,
                  const int64_t *ctx, unsigned long long q, int hq, unsigned long long out, float scale, Py_ssize_t B,
                  int nthreads) {
    Job job = {g, layer, table, stride, rows, ctx, (const float *)(uintptr_t)q, (float *)(uintptr_t)out, hq,
               hq / g->hkv, scale};
    int rc = 0;
    if (B > 0) {
        Py_BEGIN_ALLOW_THREADS rc = run_attention(&job, (int)B, nthreads);
        Py_END_ALLOW_THREADS
    }
    if (rc < 0) PyErr_NoMemory();
    return rc;
}

/*
 * attention(geom, layer, table, table_stride, row_tokens, rows, ctx, q, hq, out, scale, nthreads)
 * table: int32 [num_rows, table_stride] block ids; row_tokens: int64 [num_rows] tokens stored per row (the
 * blocks of a row cover at least that many positions); rows, ctx: int64 [B]. Checks every row and context
 * length here (ValueError naming the batch index), so a bad call can never read outside a sequence's blocks.
 */
static PyObject *py_attention(PyObject *self, PyObject *args) {
    PyObject *geom_t;
    Geom g;
    Py_buffer table, row_tokens, rows, ctx;
    int layer, hq, nthreads;
    unsigned long long q, out;
    long long stride;
    float scale;
    if (!PyArg_ParseTuple(args, "Oiy*Ly*y*y*KiKfi", &geom_t, &layer, &table, &stride, &row_tokens, &rows, &ctx, &q,
                          &hq, &out, &scale, &nthreads))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t B = rows.len / 8, nrows = row_tokens.len / 8;
    const int64_t *rw = rows.buf, *cx = ctx.buf, *rt = row_tokens.buf;
    if (parse_geom(geom_t, &g) < 0) goto done;
    if (hq <= 0 || hq % g.hkv != 0 || layer < 0 || layer >= g.num_layers || nthreads < 1 || stride <= 0 ||
        ctx.len != rows.len || table.len < (Py_ssize_t)(nrows * stride * 4)) {
        PyErr_SetString(PyExc_ValueError, "attention: bad layer, head count, thread count or table shape");
        goto done;
    }
    for (Py_ssize_t b = 0; b < B; b++) {
        if (rw[b] < 0 || rw[b] >= nrows) {
            PyErr_Format(PyExc_ValueError, "batch entry %zd: no such sequence row %lld", b, (long long)rw[b]);
            goto done;
        }
        if (cx[b] < 1 || cx[b] > rt[rw[b]]) {
            PyErr_Format(PyExc_ValueError, "batch entry %zd: context length %lld is outside [1, %lld] (the tokens "
                         "stored for that sequence)", b, (long long)cx[b], (long long)rt[rw[b]]);
            goto done;
        }
    }
    if (attend(&g, layer, table.buf, stride, rw, cx, q, hq, out, scale, B, nthreads) == 0) result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&table);
    PyBuffer_Release(&row_tokens);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&ctx);
    return result;
}

/*
 * decode(geom, layer, table, table_stride, row_tokens, row_blocks, rows, ctx, q, hq, k, v, out, scale, nthreads)
 * One layer of one decode step for B sequences, the sidecar's per-layer request in one call: stores each new
 * token's K/V (k, v fp32 [B, Hkv, D]; both 0 when the cache holds them already) at position ctx[b] - 1 of row
 * rows[b], then runs attention() over [0, ctx[b]).
 * row_tokens: int64 [num_rows] tokens stored per row, advanced here; row_blocks: int64 [num_rows] blocks held
 * per row. With k/v, ctx[b] must be row_tokens + 1 (the step's first layer appends) or row_tokens (a later
 * layer finds the token counted already), within the blocks held; without, 1 <= ctx[b] <= row_tokens.
 * Everything is checked before anything is written (ValueError naming the batch index). The caller rules out
 * a row appearing twice.
 * NOTE: one call per layer instead of store() + attention() and their Python wrappers: at the batch sizes a
 * pipelined step sends, the per-call overhead, not the kernel, was most of a sidecar call.
 */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    PyObject *geom_t;
    Geom g;
    Py_buffer table, row_tokens, row_blocks, rows, ctx;
    int layer, hq, nthreads;
    unsigned long long q, k, v, out;
    long long stride;
    float scale;
    if (!PyArg_ParseTuple(args, "Oiy*Lw*y*y*y*KiKKKfi", &geom_t, &layer, &table, &stride, &row_tokens, &row_blocks,
                          &rows, &ctx, &q, &hq, &k, &v, &out, &scale, &nthreads))
        return NULL;
    PyObject *result = NULL;
    int32_t *blocks = NULL, *offs = NULL;
    const Py_ssize_t B = rows.len / 8, nrows = row_tokens.len / 8;
    const int64_t *rw = rows.buf, *cx = ctx.buf, *rb = row_blocks.buf;
    int64_t *rt = row_tokens.buf;
    const int32_t *tb = table.buf;
    const int has_kv = k != 0;
    if (parse_geom(geom_t, &g) < 0) goto done;
    if (hq <= 0 || hq % g.hkv != 0 || layer < 0 || layer >= g.num_layers || nthreads < 1 || stride <= 0 ||
        ctx.len != rows.len || row_blocks.len != row_tokens.len || table.len < (Py_ssize_t)(nrows * stride * 4) ||
        (k == 0) != (v == 0)) {
        PyErr_SetString(PyExc_ValueError, "decode: bad layer, head count, thread count, table shape or k/v");
        goto done;
    }
    if (has_kv && B > 0) {
        blocks = malloc(sizeof(int32_t) * (size_t)B);
        offs = malloc(sizeof(int32_t) * (size_t)B);
        if (!blocks || !offs) {
            PyErr_NoMemory();
            goto done;
        }
    }
    char why[200];
    if (decode_prepare(&g, tb, stride, nrows, rt, rb, rw, cx, B, has_kv, blocks, offs, why, sizeof why) != DECODE_OK) {
        PyErr_SetString(PyExc_ValueError, why);
        goto done;
    }
    if (B > 0) {
        if (has_kv) {
            Py_BEGIN_ALLOW_THREADS
            copy_tokens(&g, layer, B, blocks, offs, (float *)(uintptr_t)k, (float *)(uintptr_t)v, nthreads, 1);
            Py_END_ALLOW_THREADS
        }
        if (has_kv) decode_advance(rt, rw, cx, B);
    }
    if (attend(&g, layer, tb, stride, rw, cx, q, hq, out, scale, B, nthreads) == 0) result = Py_NewRef(Py_None);
done:
    free(blocks);
    free(offs);
    PyBuffer_Release(&table);
    PyBuffer_Release(&row_tokens);
    PyBuffer_Release(&row_blocks);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&ctx);
    return result;
}

/* store/load(geom, layer, blocks, offsets, k, v, nthreads): blocks, offsets int32 [n]; k, v fp32 [n, Hkv, D]. */
static PyObject *py_copy(PyObject *args, int to_arena) {
    PyObject *geom_t;
    Geom g;
    Py_buffer blocks, offs;
    int layer, nthreads;
    unsigned long long k, v;
    if (!PyArg_ParseTuple(args, "Oiy*y*KKi", &geom_t, &layer, &blocks, &offs, &k, &v, &nthreads)) return NULL;
    PyObject *result = NULL;
    const int64_t n = blocks.len / 4;
    if (parse_geom(geom_t, &g) < 0) goto done;
    if (offs.len != blocks.len || layer < 0 || layer >= g.num_layers) {
        PyErr_SetString(PyExc_ValueError, "store/load: bad layer or offsets length");
        goto done;
    }
    const int32_t *bl = blocks.buf, *of = offs.buf;
    for (int64_t i = 0; i < n; i++) {
        if (bl[i] < 0 || bl[i] >= g.num_blocks || of[i] < 0 || of[i] >= g.bs) {
            PyErr_Format(PyExc_ValueError, "store/load: token %lld maps to block %d slot %d, outside the arena",
                         (long long)i, bl[i], of[i]);
            goto done;
        }
    }
    if (nthreads < 1) nthreads = 1;
    Py_BEGIN_ALLOW_THREADS copy_tokens(&g, layer, n, bl, of, (float *)(uintptr_t)k, (float *)(uintptr_t)v, nthreads,
                                       to_arena);
    Py_END_ALLOW_THREADS result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&blocks);
    PyBuffer_Release(&offs);
    return result;
}

static PyObject *py_store(PyObject *self, PyObject *args) { return py_copy(args, 1); }
static PyObject *py_load(PyObject *self, PyObject *args) { return py_copy(args, 0); }

static PyObject *py_stream_read(PyObject *self, PyObject *args) {
    unsigned long long ptr;
    long long nbytes;
    int nthreads;
    if (!PyArg_ParseTuple(args, "KLi", &ptr, &nbytes, &nthreads)) return NULL;
    if (ptr % 64 != 0 || nbytes <= 0 || nthreads < 1) {
        PyErr_SetString(PyExc_ValueError, "stream_read: buffer must be 64-byte aligned and non-empty");
        return NULL;
    }
    const char *p = (const char *)(uintptr_t)ptr;
    const size_t per = ((size_t)nbytes / (size_t)nthreads) / 256 * 256;
    double total = 0.0;
    const int avx = use_avx512();
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nthreads) reduction(+ : total) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) {
#if ATTN_X86
        if (avx)
            total += stream_read_avx512(p + (size_t)t * per, per);
        else
#endif
            total += stream_read_portable(p + (size_t)t * per, per);
    }
    Py_END_ALLOW_THREADS(void) avx;
    return Py_BuildValue("(dL)", total, (long long)(per * (size_t)nthreads));
}

static PyObject *py_has_avx512(PyObject *self, PyObject *noargs) { return PyBool_FromLong(use_avx512()); }

static PyObject *py_set_force_portable(PyObject *self, PyObject *arg) {
    int v = PyObject_IsTrue(arg);
    if (v < 0) return NULL;
    g_force_portable = v;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"attention", py_attention, METH_VARARGS,
     "attention(geom, layer, table, table_stride, row_tokens, rows, ctx, q, hq, out, scale, nthreads)"},
    {"decode", py_decode, METH_VARARGS,
     "decode(geom, layer, table, table_stride, row_tokens, row_blocks, rows, ctx, q, hq, k, v, out, scale, nthreads)"},
    {"store", py_store, METH_VARARGS, "store(geom, layer, blocks, offsets, k, v, nthreads)"},
    {"load", py_load, METH_VARARGS, "load(geom, layer, blocks, offsets, k_out, v_out, nthreads)"},
    {"stream_read", py_stream_read, METH_VARARGS,
     "stream_read(ptr, nbytes, nthreads) -> (checksum, bytes_read): read a buffer once, split over threads"},
    {"has_avx512", py_has_avx512, METH_NOARGS, "True when the AVX-512 path will be used"},
    {"set_force_portable", py_set_force_portable, METH_O, "Force the portable path (tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_attn_kernel", "CPU paged decode attention", -1,
                                       methods};

PyMODINIT_FUNC PyInit__attn_kernel(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (m && team_register(m) < 0) Py_CLEAR(m);
    return m;
}
