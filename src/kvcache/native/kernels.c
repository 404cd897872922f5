/* Fused CPU kernels for the decode path, called through ctypes (kvcache.native).
 *
 * Plain C, no torch headers: it compiles in about a second with the system compiler.
 * Every kernel takes raw pointers to contiguous tensors and does its arithmetic in fp32;
 * the bf16 variants widen on load and round to nearest-even on store. Built with
 * -ffp-contract=off so that a*b + c rounds twice, as torch's separate ops do.
 * OpenMP threads come from the process's libgomp (torch's), so they share torch's pool.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* exp(x) for x <= ~88, vectorizable (no libm call): 2^k * e^r with |r| <= ln2/2, a degree-6
 * polynomial for e^r; relative error about 2e-7 (a couple of ulps), inputs below -87 give 0. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float k = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t e = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return x <= -87.0f ? 0.f : p * scale;
}

/* exp_approx on a vector of floats, the same operations in the same order (equal results),
 * for P = _mm512 (V __m512, VI __m512i, W 512) or _mm256; ROUND_DOWN(v) floors, ZERO_LE(x, y)
 * is y with 0 where x <= -87. */
#define EXP_VEC(NAME, P, V, VI, W, ROUND_DOWN, ZERO_LE)                                     \
    static inline V NAME(V x) {                                                             \
        x = P##_min_ps(P##_max_ps(x, P##_set1_ps(-87.0f)), P##_set1_ps(88.0f));             \
        V k = ROUND_DOWN(P##_add_ps(P##_mul_ps(x, P##_set1_ps(1.44269504088896341f)), P##_set1_ps(0.5f))); \
        V r = P##_sub_ps(x, P##_mul_ps(k, P##_set1_ps(0.693359375f)));                      \
        r = P##_sub_ps(r, P##_mul_ps(k, P##_set1_ps(-2.12194440e-4f)));                     \
        V p = P##_set1_ps(1.f / 720.f);                                                     \
        p = P##_add_ps(P##_mul_ps(p, r), P##_set1_ps(1.f / 120.f));                         \
        p = P##_add_ps(P##_mul_ps(p, r), P##_set1_ps(1.f / 24.f));                          \
        p = P##_add_ps(P##_mul_ps(p, r), P##_set1_ps(1.f / 6.f));                           \
        p = P##_add_ps(P##_mul_ps(p, r), P##_set1_ps(0.5f));                                \
        p = P##_add_ps(P##_mul_ps(p, r), P##_set1_ps(1.f));                                 \
        p = P##_add_ps(P##_mul_ps(p, r), P##_set1_ps(1.f));                                 \
        VI e = P##_slli_epi32(P##_add_epi32(P##_cvtps_epi32(k), P##_set1_epi32(127)), 23);  \
        return ZERO_LE(x, P##_mul_ps(p, P##_castsi##W##_ps(e)));                            \
    }

/* AVX-512 (where the compiler targets it): 16 floats per vector; bf16 widens by a shift and
 * narrows with round-to-nearest-even, as f32_to_bf16 does. */
#if defined(__AVX512F__)
#define HAVE_AVX512 1
#include <immintrin.h>

static inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const bf16* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline void store16_f32(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
static inline void store16_bf16(bf16* p, __m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); /* NaN stays NaN */
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));
}

static inline __m512 floor16(__m512 v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline __m512 zero_le16(__m512 x, __m512 y) {
    return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LE_OQ), _mm512_setzero_ps());
}
EXP_VEC(exp16, _mm512, __m512, __m512i, 512, floor16, zero_le16)
#else
#define HAVE_AVX512 0
#endif

/* AVX2 with FMA, where AVX-512 is not targeted (AMD Zen 2/3, older Intel): 8 floats per vector,
 * the same widening, rounding and exp as above. */
#if !HAVE_AVX512 && defined(__AVX2__) && defined(__FMA__)
#define HAVE_AVX2 1
#include <immintrin.h>

static inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const bf16* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline void store8_f32(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
static inline void store8_bf16(bf16* p, __m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)); /* NaN stays NaN */
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    /* 8 x u32 (each < 2^16) to u16: the pack works per 128-bit half, the permute joins the halves */
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
}

static inline __m256 floor8(__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline __m256 zero_le8(__m256 x, __m256 y) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LE_OQ), y);
}
EXP_VEC(exp8, _mm256, __m256, __m256i, 256, floor8, zero_le8)

/* The sum of a vector's 8 lanes. */
static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
#else
#define HAVE_AVX2 0
#endif

/* ---- RMSNorm: out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)), rows of n -------------- */

#define RMS_NORM(NAME, T, LOAD, STORE)                                                      \
    void NAME(const T* x, const T* w, T* out, int64_t rows, int64_t n, float eps) {         \
        _Pragma("omp parallel for if(rows >= 64)")                                          \
        for (int64_t r = 0; r < rows; r++) {                                                \
            const T* xr = x + r * n;                                                        \
            T* o = out + r * n;                                                             \
            float acc = 0.f;                                                                \
            _Pragma("omp simd reduction(+:acc)")                                            \
            for (int64_t i = 0; i < n; i++) { float v = LOAD(xr[i]); acc += v * v; }        \
            float s = 1.0f / sqrtf(acc / (float)n + eps);                                   \
            for (int64_t i = 0; i < n; i++) o[i] = STORE(LOAD(w[i]) * (LOAD(xr[i]) * s));   \
        }                                                                                   \
    }

#define ID(x) (x)
RMS_NORM(rms_norm_f32, float, ID, ID)
RMS_NORM(rms_norm_bf16, bf16, bf16_to_f32, f32_to_bf16)

/* ---- RoPE in place, rotate-half convention ----------------------------------------------
 * x: (rows, heads_total, D) contiguous; the first n_rot heads of each row are rotated by
 * the angles of position pos[row]: x*cos + rotate_half(x)*sin_signed, where the tables
 * are (L, D) with sin_signed = [-sin, sin]. */

#define ROTARY(NAME, T, LOAD, STORE)                                                        \
    void NAME(T* x, const T* cos_t, const T* sin_t, const int64_t* pos, int64_t rows,       \
              int64_t heads_total, int64_t n_rot, int64_t D) {                              \
        int64_t half = D / 2;                                                               \
        _Pragma("omp parallel for if(rows >= 64)")                                          \
        for (int64_t r = 0; r < rows; r++) {                                                \
            const T* c = cos_t + pos[r] * D;                                                \
            const T* s = sin_t + pos[r] * D;                                                \
            float tmp[512];                                                                 \
            for (int64_t h = 0; h < n_rot; h++) {                                           \
                T* v = x + (r * heads_total + h) * D;                                       \
                for (int64_t d = 0; d < D; d++) tmp[d] = LOAD(v[d]);                        \
                for (int64_t d = 0; d < D; d++) {                                           \
                    float other = tmp[d < half ? d + half : d - half];                      \
                    float a = tmp[d] * LOAD(c[d]);                                          \
                    float b = other * LOAD(s[d]);                                           \
                    v[d] = STORE(a + b);                                                    \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }

ROTARY(rotary_f32, float, ID, ID)
ROTARY(rotary_bf16, bf16, bf16_to_f32, f32_to_bf16)

/* ---- SwiGLU: out[r] = silu(gu[r, :I]) * gu[r, I:] -------------------------------------- */

#if HAVE_AVX512
#define SILU16(SUF)                                                                         \
    for (; i + 16 <= inter; i += 16) {                                                      \
        __m512 a = load16_##SUF(g + i);                                                     \
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), a));                            \
        __m512 silu = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), e));             \
        store16_##SUF(o + i, _mm512_mul_ps(silu, load16_##SUF(u + i)));                     \
    }
#elif HAVE_AVX2
#define SILU16(SUF)                                                                         \
    for (; i + 8 <= inter; i += 8) {                                                        \
        __m256 a = load8_##SUF(g + i);                                                      \
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), a));                             \
        __m256 silu = _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.0f), e));             \
        store8_##SUF(o + i, _mm256_mul_ps(silu, load8_##SUF(u + i)));                       \
    }
#else
#define SILU16(SUF)
#endif
#define SILU_MUL(NAME, SUF, T, LOAD, STORE)                                                      \
    void NAME(const T* gu, T* out, int64_t rows, int64_t inter) {                           \
        _Pragma("omp parallel for if(rows >= 16)")                                          \
        for (int64_t r = 0; r < rows; r++) {                                                \
            const T* g = gu + r * 2 * inter;                                                \
            const T* u = g + inter;                                                         \
            T* o = out + r * inter;                                                         \
            int64_t i = 0;                                                                  \
            SILU16(SUF)                                                                     \
            for (; i < inter; i++) {                                                        \
                float a = LOAD(g[i]);                                                       \
                float silu = a / (1.0f + exp_approx(-a));                                   \
                o[i] = STORE(silu * LOAD(u[i]));                                            \
            }                                                                               \
        }                                                                                   \
    }

SILU_MUL(silu_mul_f32, f32, float, ID, ID)
SILU_MUL(silu_mul_bf16, bf16, bf16, bf16_to_f32, f32_to_bf16)

/* ---- Greedy sampling: the first index of each row's largest value (NaN counts as the
 * largest, as in torch.argmax). rows of n; out int64 (rows,). */

#if HAVE_AVX512
#define ARGMAX16(SUF)                                                                       \
    __m512 vm = _mm512_set1_ps(-INFINITY);                                                  \
    __m512i vi = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, \
                                                                 9, 10, 11, 12, 13, 14, 15); \
    __mmask16 nan = 0;                                                                      \
    for (; i + 16 <= n; i += 16) {                                                          \
        __m512 x = load16_##SUF(xr + i);                                                    \
        __mmask16 gt = _mm512_cmp_ps_mask(x, vm, _CMP_GT_OQ);                               \
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);                                      \
        vm = _mm512_mask_mov_ps(vm, gt, x);                                                 \
        vi = _mm512_mask_mov_epi32(vi, gt, idx);                                            \
        idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));                                 \
    }                                                                                       \
    if (nan) i = 0; /* rare: let the scalar scan find the first NaN */                      \
    else if (i > 0) {                                                                       \
        float lane_m[16];                                                                   \
        int32_t lane_i[16];                                                                 \
        _mm512_storeu_ps(lane_m, vm);                                                       \
        _mm512_storeu_si512(lane_i, vi);                                                    \
        for (int l = 0; l < 16; l++)                                                        \
            if (lane_m[l] > best || (lane_m[l] == best && lane_i[l] < at)) {                \
                best = lane_m[l];                                                           \
                at = lane_i[l];                                                             \
            }                                                                               \
    }
#elif HAVE_AVX2
#define ARGMAX16(SUF)                                                                       \
    __m256 vm = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();                       \
    __m256i vi = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);   \
    for (; i + 8 <= n; i += 8) {                                                            \
        __m256 x = load8_##SUF(xr + i);                                                     \
        __m256 gt = _mm256_cmp_ps(x, vm, _CMP_GT_OQ);                                       \
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));                         \
        vm = _mm256_blendv_ps(vm, x, gt);                                                   \
        vi = _mm256_blendv_epi8(vi, idx, _mm256_castps_si256(gt));                          \
        idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));                                  \
    }                                                                                       \
    if (_mm256_movemask_ps(nan)) i = 0; /* rare: let the scalar scan find the first NaN */  \
    else if (i > 0) {                                                                       \
        float lane_m[8];                                                                    \
        int32_t lane_i[8];                                                                  \
        _mm256_storeu_ps(lane_m, vm);                                                       \
        _mm256_storeu_si256((__m256i*)lane_i, vi);                                          \
        for (int l = 0; l < 8; l++)                                                         \
            if (lane_m[l] > best || (lane_m[l] == best && lane_i[l] < at)) {                \
                best = lane_m[l];                                                           \
                at = lane_i[l];                                                             \
            }                                                                               \
    }
