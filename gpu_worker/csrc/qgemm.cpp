// neoserve::q4_linear, neoserve::q8_linear: y = x @ W^T for block-quantized weights, for the few-row products of
// CPU decode steps (a batch of decodes is one row each).
//
// Why our own: at batch 1 a decode step reads every weight once, so it is bound by the bytes read and by the work
// to unpack them. torch's weight-only int4/int8 CPU kernels reached 4-5 GB/s of weights per core here (issue 14),
// a fraction of what one core can stream; this loop unpacks 32 weights in a handful of AVX-512 instructions and
// keeps the activations in fp32 (llama.cpp rounds them to 8 bits).
//
// Layouts (groups of 32 consecutive inputs, as GGUF's Q4_1 and Q8_0 blocks):
//   q4: q  uint8 [N, K/2]   group g of row n at bytes [g*16, g*16+16) of the row; byte i holds element i in its
//                           low nibble and element i+16 in its high nibble (ggml's order)
//       dm fp16  [N, 2, K/32]  scales d (plane 0) and offsets m (plane 1): w = d * q + m   (Q4_1 exactly)
//   q8: q  int8  [N, K]     dq fp16 [N, K/32]: w = d * q            (Q8_0 exactly)
// x: [M, K] fp32 or bf16 (computed in fp32); y: [M, N] in x's dtype.
//
// Threads: at::parallel_for over output rows, i.e. torch's own thread pool: a second OpenMP runtime in the same
// process would leave two pools spinning against each other on a 2-core machine.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowTile = 4;  // activation rows sharing one unpack of a weight group (registers: 4 x 2 acc)
// NOTE: weights stream from L3 or DRAM once per call; the hardware prefetcher alone left a 28 MB LM head at
// half the bandwidth a plain fp32 GEMV reached on the same core, so each group also prefetches ~1 KiB ahead.
constexpr int64_t kPrefetchBytes = 1024;

inline float half_to_float(uint16_t h) {
    // NOTE: portable IEEE half -> float (the AVX-512 paths convert 16 at a time with vcvtph2ps instead).
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// ---- portable reference loops (any x86-64 or other CPU) ------------------------------------------------------

void q4_rows_portable(const float* x, const float* xsum, int64_t M, int64_t K, const uint8_t* q, const uint16_t* dm,
                      float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / kGroup;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* qr = q + n * (K / 2);
        const uint16_t* dr = dm + n * G * 2;
        const uint16_t* mr = dr + G;
        for (int64_t m = 0; m < M; m++) {
            const float* xr = x + m * K;
            float acc = 0.f;
            for (int64_t g = 0; g < G; g++) {
                float dot = 0.f;
                for (int i = 0; i < 16; i++) {
                    uint8_t b = qr[g * 16 + i];
                    dot += (float)(b & 0xf) * xr[g * kGroup + i] + (float)(b >> 4) * xr[g * kGroup + 16 + i];
                }
                acc += half_to_float(dr[g]) * dot + half_to_float(mr[g]) * xsum[m * G + g];
            }
            y[m * N + n] = acc;
        }
    }
}

void q8_rows_portable(const float* x, int64_t M, int64_t K, const int8_t* q, const uint16_t* dq, float* y, int64_t N,
                      int64_t n0, int64_t n1) {
    const int64_t G = K / kGroup;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < M; m++) {
            const float* xr = x + m * K;
            float acc = 0.f;
            for (int64_t g = 0; g < G; g++) {
                float dot = 0.f;
                for (int i = 0; i < kGroup; i++) dot += (float)q[n * K + g * kGroup + i] * xr[g * kGroup + i];
                acc += half_to_float(dq[n * G + g]) * dot;
            }
            y[m * N + n] = acc;
        }
    }
}

// ---- AVX-512 loops ---------------------------------------------------------------------------------------------

#define NEOSERVE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))

