/* Every decoder layer of one decode step in one call (kvcache.models.fused_decode).
 *
 * A decode step of a small model runs about a dozen small operations per layer; called one
 * by one from Python, each pays the interpreter's and torch's dispatch, a few microseconds
 * apiece, a large share of a step whose weights stream in a few milliseconds. Here the
 * layer loop runs in C and calls the same kernels in the same order as
 * `LlamaModel.forward`'s decode path, so its result is bit-identical to it:
 *
 *   h = rms_norm(x); qkv = h @ Wqkv^T; rotate q and k; write k, v to their slots;
 *   o = attention over each row's blocks; x += o @ Wo^T;
 *   h = rms_norm(x); x += silu_mul(h @ Wgu^T) @ Wdown^T
 *
 * Weights: packed matrices (qlinear.c). K/V: float paged storage (L, Hkv, slots, D), read
 * in place (decode_attn in kernels.c). x (B, H) is updated in place; fp32 or bf16 (io_bf16),
 * the residual sum rounded to bf16 once per add, as torch's bf16 add does.
 *
 * layers: (L, DL_FIELDS) int64 per layer: attn_norm, qkv codes, qkv format, o codes,
 * o format, mlp_norm, gate_up codes, gate_up format, down codes, down format, activation digits
 * of the four matrices (qlinear.c).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

enum { DL_ATTN_NORM, DL_QKV, DL_QKV_FMT, DL_O, DL_O_FMT, DL_MLP_NORM, DL_GU, DL_GU_FMT, DL_DOWN, DL_DOWN_FMT,
       DL_DIGITS, DL_FIELDS };

/* kernels.c and qlinear.c, compiled into the same library */
void ql_matmul(const void* x, const uint8_t* w, void* y, int64_t M, int64_t K, int64_t N, int64_t ldy, int fmt,
               int digits, int io_bf16);
void rms_norm_f32(const float* x, const float* w, float* out, int64_t rows, int64_t n, float eps);
void rms_norm_bf16(const bf16* x, const bf16* w, bf16* out, int64_t rows, int64_t n, float eps);
void rotary_f32(float* x, const float* cos_t, const float* sin_t, const int64_t* pos, int64_t rows,
                int64_t heads_total, int64_t n_rot, int64_t D);
void rotary_bf16(bf16* x, const bf16* cos_t, const bf16* sin_t, const int64_t* pos, int64_t rows,
                 int64_t heads_total, int64_t n_rot, int64_t D);
void silu_mul_f32(const float* gu, float* out, int64_t rows, int64_t inter);
void silu_mul_bf16(const bf16* gu, bf16* out, int64_t rows, int64_t inter);
void decode_attn_f32(const float* q, float* out, const float* k, const float* v, const int32_t* table,
                     const int64_t* lo, const int64_t* hi, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t NB,
                     int64_t bs, int64_t row_stride, int64_t head_stride, float scale, const float* qs,
                     const int64_t* sink_end, const int64_t* gap_end);
void decode_attn_bf16(const bf16* q, bf16* out, const bf16* k, const bf16* v, const int32_t* table,
                      const int64_t* lo, const int64_t* hi, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t NB,
                      int64_t bs, int64_t row_stride, int64_t head_stride, float scale, const bf16* qs,
                      const int64_t* sink_end, const int64_t* gap_end);

int64_t dl_fields(void) { return DL_FIELDS; }

static void rms_norm(const void* x, const void* w, void* out, int64_t rows, int64_t n, float eps, int bf) {
    if (bf) rms_norm_bf16(x, w, out, rows, n, eps);
    else rms_norm_f32(x, w, out, rows, n, eps);
}