#else
#define ARGMAX16(SUF)
#endif

#define ARGMAX_ROWS(NAME, SUF, T, LOAD)                                                     \
    void NAME(const T* x, int64_t* out, int64_t rows, int64_t n) {                          \
        _Pragma("omp parallel for if(rows >= 2)")                                           \
        for (int64_t r = 0; r < rows; r++) {                                                \
            const T* xr = x + r * n;                                                        \
            float best = -INFINITY;                                                         \
            int64_t at = 0, i = 0;                                                          \
            ARGMAX16(SUF)                                                                   \
            for (; i < n; i++) {                                                            \
                float v = LOAD(xr[i]);                                                      \
                if (v != v) { at = i; break; }                                              \
                if (v > best) { best = v; at = i; }                                         \
            }                                                                               \
            out[r] = at;                                                                    \
        }                                                                                   \
    }

ARGMAX_ROWS(argmax_rows_f32, f32, float, ID)
ARGMAX_ROWS(argmax_rows_bf16, bf16, bf16, bf16_to_f32)

/* ---- Decode attention straight from the cache's storage ---------------------------------
 * One query token per row. q, out: (B, Hq, D). The K/V element of row b, KV head h and
 * token t lives at  b*row_stride + h*head_stride + slot*D  with
 * slot = table[b*NB + t/bs]*bs + t%bs  (a dense cache: one "block" 0 of bs = capacity).
 * Row b attends to its tokens lo[b] <= t < hi[b]. The G = Hq/Hkv query heads of a KV head
 * are done together (each K/V row is loaded once for all of them). The token range is cut
 * into chunks so that both threads have work at batch 1; each chunk keeps its running max,
 * sum of exponentials and weighted V sum, merged at the end (flash-decoding).
 * Scratch: chunks x G x (D + 2) floats per (row, KV head), and the chunk's scores. */

static inline float dot(const float* a, const float* b, int64_t n) {
    float s = 0.f;
    _Pragma("omp simd reduction(+:s)")
    for (int64_t d = 0; d < n; d++) s += a[d] * b[d];
    return s;
}

/* 64 lanes: four 16-wide partial sums, reduced once (the common head_dim) */
static inline float dot64(const float* a, const float* b) {
    float part[16];
    for (int l = 0; l < 16; l++) part[l] = a[l] * b[l] + a[16 + l] * b[16 + l] + (a[32 + l] * b[32 + l] + a[48 + l] * b[48 + l]);
    for (int w = 8; w > 0; w /= 2) /* halving tree: vector shuffles, not 16 dependent adds */
        for (int l = 0; l < w; l++) part[l] += part[l + w];
    return part[0];
}

#define MAX_G 16
#define MAX_D 256

/* A chunk's n scores -> their exponentials after the chunk's max m, in place; the chunk's
 * result row starts with [m, sum of exponentials]. */
static inline void chunk_exp(float* sg, int64_t n, float m, float* res) {
    float total = 0.f;
    int64_t i = 0;
#if HAVE_AVX512 /* exp16 gives exp_approx's values; the sum runs in 16 lanes, then across them */
    __m512 mv = _mm512_set1_ps(m), tv = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + i), mv));
        _mm512_storeu_ps(sg + i, e);
        tv = _mm512_add_ps(tv, e);
    }
    total = _mm512_reduce_add_ps(tv);
#elif HAVE_AVX2
    __m256 mv = _mm256_set1_ps(m), tv = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + i), mv));
        _mm256_storeu_ps(sg + i, e);
        tv = _mm256_add_ps(tv, e);
    }
    total = hsum8(tv);
#endif
    for (; i < n; i++) { float e = exp_approx(sg[i] - m); sg[i] = e; total += e; }
    res[0] = m;
    res[1] = total;
}

/* Merge the chunk results of one query head (flash-decoding): chunk c's row for head g is
 * part[c * per + g * (D + 2)] = [max, sum, weighted V sum (D)]. Writes the softmax output to o. */
static inline void merge_chunks(const float* part, int64_t nchunks, int64_t per, int64_t g, int64_t D, float* o) {
    float m = -INFINITY, total = 0.f;
    for (int64_t c = 0; c < nchunks; c++) {
        float mc = part[c * per + g * (D + 2)];
        if (mc > m) m = mc;
    }
    for (int64_t d = 0; d < D; d++) o[d] = 0.f;
    for (int64_t c = 0; c < nchunks; c++) {
        const float* r = part + c * per + g * (D + 2);
        if (r[0] == -INFINITY) continue;
        float f = exp_approx(r[0] - m);
        total += r[1] * f;
        for (int64_t d = 0; d < D; d++) o[d] += r[2 + d] * f;
    }
    float inv = total > 0.f ? 1.0f / total : 0.f;
    for (int64_t d = 0; d < D; d++) o[d] *= inv;
}

/* Split rows' token ranges into chunks (flash-decoding): 256 tokens, smaller when there are
 * few (row, KV head) pairs so that every thread gets work. Returns the chunk length; sets
 * the chunk count per row and the total tokens. */
static inline int64_t plan_chunks(const int64_t* lo, const int64_t* hi, int64_t B, int64_t Hkv, int64_t* nchunks,
                                  int64_t* work) {
    int64_t longest = 0;
    *work = 0;
    for (int64_t b = 0; b < B; b++) {
        int64_t n = hi[b] - lo[b];
        *work += n;
        if (n > longest) longest = n;
    }
    int threads = omp_get_max_threads();
    int64_t chunk = 256;
    if (B * Hkv < 2 * threads) {
        int64_t want = (2 * threads + B * Hkv - 1) / (B * Hkv);
        int64_t c = (longest + want - 1) / want;
        chunk = c < 64 ? 64 : (c < chunk ? c : chunk);
    }
    *nchunks = longest > 0 ? (longest + chunk - 1) / chunk : 1;
    return chunk;
}

/* G fixed for the usual group sizes, so the compiler keeps the queries and sums in registers */
#define TASK64_DISPATCH(SUF, T)                                                             \
    static void task64_dispatch_##SUF(const T* q, const T* qs, const T* kb, const T* vb,    \
                                      const int32_t* tb, int64_t bs, int64_t t0, int64_t t1, \
                                      int64_t s_end, int64_t g_end, int64_t G, float scale, \
                                      float* res) {                                         \
        switch (G) {                                                                        \
        case 1: task64_##SUF(q, qs, kb, vb, tb, bs, t0, t1, s_end, g_end, 1, scale, res); break; \
        case 2: task64_##SUF(q, qs, kb, vb, tb, bs, t0, t1, s_end, g_end, 2, scale, res); break; \
        case 3: task64_##SUF(q, qs, kb, vb, tb, bs, t0, t1, s_end, g_end, 3, scale, res); break; \
        case 4: task64_##SUF(q, qs, kb, vb, tb, bs, t0, t1, s_end, g_end, 4, scale, res); break; \
        default: task64_##SUF(q, qs, kb, vb, tb, bs, t0, t1, s_end, g_end, G, scale, res);  \
        }                                                                                   \
    }


/* The task body for head_dim 64 with AVX-512: a K or V row is four 16-lane vectors, widened
 * once per token for all G query heads; scores and the weighted V sums are fused multiply-adds
 * in registers (G is a compile-time constant in the common cases, so the accumulators stay in
 * registers). Same chunk result as the generic body, summed in another order. */
#if HAVE_AVX512

/* The four horizontal sums of a, b, c, d, in one vector (lanes 0..3). */
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)); /* per 128 bits: a a' b b' */
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    /* lane l of each 128-bit quarter: a partial sum of the l-th input; add the four quarters */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* A query and a key row of 64 for scoring, per storage type: fp32 rows are 4 vectors (the
 * query pre-scaled); bf16 rows stay packed for the bf16 dot-product instruction where the CPU
 * has it (32 exact products per instruction, summed in fp32; the score scaled after), and are
 * widened like fp32 otherwise. qk_dot gives 16 partial sums whose total is the score. */
typedef struct { __m512 v[4]; } qk_f32_t;
static inline qk_f32_t qk_load_f32(const float* p, __m512 sv) {
    qk_f32_t r;
    for (int j = 0; j < 4; j++) r.v[j] = _mm512_mul_ps(_mm512_loadu_ps(p + 16 * j), sv);
    return r;
}
static inline __m512 qk_dot_f32(const qk_f32_t* q, const qk_f32_t* k) {
    __m512 a = _mm512_mul_ps(q->v[0], k->v[0]), b = _mm512_mul_ps(q->v[2], k->v[2]);
    a = _mm512_fmadd_ps(q->v[1], k->v[1], a);
    b = _mm512_fmadd_ps(q->v[3], k->v[3], b);
    return _mm512_add_ps(a, b);
}
#define QK_POST_f32 0 /* the scale is in the query */
#if defined(__AVX512BF16__)
typedef struct { __m512bh v[2]; } qk_bf16_t;
static inline qk_bf16_t qk_load_bf16(const bf16* p, __m512 sv) {
    (void)sv;
    qk_bf16_t r;
    r.v[0] = (__m512bh)_mm512_loadu_si512(p);
    r.v[1] = (__m512bh)_mm512_loadu_si512(p + 32);
    return r;
}
static inline __m512 qk_dot_bf16(const qk_bf16_t* q, const qk_bf16_t* k) {
    return _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), q->v[0], k->v[0]), q->v[1], k->v[1]);
}
#define QK_POST_bf16 1
#else
typedef qk_f32_t qk_bf16_t;
static inline qk_bf16_t qk_load_bf16(const bf16* p, __m512 sv) {
    qk_bf16_t r;
    for (int j = 0; j < 4; j++) r.v[j] = _mm512_mul_ps(load16_bf16(p + 16 * j), sv);
    return r;
}
#define qk_dot_bf16 qk_dot_f32
#define QK_POST_bf16 0
#endif

/* Software prefetch distances of the head_dim-64 AVX-512 body, against DRAM latency: keys
 * three blocks ahead of the K pass, values 48 tokens ahead of the V pass (a full bf16 pool:
 * ~12-17 -> ~10-13 ms a step against one block ahead, issued all at once per block) */
#define KEYS_AHEAD 3
#define V_AHEAD 48
static inline __attribute__((always_inline)) void prefetch_rows(const char* p, int64_t bytes) {
    for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(p + l, _MM_HINT_T0);
}

#if defined(__AVX512BF16__)
/* Two bf16 rows of 64 channels as dot-product operands: x[j] holds (a[d], b[d]) pairs,
 * interleaved within 128-bit lanes (x[0]: channels 0-3, 8-11, 16-19, 24-27; x[1]: 4-7, 12-15,
 * 20-23, 28-31; x[2], x[3] the same for channels 32-63). */