NEOSERVE_AVX512 inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// 16 fp16 values (fewer at a tail, zero-filled) as fp32.
NEOSERVE_AVX512 inline __m512 load_halves(const uint16_t* p, int64_t n) {
    const __mmask16 k = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

// One output row against rows [m0, m0 + MT) of x. Per group of 32 weights: unpack (4 ops), then per row of x
// one multiply and two FMAs; the group's scale is applied once to the group's partial dot product.
// NOTE: scales and offsets are converted 16 groups at a time and broadcast from a register per group; the
// offsets' term sum_g m_g * sum(x_g) is one vector FMA per 16 groups.
template <int MT>
NEOSERVE_AVX512 inline void q4_row_tile(const float* x, const float* xsum, int64_t K, const uint8_t* qr,
                                        const uint16_t* dr, const uint16_t* mr, float* y, int64_t N, int64_t n,
                                        int64_t m0) {
    const int64_t G = K / kGroup;
    // NOTE: two accumulators per row, for even and odd groups: one chain of dependent FMAs (4 cycles each) would
    // bound a row at a group per 4 cycles.
    __m512 acc[2][MT], offs[MT];
    for (int t = 0; t < MT; t++) acc[0][t] = acc[1][t] = offs[t] = _mm512_setzero_ps();
    const __m512i nib = _mm512_set1_epi32(0xf);
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
        const int64_t ng = G - g0 < 16 ? G - g0 : 16;
        const __m512 d16 = load_halves(dr + g0, ng);
        const __m512 m16 = load_halves(mr + g0, ng);
        const __mmask16 k = ng >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << ng) - 1u);
        for (int t = 0; t < MT; t++)
            offs[t] = _mm512_fmadd_ps(m16, _mm512_maskz_loadu_ps(k, xsum + (m0 + t) * G + g0), offs[t]);
        for (int64_t j = 0; j < ng; j++) {
            const int64_t g = g0 + j;
            const __m512 dv = _mm512_permutexvar_ps(_mm512_set1_epi32((int)j), d16);
            _mm_prefetch((const char*)(qr + g * 16) + kPrefetchBytes, _MM_HINT_T0);
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qr + g * 16)));  // 16 bytes
            const __m512 wlo = _mm512_cvtepi32_ps(_mm512_and_si512(b, nib));  // elements 0-15
            const __m512 whi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));  // elements 16-31
            for (int t = 0; t < MT; t++) {
                const float* xg = x + (m0 + t) * K + g * kGroup;
                const __m512 part = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xg), _mm512_mul_ps(whi, _mm512_loadu_ps(xg + 16)));
                acc[j & 1][t] = _mm512_fmadd_ps(part, dv, acc[j & 1][t]);
            }
        }
    }
    for (int t = 0; t < MT; t++) y[(m0 + t) * N + n] = hsum(_mm512_add_ps(acc[0][t], acc[1][t])) + hsum(offs[t]);
}

NEOSERVE_AVX512 void q4_rows_avx512(const float* x, const float* xsum, int64_t M, int64_t K, const uint8_t* q,
                                    const uint16_t* dm, float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / kGroup;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* qr = q + n * (K / 2);
        const uint16_t* dr = dm + n * G * 2;
        const uint16_t* mr = dr + G;
        // NOTE: a row of weights is at most a few KiB: the tiles after the first re-read it from L1.
        int64_t m0 = 0;
        for (; m0 + kRowTile <= M; m0 += kRowTile) q4_row_tile<kRowTile>(x, xsum, K, qr, dr, mr, y, N, n, m0);
        switch (M - m0) {
            case 3: q4_row_tile<3>(x, xsum, K, qr, dr, mr, y, N, n, m0); break;
            case 2: q4_row_tile<2>(x, xsum, K, qr, dr, mr, y, N, n, m0); break;
            case 1: q4_row_tile<1>(x, xsum, K, qr, dr, mr, y, N, n, m0); break;
            default: break;
        }
    }
}