/* x += y, n elements */
static void add_into(void* x, const void* y, int64_t n, int bf) {
    if (bf) {
        bf16* a = x;
        const bf16* b = y;
        for (int64_t i = 0; i < n; i++) a[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
    } else {
        float* a = x;
        const float* b = y;
        for (int64_t i = 0; i < n; i++) a[i] += b[i];
    }
}

void dl_decode_layers(void* x, const int64_t* layers, int64_t L, int64_t B, int64_t H, int64_t Hq, int64_t Hkv,
                      int64_t D, int64_t I, float eps, float scale, const void* cos_t, const void* sin_t,
                      const int64_t* pos, void* k, void* v, int64_t layer_stride, int64_t head_stride,
                      const int64_t* slots, const int32_t* table, const int64_t* lo, const int64_t* hi, int64_t NB,
                      int64_t bs, int bf) {
    const int64_t es = bf ? 2 : 4, heads = Hq + 2 * Hkv;
    char* h = malloc((size_t)(B * H * es));              /* (B, H) normed input */
    char* qkv = malloc((size_t)(B * heads * D * es));    /* (B, Hq+2Hkv, D) */
    char* q = malloc((size_t)(B * Hq * D * es));         /* (B, Hq, D) */
    char* att = malloc((size_t)(B * Hq * D * es));       /* (B, Hq, D) */
    char* proj = malloc((size_t)(B * H * es));           /* (B, H) a projection back to the residual */
    char* gu = malloc((size_t)(B * 2 * I * es));         /* (B, 2I) [gate | up] */
    char* act = malloc((size_t)(B * I * es));            /* (B, I) */
    for (int64_t l = 0; l < L; l++) {
        const int64_t* w = layers + l * DL_FIELDS;
        char* kl = (char*)k + l * layer_stride * es;
        char* vl = (char*)v + l * layer_stride * es;
        rms_norm(x, (const void*)w[DL_ATTN_NORM], h, B, H, eps, bf);
        ql_matmul(h, (const uint8_t*)w[DL_QKV], qkv, B, H, heads * D, heads * D, (int)w[DL_QKV_FMT], (int)w[DL_DIGITS], bf);
        if (bf) rotary_bf16((bf16*)qkv, cos_t, sin_t, pos, B, heads, Hq + Hkv, D);
        else rotary_f32((float*)qkv, cos_t, sin_t, pos, B, heads, Hq + Hkv, D);
        for (int64_t b = 0; b < B; b++) {
            const char* row = qkv + b * heads * D * es;
            memcpy(q + b * Hq * D * es, row, (size_t)(Hq * D * es));
            for (int64_t j = 0; j < Hkv; j++) { /* this token's key and value to its slot */
                int64_t at = (j * head_stride + slots[b] * D) * es;
                memcpy(kl + at, row + (Hq + j) * D * es, (size_t)(D * es));
                memcpy(vl + at, row + (Hq + Hkv + j) * D * es, (size_t)(D * es));
            }
        }
        if (bf) decode_attn_bf16((bf16*)q, (bf16*)att, (bf16*)kl, (bf16*)vl, table, lo, hi, B, Hq, Hkv, D, NB, bs,
                                 0, head_stride, scale, NULL, NULL, NULL);
        else decode_attn_f32((float*)q, (float*)att, (float*)kl, (float*)vl, table, lo, hi, B, Hq, Hkv, D, NB, bs,
                             0, head_stride, scale, NULL, NULL, NULL);
        ql_matmul(att, (const uint8_t*)w[DL_O], proj, B, Hq * D, H, H, (int)w[DL_O_FMT], (int)w[DL_DIGITS], bf);
        add_into(x, proj, B * H, bf);
        rms_norm(x, (const void*)w[DL_MLP_NORM], h, B, H, eps, bf);
        ql_matmul(h, (const uint8_t*)w[DL_GU], gu, B, H, 2 * I, 2 * I, (int)w[DL_GU_FMT], (int)w[DL_DIGITS], bf);
        if (bf) silu_mul_bf16((bf16*)gu, (bf16*)act, B, I);
        else silu_mul_f32((float*)gu, (float*)act, B, I);
        ql_matmul(act, (const uint8_t*)w[DL_DOWN], proj, B, I, H, H, (int)w[DL_DOWN_FMT], (int)w[DL_DIGITS], bf);
        add_into(x, proj, B * H, bf);
    }
    free(h);
    free(qkv);
    free(q);
    free(att);
    free(proj);
    free(gu);
    free(act);
}