static inline __attribute__((always_inline)) void pair_rows(const bf16* a, const bf16* b, __m512i x[4]) {
    __m512i a0 = _mm512_loadu_si512(a), a1 = _mm512_loadu_si512(a + 32);
    __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 32);
    x[0] = _mm512_unpacklo_epi16(a0, b0);
    x[1] = _mm512_unpackhi_epi16(a0, b0);
    x[2] = _mm512_unpacklo_epi16(a1, b1);
    x[3] = _mm512_unpackhi_epi16(a1, b1);
}
/* Sums accumulated against pair_rows' x[2h] (lo) and x[2h+1] (hi), back in channel order:
 * channels 32h..32h+15 and 32h+16..32h+31. */
static inline __attribute__((always_inline)) void unpair_sums(__m512 lo, __m512 hi, __m512* first, __m512* second) {
    *first = _mm512_permutex2var_ps(lo, _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23), hi);
    *second = _mm512_permutex2var_ps(lo, _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31), hi);
}
static const bf16 zero_row_bf16[64] __attribute__((aligned(64)));
#endif

/* The V pass of the head_dim-64 AVX-512 body: o + g * 66 (o: the chunk result's sums) gets
 * sum_i sc[g][i] * V(t0 + i), token by token in fp32 multiply-adds. */
#define PV_FMA(SUF, T)                                                                      \
    static inline __attribute__((always_inline)) void pv_fma_##SUF(                         \
        const T* vb, const int32_t* tb, int64_t bs, int64_t t0, int64_t t1, float (*sc)[256], \
        const int64_t G, float* o) {                                                        \
        __m512 acc[MAX_G][4];                                                               \
        for (int64_t g = 0; g < G; g++)                                                     \
            for (int j = 0; j < 4; j++) acc[g][j] = _mm512_setzero_ps();                    \
        for (int64_t t = t0, i = 0; t < t1;) {                                              \
            int64_t blk = t / bs, off = t % bs, run = bs - off;                             \
            if (run > t1 - t) run = t1 - t;                                                 \
            const T* vr = vb + ((int64_t)tb[blk] * bs + off) * 64;                          \
            for (int64_t nb = t == t0 ? blk + 1 : blk + 2; nb <= blk + 2 && nb * bs < t1; nb++) \
                prefetch_rows((const char*)(vb + (int64_t)tb[nb] * bs * 64), bs * 64 * (int64_t)sizeof(T)); \
            for (int64_t r = 0; r < run; r++, i++, vr += 64) {                              \
                __m512 v0 = load16_##SUF(vr), v1 = load16_##SUF(vr + 16);                   \
                __m512 v2 = load16_##SUF(vr + 32), v3 = load16_##SUF(vr + 48);              \
                for (int64_t g = 0; g < G; g++) {                                           \
                    __m512 w = _mm512_set1_ps(sc[g][i]);                                    \
                    acc[g][0] = _mm512_fmadd_ps(w, v0, acc[g][0]);                          \
                    acc[g][1] = _mm512_fmadd_ps(w, v1, acc[g][1]);                          \
                    acc[g][2] = _mm512_fmadd_ps(w, v2, acc[g][2]);                          \
                    acc[g][3] = _mm512_fmadd_ps(w, v3, acc[g][3]);                          \
                }                                                                           \
            }                                                                               \
            t += run;                                                                       \
        }                                                                                   \
        for (int64_t g = 0; g < G; g++)                                                     \
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(o + g * 66 + 16 * j, acc[g][j]);   \
    }
PV_FMA(f32, float)
PV_FMA(bf16, bf16)
#define pv_f32 pv_fma_f32
#if defined(__AVX512BF16__)
/* The V pass for bf16 storage with the bf16 dot-product instruction: two tokens at a time,
 * their V rows interleaved channel by channel (pair_rows), times each
 * head's pair of exponentials rounded to bf16 (as transformers' eager attention rounds its
 * probabilities to the model dtype), summed in fp32: 8 instructions per pair and head
 * instead of 8 multiply-adds per token. unpair_sums puts the sums back in channel order. */
static inline __attribute__((always_inline)) void pv_bf16(const bf16* vb, const int32_t* tb, int64_t bs, int64_t t0,
                                                          int64_t t1, float (*sc)[256], const int64_t G, float* o) {
    const int64_t n = t1 - t0;
    const bf16* vrow[256];
    bf16 pb[MAX_G][256] __attribute__((aligned(64))); /* exponentials as bf16, 0 past n */
    for (int64_t t = t0, i = 0; t < t1;) {
        int64_t blk = t / bs, off = t % bs, run = bs - off;
        if (run > t1 - t) run = t1 - t;
        const bf16* vr = vb + ((int64_t)tb[blk] * bs + off) * 64;
        for (int64_t r = 0; r < run; r++, i++, vr += 64) vrow[i] = vr;
        t += run;
    }
    for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
            __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, sc[g] + i));
            _mm256_store_si256((__m256i*)(pb[g] + i), (__m256i)h);
        }
    __m512 acc[MAX_G][4];
    for (int64_t g = 0; g < G; g++)
        for (int j = 0; j < 4; j++) acc[g][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < V_AHEAD && i < n; i++) prefetch_rows((const char*)vrow[i], 128);
    for (int64_t i = 0; i < n; i += 2) {
        for (int64_t f = i + V_AHEAD; f < i + V_AHEAD + 2 && f < n; f++) /* rows V_AHEAD tokens on */
            prefetch_rows((const char*)vrow[f], 128);
        __m512i x[4];
        pair_rows(vrow[i], i + 1 < n ? vrow[i + 1] : vrow[i], x); /* a lone last row: its weight is 0 */
        for (int64_t g = 0; g < G; g++) {
            uint32_t pair;
            memcpy(&pair, pb[g] + i, 4);
            __m512bh w = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int j = 0; j < 4; j++) acc[g][j] = _mm512_dpbf16_ps(acc[g][j], w, (__m512bh)x[j]);
        }
    }
    for (int64_t g = 0; g < G; g++)
        for (int h = 0; h < 2; h++) {
            __m512 c0, c1;
            unpair_sums(acc[g][2 * h], acc[g][2 * h + 1], &c0, &c1);
            _mm512_storeu_ps(o + g * 66 + 32 * h, c0);
            _mm512_storeu_ps(o + g * 66 + 32 * h + 16, c1);
        }
}
#else
#define pv_bf16 pv_fma_bf16
#endif

