/* Error-compensated int8 rounding of a block of weight columns (kvcache.models.calibrated_int8).
 *
 * blk (C, N): C consecutive input columns of a weight, one row per input, N outputs along a row.
 * Rows are rounded in turn, q = clamp(round(w * inv), -127, 127), and each row's error
 * e = (w - q * scale) / u[j][j] is carried onto the rows after it in the block,
 * w[l] -= u[j][l] * e (u: the upper Cholesky factor of H^-1, row stride ldu, starting at the
 * block's first column). Outputs are independent, so threads split them; torch pays an
 * operator dispatch per row for the same loop. err (C, N) receives the carried errors (the
 * caller updates the columns past the block with them in one matrix product).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>

void rc_round_block(float* blk, const float* u, int64_t ldu, int64_t C, int64_t N, const float* scale,
                    const float* inv, int8_t* codes, float* err) {
    _Pragma("omp parallel for schedule(static)")
    for (int64_t i0 = 0; i0 < N; i0 += 64) {
        int64_t i1 = N - i0 < 64 ? N : i0 + 64;
        for (int64_t j = 0; j < C; j++) {
            const float* uj = u + j * ldu;
            float* row = blk + j * N;
            float* e = err + j * N;
            for (int64_t i = i0; i < i1; i++) {
                float q = nearbyintf(row[i] * inv[i]);
                q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);
                codes[j * N + i] = (int8_t)q;
                e[i] = (row[i] - q * scale[i]) / uj[j];
            }
            for (int64_t l = j + 1; l < C; l++) {
                float ul = uj[l];
                float* rl = blk + l * N;
                for (int64_t i = i0; i < i1; i++) rl[i] -= ul * e[i];
            }
        }
    }
}
