/* Fused CPU loops for task arithmetic and TIES (see native.py, which compiles and calls them).
 *
 * Each function does in one pass over memory what the torch path (task_arithmetic.py) does in about
 * thirty element-wise passes per block, with the same float32 operations in the same order, so the
 * results are bit-identical to it: compiled without -ffast-math and with -ffp-contract=off (no fused
 * multiply-adds, no reassociation). Masks multiply as 1.0 / 0.0, as in torch (so −x·0 = −0, NaN·0 = NaN).
 * Work goes through chunks of CH elements that stay in L1, with GCC/Clang vector types (8 lanes), so
 * the selects run as SIMD blends instead of unpredictable branches.
 *
 * dtype codes: 0 = float32, 1 = bfloat16, 2 = float16 (only when the compiler has _Float16).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define CH 1024
#define VL 8
#define MAXT 64

typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }
static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }
static inline vf ones(vi mask) { return (vf)(mask & (vi)splat(1.0f)); }  /* 1.0 where set, else +0.0 */
static inline vf pick(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

int sm_abi(void) { return 4; }

int sm_has_f16(void) {
#ifdef __FLT16_MAX__
    return 1;
#else
    return 0;
#endif
}

/* dst[0, len) from src[off, off + len), as float32; dst[len, CH) = 0 (whole vectors stay defined). */
static void load(float *restrict dst, const void *src, int dt, int64_t off, int len) {
    if (dt == F32) {
        memcpy(dst, (const float *)src + off, (size_t)len * sizeof(float));
    } else if (dt == BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        uint32_t *d = (uint32_t *)dst;
        for (int j = 0; j < len; j++) d[j] = (uint32_t)s[j] << 16;  /* exact */
    }
#ifdef __FLT16_MAX__
    else {
        const _Float16 *s = (const _Float16 *)src + off;
        for (int j = 0; j < len; j++) dst[j] = (float)s[j];  /* exact */
    }
#endif
    if (len < CH) memset(dst + len, 0, (size_t)(CH - len) * sizeof(float));
}

static void store(void *dst, int dt, int64_t off, const float *restrict src, int len) {
    if (dt == F32) {
        memcpy((float *)dst + off, src, (size_t)len * sizeof(float));
    } else if (dt == BF16) {  /* round to nearest even, as torch does */
        const uint32_t *s = (const uint32_t *)src;
        uint16_t *d = (uint16_t *)dst + off;
        for (int j = 0; j < len; j++) {
            uint32_t u = s[j];
            uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
            d[j] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : r;
        }
    }
#ifdef __FLT16_MAX__
    else {
        _Float16 *d = (_Float16 *)dst + off;
        for (int j = 0; j < len; j++) d[j] = (_Float16)src[j];
    }
#endif
}

/* τ for one chunk: src − base, or src itself when has_base is 0 (a precomputed task vector). */
static void tau(float *restrict d, const float *restrict bb, const void *src, int dt, int has_base, int64_t off,
                int len) {
    load(d, src, dt, off, len);
    if (has_base)
        for (int j = 0; j < len; j++) d[j] = d[j] - bb[j];
}

/* The top-k bracket pass: counts |τ| above `hi` (NaN counts as above, as in the torch path) and copies
 * the |τ| within [lo, hi] into `inside` (at most `cap`); returns how many were within. */
int64_t sm_bracket(int64_t n, const void *src, int src_dt, const void *base, int base_dt, float lo, float hi,
                   float *inside, int64_t cap, int64_t *above_out) {
    float d[CH] __attribute__((aligned(32))), bb[CH] __attribute__((aligned(32)));
    int64_t above = 0, cnt = 0;
    const vf vhi = splat(hi), vlo = splat(lo);
    for (int64_t s = 0; s < n; s += CH) {
        int len = (int)(n - s < CH ? n - s : CH);
        if (base) load(bb, base, base_dt, s, len);
        tau(d, bb, src, src_dt, base != NULL, s, len);
        int64_t na = 0, wi = 0;
        if (len == CH) {
            vi not_above = {0}, within = {0};
            for (int j = 0; j < CH; j += VL) {
                vf m = vabs(vload(d + j));
                vstore(d + j, m);
                vi le = m <= vhi;  /* −1 where true */
                not_above += le;
                within += le & (m >= vlo);
            }
            for (int k = 0; k < VL; k++) {
                na -= not_above[k];
                wi -= within[k];
            }
        } else {  /* the last, partial chunk: its zero padding must not be counted */
            for (int j = 0; j < len; j++) {
                d[j] = fabsf(d[j]);
                na += d[j] <= hi;
                wi += (d[j] <= hi) & (d[j] >= lo);
            }
        }
        above += len - na;
        if (wi == 0) continue;
        if (cnt + len <= cap) {
            for (int j = 0; j < len; j++) {  /* branch-free compaction */
                inside[cnt] = d[j];
                cnt += (d[j] >= lo) & (d[j] <= hi);
            }
        } else {
            for (int j = 0; j < len; j++)
                if (d[j] >= lo && d[j] <= hi) {
                    if (cnt < cap) inside[cnt] = d[j];
                    cnt++;
                }
        }
    }
    *above_out = above;
    return cnt;
}

/* TIES trim of one chunk in place: keep |τ| >= thr (inclusive), or |τ| > thr plus the first `*short_`
 * entries equal to thr in index order (counting). Lanes at and after len are zero padding. */
static void trim(float *restrict d, int len, float thr, int64_t *short_) {
    const vf t = splat(thr);
    int64_t s = *short_;
    int inclusive = s < 0;
    if (s > 0) {
        vi eq = {0};
        for (int j = 0; j < CH; j += VL) eq += vabs(vload(d + j)) == t;
        int64_t ties = 0;
        for (int k = 0; k < VL; k++) ties -= eq[k];
        if (thr == 0.0f) ties -= CH - len;  /* the padding's zeros */
        if (ties <= s) {
            inclusive = 1;
            *short_ = s - ties;
        } else {  /* the one chunk where the admitted ties run out */
            for (int j = 0; j < len; j++) {
                float m = fabsf(d[j]);
                float keep = m > thr ? 1.0f : 0.0f;
                if (m == thr && s > 0) {
                    keep = 1.0f;
                    s--;
                }
                d[j] = d[j] * keep;
            }
            *short_ = s;
            return;
        }
    }
    if (inclusive)
        for (int j = 0; j < CH; j += VL) {
            vf v = vload(d + j);
            vstore(d + j, v * ones(vabs(v) >= t));
        }
    else
        for (int j = 0; j < CH; j += VL) {
            vf v = vload(d + j);
            vstore(d + j, v * ones(vabs(v) > t));
        }
}

/* θ_base + λ · Σ m_i ⊙ w_i·τ̃_i / D over n elements (the torch path's `combine`, fused).
 * trims[t]: 0 = no sparsifier, 1 = magnitude trim with thr[t] and short_[t] (−1: inclusive).
 * divide: 0 = none, 1 = by fixed_div, 2 = disjoint mean (consensus), its divisors clamped to at least
 * `floor` when floor > 0, else zeros set to 1. Returns 0, −1 for more than MAXT task vectors, −2 when
 * out of memory. */
int sm_combine(int64_t n, const void *base, int base_dt, int nt, const void *const *src, const int *src_dt,
               int has_base, const float *w, const int *trims, const float *thr, int64_t *short_, int consensus,
               int divide, float fixed_div, float floor, int scale, float lam, void *out, int out_dt) {
    if (nt > MAXT || nt < 1) return -1;
    float(*d)[CH] = aligned_alloc(32, sizeof(float[CH]) * (size_t)nt);
    if (!d) return -2;
    float bb[CH] __attribute__((aligned(32))), mixed[CH] __attribute__((aligned(32)));
    float div[CH] __attribute__((aligned(32))), sign[CH] __attribute__((aligned(32)));
    const vf zero = splat(0.0f), one = splat(1.0f), minus = splat(-1.0f), vfloor = splat(floor);
    for (int64_t s = 0; s < n; s += CH) {
        int len = (int)(n - s < CH ? n - s : CH);
        load(bb, base, base_dt, s, len);
        for (int t = 0; t < nt; t++) {
            float *restrict dt = d[t];
            tau(dt, bb, src[t], src_dt[t], has_base, s, len);
            if (trims[t]) trim(dt, len, thr[t], &short_[t]);
            const vf wt = splat(w[t]);
            for (int j = 0; j < CH; j += VL) vstore(dt + j, vload(dt + j) * wt);
        }
        memcpy(mixed, d[0], sizeof mixed);
        for (int t = 1; t < nt; t++)
            for (int j = 0; j < CH; j += VL) vstore(mixed + j, vload(mixed + j) + vload(d[t] + j));
        if (consensus) {
            for (int j = 0; j < CH; j += VL)  /* the elected sign: +1 where Σ w_i·τ̃_i ≥ 0, else −1 */
                vstore(sign + j, pick(vload(mixed + j) >= zero, one, minus));
            for (int t = 0; t < nt; t++) {  /* sums and weights of the entries that agree with it */
                const float *restrict dt = d[t];
                const vf wt = splat(w[t]);
                for (int j = 0; j < CH; j += VL) {
                    vf v = vload(dt + j);
                    vf agree = ones(v * vload(sign + j) > zero);
                    if (t == 0) {
                        vstore(mixed + j, v * agree);
                        vstore(div + j, agree * wt);
                    } else {
                        vstore(mixed + j, vload(mixed + j) + v * agree);
                        vstore(div + j, vload(div + j) + agree * wt);
                    }
                }
            }
            if (divide == 2)
                for (int j = 0; j < CH; j += VL) {
                    vf q = vload(div + j);
                    q = floor > 0.0f ? pick(q < vfloor, vfloor, q) : pick(q == zero, one, q);
                    vstore(mixed + j, vload(mixed + j) / q);
                }
        } else if (divide == 1) {
            const vf q = splat(fixed_div);
            for (int j = 0; j < CH; j += VL) vstore(mixed + j, vload(mixed + j) / q);
        }
        if (scale) {
            const vf l = splat(lam);
            for (int j = 0; j < CH; j += VL) vstore(mixed + j, vload(mixed + j) * l);
        }
        for (int j = 0; j < CH; j += VL) vstore(mixed + j, vload(mixed + j) + vload(bb + j));
        store(out, out_dt, s, mixed, len);
    }
    free(d);
    return 0;
}

/* SLERP's statistics: Σa², Σb², Σab in float64 (products of float32 values are exact in float64), in
 * a fixed order: eight running sums, one per lane, added pairwise at the end; deterministic whatever
 * the memory alignment, thread count or vector width (BLAS dot products are not). */
void sm_dots(int64_t n, const void *a, int a_dt, const void *b, int b_dt, double *out3) {
    float x[CH] __attribute__((aligned(32))), y[CH] __attribute__((aligned(32)));
    double aa[VL] = {0}, bb[VL] = {0}, ab[VL] = {0};
    for (int64_t s = 0; s < n; s += CH) {
        int len = (int)(n - s < CH ? n - s : CH);
        load(x, a, a_dt, s, len);
        load(y, b, b_dt, s, len);
        for (int j = 0; j < CH; j += VL)
            for (int k = 0; k < VL; k++) {
                double u = x[j + k], v = y[j + k];
                aa[k] = aa[k] + u * u;
                bb[k] = bb[k] + v * v;
                ab[k] = ab[k] + u * v;
            }
    }
    double *acc[3] = {aa, bb, ab};
    for (int i = 0; i < 3; i++) {
        double *l = acc[i];
        out3[i] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }
}

/* SLERP's combination, cast once: out = a·ca + b·cb, each product rounded to float32 (no fused
 * multiply-add), as the torch path computes it. */
void sm_lerp(int64_t n, const void *a, int a_dt, const void *b, int b_dt, float ca, float cb, void *out, int out_dt) {
    float x[CH] __attribute__((aligned(32))), y[CH] __attribute__((aligned(32)));
    for (int64_t s = 0; s < n; s += CH) {
        int len = (int)(n - s < CH ? n - s : CH);
        load(x, a, a_dt, s, len);
        load(y, b, b_dt, s, len);
        for (int j = 0; j < CH; j++) x[j] = x[j] * ca + y[j] * cb;
        store(out, out_dt, s, x, len);
    }
}
