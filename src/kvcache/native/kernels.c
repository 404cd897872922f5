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

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (bf16)(u >> 16);
}

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

#define SILU_MUL(NAME, T, LOAD, STORE)                                                      \
    void NAME(const T* gu, T* out, int64_t rows, int64_t inter) {                           \
        _Pragma("omp parallel for if(rows >= 16)")                                          \
        for (int64_t r = 0; r < rows; r++) {                                                \
            const T* g = gu + r * 2 * inter;                                                \
            const T* u = g + inter;                                                         \
            T* o = out + r * inter;                                                         \
            _Pragma("omp simd")                                                             \
            for (int64_t i = 0; i < inter; i++) {                                           \
                float a = LOAD(g[i]);                                                       \
                float silu = a / (1.0f + exp_approx(-a));                                   \
                o[i] = STORE(silu * LOAD(u[i]));                                            \
            }                                                                               \
        }                                                                                   \
    }

SILU_MUL(silu_mul_f32, float, ID, ID)
SILU_MUL(silu_mul_bf16, bf16, bf16_to_f32, f32_to_bf16)

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
    _Pragma("omp simd reduction(+:total)")
    for (int64_t i = 0; i < n; i++) { float e = exp_approx(sg[i] - m); sg[i] = e; total += e; }
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

#define DECODE_ATTN(NAME, T, LOAD, STORE)                                                   \
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

DECODE_ATTN(decode_attn_f32, float, ID, ID)
DECODE_ATTN(decode_attn_bf16, bf16, bf16_to_f32, f32_to_bf16)

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