#define DECODE_TASK64(SUF, T)                                                               \
    static inline __attribute__((always_inline)) void task64_##SUF(                         \
        const T* q, const T* qs, const T* kb, const T* vb, const int32_t* tb, int64_t bs,   \
        int64_t t0, int64_t t1, int64_t s_end, int64_t g_end, const int64_t G, float scale, \
        float* res) {                                                                       \
        qk_##SUF##_t qv[MAX_G], qsv[MAX_G];                                                 \
        float sc[MAX_G][256], mx[MAX_G];                                                    \
        __m128 mx4[MAX_G]; /* running maxima of the four-key path, per lane */              \
        const float post = QK_POST_##SUF ? scale : 1.0f;                                    \
        const __m512 one = _mm512_set1_ps(1.0f); /* keys are not scaled */                  \
        __m512 sv = _mm512_set1_ps(QK_POST_##SUF ? 1.0f : scale);                           \
        for (int64_t g = 0; g < G; g++) {                                                   \
            qv[g] = qk_load_##SUF(q + g * 64, sv);                                          \
            qsv[g] = t0 < s_end ? qk_load_##SUF(qs + g * 64, sv) : qv[g];                   \
            mx[g] = -INFINITY;                                                              \
            mx4[g] = _mm_set1_ps(-INFINITY);                                                \
        }                                                                                   \
        for (int64_t t = t0, i = 0; t < t1;) { /* scores, block by block */                 \
            int64_t blk = t / bs, off = t % bs, run = bs - off;                             \
            if (run > t1 - t) run = t1 - t;                                                 \
            const T* kr = kb + ((int64_t)tb[blk] * bs + off) * 64;                          \
            /* blocks sit anywhere in the pool: fetch the keys KEYS_AHEAD blocks on, four    \
             * rows with every four keys scored (the first blocks of a task at its start) */  \
            const char* ahead = (blk + KEYS_AHEAD) * bs < t1                                \
                ? (const char*)(kb + (int64_t)tb[blk + KEYS_AHEAD] * bs * 64) : NULL;       \
            if (t == t0)                                                                    \
                for (int64_t nb = blk + 1; nb < blk + KEYS_AHEAD && nb * bs < t1; nb++)     \
                    prefetch_rows((const char*)(kb + (int64_t)tb[nb] * bs * 64), bs * 64 * (int64_t)sizeof(T)); \
            int64_t r = 0;                                                                  \
            if (t >= g_end) /* past the sinks and the gap: four keys per reduction */       \
                for (; r + 4 <= run; r += 4, i += 4, kr += 256) {                           \
                    if (ahead) prefetch_rows(ahead + r * 64 * (int64_t)sizeof(T), 4 * 64 * (int64_t)sizeof(T)); \
                    qk_##SUF##_t k[4];                                                      \
                    for (int u = 0; u < 4; u++) k[u] = qk_load_##SUF(kr + 64 * u, one);     \
                    for (int64_t g = 0; g < G; g++) {                                       \
                        __m512 a[4];                                                        \
                        for (int u = 0; u < 4; u++) a[u] = qk_dot_##SUF(&qv[g], &k[u]);     \
                        __m128 s4 = hsum4(a[0], a[1], a[2], a[3]);                          \
                        if (QK_POST_##SUF) s4 = _mm_mul_ps(s4, _mm_set1_ps(post));          \
                        _mm_storeu_ps(&sc[g][i], s4);                                       \
                        mx4[g] = _mm_max_ps(mx4[g], s4);                                    \
                    }                                                                       \
                }                                                                           \
            for (; r < run; r++, i++, kr += 64) {                                           \
                int64_t tt = t + r;                                                         \
                if (tt >= s_end && tt < g_end) {                                            \
                    for (int64_t g = 0; g < G; g++) sc[g][i] = -INFINITY;                   \
                    continue;                                                               \
                }                                                                           \
                qk_##SUF##_t kk = qk_load_##SUF(kr, one);                                   \
                int sink = tt < s_end;                                                      \
                for (int64_t g = 0; g < G; g++) {                                           \
                    float s = _mm512_reduce_add_ps(qk_dot_##SUF(sink ? &qsv[g] : &qv[g], &kk)) * post; \
                    sc[g][i] = s;                                                           \
                    if (s > mx[g]) mx[g] = s;                                               \
                }                                                                           \
            }                                                                               \
            t += run;                                                                       \
        }                                                                                   \
        int64_t n = t1 - t0;                                                                \
        for (int64_t g = 0; g < G; g++) { /* fold the four-key maxima in */                 \
            __m128 h2 = _mm_max_ps(mx4[g], _mm_movehl_ps(mx4[g], mx4[g])); /* lanes 0, 1 */ \
            float m4 = _mm_cvtss_f32(_mm_max_ss(h2, _mm_shuffle_ps(h2, h2, 1)));           \
            if (m4 > mx[g]) mx[g] = m4;                                                     \
        }                                                                                   \
        for (int64_t g = 0; g < G; g++) chunk_exp(sc[g], n, mx[g], res + g * 66);           \
        pv_##SUF(vb, tb, bs, t0, t1, sc, G, res + 2); /* probabilities x V */              \
    }

DECODE_TASK64(f32, float)
DECODE_TASK64(bf16, bf16)
TASK64_DISPATCH(f32, float)
TASK64_DISPATCH(bf16, bf16)
#endif

/* The task body for head_dim 64 with AVX2: the same two passes with 8-lane vectors. The
 * queries (widened, scaled) stay in L1 and feed the multiply-adds from memory, so that four
 * keys x G heads of partial sums fit the 16 registers; the V pass runs once per half of D,
 * keeping G x 4 accumulators in registers. Same chunk result, summed in another order. */
#if HAVE_AVX2
/* The four horizontal sums of a, b, c, d, in one vector (lanes 0..3). */
static inline __m128 hsum4_8(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d)); /* per 128 bits: a b c d */
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

#define DECODE_TASK64_AVX2(SUF, T)                                                          \
    static inline __attribute__((always_inline)) void task64_##SUF(                         \
        const T* q, const T* qs, const T* kb, const T* vb, const int32_t* tb, int64_t bs,   \
        int64_t t0, int64_t t1, int64_t s_end, int64_t g_end, const int64_t G, float scale, \
        float* res) {                                                                       \
        float qf[MAX_G][64] __attribute__((aligned(32))), qsf[MAX_G][64] __attribute__((aligned(32))); \
        float sc[MAX_G][256], mx[MAX_G];                                                    \
        const __m256 sv = _mm256_set1_ps(scale);                                            \
        for (int64_t g = 0; g < G; g++) {                                                   \
            for (int j = 0; j < 8; j++) {                                                   \
                _mm256_store_ps(qf[g] + 8 * j, _mm256_mul_ps(load8_##SUF(q + g * 64 + 8 * j), sv)); \
                if (t0 < s_end)                                                             \
                    _mm256_store_ps(qsf[g] + 8 * j, _mm256_mul_ps(load8_##SUF(qs + g * 64 + 8 * j), sv)); \
            }                                                                               \
            mx[g] = -INFINITY;                                                              \
        }                                                                                   \
        for (int64_t t = t0, i = 0; t < t1;) { /* scores, block by block */                 \
            int64_t blk = t / bs, off = t % bs, run = bs - off;                             \
            if (run > t1 - t) run = t1 - t;                                                 \
            const T* kr = kb + ((int64_t)tb[blk] * bs + off) * 64;                          \
            const T* nk = (blk + 1) * bs < t1 ? kb + (int64_t)tb[blk + 1] * bs * 64 : NULL;  \
            const T* nv = (blk + 1) * bs < t1 ? vb + (int64_t)tb[blk + 1] * bs * 64 : NULL;  \
            for (int64_t l = 0; nk && l < bs * 64 * (int64_t)sizeof(T); l += 64) {          \
                _mm_prefetch((const char*)nk + l, _MM_HINT_T0);                             \
                _mm_prefetch((const char*)nv + l, _MM_HINT_T1);                             \
            }                                                                               \
            int64_t r = 0;                                                                  \
            if (t >= g_end) /* past the sinks and the gap: four keys per reduction */       \
                for (; r + 4 <= run; r += 4, i += 4, kr += 256) {                           \
                    __m256 a[4][MAX_G];                                                     \
                    for (int u = 0; u < 4; u++)                                             \
                        for (int64_t g = 0; g < G; g++) a[u][g] = _mm256_setzero_ps();      \
                    for (int j = 0; j < 8; j++)                                             \
                        for (int u = 0; u < 4; u++) {                                       \
                            __m256 kv = load8_##SUF(kr + 64 * u + 8 * j);                   \
                            for (int64_t g = 0; g < G; g++)                                 \
                                a[u][g] = _mm256_fmadd_ps(_mm256_load_ps(qf[g] + 8 * j), kv, a[u][g]); \
                        }                                                                   \
                    for (int64_t g = 0; g < G; g++) {                                       \
                        __m128 s4 = hsum4_8(a[0][g], a[1][g], a[2][g], a[3][g]);            \
                        _mm_storeu_ps(&sc[g][i], s4);                                       \
                        __m128 h2 = _mm_max_ps(s4, _mm_movehl_ps(s4, s4)); /* lanes 0, 1 */ \
                        float m4 = _mm_cvtss_f32(_mm_max_ss(h2, _mm_shuffle_ps(h2, h2, 1)));   \
                        if (m4 > mx[g]) mx[g] = m4;                                         \
                    }                                                                       \
                }                                                                           \
            for (; r < run; r++, i++, kr += 64) {                                           \
                int64_t tt = t + r;                                                         \
                if (tt >= s_end && tt < g_end) {                                            \
                    for (int64_t g = 0; g < G; g++) sc[g][i] = -INFINITY;                   \
                    continue;                                                               \
                }                                                                           \
                for (int64_t g = 0; g < G; g++) {                                           \
                    const float* qq = tt < s_end ? qsf[g] : qf[g];                          \
                    __m256 a0 = _mm256_setzero_ps();                                        \
                    for (int j = 0; j < 8; j++)                                             \
                        a0 = _mm256_fmadd_ps(_mm256_load_ps(qq + 8 * j), load8_##SUF(kr + 8 * j), a0); \
                    float s = hsum8(a0);                                                    \
                    sc[g][i] = s;                                                           \
                    if (s > mx[g]) mx[g] = s;                                               \
                }                                                                           \
            }                                                                               \
            t += run;                                                                       \
        }                                                                                   \
        int64_t n = t1 - t0;                                                                \
        for (int64_t g = 0; g < G; g++) chunk_exp(sc[g], n, mx[g], res + g * 66);           \
        for (int half = 0; half < 2; half++) { /* probabilities x V, 32 channels at a time */ \
            __m256 acc[MAX_G][4];                                                           \
            for (int64_t g = 0; g < G; g++)                                                 \
                for (int j = 0; j < 4; j++) acc[g][j] = _mm256_setzero_ps();                \
            for (int64_t t = t0, i = 0; t < t1;) {                                          \
                int64_t blk = t / bs, off = t % bs, run = bs - off;                         \
                if (run > t1 - t) run = t1 - t;                                             \
                const T* vr = vb + ((int64_t)tb[blk] * bs + off) * 64 + 32 * half;          \
                for (int64_t r = 0; r < run; r++, i++, vr += 64) {                          \
                    __m256 v0 = load8_##SUF(vr), v1 = load8_##SUF(vr + 8);                  \
                    __m256 v2 = load8_##SUF(vr + 16), v3 = load8_##SUF(vr + 24);            \
                    for (int64_t g = 0; g < G; g++) {                                       \
                        __m256 w = _mm256_set1_ps(sc[g][i]);                                \
                        acc[g][0] = _mm256_fmadd_ps(w, v0, acc[g][0]);                      \
                        acc[g][1] = _mm256_fmadd_ps(w, v1, acc[g][1]);                      \
                        acc[g][2] = _mm256_fmadd_ps(w, v2, acc[g][2]);                      \
                        acc[g][3] = _mm256_fmadd_ps(w, v3, acc[g][3]);                      \
                    }                                                                       \
                }                                                                           \
                t += run;                                                                   \
            }                                                                               \
            for (int64_t g = 0; g < G; g++)                                                 \
                for (int j = 0; j < 4; j++)                                                 \
                    _mm256_storeu_ps(res + g * 66 + 2 + 32 * half + 8 * j, acc[g][j]);      \
        }                                                                                   \
    }

DECODE_TASK64_AVX2(f32, float)
DECODE_TASK64_AVX2(bf16, bf16)
TASK64_DISPATCH(f32, float)
TASK64_DISPATCH(bf16, bf16)
#endif

#define DECODE_ATTN(NAME, SUF, T, LOAD, STORE)                                                   \
    void NAME(const T* q, T* out, const T* k, const T* v, const int32_t* table,             \
              const int64_t* lo, const int64_t* hi, int64_t B, int64_t Hq, int64_t Hkv,     \
              int64_t D, int64_t NB, int64_t bs, int64_t row_stride, int64_t head_stride,   \
              float scale, const T* qs, const int64_t* sink_end, const int64_t* gap_end) {  \
        int64_t G = Hq / Hkv, work, nchunks;                                                \
        int64_t chunk = plan_chunks(lo, hi, B, Hkv, &nchunks, &work);                       \
        int64_t per = G * (D + 2);                                                          \
        float* part = (float*)malloc((size_t)(B * Hkv * nchunks * per) * sizeof(float));    \
        _Pragma("omp parallel for schedule(dynamic, 1) if(work * Hq >= 4096)")              \
        for (int64_t task = 0; task < B * Hkv * nchunks; task++) {                          \
            int64_t c = task % nchunks, bh = task / nchunks, b = bh / Hkv, h = bh % Hkv;    \
            float* res = part + task * per; /* G x [max, sum, acc(D)] */                    \
            int64_t t0 = lo[b] + c * chunk, t1 = t0 + chunk;                                \
            if (t1 > hi[b]) t1 = hi[b];                                                     \
            for (int64_t g = 0; g < G; g++) { res[g * (D + 2)] = -INFINITY;                 \
                res[g * (D + 2) + 1] = 0.f; }                                               \
            if (t0 >= t1) continue;                                                         \
            if ((HAVE_AVX512 || HAVE_AVX2) && D == 64) {                                                   \
                int64_t qo = (b * Hq + h * G) * D;                                          \
                TASK64(SUF)(q + qo, qs ? qs + qo : q + qo, k + b * row_stride + h * head_stride, \
                            v + b * row_stride + h * head_stride, table + b * NB, bs, t0, t1, \
                            qs ? sink_end[b] : 0, qs ? gap_end[b] : 0, G, scale, res);      \
                continue;                                                                   \
            }                                                                               \
            float qf[MAX_G][MAX_D], acc[MAX_G][MAX_D], sc[MAX_G][256], mx[MAX_G];           \
            /* attention sinks: tokens before sink_end score with the query qs, those before  \
             * gap_end are masked (the window starts there) */                              \
            int64_t s_end = qs ? sink_end[b] : 0, g_end = qs ? gap_end[b] : 0;              \
            float qsf[MAX_G][MAX_D];                                                        \
            for (int64_t g = 0; g < G; g++) {                                               \
                const T* qr = q + (b * Hq + h * G + g) * D;                                 \
                for (int64_t d = 0; d < D; d++) { qf[g][d] = LOAD(qr[d]) * scale;           \
                    acc[g][d] = 0.f; }                                                      \
                if (t0 < s_end) {                                                           \
                    const T* qsr = qs + (b * Hq + h * G + g) * D;                           \
                    for (int64_t d = 0; d < D; d++) qsf[g][d] = LOAD(qsr[d]) * scale;       \
                }                                                                           \
                mx[g] = -INFINITY;                                                          \
            }                                                                               \
            const T* kb = k + b * row_stride + h * head_stride;                             \
            const T* vb = v + b * row_stride + h * head_stride;                             \
            const int32_t* tb = table + b * NB;                                             \
            int64_t n = t1 - t0;                                                            \
            for (int64_t t = t0, i = 0; t < t1;) { /* scores, block by block */             \
                int64_t blk = t / bs, off = t % bs, run = bs - off;                         \
                if (run > t1 - t) run = t1 - t;                                             \
                const T* kr = kb + ((int64_t)tb[blk] * bs + off) * D;                       \
                for (int64_t r = 0; r < run; r++, i++, kr += D) {                           \
                    int64_t tt = t + r;                                                     \
                    if (tt >= s_end && tt < g_end) {                                        \
                        for (int64_t g = 0; g < G; g++) sc[g][i] = -INFINITY;               \
                        continue;                                                           \
                    }                                                                       \
                    float kf[MAX_D];                                                        \
                    for (int64_t d = 0; d < D; d++) kf[d] = LOAD(kr[d]);                    \
                    for (int64_t g = 0; g < G; g++) {                                       \
                        const float* qq = tt < s_end ? qsf[g] : qf[g];                      \
                        float s = D == 64 ? dot64(qq, kf) : dot(qq, kf, D);                  \
                        sc[g][i] = s;                                                       \
                        if (s > mx[g]) mx[g] = s;                                           \
                    }                                                                       \
                }                                                                           \
                t += run;                                                                   \
            }                                                                               \
            for (int64_t g = 0; g < G; g++) chunk_exp(sc[g], n, mx[g], res + g * (D + 2));   \
            for (int64_t t = t0, i = 0; t < t1;) { /* probabilities x V */                  \
                int64_t blk = t / bs, off = t % bs, run = bs - off;                         \
                if (run > t1 - t) run = t1 - t;                                             \
                const T* vr = vb + ((int64_t)tb[blk] * bs + off) * D;                       \
                for (int64_t r = 0; r < run; r++, i++, vr += D) {                           \
                    for (int64_t g = 0; g < G; g++) {                                       \
                        float w = sc[g][i];                                                 \
                        float* ag = acc[g];                                                 \
                        _Pragma("omp simd")                                                 \
                        for (int64_t d = 0; d < D; d++) ag[d] += w * LOAD(vr[d]);           \
                    }                                                                       \
                }                                                                           \
                t += run;                                                                   \
            }                                                                               \
            for (int64_t g = 0; g < G; g++)                                                 \
                memcpy(res + g * (D + 2) + 2, acc[g], (size_t)D * sizeof(float));           \
        }                                                                                   \
        _Pragma("omp parallel for if(B * Hkv >= 4)")                                        \
        for (int64_t bh = 0; bh < B * Hkv; bh++) { /* merge the chunks of each (row, head) */\
            int64_t b = bh / Hkv, h = bh % Hkv;                                             \
            for (int64_t g = 0; g < G; g++) {                                               \
                float o[MAX_D];                                                             \
                merge_chunks(part + bh * nchunks * per, nchunks, per, g, D, o);             \
                T* dst = out + (b * Hq + h * G + g) * D;                                    \
                for (int64_t d = 0; d < D; d++) dst[d] = STORE(o[d]);                       \
            }                                                                               \
        }                                                                                   \
        free(part);                                                                         \
    }

#if HAVE_AVX512 || HAVE_AVX2
#define TASK64(SUF) task64_dispatch_##SUF
#else
#define TASK64(SUF) (void) /* never called: the branch is compiled out */
#endif
DECODE_ATTN(decode_attn_f32, f32, float, ID, ID)
DECODE_ATTN(decode_attn_bf16, bf16, bf16, bf16_to_f32, f32_to_bf16)

/* ---- Causal attention of a prompt chunk (flash attention, head_dim 64, AVX-512) ----------
 * T queries at positions start..start+T-1 attend to keys 0..their own position. q element
 * (token t, head hq, d) at t*q_ts + hq*D + d (the fused QKV projection's layout); k, v element
 * (KV head h, key j, d) at h*kv_hs + j*D + d; out (T, Hq*D) contiguous. A task is one KV head
 * and 16 queries, i.e. 16*G query rows that share every K/V tile: a tile of 16 keys is widened
 * and transposed once, then each row's 16 scores are 64 fused multiply-adds (broadcast query
 * channel times 16 keys; 32 bf16 dot products) and its V sum 64 more (32); softmax runs
 * online, PA_NS tiles per update (one max, one rescale of the sums per 32-64 keys, the tiles'
 * exponentials independent), and tiles past a block's last query are never read (the
 * causal half is skipped). */
#if HAVE_AVX512
/* A query row and a transposed 16-key tile for the prefill kernel's scores: fp32 (the query
 * widened and scaled; keys transposed per channel), or for bf16 with the dot-product
 * instruction, pairs of channels kept packed (query pairs broadcast against 16 keys' pairs;
 * the score scaled after). pa_score returns the 16 keys' scores of one row. */
typedef struct { float v[64]; } pa_q_f32_t;
typedef struct { float v[64][16]; } pa_kt_f32_t;
static inline void pa_qrow_f32(pa_q_f32_t* r, const float* q, float scale) {
    for (int d = 0; d < 64; d++) r->v[d] = q[d] * scale;
}
static inline void pa_qrow_bf16w(pa_q_f32_t* r, const bf16* q, float scale) {
    for (int d = 0; d < 64; d++) r->v[d] = bf16_to_f32(q[d]) * scale;
}
static inline void pa_key_f32(pa_kt_f32_t* kt, int j, __m512 x0, __m512 x1, __m512 x2, __m512 x3, __m512i stride) {
    _mm512_i32scatter_ps(&kt->v[0][j], stride, x0, 4);
    _mm512_i32scatter_ps(&kt->v[16][j], stride, x1, 4);
    _mm512_i32scatter_ps(&kt->v[32][j], stride, x2, 4);
    _mm512_i32scatter_ps(&kt->v[48][j], stride, x3, 4);
}
static inline __m512 pa_score_f32(const pa_q_f32_t* q, const pa_kt_f32_t* kt) {
    __m512 sa[8]; /* eight independent sums: the FMA latency stays hidden */
    for (int u = 0; u < 8; u++) sa[u] = _mm512_mul_ps(_mm512_set1_ps(q->v[u]), _mm512_loadu_ps(kt->v[u]));
    for (int d = 8; d < 64; d += 8)
        for (int u = 0; u < 8; u++) sa[u] = _mm512_fmadd_ps(_mm512_set1_ps(q->v[d + u]), _mm512_loadu_ps(kt->v[d + u]), sa[u]);
    return _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(sa[0], sa[1]), _mm512_add_ps(sa[2], sa[3])),
                         _mm512_add_ps(_mm512_add_ps(sa[4], sa[5]), _mm512_add_ps(sa[6], sa[7])));
}
#define PA_F32(T, KT, SRC) /* key j of tile KT from a row of T: widened, transposed */      \
    pa_key_f32(KT, (int)j, load16_##T(SRC), load16_##T((SRC) + 16), load16_##T((SRC) + 32), load16_##T((SRC) + 48), stride16)
#define PA_Q_f32 pa_q_f32_t
#define PA_KT_f32 pa_kt_f32_t
#define PA_QROW_f32 pa_qrow_f32
#define PA_KEY_f32(KT, SRC) PA_F32(f32, KT, SRC)
#define PA_SCORE_f32 pa_score_f32
#if defined(__AVX512BF16__)
typedef struct { uint32_t v[32]; float scale; } pa_q_bf16_t;
typedef struct { uint32_t v[32][16]; } pa_kt_bf16_t;
static inline void pa_qrow_bf16(pa_q_bf16_t* r, const bf16* q, float scale) {
    memcpy(r->v, q, 128);
    r->scale = scale;
}
static inline void pa_key_bf16(pa_kt_bf16_t* kt, int j, const bf16* src, __m512i stride) {
    _mm512_i32scatter_epi32(&kt->v[0][j], stride, _mm512_loadu_si512(src), 4);
    _mm512_i32scatter_epi32(&kt->v[16][j], stride, _mm512_loadu_si512(src + 32), 4);
}
static inline __m512 pa_score_bf16(const pa_q_bf16_t* q, const pa_kt_bf16_t* kt) {
    __m512 sa[8];
    for (int u = 0; u < 8; u++) sa[u] = _mm512_setzero_ps();
    for (int i = 0; i < 32; i += 8)
        for (int u = 0; u < 8; u++)
            sa[u] = _mm512_dpbf16_ps(sa[u], (__m512bh)_mm512_set1_epi32((int)q->v[i + u]),
                                     (__m512bh)_mm512_loadu_si512(kt->v[i + u]));
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(sa[0], sa[1]), _mm512_add_ps(sa[2], sa[3])),
                             _mm512_add_ps(_mm512_add_ps(sa[4], sa[5]), _mm512_add_ps(sa[6], sa[7])));
    return _mm512_mul_ps(s, _mm512_set1_ps(q->scale));
}
#define PA_Q_bf16 pa_q_bf16_t
#define PA_KT_bf16 pa_kt_bf16_t
#define PA_QROW_bf16 pa_qrow_bf16
#define PA_KEY_bf16(KT, SRC) pa_key_bf16(KT, (int)j, SRC, stride16)
#define PA_SCORE_bf16 pa_score_bf16
#else
#define PA_Q_bf16 pa_q_f32_t
#define PA_KT_bf16 pa_kt_f32_t
#define PA_QROW_bf16 pa_qrow_bf16w
#define PA_KEY_bf16(KT, SRC) PA_F32(bf16, KT, SRC)
#define PA_SCORE_bf16 pa_score_f32
#endif

/* The V side of a 16-key tile and what a row does with it: values widened to fp32 (one
 * multiply-add per key and 16 channels), or for bf16 with the dot-product instruction, pairs
 * of keys interleaved channel by channel (pair_rows, as in pv_bf16)
 * and multiplied by the row's probabilities rounded to bf16 in pairs (as transformers' eager
 * attention rounds its probabilities to the model dtype): half the instructions. pa_out
 * writes a row's normalized sums; the paired tile leaves them in the interleaved order. */
typedef struct { float v[16][64]; } pa_vt_f32_t;
#define PA_VTILE_W(NAME, SUF, T)                                                            \
    static inline void NAME(pa_vt_f32_t* vt, const T* src, int64_t nk) {                    \
        for (int64_t j = 0; j < 16; j++)                                                    \
            for (int c = 0; c < 4; c++)                                                     \
                _mm512_storeu_ps(vt->v[j] + 16 * c, j < nk ? load16_##SUF(src + j * 64 + 16 * c) \
                                                           : _mm512_setzero_ps());          \
    }
PA_VTILE_W(pa_vtile_f32, f32, float)
PA_VTILE_W(pa_vtile_bf16w, bf16, bf16)
static inline void pa_pv_f32(__m512* a, __m512 p, int64_t see, const pa_vt_f32_t* vt) {
    float pj[16];
    _mm512_storeu_ps(pj, p);
    for (int64_t j = 0; j < see; j++) {
        __m512 w = _mm512_set1_ps(pj[j]);
        for (int c = 0; c < 4; c++) a[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt->v[j] + 16 * c), a[c]);
    }
}
static inline void pa_out_f32(const float* acc, float inv, float* o) {
    for (int64_t d = 0; d < 64; d++) o[d] = acc[d] * inv;
}
static inline void pa_out_bf16w(const float* acc, float inv, bf16* o) {
    for (int64_t d = 0; d < 64; d++) o[d] = f32_to_bf16(acc[d] * inv);
}
#define PA_VT_f32 pa_vt_f32_t
#define PA_VTILE_f32 pa_vtile_f32
#define PA_PV_f32 pa_pv_f32
#define PA_OUT_f32 pa_out_f32
#if defined(__AVX512BF16__)
typedef struct { __m512i v[8][4]; } pa_vt_bf16_t;
static inline void pa_vtile_bf16(pa_vt_bf16_t* vt, const bf16* src, int64_t nk) {
    for (int64_t j2 = 0; j2 < 8; j2++) /* rows past nk are zeros */
        pair_rows(2 * j2 < nk ? src + 2 * j2 * 64 : zero_row_bf16, 2 * j2 + 1 < nk ? src + (2 * j2 + 1) * 64 : zero_row_bf16,
                  vt->v[j2]);
}
static inline void pa_pv_bf16(__m512* a, __m512 p, int64_t see, const pa_vt_bf16_t* vt) {
    uint32_t pw[8]; /* (p[2i], p[2i+1]) as bf16 pairs */
    _mm256_storeu_si256((__m256i*)pw, (__m256i)_mm512_cvtneps_pbh(p));
    for (int64_t j2 = 0; 2 * j2 < see; j2++) {
        __m512bh w = (__m512bh)_mm512_set1_epi32((int)pw[j2]);
        for (int c = 0; c < 4; c++) a[c] = _mm512_dpbf16_ps(a[c], w, (__m512bh)vt->v[j2][c]);
    }
}
static inline void pa_out_bf16(const float* acc, float inv, bf16* o) {
    const __m512 iv = _mm512_set1_ps(inv);
    for (int h = 0; h < 2; h++) {
        __m512 c0, c1;
        unpair_sums(_mm512_loadu_ps(acc + 32 * h), _mm512_loadu_ps(acc + 32 * h + 16), &c0, &c1);
        store16_bf16(o + 32 * h, _mm512_mul_ps(c0, iv));
        store16_bf16(o + 32 * h + 16, _mm512_mul_ps(c1, iv));
    }
}
#define PA_VT_bf16 pa_vt_bf16_t
#define PA_VTILE_bf16 pa_vtile_bf16
#define PA_PV_bf16 pa_pv_bf16
#define PA_OUT_bf16 pa_out_bf16
#else
#define PA_VT_bf16 pa_vt_f32_t
#define PA_VTILE_bf16 pa_vtile_bf16w
#define PA_PV_bf16 pa_pv_f32
#define PA_OUT_bf16 pa_out_bf16w
#endif


/* 16-key tiles per softmax update (measured: bf16 with the dot-product instruction 145 -> 280
 * GFLOP/s from 1 to 4, no gain at 8; fp32 the same at 1 and 2, slower at 4: its tiles outgrow L1) */
#define PA_NS_f32 2
#define PA_NS_bf16 4
#define PREFILL_ATTN(NAME, SUF, T, LOAD, STORE)                                             \
    void NAME(const T* q, const T* k, const T* v, T* out, int64_t Tq, int64_t start,       \
              int64_t Hq, int64_t Hkv, int64_t q_ts, int64_t kv_hs, float scale) {         \
        const int64_t D = 64, G = Hq / Hkv, QB = 16;                                        \
        int64_t nqb = (Tq + QB - 1) / QB;                                                   \
        _Pragma("omp parallel for schedule(dynamic, 1)")                                    \
        for (int64_t task = 0; task < Hkv * nqb; task++) {                                  \
            int64_t h = task % Hkv, qb = nqb - 1 - task / Hkv; /* longest blocks first */   \
            int64_t t0 = qb * QB, t1 = t0 + QB < Tq ? t0 + QB : Tq, rows = (t1 - t0) * G;   \
            PA_Q_##SUF qf[16 * MAX_G];                                                      \
            PA_KT_##SUF kt[PA_NS_##SUF];                                                    \
            PA_VT_##SUF vt[PA_NS_##SUF];                                                    \
            float acc[16 * MAX_G][64], m[16 * MAX_G], l[16 * MAX_G];                        \
            const __m512i stride16 = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \
                                                       10, 11, 12, 13, 14, 15), _mm512_set1_epi32(16)); \
            int64_t qpos[16 * MAX_G];                                                       \
            static const T zeros64[64] = {0};                                               \
            for (int64_t r = 0; r < rows; r++) { /* row r: query t0 + r / G, head h*G + r % G */ \
                int64_t t = t0 + r / G, hq = h * G + r % G;                                 \
                PA_QROW_##SUF(&qf[r], q + t * q_ts + hq * D, scale);                        \
                for (int64_t d = 0; d < D; d++) acc[r][d] = 0.f;                            \
                m[r] = -INFINITY;                                                           \
                l[r] = 0.f;                                                                 \
                qpos[r] = start + t;                                                        \
            }                                                                               \
            int64_t kend = start + t1; /* keys the block's last query sees */               \
            const T* kh = k + h * kv_hs;                                                    \
            const T* vh = v + h * kv_hs;                                                    \
            const int64_t span = 16 * PA_NS_##SUF; /* keys per softmax update */            \
            for (int64_t j0 = 0; j0 < kend; j0 += span) {                                   \
                int64_t nks = kend - j0 < span ? kend - j0 : span, ns = (nks + 15) / 16;     \
                for (int64_t u = 0; u < ns; u++) { /* the tiles: keys transposed */         \
                    int64_t base = j0 + 16 * u, nk = nks - 16 * u < 16 ? nks - 16 * u : 16; \
                    for (int64_t j = 0; j < 16; j++)                                        \
                        PA_KEY_##SUF(&kt[u], j < nk ? kh + (base + j) * D : zeros64);       \
                    PA_VTILE_##SUF(&vt[u], vh + base * D, nk);                              \
                }                                                                           \
                for (int64_t r = 0; r < rows; r++) {                                        \
                    int64_t see = qpos[r] - j0 + 1; /* keys of these tiles row r sees */    \
                    if (see <= 0) continue;                                                 \
                    if (see > nks) see = nks;                                               \
                    int64_t nu = (see + 15) / 16;                                           \
                    __m512 sc[PA_NS_##SUF], mv = _mm512_set1_ps(-INFINITY);                 \
                    for (int64_t u = 0; u < nu; u++) {                                      \
                        sc[u] = PA_SCORE_##SUF(&qf[r], &kt[u]);                             \
                        if (see - 16 * u < 16)                                              \
                            sc[u] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY),           \
                                                       (__mmask16)((1u << (see - 16 * u)) - 1u), sc[u]); \
                        mv = _mm512_max_ps(mv, sc[u]);                                      \
                    }                                                                       \
                    float mt = _mm512_reduce_max_ps(mv);                                    \
                    float mn = mt > m[r] ? mt : m[r];                                       \
                    __m512 mnv = _mm512_set1_ps(mn), sum = _mm512_setzero_ps();             \
                    for (int64_t u = 0; u < nu; u++) { /* masked keys: exp16(-inf) is 0 */   \
                        sc[u] = exp16(_mm512_sub_ps(sc[u], mnv));                           \
                        sum = _mm512_add_ps(sum, sc[u]);                                    \
                    }                                                                       \
                    float alpha = m[r] == -INFINITY ? 0.f : exp_approx(m[r] - mn);          \
                    l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);                        \
                    m[r] = mn;                                                              \
                    __m512 a[4], b[4]; /* even and odd tiles: two short chains */           \
                    for (int c = 0; c < 4; c++) {                                           \
                        a[c] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + 16 * c), _mm512_set1_ps(alpha)); \
                        b[c] = _mm512_setzero_ps();                                         \
                    }                                                                       \
                    for (int64_t u = 0; u < nu; u++)                                        \
                        PA_PV_##SUF(u & 1 ? b : a, sc[u], see - 16 * u < 16 ? see - 16 * u : 16, &vt[u]); \
                    for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc[r] + 16 * c, _mm512_add_ps(a[c], b[c])); \
                }                                                                           \
            }                                                                               \
            for (int64_t r = 0; r < rows; r++) {                                            \
                int64_t t = t0 + r / G, hq = h * G + r % G;                                 \
                PA_OUT_##SUF(acc[r], 1.0f / l[r], out + t * Hq * D + hq * D);               \
            }                                                                               \
        }                                                                                   \
    }
