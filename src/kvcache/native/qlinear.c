/* Linear layers computed from packed weight codes (kvcache.models.quantized_linear).
 *
 * Weights are packed in tiles of 16 output rows by 32 inputs (one block): a tile's blocks
 * follow each other, so one thread streams a tile once per call, for every row of x. In a
 * block, each group of 4 consecutive inputs of the 16 outputs sits in 64 bytes, output j
 * at bytes 4j..4j+3: the layout of one 512-bit integer dot-product step (16 int32 lanes,
 * each the sum of 4 byte products).
 *
 * Formats (QL_* below; bytes per tile-block):
 *   Q4  (320): 4-bit codes q with a scale d and a minimum m per output and block,
 *              w = d * q + m (GGUF Q4_1; Q4_0 is d * (q - 8), i.e. m = -8d; our int4).
 *              Codes 0-255: 4 chunks of 64 bytes, chunk c holding inputs 8c..8c+3 in the low
 *              nibbles and 8c+4..8c+7 in the high ones; then 16 fp16 d, then 16 fp16 m.
 *   Q8  (544): signed 8-bit codes, w = d * q (GGUF Q8_0): 8 chunks of 64 bytes (chunk c:
 *              inputs 4c..4c+3), then 16 fp16 d.
 *   I8  (512): signed 8-bit codes with one fp32 scale per output row (our int8): the blocks'
 *              8 chunks each, and after a tile's last block its 16 fp32 scales (64 bytes).
 *
 * Activations are quantized per row and block of 32 to int8 (scale amax / 127, round to
 * nearest even), as the dot products need; each block's integer sum is scaled in fp32. With
 * two digits (the caller's choice: our int8 quantization takes them) each row also gets its
 * rounding residual as a second int8 row over the same weight bytes, so activations are
 * carried almost exactly at twice the integer work and no more weight traffic.
 * Paths: AVX-512 VNNI (vpdpbusd), AVX2 (vpmaddubsw), plain C; all compute the same integer
 * sums, so they differ only in the order of the fp32 additions.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QL_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QL_AVX2 1
#include <immintrin.h>
#endif

enum { QL_Q4 = 0, QL_Q8 = 1, QL_I8 = 2 };
#define QL_TILE 16
#define QL_BLOCK 32
#define QL_ROWS 8 /* rows of x per pass over a tile (registers hold their sums) */

static inline int64_t ql_block_bytes(int fmt) { return fmt == QL_Q4 ? 320 : (fmt == QL_Q8 ? 544 : 512); }

/* Bytes of one tile (16 outputs, nb blocks). */
int64_t ql_tile_bytes(int fmt, int64_t nb) { return nb * ql_block_bytes(fmt) + (fmt == QL_I8 ? 64 : 0); }

/* Which vector path this build runs: 2 AVX-512 VNNI, 1 AVX2, 0 plain C. */
int ql_isa(void) {
#if defined(QL_AVX512)
    return 2;
#elif defined(QL_AVX2)
    return 1;
#else
    return 0;
#endif
}