template <int MT>
NEOSERVE_AVX512 inline void q8_row_tile(const float* x, int64_t K, const int8_t* qr, const uint16_t* dr, float* y,
                                        int64_t N, int64_t n, int64_t m0) {
    const int64_t G = K / kGroup;
    __m512 acc[2][MT];  // even and odd groups (see q4_row_tile)
    for (int t = 0; t < MT; t++) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
        const int64_t ng = G - g0 < 16 ? G - g0 : 16;
        const __m512 d16 = load_halves(dr + g0, ng);
        for (int64_t j = 0; j < ng; j++) {
            const int64_t g = g0 + j;
            const __m512 dv = _mm512_permutexvar_ps(_mm512_set1_epi32((int)j), d16);
            const __m128i* src = (const __m128i*)(qr + g * kGroup);
            _mm_prefetch((const char*)src + kPrefetchBytes, _MM_HINT_T0);
            const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src)));
            const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src + 1)));
            for (int t = 0; t < MT; t++) {
                const float* xg = x + (m0 + t) * K + g * kGroup;
                const __m512 part = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xg), _mm512_mul_ps(w1, _mm512_loadu_ps(xg + 16)));
                acc[j & 1][t] = _mm512_fmadd_ps(part, dv, acc[j & 1][t]);
            }
        }
    }
    for (int t = 0; t < MT; t++) y[(m0 + t) * N + n] = hsum(_mm512_add_ps(acc[0][t], acc[1][t]));
}

NEOSERVE_AVX512 void q8_rows_avx512(const float* x, int64_t M, int64_t K, const int8_t* q, const uint16_t* dq,
                                    float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / kGroup;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t* qr = q + n * K;
        const uint16_t* dr = dq + n * G;
        int64_t m0 = 0;
        for (; m0 + kRowTile <= M; m0 += kRowTile) q8_row_tile<kRowTile>(x, K, qr, dr, y, N, n, m0);
        switch (M - m0) {
            case 3: q8_row_tile<3>(x, K, qr, dr, y, N, n, m0); break;
            case 2: q8_row_tile<2>(x, K, qr, dr, y, N, n, m0); break;
            case 1: q8_row_tile<1>(x, K, qr, dr, y, N, n, m0); break;
            default: break;
        }
    }
}

// ---- AVX2 loops (x86-64 CPUs without AVX-512, e.g. AMD Zen 2/3) --------------------------------------------
// The same arithmetic as the AVX-512 loops, 8 lanes wide: a group of 32 weights is four 8-lane vectors.

#define NEOSERVE_AVX2 __attribute__((target("avx2,f16c,fma")))

NEOSERVE_AVX2 inline float hsum8(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// n fp16 values as fp32 into out (8 at a time with vcvtph2ps).
NEOSERVE_AVX2 inline void halves_to_floats(const uint16_t* p, int64_t n, float* out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + i))));
    for (; i < n; i++) out[i] = _cvtsh_ss(p[i]);
}

// NOTE: a row's scales are converted once into a stack buffer and broadcast from memory per group (a load-port
// op), so the vector ALUs only unpack weights and multiply; rows wider than kMaxGroups groups take the portable
// loops (no Llama we serve comes near: an 8B model's widest input is 14336 = 448 groups).
constexpr int64_t kMaxGroups = 512;