PREFILL_ATTN(prefill_attn_f32, f32, float, ID, ID)
PREFILL_ATTN(prefill_attn_bf16, bf16, bf16, bf16_to_f32, f32_to_bf16)
#define HAVE_PREFILL_ATTN 1
#else
#define HAVE_PREFILL_ATTN 0
#endif
int prefill_attn_available(void) { return HAVE_PREFILL_ATTN; }

/* ---- Decode attention over a KIVI-quantized cache, from the codes ------------------------
 * One query token per sequence, fp32; B sequences per call (each its own operands). The
 * keys and values of KV head h of a sequence are
 *   exact:     ek, ev (Hkv, ne, D) fp32 (sinks and recent tail; order does not matter; each
 *              head's rows contiguous, heads ek_hs / ev_hs elements apart)
 *   quantized: nq tokens; K codes per channel in groups of gk tokens, V codes per token in
 *              groups of gv channels; codes packed in planes (code d of a row sits in byte
 *              d % Dp at bit (d / Dp) * bits, Dp = D * bits / 8; keys at kbits, values at
 *              vbits); scales and zeros fp16.
 * Strides are per KV head, in elements: kc_hs (K codes), km_hs (K scale/zero), vc_hs, vm_hs.
 * Scores of a K group fold its per-channel scales into the query:
 *   q . (c * s + z) = (q * s) . c + q . z
 * and the output folds V's per-token scales into the probabilities:
 *   sum_t p_t (c_t * s_t + z_t) = sum_t (p_t s_t) c_t + sum_t p_t z_t
 * so no float copy of the history is ever made. Chunks of tokens run in parallel, each
 * keeping its running max, exponential sum and weighted sum (merged at the end). */