static inline float ql_half(uint16_t h) { /* IEEE fp16 -> fp32 */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    u = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- Activations: x (M, K) fp32 or bf16 -> xq (M * digits, nb*32) int8 (zero past K); per
 * block the scale xd = amax / 127, the code sum xs and xds = xd * xs. With digits = 2 (int8
 * weights), row 2r + 1 holds a second digit: the block's rounding residual x - xd * q,
 * quantized the same way, so that the two rows together carry x to within amax / 64516
 * (one digit: amax / 254). --------------------------------------------------------------------- */
static inline void ql_quantize_block(const float* v, int8_t* q, float* xd, int32_t* xs, float* xds) {
    float amax = 0.f;
    for (int i = 0; i < QL_BLOCK; i++) amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
    float id = amax > 0.f ? 127.f / amax : 0.f;
    if (!(id < INFINITY)) id = 0.f; /* amax below ~3.7e-37: 127 / amax overflows; the block counts as zero */
    float d = id > 0.f ? amax / 127.f : 0.f;
    int32_t s = 0;
    for (int i = 0; i < QL_BLOCK; i++) {
        int32_t c = (int32_t)nearbyintf(v[i] * id);
        q[i] = (int8_t)c;
        s += c;
    }
    *xd = d;
    *xs = s;
    *xds = d * (float)s;
}

static void ql_quantize_rows(const void* x, int bf16_in, int64_t M, int64_t K, int64_t nb, int digits, int8_t* xq,
                             float* xd, float* xds, int32_t* xs) {
    _Pragma("omp parallel for schedule(static) if (M * K > 65536)")
    for (int64_t r = 0; r < M; r++) {
        float buf[QL_BLOCK];
        for (int64_t b = 0; b < nb; b++) {
            int64_t k0 = b * QL_BLOCK, n = K - k0 < QL_BLOCK ? K - k0 : QL_BLOCK;
            for (int64_t i = 0; i < QL_BLOCK; i++)
                buf[i] = i >= n ? 0.f : bf16_in ? bf16_to_f32(((const bf16*)x)[r * K + k0 + i])
                                                : ((const float*)x)[r * K + k0 + i];
            for (int g = 0; g < digits; g++) {
                int64_t row = r * digits + g, i = row * nb + b;
                int8_t* q = xq + row * nb * QL_BLOCK + k0;
                ql_quantize_block(buf, q, xd + i, xs + i, xds + i);
                if (g + 1 < digits) /* what the next digit carries (d * q is exact in double) */
                    for (int e = 0; e < QL_BLOCK; e++) buf[e] = (float)((double)buf[e] - (double)xd[i] * (double)q[e]);
            }
        }
    }
}

/* Quantize x as the matmul does (for tests): xq (M * digits, nb*32), xd and xs (M * digits, nb). */
void ql_quantize_activations(const void* x, int bf16_in, int64_t M, int64_t K, int digits, int8_t* xq, float* xd,
                             int32_t* xs) {
    int64_t nb = (K + QL_BLOCK - 1) / QL_BLOCK;
    float* xds = malloc(sizeof(float) * M * digits * nb);
    ql_quantize_rows(x, bf16_in, M, K, nb, digits, xq, xd, xds, xs);
    free(xds);
}

/* The R x 16 fp32 results of one tile, written to y (row stride ldy) for its n valid outputs. */
static inline void ql_store(const float* acc, int R, void* y, int bf16_out, int64_t ldy, int64_t o0, int64_t n) {
    for (int r = 0; r < R; r++)
        for (int64_t j = 0; j < n; j++) {
            if (bf16_out) ((uint16_t*)y)[r * ldy + o0 + j] = f32_to_bf16(acc[r * QL_TILE + j]);
            else ((float*)y)[r * ldy + o0 + j] = acc[r * QL_TILE + j];
        }
}

#if defined(QL_AVX512)
/* One tile against R rows of quantized x; acc (R x 16) receives the fp32 sums. The weight
 * chunks are loaded once for all R rows; each row's 4 activation bytes are broadcast. */
static inline __attribute__((always_inline)) void ql_tile(int fmt, const uint8_t* wt, int64_t nb, const int8_t* xq,
                                                          const float* xd, const float* xds, const int32_t* xs,
                                                          int64_t xstride, const int R, float* out) {
    __m512 acc[QL_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8((char)0x80);
    const int64_t bb = ql_block_bytes(fmt);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = wt + b * bb;
        __m512i s[QL_ROWS];
        for (int r = 0; r < R; r++) s[r] = _mm512_setzero_si512();
        if (fmt == QL_Q4) {
            for (int c = 0; c < 4; c++) {
                __m512i v = _mm512_loadu_si512(blk + 64 * c);
                __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                for (int r = 0; r < R; r++) {
                    const int32_t* xr = (const int32_t*)(xq + r * xstride + b * QL_BLOCK + 8 * c);
                    s[r] = _mm512_dpbusd_epi32(s[r], lo, _mm512_set1_epi32(xr[0]));
                    s[r] = _mm512_dpbusd_epi32(s[r], hi, _mm512_set1_epi32(xr[1]));
                }
            }
            __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 256)));
            __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 288)));
            for (int r = 0; r < R; r++) {
                int64_t i = r * nb + b;
                __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(xd[i]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), ds, acc[r]);
                acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xds[i]), acc[r]);
            }
        } else {
            for (int c = 0; c < 8; c++) {
                /* codes + 128 as unsigned bytes: the sum gains 128 * (sum of x codes), taken off below */
                __m512i v = _mm512_xor_si512(_mm512_loadu_si512(blk + 64 * c), flip);
                for (int r = 0; r < R; r++) {
                    const int32_t* xr = (const int32_t*)(xq + r * xstride + b * QL_BLOCK + 4 * c);
                    s[r] = _mm512_dpbusd_epi32(s[r], v, _mm512_set1_epi32(xr[0]));
                }
            }
            if (fmt == QL_Q8) {
                __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 512)));
                for (int r = 0; r < R; r++) {
                    int64_t i = r * nb + b;
                    __m512i t = _mm512_sub_epi32(s[r], _mm512_set1_epi32(128 * xs[i]));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(d, _mm512_set1_ps(xd[i])), acc[r]);
                }
            } else {
                for (int r = 0; r < R; r++) {
                    int64_t i = r * nb + b;
                    __m512i t = _mm512_sub_epi32(s[r], _mm512_set1_epi32(128 * xs[i]));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(xd[i]), acc[r]);
                }
            }
        }
    }
    if (fmt == QL_I8) {
        __m512 sc = _mm512_loadu_ps((const float*)(wt + nb * bb));
        for (int r = 0; r < R; r++) acc[r] = _mm512_mul_ps(acc[r], sc);
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + r * QL_TILE, acc[r]);
}

