/* Fused CPU kernel for re-parameterised slide attention (Pan et al., CVPR 2023, Sec. 3.3).
 *
 * One pass per pixel and head over a channels-last qkv map: the ka*ka neighbour keys and values are
 * mixed by the merged depthwise convolution, scored against the query, soft-maxed over the slots and
 * summed, without ever writing the ka*ka-times expanded keys or values to memory (the torch path
 * writes and re-reads them, which makes it memory-bound on a CPU).
 *
 * Layouts (float32, contiguous):
 *   qkv   [B, H, W, nh, 3, hd]   per head [q | k | v], the reference's channel order
 *   wt    [ka2, ka2, hd]         wt[i][j][d]: weight of neighbour j in slot i for channel d
 *   bias  [ka2, hd]              bias of slot i for channel d
 *   table [nh, ka2]              the position table (added to the keys)
 *   out   [B, H, W, nh, hd]
 * Rows [row0, row1) of the B*H image rows are processed, so callers can split work across threads.
 * Specialised for ka = 3 (every reference config) and head_dim a multiple of 16: channels go in
 * 16-wide vectors, and the 9 neighbour vectors and 9 slot accumulators stay in registers.
 * Zero padding at the borders, as the reference: an outside neighbour is a zero key/value, and the
 * slot bias is still added.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define KA2 9
#define VL 16
#define MAX_HD 256
typedef float vec __attribute__((vector_size(VL * sizeof(float)), aligned(4)));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }
static inline float hsum(vec v) { float s = 0.f; for (int l = 0; l < VL; ++l) s += v[l]; return s; }

void slide_attention_rows(const float *qkv, const float *wt, const float *bias, const float *table,
                          float *out, int64_t B, int64_t H, int64_t W, int64_t nh, int64_t hd,
                          float scale, int64_t row0, int64_t row1) {
    (void)B;
    const int64_t C3 = 3 * nh * hd;
    static const float zeros[MAX_HD];
    const float *kn[KA2], *vn[KA2];
    for (int64_t row = row0; row < row1; ++row) {
        const int64_t b = row / H, y = row % H;
        for (int64_t x = 0; x < W; ++x) {
            for (int64_t h = 0; h < nh; ++h) {
                const float *px = qkv + ((b * H + y) * W + x) * C3 + h * 3 * hd;
                for (int j = 0; j < KA2; ++j) {
                    const int64_t yy = y + j / 3 - 1, xx = x + j % 3 - 1;
                    if (yy < 0 || yy >= H || xx < 0 || xx >= W) {
                        kn[j] = zeros;   /* zero padding: an outside neighbour is a zero key/value */
                        vn[j] = zeros;
                    } else {
                        const float *nb = qkv + ((b * H + yy) * W + xx) * C3 + h * 3 * hd;
                        kn[j] = nb + hd;
                        vn[j] = nb + 2 * hd;
                    }
                }
                vec score[KA2] = {0};
                vec qsum = {0};
                for (int64_t d = 0; d < hd; d += VL) {
                    const vec q = load(px + d) * scale;
                    vec k[KA2];
                    for (int j = 0; j < KA2; ++j) k[j] = load(kn[j] + d);
                    qsum += q;
                    for (int i = 0; i < KA2; ++i) {
                        vec mixed = load(bias + i * hd + d);
                        for (int j = 0; j < KA2; ++j) mixed += load(wt + (i * KA2 + j) * hd + d) * k[j];
                        score[i] += q * mixed;
                    }
                }
                const float qs = hsum(qsum);
                float a[KA2], top = -INFINITY, total = 0.f;
                for (int i = 0; i < KA2; ++i) {
                    a[i] = hsum(score[i]) + table[h * KA2 + i] * qs;   /* the table is added to the keys */
                    if (a[i] > top) top = a[i];
                }
                for (int i = 0; i < KA2; ++i) { a[i] = expf(a[i] - top); total += a[i]; }
                for (int i = 0; i < KA2; ++i) a[i] /= total;
                /* out = sum_i a_i bias_i + sum_j v_j * (sum_i a_i w_ij): the mixed values are never formed */
                float *dst = out + ((b * H + y) * W + x) * nh * hd + h * hd;
                for (int64_t d = 0; d < hd; d += VL) {
                    vec o = {0};
                    for (int i = 0; i < KA2; ++i) o += a[i] * load(bias + i * hd + d);
                    for (int j = 0; j < KA2; ++j) {
                        vec c = {0};
                        for (int i = 0; i < KA2; ++i) c += a[i] * load(wt + (i * KA2 + j) * hd + d);
                        o += c * load(vn[j] + d);
                    }
                    store(dst + d, o);
                }
            }
        }
    }
}