static inline float half_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-8f; /* subnormal: m * 2^-24 */
        return sign ? -f : f;
    }
    if (e == 31) u = sign | 0x7f800000u | (m << 13);
    else u = sign | ((e + 112u) << 23) | (m << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#define UNPACK_PLANES(BITS, D)                                                               \
    do {                                                                                    \
        const int per_ = 8 / (BITS), dp_ = (D) / per_;                                      \
        for (int pl = 0; pl < per_; pl++) {                                                 \
            float* dst = c + pl * dp_;                                                      \
            _Pragma("omp simd")                                                             \
            for (int j = 0; j < dp_; j++)                                                   \
                dst[j] = (float)((row[j] >> (pl * (BITS))) & ((1u << (BITS)) - 1u));        \
        }                                                                                   \
    } while (0)

/* codes of one token row -> floats; constant trip counts for head_dim 64 (vectorized) */
static inline void unpack_row(const uint8_t* row, float* c, int64_t D, int64_t bits) {
    if (D == 64) {
        if (bits == 8) UNPACK_PLANES(8, 64);
        else if (bits == 4) UNPACK_PLANES(4, 64);
        else UNPACK_PLANES(2, 64);
        return;
    }
    int64_t per = 8 / bits, Dp = D / per;
    uint32_t mask = (1u << bits) - 1u;
    for (int64_t pl = 0; pl < per; pl++) {
        int shift = (int)(pl * bits);
        float* dst = c + pl * Dp;
        _Pragma("omp simd")
        for (int64_t j = 0; j < Dp; j++) dst[j] = (float)((row[j] >> shift) & mask);
    }
}

/* One token's value row, quantized per token (codes cf, fp16 scale and zero per group of gv
 * channels), into the sums of the G query heads: acc[g] += (p_g s) c and zacc[g][group] +=
 * p_g z, with p_g = p[g * p_stride]. `fold_zero_sums` adds the zero sums in at the end:
 *   sum_t p_t (c_t s_t + z_t) = sum_t (p_t s_t) c_t + sum_t p_t z_t */
static inline void add_value_row(float acc[][MAX_D], float zacc[][MAX_D], int64_t G, const float* cf,
                                 const uint16_t* s16, const uint16_t* z16, int64_t ngv, int64_t gv, const float* p,
                                 int64_t p_stride) {
    if (gv == 64 && ngv == 1) { /* the common case: one value group per row, constant trip counts */
        float sv = half_to_f32(s16[0]), zv = half_to_f32(z16[0]);
        for (int64_t g = 0; g < G; g++) {
            float pg = p[g * p_stride], w = pg * sv;
            float* ag = acc[g];
            _Pragma("omp simd")
            for (int d = 0; d < 64; d++) ag[d] += w * cf[d];
            zacc[g][0] += pg * zv;
        }
        return;
    }
    for (int64_t gi = 0; gi < ngv; gi++) {
        float sv = half_to_f32(s16[gi]), zv = half_to_f32(z16[gi]);
        for (int64_t g = 0; g < G; g++) {
            float pg = p[g * p_stride], w = pg * sv;
            float* ag = acc[g] + gi * gv;
            const float* cg = cf + gi * gv;
            _Pragma("omp simd")
            for (int64_t d = 0; d < gv; d++) ag[d] += w * cg[d];
            zacc[g][gi] += pg * zv;
        }
    }
}

static inline void fold_zero_sums(float acc[][MAX_D], float zacc[][MAX_D], int64_t G, int64_t D, int64_t gv) {
    for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++) acc[g][d] += zacc[g][d / gv];
}