// One output row against rows [m0, m0 + MT) of x: per group of 32 weights, unpack into four 8-lane vectors
// (9 ops), then per row of x one multiply and four FMAs.
template <int MT>
NEOSERVE_AVX2 inline void q4_row_tile_avx2(const float* x, const float* xsum, int64_t K, const uint8_t* qr,
                                           const float* d, const float* m, float* y, int64_t N, int64_t n,
                                           int64_t m0) {
    const int64_t G = K / kGroup;
    __m256 acc[2][MT];  // even and odd groups: two independent FMA chains per row (see q4_row_tile)
    for (int t = 0; t < MT; t++) acc[0][t] = acc[1][t] = _mm256_setzero_ps();
    const __m128i nib = _mm_set1_epi8(0xf);
    for (int64_t g = 0; g < G; g++) {
        _mm_prefetch((const char*)(qr + g * 16) + kPrefetchBytes, _MM_HINT_T0);
        const __m128i b = _mm_loadu_si128((const __m128i*)(qr + g * 16));  // 32 nibbles
        const __m128i lo = _mm_and_si128(b, nib);                  // elements 0-15
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);  // elements 16-31
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi)));
        const __m256 dv = _mm256_broadcast_ss(d + g);
        for (int t = 0; t < MT; t++) {
            const float* xg = x + (m0 + t) * K + g * kGroup;
            __m256 part = _mm256_mul_ps(w0, _mm256_loadu_ps(xg));
            part = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 8), part);
            part = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xg + 16), part);
            part = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xg + 24), part);
            acc[g & 1][t] = _mm256_fmadd_ps(part, dv, acc[g & 1][t]);
        }
    }
    for (int t = 0; t < MT; t++) {
        // the offsets' term: sum_g m_g * sum(x_g), 8 groups a vector
        const float* xs = xsum + (m0 + t) * G;
        __m256 o = _mm256_setzero_ps();
        int64_t g = 0;
        for (; g + 8 <= G; g += 8) o = _mm256_fmadd_ps(_mm256_loadu_ps(m + g), _mm256_loadu_ps(xs + g), o);
        float tail = 0.f;
        for (; g < G; g++) tail += m[g] * xs[g];
        y[(m0 + t) * N + n] = hsum8(_mm256_add_ps(acc[0][t], acc[1][t])) + hsum8(o) + tail;
    }
}

NEOSERVE_AVX2 void q4_rows_avx2(const float* x, const float* xsum, int64_t M, int64_t K, const uint8_t* q,
                                const uint16_t* dm, float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / kGroup;
    float d[kMaxGroups], m[kMaxGroups];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* qr = q + n * (K / 2);
        halves_to_floats(dm + n * G * 2, G, d);
        halves_to_floats(dm + n * G * 2 + G, G, m);
        int64_t m0 = 0;
        for (; m0 + kRowTile <= M; m0 += kRowTile) q4_row_tile_avx2<kRowTile>(x, xsum, K, qr, d, m, y, N, n, m0);
        switch (M - m0) {
            case 3: q4_row_tile_avx2<3>(x, xsum, K, qr, d, m, y, N, n, m0); break;
            case 2: q4_row_tile_avx2<2>(x, xsum, K, qr, d, m, y, N, n, m0); break;
            case 1: q4_row_tile_avx2<1>(x, xsum, K, qr, d, m, y, N, n, m0); break;
            default: break;
        }
    }
}

template <int MT>
NEOSERVE_AVX2 inline void q8_row_tile_avx2(const float* x, int64_t K, const int8_t* qr, const float* d, float* y,
                                           int64_t N, int64_t n, int64_t m0) {
    const int64_t G = K / kGroup;
    __m256 acc[2][MT];  // even and odd groups (see q4_row_tile)
    for (int t = 0; t < MT; t++) acc[0][t] = acc[1][t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const int8_t* src = qr + g * kGroup;
        _mm_prefetch((const char*)src + kPrefetchBytes, _MM_HINT_T0);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)src)));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(src + 8))));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(src + 16))));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(src + 24))));
        const __m256 dv = _mm256_broadcast_ss(d + g);
        for (int t = 0; t < MT; t++) {
            const float* xg = x + (m0 + t) * K + g * kGroup;
            __m256 part = _mm256_mul_ps(w0, _mm256_loadu_ps(xg));
            part = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 8), part);
            part = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xg + 16), part);
            part = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xg + 24), part);
            acc[g & 1][t] = _mm256_fmadd_ps(part, dv, acc[g & 1][t]);
        }
    }
    for (int t = 0; t < MT; t++) y[(m0 + t) * N + n] = hsum8(_mm256_add_ps(acc[0][t], acc[1][t]));
}