#elif defined(QL_AVX2)
/* AVX2: each half tile (8 outputs, 32 bytes of a chunk) in turn. Q4 codes (0..15) times int8
 * activations through vpmaddubsw cannot saturate, and a block's eight 16-bit partial sums
 * stay below 2^15 (8 * 2 * 15 * 127); Q8/I8 codes go in as |q| with the activation's sign
 * flipped where q < 0 (|q| <= 128: a pair stays within 2 * 128 * 127 < 2^15). */
static inline __attribute__((always_inline)) void ql_tile(int fmt, const uint8_t* wt, int64_t nb, const int8_t* xq,
                                                          const float* xd, const float* xds, const int32_t* xs,
                                                          int64_t xstride, const int R, float* out) {
    (void)xs;
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const int64_t bb = ql_block_bytes(fmt);
    for (int h = 0; h < 2; h++) {
        __m256 acc[QL_ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t* blk = wt + b * bb;
            __m256i s[QL_ROWS];
            if (fmt == QL_Q4) {
                __m256i p16[QL_ROWS];
                for (int r = 0; r < R; r++) p16[r] = _mm256_setzero_si256();
                for (int c = 0; c < 4; c++) {
                    __m256i v = _mm256_loadu_si256((const __m256i*)(blk + 64 * c + 32 * h));
                    __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    for (int r = 0; r < R; r++) {
                        const int32_t* xr = (const int32_t*)(xq + r * xstride + b * QL_BLOCK + 8 * c);
                        p16[r] = _mm256_add_epi16(p16[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xr[0])));
                        p16[r] = _mm256_add_epi16(p16[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xr[1])));
                    }
                }
                for (int r = 0; r < R; r++) s[r] = _mm256_madd_epi16(p16[r], ones);
                __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 256 + 16 * h)));
                __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 288 + 16 * h)));
                for (int r = 0; r < R; r++) {
                    int64_t i = r * nb + b;
                    __m256 ds = _mm256_mul_ps(d, _mm256_set1_ps(xd[i]));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), ds, acc[r]);
                    acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xds[i]), acc[r]);
                }
            } else {
                for (int r = 0; r < R; r++) s[r] = _mm256_setzero_si256();
                for (int c = 0; c < 8; c++) {
                    __m256i v = _mm256_loadu_si256((const __m256i*)(blk + 64 * c + 32 * h));
                    __m256i a = _mm256_abs_epi8(v);
                    for (int r = 0; r < R; r++) {
                        const int32_t* xr = (const int32_t*)(xq + r * xstride + b * QL_BLOCK + 4 * c);
                        __m256i xv = _mm256_sign_epi8(_mm256_set1_epi32(xr[0]), v);
                        s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, xv), ones));
                    }
                }
                __m256 d = fmt == QL_Q8 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 512 + 16 * h)))
                                        : _mm256_set1_ps(1.f);
                for (int r = 0; r < R; r++) {
                    __m256 ds = _mm256_mul_ps(d, _mm256_set1_ps(xd[r * nb + b]));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), ds, acc[r]);
                }
            }
        }
        if (fmt == QL_I8) {
            __m256 sc = _mm256_loadu_ps((const float*)(wt + nb * bb) + 8 * h);
            for (int r = 0; r < R; r++) acc[r] = _mm256_mul_ps(acc[r], sc);
        }
        for (int r = 0; r < R; r++) _mm256_storeu_ps(out + r * QL_TILE + 8 * h, acc[r]);
    }
}