/* One sequence's operands (see above). */
typedef struct {
    const float *q, *ek, *ev;
    float* out;
    int64_t ne, ek_hs, ev_hs, kc_hs, km_hs, vc_hs, vm_hs, nq;
    const uint8_t *kc, *vc;
    const uint16_t *ks, *kz, *vs, *vz;
} qrow_t;

static int64_t qrow_chunks(const qrow_t* r, int64_t qchunk) {
    return (r->ne > 0 ? 1 : 0) + (r->nq + qchunk - 1) / qchunk;
}

/* Chunk c of KV head h of one sequence: the exact tokens (c == 0 when there are any) or
 * qchunk quantized ones; writes (max, sum, acc[D]) per query head of the group to res. */
static void quant_chunk(const qrow_t* r, int64_t h, int64_t c, float* res, int64_t qchunk, int64_t gk, int64_t gv,
                        int64_t kbits, int64_t vbits, int64_t G, int64_t D, float scale) {
    int64_t Dpk = D * kbits / 8, Dpv = D * vbits / 8, ngv = D / gv;
    int64_t ne = r->ne, nq = r->nq, echunks = ne > 0 ? 1 : 0;
    int64_t sclen = ne > qchunk ? ne : qchunk;
    float qf[MAX_G][MAX_D], acc[MAX_G][MAX_D], zacc[MAX_G][MAX_D], mx[MAX_G], cf[MAX_D];
    float* sc = (float*)malloc((size_t)(G * sclen) * sizeof(float));
    for (int64_t g = 0; g < G; g++) {
        for (int64_t d = 0; d < D; d++) { qf[g][d] = r->q[(h * G + g) * D + d] * scale; acc[g][d] = 0.f;
                                          zacc[g][d] = 0.f; }
        mx[g] = -INFINITY;
    }
    int64_t n;
    if (c < echunks) { /* the exact tokens */
        n = ne;
        const float* kb = r->ek + h * r->ek_hs;
        for (int64_t i = 0; i < n; i++)
            for (int64_t g = 0; g < G; g++) {
                float s = D == 64 ? dot64(qf[g], kb + i * D) : dot(qf[g], kb + i * D, D);
                sc[g * sclen + i] = s;
                if (s > mx[g]) mx[g] = s;
            }
    } else { /* quantized tokens j0 .. j0+n */
        int64_t j0 = (c - echunks) * qchunk;
        n = nq - j0 < qchunk ? nq - j0 : qchunk;
        float qs[MAX_G][MAX_D], bias[MAX_G];
        for (int64_t i = 0; i < n; i++) {
            int64_t j = j0 + i;
            if (j % gk == 0 || i == 0) { /* a new K group: fold its scales into the query */
                const uint16_t* s16 = r->ks + h * r->km_hs + (j / gk) * D;
                const uint16_t* z16 = r->kz + h * r->km_hs + (j / gk) * D;
                for (int64_t g = 0; g < G; g++) {
                    float b = 0.f;
                    for (int64_t d = 0; d < D; d++) {
                        qs[g][d] = qf[g][d] * half_to_f32(s16[d]);
                        b += qf[g][d] * half_to_f32(z16[d]);
                    }
                    bias[g] = b;
                }
            }
            unpack_row(r->kc + h * r->kc_hs + j * Dpk, cf, D, kbits);
            for (int64_t g = 0; g < G; g++) {
                float s = (D == 64 ? dot64(qs[g], cf) : dot(qs[g], cf, D)) + bias[g];
                sc[g * sclen + i] = s;
                if (s > mx[g]) mx[g] = s;
            }
        }
    }
    for (int64_t g = 0; g < G; g++) chunk_exp(sc + g * sclen, n, mx[g], res + g * (D + 2));
    if (c < echunks) {
        const float* vb = r->ev + h * r->ev_hs;
        for (int64_t i = 0; i < n; i++)
            for (int64_t g = 0; g < G; g++) {
                float w = sc[g * sclen + i];
                _Pragma("omp simd")
                for (int64_t d = 0; d < D; d++) acc[g][d] += w * vb[i * D + d];
            }
    } else {
        int64_t j0 = (c - echunks) * qchunk;
        for (int64_t i = 0; i < n; i++) {
            int64_t j = j0 + i;
            unpack_row(r->vc + h * r->vc_hs + j * Dpv, cf, D, vbits);
            add_value_row(acc, zacc, G, cf, r->vs + h * r->vm_hs + j * ngv, r->vz + h * r->vm_hs + j * ngv, ngv, gv,
                          sc + i, sclen);
        }
        fold_zero_sums(acc, zacc, G, D, gv);
    }
    for (int64_t g = 0; g < G; g++) memcpy(res + g * (D + 2) + 2, acc[g], (size_t)D * sizeof(float));
    free(sc);
}

/* B sequences at once (one task per sequence, KV head and chunk, in one parallel region),
 * then each sequence's chunks merged into its own out. */
static void quant_decode_rows(const qrow_t* rows, int64_t B, int64_t gk, int64_t gv, int64_t kbits, int64_t vbits,
                              int64_t Hq, int64_t Hkv, int64_t D, float scale) {
    int64_t G = Hq / Hkv, per = G * (D + 2);
    int64_t qchunk = gk * ((256 + gk - 1) / gk); /* whole K groups per chunk */
    int64_t* first = (int64_t*)malloc((size_t)(B + 1) * sizeof(int64_t)); /* first task of each row */
    int64_t work = 0;
    first[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        first[b + 1] = first[b] + Hkv * qrow_chunks(rows + b, qchunk);
        work += rows[b].ne + rows[b].nq;
    }
    int64_t tasks = first[B];
    float* part = (float*)malloc((size_t)((tasks > 0 ? tasks : 1) * per) * sizeof(float));
    _Pragma("omp parallel for schedule(dynamic, 1) if(work * Hq >= 4096)")
    for (int64_t task = 0; task < tasks; task++) {
        int64_t b = 0;
        while (first[b + 1] <= task) b++;
        int64_t nchunks = qrow_chunks(rows + b, qchunk), t = task - first[b];
        quant_chunk(rows + b, t / nchunks, t % nchunks, part + task * per, qchunk, gk, gv, kbits, vbits, G, D, scale);
    }
    for (int64_t b = 0; b < B; b++) { /* merge each row's chunks */
        int64_t nchunks = qrow_chunks(rows + b, qchunk);
        for (int64_t h = 0; h < Hkv; h++)
            for (int64_t g = 0; g < G; g++)
                merge_chunks(part + (first[b] + h * nchunks) * per, nchunks, per, g, D, rows[b].out + (h * G + g) * D);
    }
    free(part);
    free(first);
}

/* The entry point. meta (B, 18) int64 per sequence: q, out, ek, ev (addresses), ne, ek_hs,
 * ev_hs, kc, ks, kz (addresses), kc_hs, km_hs, vc, vs, vz (addresses), vc_hs, vm_hs, nq.
 * Shared: group sizes, widths, heads, head_dim, scale. */
void quant_decode_attn_rows_f32(const int64_t* meta, int64_t B, int64_t gk, int64_t gv, int64_t kbits,
                                int64_t vbits, int64_t Hq, int64_t Hkv, int64_t D, float scale) {
    qrow_t* rows = (qrow_t*)malloc((size_t)(B > 0 ? B : 1) * sizeof(qrow_t));
    for (int64_t b = 0; b < B; b++) {
        const int64_t* m = meta + b * 18;
        qrow_t r = {(const float*)(intptr_t)m[0], (const float*)(intptr_t)m[2], (const float*)(intptr_t)m[3],
                    (float*)(intptr_t)m[1], m[4], m[5], m[6], m[10], m[11], m[15], m[16], m[17],
                    (const uint8_t*)(intptr_t)m[7], (const uint8_t*)(intptr_t)m[12],
                    (const uint16_t*)(intptr_t)m[8], (const uint16_t*)(intptr_t)m[9],
                    (const uint16_t*)(intptr_t)m[13], (const uint16_t*)(intptr_t)m[14]};
        rows[b] = r;
    }
    quant_decode_rows(rows, B, gk, gv, kbits, vbits, Hq, Hkv, D, scale);
    free(rows);
}

/* ---- Decode attention over paged blocks held per-token quantized ------------------------
 * The paged pool of `cache/paged_quant.py`: slot t of KV head h holds K and V codes (packed
 * in planes, like above; kbits / vbits wide) with a fp16 scale and zero per group of gk (K) /
 * gv (V) channels.
 * q, out (B, Hq, D) fp32; row b attends to its tokens lo[b] <= t < hi[b] through its block
 * table (B, NB), as decode_attn does. Strides per KV head, in elements: kc_hs / vc_hs codes,
 * km_hs / vm_hs scale and zero. Per token and group, with c the codes:
 *   q . (c * s + z) = s (q . c) + z sum(q)      (key scores)
 *   sum_t p_t (c_t s_t + z_t)                    (values: the scale folds into p_t)
 * Values stored rotated are attended in the rotated space (the caller rotates back). */