NEOSERVE_AVX2 void q8_rows_avx2(const float* x, int64_t M, int64_t K, const int8_t* q, const uint16_t* dq, float* y,
                                int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / kGroup;
    float d[kMaxGroups];
    for (int64_t n = n0; n < n1; n++) {
        const int8_t* qr = q + n * K;
        halves_to_floats(dq + n * G, G, d);
        int64_t m0 = 0;
        for (; m0 + kRowTile <= M; m0 += kRowTile) q8_row_tile_avx2<kRowTile>(x, K, qr, d, y, N, n, m0);
        switch (M - m0) {
            case 3: q8_row_tile_avx2<3>(x, K, qr, d, y, N, n, m0); break;
            case 2: q8_row_tile_avx2<2>(x, K, qr, d, y, N, n, m0); break;
            case 1: q8_row_tile_avx2<1>(x, K, qr, d, y, N, n, m0); break;
            default: break;
        }
    }
}

bool has_avx2() {
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                           __builtin_cpu_supports("fma");
    return ok;
}

bool has_avx512() {
    static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c") &&
                           __builtin_cpu_supports("fma");
    return ok;
}

enum class Isa { kAuto, kAvx512, kAvx2, kPortable };

Isa g_forced_isa = Isa::kAuto;  // tests pin one code path to check it against float64 products

bool isa_available(Isa isa) {
    return isa == Isa::kAvx512 ? has_avx512() : isa == Isa::kAvx2 ? has_avx2() : true;
}

Isa pick_isa(int64_t groups) {
    Isa isa = g_forced_isa;
    if (isa == Isa::kAuto) isa = has_avx512() ? Isa::kAvx512 : has_avx2() ? Isa::kAvx2 : Isa::kPortable;
    return isa == Isa::kAvx2 && groups > kMaxGroups ? Isa::kPortable : isa;
}

// ---- ops ------------------------------------------------------------------------------------------------------

void check_x(const at::Tensor& x, int64_t K, const char* op) {
    TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K, op, ": x must be [M, ", K, "], got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
                ": x must be float32 or bfloat16, got ", x.scalar_type());
}