#else
/* Plain C: the same integer sums per block. */
static inline void ql_tile(int fmt, const uint8_t* wt, int64_t nb, const int8_t* xq, const float* xd,
                           const float* xds, const int32_t* xs, int64_t xstride, const int R, float* out) {
    const int64_t bb = ql_block_bytes(fmt);
    for (int r = 0; r < R; r++)
        for (int j = 0; j < QL_TILE; j++) {
            float acc = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t* blk = wt + b * bb;
                const int8_t* x = xq + r * xstride + b * QL_BLOCK;
                int32_t s = 0;
                int64_t i = r * nb + b;
                if (fmt == QL_Q4) {
                    for (int c = 0; c < 4; c++)
                        for (int e = 0; e < 4; e++) {
                            uint8_t v = blk[64 * c + 4 * j + e];
                            s += (v & 15) * x[8 * c + e] + (v >> 4) * x[8 * c + 4 + e];
                        }
                    const uint16_t* dm = (const uint16_t*)(blk + 256);
                    acc += (float)s * (ql_half(dm[j]) * xd[i]) + ql_half(dm[16 + j]) * xds[i];
                } else {
                    for (int c = 0; c < 8; c++)
                        for (int e = 0; e < 4; e++) s += (int8_t)blk[64 * c + 4 * j + e] * x[4 * c + e];
                    float d = fmt == QL_Q8 ? ql_half(((const uint16_t*)(blk + 512))[j]) : 1.f;
                    acc += (float)s * (d * xd[i]);
                }
            }
            if (fmt == QL_I8) acc *= ((const float*)(wt + nb * bb))[j];
            out[r * QL_TILE + j] = acc;
        }
    (void)xs;
}
#endif

/* y (M, N) [row stride ldy] = x (M, K) @ W^T for W packed in `fmt` tiles (N rounded up to 16
 * rows, K to 32 inputs), x's activations quantized to `digits` (1 or 2) int8 digits per row. x and y
 * are fp32, or bf16 where io_bf16. Threads split the tiles;
 * each streams its tiles once, QL_ROWS rows of x at a time (a tile stays in cache between). */