void paged_quant_decode_attn_f32(const float* q, float* out, const uint8_t* kc, const uint16_t* ks,
                                 const uint16_t* kz, const uint8_t* vc, const uint16_t* vs, const uint16_t* vz,
                                 const int32_t* table, const int64_t* lo, const int64_t* hi, int64_t B,
                                 int64_t Hq, int64_t Hkv, int64_t D, int64_t NB, int64_t bs, int64_t kc_hs,
                                 int64_t km_hs, int64_t vc_hs, int64_t vm_hs, int64_t gk, int64_t gv,
                                 int64_t kbits, int64_t vbits, float scale) {
    int64_t G = Hq / Hkv, kDp = D * kbits / 8, vDp = D * vbits / 8, ngk = D / gk, ngv = D / gv, work, nchunks;
    int64_t chunk = plan_chunks(lo, hi, B, Hkv, &nchunks, &work);
    int64_t per = G * (D + 2);
    float* part = (float*)malloc((size_t)(B * Hkv * nchunks * per) * sizeof(float));
    _Pragma("omp parallel for schedule(dynamic, 1) if(work * Hq >= 4096)")
    for (int64_t task = 0; task < B * Hkv * nchunks; task++) {
        int64_t c = task % nchunks, bh = task / nchunks, b = bh / Hkv, h = bh % Hkv;
        float* res = part + task * per;
        int64_t t0 = lo[b] + c * chunk, t1 = t0 + chunk;
        if (t1 > hi[b]) t1 = hi[b];
        for (int64_t g = 0; g < G; g++) { res[g * (D + 2)] = -INFINITY; res[g * (D + 2) + 1] = 0.f; }
        if (t0 >= t1) continue;
        float qf[MAX_G][MAX_D], qsum[MAX_G][MAX_D], acc[MAX_G][MAX_D], zacc[MAX_G][MAX_D], sc[MAX_G][256],
              mx[MAX_G], cf[MAX_D];
        for (int64_t g = 0; g < G; g++) {
            const float* qr = q + (b * Hq + h * G + g) * D;
            for (int64_t d = 0; d < D; d++) { qf[g][d] = qr[d] * scale; acc[g][d] = 0.f; zacc[g][d] = 0.f; }
            for (int64_t gi = 0; gi < ngk; gi++) {
                float s = 0.f;
                for (int64_t d = gi * gk; d < (gi + 1) * gk; d++) s += qf[g][d];
                qsum[g][gi] = s;
            }
            mx[g] = -INFINITY;
        }
        const int32_t* tb = table + b * NB;
        int64_t n = t1 - t0;
        for (int64_t t = t0, i = 0; t < t1; t++, i++) { /* scores */
            int64_t slot = (int64_t)tb[t / bs] * bs + t % bs;
            unpack_row(kc + h * kc_hs + slot * kDp, cf, D, kbits);
            const uint16_t* s16 = ks + h * km_hs + slot * ngk;
            const uint16_t* z16 = kz + h * km_hs + slot * ngk;
            for (int64_t g = 0; g < G; g++) {
                float s;
                if (ngk == 1) {
                    s = half_to_f32(s16[0]) * (D == 64 ? dot64(qf[g], cf) : dot(qf[g], cf, D))
                        + half_to_f32(z16[0]) * qsum[g][0];
                } else {
                    s = 0.f;
                    for (int64_t gi = 0; gi < ngk; gi++)
                        s += half_to_f32(s16[gi]) * dot(qf[g] + gi * gk, cf + gi * gk, gk)
                             + half_to_f32(z16[gi]) * qsum[g][gi];
                }
                sc[g][i] = s;
                if (s > mx[g]) mx[g] = s;
            }
        }
        for (int64_t g = 0; g < G; g++) chunk_exp(sc[g], n, mx[g], res + g * (D + 2));
        for (int64_t t = t0, i = 0; t < t1; t++, i++) { /* probabilities x V */
            int64_t slot = (int64_t)tb[t / bs] * bs + t % bs;
            unpack_row(vc + h * vc_hs + slot * vDp, cf, D, vbits);
            add_value_row(acc, zacc, G, cf, vs + h * vm_hs + slot * ngv, vz + h * vm_hs + slot * ngv, ngv, gv,
                          &sc[0][i], 256);
        }
        fold_zero_sums(acc, zacc, G, D, gv);
        for (int64_t g = 0; g < G; g++) memcpy(res + g * (D + 2) + 2, acc[g], (size_t)D * sizeof(float));
    }
    _Pragma("omp parallel for if(B * Hkv >= 4)")
    for (int64_t bh = 0; bh < B * Hkv; bh++) { /* merge the chunks of each (row, head) */
        int64_t b = bh / Hkv, h = bh % Hkv;
        for (int64_t g = 0; g < G; g++)
            merge_chunks(part + bh * nchunks * per, nchunks, per, g, D, out + (b * Hq + h * G + g) * D);
    }
    free(part);
}

/* ---- Per-token quantization straight into paged slots -----------------------------------
 * x (Hkv, N, D) fp32; token i of head h goes to slot slots[i]: codes (Hkv, S, D*bits/8) packed
 * in planes, scale and zero (Hkv, S, D/g) fp16 (strides per head: c_hs, m_hs elements). The
 * arithmetic is cache/quant.py's, step for step, so both give the same bytes: zero = the
 * group's min rounded down to fp16, scale = (max - zero) / levels rounded up to fp16,
 * code = round-half-even((x - zero) * (1 / scale)) clamped to [0, levels]. */
static inline uint16_t f32_to_half_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u)); /* inf, nan */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504: inf */
    if (a < 0x38800000u) { /* fp16 subnormal (or zero): units of 2^-24, half-even */
        float m = fabsf(f) * 16777216.0f; /* exact: a power-of-two scale */
        return (uint16_t)(sign | (uint32_t)nearbyintf(m));
    }
    uint32_t mant = a & 0x7fffffu, e = (a >> 23) - 112u; /* rebias 127 -> 15 */
    uint32_t h = (e << 10) | (mant >> 13), rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++; /* carries into the exponent correctly */
    return (uint16_t)(sign | h);
}

static inline uint16_t half_step(uint16_t h, int up) { /* the next fp16 toward +inf (up) or -inf */
    int neg = (h & 0x8000u) != 0;
    if ((h & 0x7fffu) == 0) return up ? 0x0001u : 0x8001u;
    return (uint16_t)((neg == !up) ? h + 1u : h - 1u); /* away from zero: +1 on the magnitude */
}

static inline uint16_t half_toward(float t, int up) {
    uint16_t h = f32_to_half_rne(t);
    float back = half_to_f32(h);
    if (up ? back < t : back > t) h = half_step(h, up);
    return h;
}

void quantize_to_slots_f32(const float* x, const int64_t* slots, int64_t H, int64_t N, int64_t D, int64_t group,
                           int64_t bits, uint8_t* codes, uint16_t* scale, uint16_t* zero, int64_t c_hs,
                           int64_t m_hs) {
    const float FP16_MAX = 65504.0f;
    int64_t levels = (1 << bits) - 1, per = 8 / bits, Dp = D / per, ng = D / group;
    _Pragma("omp parallel for if(H * N * D >= 65536)")
    for (int64_t r = 0; r < H * N; r++) {
        int64_t h = r / N, i = r % N, slot = slots[i];
        const float* xr = x + r * D;
        uint8_t* cr = codes + h * c_hs + slot * Dp;
        float cf[MAX_D];
        for (int64_t gi = 0; gi < ng; gi++) {
            const float* xg = xr + gi * group;
            float lo = xg[0], hi = xg[0];
            for (int64_t d = 1; d < group; d++) { lo = xg[d] < lo ? xg[d] : lo; hi = xg[d] > hi ? xg[d] : hi; }
            lo = lo < -FP16_MAX ? -FP16_MAX : (lo > FP16_MAX ? FP16_MAX : lo);
            hi = hi < -FP16_MAX ? -FP16_MAX : (hi > FP16_MAX ? FP16_MAX : hi);
            uint16_t z16 = half_toward(lo, 0);
            float z = half_to_f32(z16);
            uint16_t s16 = half_toward((hi - z) / (float)levels, 1);
            float s = half_to_f32(s16), inv = 1.0f / s;
            if (isinf(inv)) inv = 0.f; /* a constant group: scale 0 */
            for (int64_t d = 0; d < group; d++) {
                float c = nearbyintf((xg[d] - z) * inv);
                cf[gi * group + d] = c < 0.f ? 0.f : (c > (float)levels ? (float)levels : c);
            }
            scale[h * m_hs + slot * ng + gi] = s16;
            zero[h * m_hs + slot * ng + gi] = z16;
        }
        for (int64_t j = 0; j < Dp; j++) { /* planes: code d in byte d % Dp at bit (d / Dp) * bits */
            uint32_t byte = 0;
            for (int64_t pl = 0; pl < per; pl++) byte |= (uint32_t)cf[pl * Dp + j] << (pl * bits);
            cr[j] = (uint8_t)byte;
        }
    }
}

/* ---- Skinny matmuls for decode: y (M, N) = x (M, K) @ W^T, W stored (N, K), M small -------
 * Decode multiplies a few rows by each weight, so the weight streams from memory once per
 * step and the step's speed is that of the stream. Each thread owns a contiguous range of
 * output rows of W (F.linear's layout) and streams it, a dot product with every x row (four
 * rows per pass).
 * A row's result never depends on the other rows of x (the same sums in the same order). */

#if HAVE_AVX2
/* AVX2: a thread owns blocks of 24 weight rows (outputs); a block is read from memory once and
 * stays in cache while every x row meets it, four x rows x three outputs at a time: twelve fused
 * multiply-add chains in registers over K. Each (row, output) sum runs the same way in any
 * tile (8 lanes over K, a fixed halving sum, the K tail in order), so a row's result never
 * depends on the other rows. */
static inline __attribute__((always_inline)) void mm_tile(const float* x, const float* w, float* y, int64_t K,
                                                          int64_t N, const int R, const int C) {
    __m256 acc[4][3];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[3];
        for (int c = 0; c < C; c++) wv[c] = _mm256_loadu_ps(w + c * K + k);
        for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_loadu_ps(x + r * K + k);
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float s = hsum8(acc[r][c]);
            for (int64_t i = k; i < K; i++) s += x[r * K + i] * w[c * K + i];
            y[r * N + c] = s;
        }
}

void matmul_nk_f32(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
    const int64_t OB = 24; /* outputs per task: a multiple of the tile's three */
    _Pragma("omp parallel for schedule(static)")
    for (int64_t o0 = 0; o0 < N; o0 += OB) {
        int64_t o1 = o0 + OB < N ? o0 + OB : N;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int64_t rows = M - m0 < 4 ? M - m0 : 4;
            for (int64_t o = o0; o < o1; o += 3) {
                const float *xt = x + m0 * K, *wt = w + o * K;
                float* yt = y + m0 * N + o;
                int64_t outs = o1 - o < 3 ? o1 - o : 3;
                switch (rows * 4 + outs) { /* constant tile shapes, unrolled */
                case 16 + 3: mm_tile(xt, wt, yt, K, N, 4, 3); break;
                case 16 + 2: mm_tile(xt, wt, yt, K, N, 4, 2); break;
                case 16 + 1: mm_tile(xt, wt, yt, K, N, 4, 1); break;
                case 12 + 3: mm_tile(xt, wt, yt, K, N, 3, 3); break;
                case 12 + 2: mm_tile(xt, wt, yt, K, N, 3, 2); break;
                case 12 + 1: mm_tile(xt, wt, yt, K, N, 3, 1); break;
                case 8 + 3: mm_tile(xt, wt, yt, K, N, 2, 3); break;
                case 8 + 2: mm_tile(xt, wt, yt, K, N, 2, 2); break;
                case 8 + 1: mm_tile(xt, wt, yt, K, N, 2, 1); break;
                case 4 + 3: mm_tile(xt, wt, yt, K, N, 1, 3); break;
                case 4 + 2: mm_tile(xt, wt, yt, K, N, 1, 2); break;
                default: mm_tile(xt, wt, yt, K, N, 1, 1);
                }
            }
        }
    }
}
#else
void matmul_nk_f32(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) { /* four rows per pass over W: past that the dots stall */
        int64_t m1 = m0 + 4 < M ? m0 + 4 : M;
        _Pragma("omp parallel for schedule(static)")
        for (int64_t o = 0; o < N; o++) {
            const float* wr = w + o * K;
            for (int64_t m = m0; m < m1; m++) {
                const float* xr = x + m * K;
                float s = 0.f;
                _Pragma("omp simd reduction(+:s)")
                for (int64_t i = 0; i < K; i++) s += xr[i] * wr[i];
                y[m * N + o] = s;
            }
        }
    }
}
#endif