// Rows of the output one thread takes at least: a few KiB of weights each, so that a call splits evenly.
int64_t grain(int64_t N) { return std::max<int64_t>(16, N / (4 * at::get_num_threads())); }

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& dm) {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "q4_linear: q must be a "
                "contiguous uint8 [N, K/2]");
    const int64_t N = q.size(0), K = q.size(1) * 2, G = K / kGroup;
    TORCH_CHECK(K % kGroup == 0, "q4_linear: K must be a multiple of 32, got ", K);
    TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.numel() == N * G * 2,
                "q4_linear: dm must be a contiguous float16 [N, 2, K/32]");
    check_x(x, K, "q4_linear");
    const at::Tensor xf = x.to(at::kFloat).contiguous();  // [M, K]
    const int64_t M = xf.size(0);
    at::Tensor y = at::empty({M, N}, xf.options());
    if (M == 0 || N == 0) return y.to(x.scalar_type());
    const float* xp = xf.data_ptr<float>();
    // NOTE: a plain loop, not at::sum: a few hundred floats, where the op's dispatch cost more than the sums.
    at::Tensor xsum = at::empty({M, G}, xf.options());  // [M, G]
    float* sp = xsum.data_ptr<float>();
    for (int64_t r = 0; r < M * G; r++) {
        float acc = 0.f;
        for (int64_t i = 0; i < kGroup; i++) acc += xp[r * kGroup + i];
        sp[r] = acc;
    }
    const uint8_t* qp = q.data_ptr<uint8_t>();
    const uint16_t* dp = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
    float* yp = y.data_ptr<float>();
    const Isa isa = pick_isa(G);
    at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
        switch (isa) {
            case Isa::kAvx512: q4_rows_avx512(xp, sp, M, K, qp, dp, yp, N, n0, n1); break;
            case Isa::kAvx2: q4_rows_avx2(xp, sp, M, K, qp, dp, yp, N, n0, n1); break;
            case Isa::kAuto:  // never: pick_isa resolves it
            case Isa::kPortable: q4_rows_portable(xp, sp, M, K, qp, dp, yp, N, n0, n1); break;
        }
    });
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& dq) {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q8_linear: q must be a "
                "contiguous int8 [N, K]");
    const int64_t N = q.size(0), K = q.size(1), G = K / kGroup;
    TORCH_CHECK(K % kGroup == 0, "q8_linear: K must be a multiple of 32, got ", K);
    TORCH_CHECK(dq.scalar_type() == at::kHalf && dq.is_contiguous() && dq.numel() == N * G,
                "q8_linear: dq must be a contiguous float16 [N, K/32]");
    check_x(x, K, "q8_linear");
    const at::Tensor xf = x.to(at::kFloat).contiguous();  // [M, K]
    const int64_t M = xf.size(0);
    at::Tensor y = at::empty({M, N}, xf.options());
    if (M == 0 || N == 0) return y.to(x.scalar_type());
    const float* xp = xf.data_ptr<float>();
    const int8_t* qp = q.data_ptr<int8_t>();
    const uint16_t* dp = reinterpret_cast<const uint16_t*>(dq.data_ptr<at::Half>());
    float* yp = y.data_ptr<float>();
    const Isa isa = pick_isa(G);
    at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
        switch (isa) {
            case Isa::kAvx512: q8_rows_avx512(xp, M, K, qp, dp, yp, N, n0, n1); break;
            case Isa::kAvx2: q8_rows_avx2(xp, M, K, qp, dp, yp, N, n0, n1); break;
            case Isa::kAuto:  // never: pick_isa resolves it
            case Isa::kPortable: q8_rows_portable(xp, M, K, qp, dp, yp, N, n0, n1); break;
        }
    });
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// Pins the code path ("auto", "avx512", "avx2", "portable"); false (and nothing changes) where this CPU lacks it.
bool set_isa(const char* name) {
    const Isa isa = !std::strcmp(name, "avx512") ? Isa::kAvx512
                    : !std::strcmp(name, "avx2") ? Isa::kAvx2
                    : !std::strcmp(name, "portable") ? Isa::kPortable
                                                     : Isa::kAuto;
    if (isa == Isa::kAuto && std::strcmp(name, "auto")) return false;
    if (!isa_available(isa)) return false;
    g_forced_isa = isa;
    return true;
}

}  // namespace

TORCH_LIBRARY(neoserve, m) {
    m.def("q4_linear(Tensor x, Tensor q, Tensor dm) -> Tensor");
    m.def("q8_linear(Tensor x, Tensor q, Tensor dq) -> Tensor");
}

TORCH_LIBRARY_IMPL(neoserve, CPU, m) {
    m.impl("q4_linear", &q4_linear);
    m.impl("q8_linear", &q8_linear);
}

// A plain CPython module so that `import gpu_worker._qgemm` loads the library (and registers the ops), plus the
// switch the tests use to check each code path (AVX-512, AVX2, portable) on its own.
#include <Python.h>

static PyObject* py_set_isa(PyObject*, PyObject* arg) {
    const char* name = PyUnicode_AsUTF8(arg);
    if (!name) return nullptr;
    return PyBool_FromLong(set_isa(name));
}

static PyMethodDef kMethods[] = {
    {"set_isa", py_set_isa, METH_O,
     "Pin the code path: 'auto', 'avx512', 'avx2' or 'portable' (tests); False where this CPU lacks it."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_qgemm", "block-quantized CPU GEMMs (neoserve:: ops)",
                                     -1, kMethods};

PyMODINIT_FUNC PyInit__qgemm(void) { return PyModule_Create(&kModule); }