void ql_matmul(const void* x, const uint8_t* w, void* y, int64_t M, int64_t K, int64_t N, int64_t ldy, int fmt,
               int digits, int io_bf16) {
    int64_t nb = (K + QL_BLOCK - 1) / QL_BLOCK, tiles = (N + QL_TILE - 1) / QL_TILE, tb = ql_tile_bytes(fmt, nb);
    int64_t xstride = nb * QL_BLOCK;
    const int64_t Mq = M * digits;
    int8_t* xq = aligned_alloc(64, ((Mq * xstride + 63) / 64) * 64);
    float* xd = malloc(sizeof(float) * Mq * nb);
    float* xds = malloc(sizeof(float) * Mq * nb);
    int32_t* xs = malloc(sizeof(int32_t) * Mq * nb);
    ql_quantize_rows(x, io_bf16, M, K, nb, digits, xq, xd, xds, xs);
    _Pragma("omp parallel for schedule(static)")
    for (int64_t t = 0; t < tiles; t++) {
        float out[QL_ROWS * QL_TILE];
        const uint8_t* wt = w + t * tb;
        int64_t o0 = t * QL_TILE, n = N - o0 < QL_TILE ? N - o0 : QL_TILE;
        for (int64_t r0 = 0; r0 < Mq; r0 += QL_ROWS) { /* QL_ROWS is even: a row's digits share a pass */
            int R = Mq - r0 < QL_ROWS ? (int)(Mq - r0) : QL_ROWS;
            const int8_t* xr = xq + r0 * xstride;
            const float *dr = xd + r0 * nb, *dsr = xds + r0 * nb;
            const int32_t* sr = xs + r0 * nb;
            switch (R) { /* constant row counts: the sums stay in registers */
            case 8: ql_tile(fmt, wt, nb, xr, dr, dsr, sr, xstride, 8, out); break;
            case 7: ql_tile(fmt, wt, nb, xr, dr, dsr, sr, xstride, 7, out); break;
            case 6: ql_tile(fmt, wt, nb, xr, dr, dsr, sr, xstride, 6, out); break;
            case 5: ql_tile(fmt, wt, nb, xr, dr, dsr, sr, xstride, 5, out); break;
            case 4: ql_tile(fmt, wt, nb, xr, dr, dsr, sr, xstride, 4, out); break;
            case 3: ql_tile(fmt, wt, nb, xr, dr, dsr, sr, xstride, 3, out); break;
            case 2: ql_tile(fmt, wt, nb, xr, dr, dsr, sr, xstride, 2, out); break;
            default: ql_tile(fmt, wt, nb, xr, dr, dsr, sr, xstride, 1, out);
            }
            if (digits == 2) /* a row's result: its two digits' sums added */
                for (int r = 0; r < R / 2; r++)
                    for (int j = 0; j < QL_TILE; j++) out[r * QL_TILE + j] = out[2 * r * QL_TILE + j] + out[(2 * r + 1) * QL_TILE + j];
            int64_t y0 = r0 / digits;
            void* yr = io_bf16 ? (void*)((uint16_t*)y + y0 * ldy) : (void*)((float*)y + y0 * ldy);
            ql_store(out, R / digits, yr, io_bf16, ldy, o0, n);
        }
    }
    free(xq);
    free(xd);
    free(xds);
    free(xs);
}

/* The weights of output rows ids[0..n) (all N rows where ids is NULL), dequantized into out
 * (n, K) fp32 or bf16: embedding lookups and the float weight of long prompts. */
void ql_dequantize(const uint8_t* w, int fmt, int64_t K, int64_t N, const int64_t* ids, int64_t n, void* out,
                   int bf16_out) {
    int64_t nb = (K + QL_BLOCK - 1) / QL_BLOCK, tb = ql_tile_bytes(fmt, nb), bb = ql_block_bytes(fmt);
    if (ids == NULL) n = N;
    _Pragma("omp parallel for schedule(static) if (n * K > 65536)")
    for (int64_t i = 0; i < n; i++) {
        int64_t id = ids ? ids[i] : i, j = id % QL_TILE;
        const uint8_t* wt = w + (id / QL_TILE) * tb;
        float sc = fmt == QL_I8 ? ((const float*)(wt + nb * bb))[j] : 1.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t* blk = wt + b * bb;
            float v[QL_BLOCK];
            if (fmt == QL_Q4) {
                const uint16_t* dm = (const uint16_t*)(blk + 256);
                float d = ql_half(dm[j]), m = ql_half(dm[16 + j]);
                for (int c = 0; c < 4; c++)
                    for (int e = 0; e < 4; e++) {
                        uint8_t q = blk[64 * c + 4 * j + e];
                        v[8 * c + e] = d * (float)(q & 15) + m;
                        v[8 * c + 4 + e] = d * (float)(q >> 4) + m;
                    }
            } else {
                float d = fmt == QL_Q8 ? ql_half(((const uint16_t*)(blk + 512))[j]) : sc;
                for (int c = 0; c < 8; c++)
                    for (int e = 0; e < 4; e++) v[4 * c + e] = d * (float)(int8_t)blk[64 * c + 4 * j + e];
            }
            int64_t k0 = b * QL_BLOCK, cnt = K - k0 < QL_BLOCK ? K - k0 : QL_BLOCK;
            for (int64_t e = 0; e < cnt; e++) {
                if (bf16_out) ((uint16_t*)out)[i * K + k0 + e] = f32_to_bf16(v[e]);
                else ((float*)out)[i * K + k0 + e] = v[e];
            }
        }
    }
}
