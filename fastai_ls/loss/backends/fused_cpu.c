/* Fused label-smoothing cross-entropy on float32 CPU rows: loss and gradient (or the loss alone, when no gradient
 * will be taken) in one call, each row in L1 cache.
 *
 * The same formula as formula.py, per row of logits x (C classes, target y):
 *
 *     z = x - max(x),  s = sum_c exp(z_c)
 *     loss = mass * log(s) - sum_c w_c q_c z_c,           mass = sum_c w_c q_c
 *     grad_c = scale * (mass * exp(z_c) / s - w_c q_c),   w_c q_c = (1 - eps) w_y [c == y] + (eps / C) w_c
 *
 * plus, with z_loss = lambda > 0, the z-loss lambda w_y lse^2 (lse = max(x) + log(s)), whose gradient adds
 * scale * 2 lambda w_y lse exp(z_c) / s. The other losses of the family (focal and adaptive focal, label-smoothed
 * or not, AdaFocal, MbLS, MaxSup, LogitNorm, the confidence penalty, each with the same z-loss) are computed by
 * family_row, from the same row statistics; see fused_cpu_family.
 *
 * with w = 1 without class weights. A row is read from memory once: the max pass brings it into cache, the exp pass
 * writes exp(z) into the gradient row, and the last pass turns that into the gradient while it is still in cache
 * (without a gradient, the exp pass only sums). Plain C with no Python or torch headers: c_kernel.py calls it
 * through ctypes with the tensors' data pointers. The
 * logits, ids and weights are only read; the gradient and loss buffers are the only memory of the caller's
 * written.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* The SHA-256 of this file as it was when the library was built (setup.py defines it). c_kernel.py compares it
 * with the file beside the library, where there is one (a source checkout, an editable install), and refuses a
 * library built from other sources, whose arguments may mean something else: after a pull without a rebuild, a
 * library built from the previous version of this file would otherwise be called with the current signature. */
#ifndef FUSED_CPU_SOURCE_SHA256
#define FUSED_CPU_SOURCE_SHA256 "unknown"
#endif
const char *fused_cpu_source_sha256(void)
{
    return FUSED_CPU_SOURCE_SHA256;
}

/* Compiled for AVX-512, AVX2 and baseline x86-64, chosen when the library loads: torch does the same for its own
 * kernels, so the floor it is compared with uses the widest vectors too. */
#ifndef VECTOR_CLONES /* -DVECTOR_CLONES= builds the baseline version only */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif
#endif

/* exp(z) for z <= 0 (the shifted logits), written without branches or calls so that the compiler vectorizes the
 * loops that use it. Cephes' expf: z = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, 2^n by
 * building the float's exponent bits; about 1 ulp. It returns 0 where the result would be below float32's normal
 * range (z < -87.7, n = -127). The clamp is a comparison, so a NaN z stays NaN through r and p, and the integer n
 * is read from the bits of a float with unsigned arithmetic, never converted from one: whatever z holds (z > 0 only
 * happens beside a NaN in the row, whose loss is NaN), the result is a float, not undefined behaviour. */
static inline float exp_nonpositive(float z)
{
    const float clamped = z < -88.0f ? -88.0f : z;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer, held in the low bits */
    const float shifted = clamped * 1.44269504088896341f + shifter;
    const float n = shifted - shifter; /* an integer, in [-127, 0] for z in [-88, 0] */
    const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23; /* 2^n; for n = -127 the exponent bits are 0 and it reads as 0 */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* log(q) for q in [0, 1] (1 - p of the smoothed focal losses), without branches or calls, like exp_nonpositive:
 * Cephes' logf, about 1 ulp. q = m 2^e with m in [sqrt(1/2), sqrt(2)) read from the float's bits, then
 * log(q) = e ln2 + log1p(m - 1), m - 1 exact and log1p by a degree-9 polynomial; ln2 in two parts, so that e ln2 adds
 * no rounding of its own. A subnormal q (1 - p_y below 2^-126, for a true class far ahead of the others) is scaled by
 * 2^23 first: its bits have no implicit leading 1. q = 0 gives -inf, and a NaN q stays NaN (the final selects). */
static inline float log_positive(float q)
{
    const int subnormal = q < 0x1p-126f;
    const float scaled = subnormal ? q * 0x1p23f : q;
    uint32_t bits;
    memcpy(&bits, &scaled, sizeof bits);
    const int32_t e = (int32_t)((bits >> 23) & 0xffu) - 126 - (subnormal ? 23 : 0); /* scaled = m 2^e, m in [1/2, 1) */
    bits = (bits & 0x007fffffu) | 0x3f000000u;
    float m;
    memcpy(&m, &bits, sizeof m);
    const int low = m < 0.707106781186547524f; /* then m 2^e = (2 m) 2^(e - 1), 2 m in [sqrt(1/2) 2, 2) */
    const float n = (float)e - (low ? 1.0f : 0.0f);
    const float r = low ? m + m - 1.0f : m - 1.0f;
    const float r2 = r * r;
    float y = 7.0376836292e-2f;
    y = y * r - 1.1514610310e-1f;
    y = y * r + 1.1676998740e-1f;
    y = y * r - 1.2420140846e-1f;
    y = y * r + 1.4249322787e-1f;
    y = y * r - 1.6668057665e-1f;
    y = y * r + 2.0000714765e-1f;
    y = y * r - 2.4999993993e-1f;
    y = y * r + 3.3333331174e-1f;
    y = y * r * r2 + n * -2.12194440e-4f - 0.5f * r2;
    const float log_q = r + y + n * 0.693359375f;
    return q > 0.0f ? log_q : q == 0.0f ? -INFINITY : NAN;
}

/* -expm1(l) = 1 - exp(l) for l in [-ln2, 0], where 1 - exp(l) would lose the digits of a p close to 1: Taylor's
 * series to l^9 / 9!, whose remainder is below 0.2 float ulp on that interval. Horner's sum 1 + l / 2 + ... stays
 * above 0.72 there, so its alternating terms cancel little (each rounding counts at most twice). A subnormal l gives
 * -l. */
static inline float minus_expm1_small(float l)
{
    float y = 1.0f / 362880.0f;
    y = y * l + 1.0f / 40320.0f;
    y = y * l + 1.0f / 5040.0f;
    y = y * l + 1.0f / 720.0f;
    y = y * l + 1.0f / 120.0f;
    y = y * l + 1.0f / 24.0f;
    y = y * l + 1.0f / 6.0f;
    y = y * l + 0.5f;
    y = y * l + 1.0f;
    return -l * y;
}

/* Partial sums over at most CHUNK classes run in float vector lanes, and are added up in double: row sums over
 * 128,000 classes keep float32's precision without giving up the vector width. 256 keeps each lane's share short
 * even with SSE2's 4 lanes: with 1024, the baseline build's gradients at 64 x 1000 were no more precise than
 * PyTorch's float32 ones, and sometimes less (the sum of exp(z) sets every gradient's relative error); with 256
 * they are several times more precise, for ~7% of the kernel's time with AVX-512. */
enum { CHUNK = 256 };

/* Return codes of fused_cpu_loss_and_grad and fused_cpu_family besides a bad row (>= 0). */
enum { DONE = -1, BAD_WEIGHT = -2, NO_MEMORY = -3, BAD_KIND = -4 };

/* sum_c exp(x_c - row_max) and sum_c w_c (x_c - row_max) of one row; with `store`, exp(x_c - row_max) is also
 * written into out[c]. Inlined into its callers with `store` and `w` known, so each loop is a plain vector loop. */
static inline void row_sums(const float *restrict x, float *restrict out, int64_t n_classes, const float *restrict w,
                            float row_max, int store, double *s_out, double *wz_out)
{
    double s = 0.0, wz = 0.0;
    for (int64_t start = 0; start < n_classes; start += CHUNK) {
        const int64_t stop = start + CHUNK < n_classes ? start + CHUNK : n_classes;
        float s_part = 0.0f, wz_part = 0.0f;
        if (w) {
#pragma omp simd reduction(+ : s_part, wz_part)
            for (int64_t c = start; c < stop; c++) {
                const float z = x[c] - row_max;
                const float e = exp_nonpositive(z);
                if (store)
                    out[c] = e;
                s_part += e;
                wz_part += w[c] * z;
            }
        } else {
#pragma omp simd reduction(+ : s_part, wz_part)
            for (int64_t c = start; c < stop; c++) {
                const float z = x[c] - row_max;
                const float e = exp_nonpositive(z);
                if (store)
                    out[c] = e;
                s_part += e;
                wz_part += z;
            }
        }
        s += s_part;
        wz += wz_part;
    }
    *s_out = s;
    *wz_out = wz;
}

/* A row's last n_classes % LANES classes would run one at a time after the vector loops, and cost as much as the
 * rest of a short row (64 x 37 took 5.8 us, 64 x 48 3.7 us). Without a gradient to write, a row of LANES classes or
 * more does them as one more whole block instead: its last LANES classes, the lanes that the vector loops already
 * counted masked out. (With a gradient the block's stores would overlap the loops' stores, whose forwarding stalls
 * cost more than they save.) 16 lanes are one AVX-512 vector, two AVX2 and four SSE2 vectors. */
enum { LANES = 16 };

static inline float block_max(const float *restrict x, float row_max)
{
#pragma omp simd reduction(max : row_max)
    for (int64_t i = 0; i < LANES; i++)
        row_max = x[i] > row_max ? x[i] : row_max;
    return row_max;
}

/* row_sums over the block x[0..LANES) (the row's last classes), counting the lanes from `skip` on. */
static inline void block_sums(const float *restrict x, const float *restrict w, int64_t skip, float row_max,
                              double *s, double *wz)
{
    float s_part = 0.0f, wz_part = 0.0f;
    if (w) {
#pragma omp simd reduction(+ : s_part, wz_part)
        for (int64_t i = 0; i < LANES; i++) {
            const float z = x[i] - row_max;
            const float e = exp_nonpositive(z);
            s_part += i >= skip ? e : 0.0f;
            wz_part += i >= skip ? w[i] * z : 0.0f;
        }
    } else {
#pragma omp simd reduction(+ : s_part, wz_part)
        for (int64_t i = 0; i < LANES; i++) {
            const float z = x[i] - row_max;
            const float e = exp_nonpositive(z);
            s_part += i >= skip ? e : 0.0f;
            wz_part += i >= skip ? z : 0.0f;
        }
    }
    *s += s_part;
    *wz += wz_part;
}

/* A row's loss as the kernel returns it: NaN where it is infinite in float, also where the double is finite but past
 * float's range (a z-loss on logits ~ 1e20 and up), as the float torch path reports the same row. */
static inline float reported(double loss)
{
    const float out = (float)loss;
    return isinf(out) ? NAN : out;
}

/* One row's loss against class y; with grad non-NULL, also its gradient (times `scale`) written into grad. */
VECTOR_CLONES
static float row_loss(const float *restrict x, float *restrict grad, int64_t n_classes, int64_t y,
                      const float *restrict w, double w_sum, double eps, double z_loss, double scale)
{
    /* Without a gradient, classes [0, n_main) in the vector loops and the rest as the row's last block. */
    const int64_t n_main = grad || n_classes < LANES ? n_classes : n_classes - n_classes % LANES;
    const int64_t block = n_classes - LANES, skip = LANES - (n_classes - n_main);

    float row_max = -INFINITY;
#pragma omp simd reduction(max : row_max)
    for (int64_t c = 0; c < n_main; c++)
        row_max = x[c] > row_max ? x[c] : row_max;
    if (n_main < n_classes)
        row_max = block_max(x + block, row_max);

    double s, wz; /* sum_c exp(z_c) and sum_c w_c z_c */
    if (grad) {
        row_sums(x, grad, n_classes, w, row_max, 1, &s, &wz);
    } else {
        row_sums(x, grad, n_main, w, row_max, 0, &s, &wz);
        if (n_main < n_classes)
            block_sums(x + block, w ? w + block : NULL, skip, row_max, &s, &wz);
    }

    const double z_y = (double)x[y] - row_max;
    const double w_y = w ? w[y] : 1.0;
    const double mass = (1.0 - eps) * w_y + eps / n_classes * w_sum;
    /* eps = 0 is plain cross-entropy: the smoothing term is left out, not multiplied by 0 (a -inf logit, or finite
     * logits so far apart that their sum overflows, would make it NaN where the loss is finite). */
    const double dot = (1.0 - eps) * w_y * z_y + (eps > 0.0 ? eps / n_classes * wz : 0.0);
    const double lse = (double)row_max + log(s);
    const double loss = mass * log(s) - dot + (z_loss > 0.0 ? z_loss * w_y * lse * lse : 0.0);

    if (grad) {
        /* grad_c = a exp(z_c) - b w_c, and the true class's share of the target once more on y. */
        const float a = (float)(scale * (mass + (z_loss > 0.0 ? 2.0 * z_loss * w_y * lse : 0.0)) / s);
        const float b = (float)(scale * eps / n_classes);
        if (w) {
#pragma omp simd
            for (int64_t c = 0; c < n_classes; c++)
                grad[c] = a * grad[c] - b * w[c];
        } else {
#pragma omp simd
            for (int64_t c = 0; c < n_classes; c++)
                grad[c] = a * grad[c] - b;
        }
        grad[y] -= (float)(scale * (1.0 - eps) * w_y);
    }
    /* A -inf logit that the smoothed target covers makes the loss +inf: reported as NaN, as on the other paths. */
    return reported(loss);
}

/* The family's row losses besides label smoothing (kind), with their parameters p[0..2]:
 *   FOCAL               f CE,  f = (1 - p_y)^gamma                                p = {gamma}
 *   ADAPTIVE_FOCAL      the same with gamma = gamma_below where p_y < threshold, else gamma_above (not
 *                       differentiated; FLSD-53 is {0.2, 5, 3})                  p = {threshold, gamma_below, gamma_above}
 *   MARGIN (MbLS)       w_y (CE + alpha / C sum_k relu(max - x_k - margin))      p = {margin, alpha}
 *   MAXSUP              w_y (CE + alpha (max - mean_k x_k))                       p = {alpha}
 *   LOGITNORM           w_y CE(x / (tau (||x||_2 + 1e-7)))                        p = {tau}
 *   CONFIDENCE_PENALTY  w_y (CE - beta H(softmax(x)))                             p = {beta}
 *   ADA_FOCAL           f CE with gamma = gammas[bin of p_y] (not differentiated): f = (1 - p_y)^gamma where
 *                       gamma >= switch, else (1 + p_y)^|gamma| (AdaFocal's inverse focal loss)
 *                                                                                 p = {switch, n_bins, has_edges}
 * with CE = w_y (lse - x_y) the cross-entropy and max the row's largest logit (the first one for the gradient, as
 * torch.max). Every kind adds, with z_loss = p[3] > 0, the z-loss z_loss w_y lse(x)^2 of the raw logits (for
 * LogitNorm too), whose gradient adds 2 z_loss w_y lse softmax(x). The focal losses (FOCAL, ADAPTIVE_FOCAL) take
 * label smoothing eps = p[4] > 0: each class then has its own focal factor (smoothed_focal_row). AdaFocal's bins
 * follow at p[5]: n_bins gammas, then, with has_edges, the n_bins + 1 edges (bins (e_b, e_b+1]; without, equal
 * width). */
enum { LABEL_SMOOTHING = 0, FOCAL = 1, ADAPTIVE_FOCAL = 2, MARGIN = 3, MAXSUP = 4, LOGITNORM = 5,
       CONFIDENCE_PENALTY = 6, ADA_FOCAL = 7 };
enum { Z_LOSS = 3, EPS = 4, BINS = 5 }; /* where p[] holds them */

/* family_row's second sweep: sum_c exp(z_c), z = kf (x - row_max) (written into out with `store`), and the kind's
 * own row sum into *extra (and MbLS's count of active classes into *n_active). Always inlined with `kind` and
 * `store` constants, so that each copy is a plain vector loop. */
static inline __attribute__((always_inline)) void family_sums(const float *restrict x, float *restrict out,
                                                               int64_t n_classes, const float *restrict w,
                                                               float row_max, float kf, float below, int kind,
                                                               int store, double *s, double *extra, double *n_active)
{
    for (int64_t start = 0; start < n_classes; start += CHUNK) {
        const int64_t stop = start + CHUNK < n_classes ? start + CHUNK : n_classes;
        float s_part = 0.0f, e_part = 0.0f, n_part = 0.0f;
#pragma omp simd reduction(+ : s_part, e_part, n_part)
        for (int64_t c = start; c < stop; c++) {
            const float z = kf * (x[c] - row_max);
            const float e = exp_nonpositive(z);
            if (store)
                out[c] = e;
            s_part += e;
            if (kind == MARGIN) {
                const float gap = below - x[c];
                e_part += gap > 0.0f ? gap : 0.0f;
                n_part += gap > 0.0f ? 1.0f : 0.0f;
            } else if (kind == MAXSUP)
                e_part += x[c] - row_max;
            else if (kind == LOGITNORM)
                e_part += e * x[c];
            else if (kind == CONFIDENCE_PENALTY)
                e_part += e > 0.0f ? e * z : 0.0f; /* p log p -> 0 as p -> 0, also for a -inf logit */
        }
        *s += s_part;
        *extra += e_part;
        *n_active += n_part;
    }
}

/* AdaFocal's gamma for true-class probability p_y: that of its bin, (e_b, e_b+1] (torch.bucketize's), or with
 * equal-width bins the one that ceil(p_y n_bins) - 1 names. p_y, the edges and p_y n_bins are taken in float, as the
 * formula takes them for float32 logits: in double, a p_y on an edge (all-equal logits, p_y = 1/C) fell in the
 * neighbouring bin. */
static double ada_focal_gamma(const double *p, float p_y)
{
    const int64_t n_bins = (int64_t)p[1];
    const double *gammas = p + BINS, *edges = gammas + n_bins;
    int64_t bin = 0;
    if (p[2] != 0.0) {
        for (int64_t i = 1; i < n_bins; i++)
            bin += (float)edges[i] < p_y;
    } else { /* p_y clamped to [0, 1] first (a NaN to 0): a float out of int64's range would be undefined */
        const float clamped = p_y > 0.0f ? (p_y < 1.0f ? p_y : 1.0f) : 0.0f;
        bin = (int64_t)ceilf(clamped * (float)n_bins) - 1;
        bin = bin < 0 ? 0 : bin > n_bins - 1 ? n_bins - 1 : bin;
    }
    return gammas[bin];
}

/* One class's focal term -(1 - p)^gamma log p into *term, and h = (1 - p)^gamma - gamma (1 - p)^(gamma - 1) p log p
 * into *h, from log p and q = 1 - p: the term's gradient is h ([c == j] - p_j) times -1. Where p rounds to 1 the
 * factor and its derivative term are their limits (0, or 1 and 0 for gamma = 0), not 0 * inf. One pow per class:
 * (1 - p)^(gamma - 1) is f / q. */
static inline void focal_term(double log_p, double q, double gamma, double *term, double *h)
{
    const double f = gamma > 0.0 ? (q > 0.0 ? pow(q, gamma) : 0.0) : 1.0;
    *term = -f * log_p;
    *h = f - (gamma > 0.0 && q > 0.0 ? gamma * (f / q) * (1.0 - q) * log_p : 0.0);
}

/* q^gamma for gamma in 0..7 (smoothed_focal_sums' `integer`) as q^4^b2 q^2^b1 q^b0, gamma's bits, each factor
 * q^k b + (1 - b), exactly q^k or 1 (also fused into one rounding): as arithmetic, not a select, it vectorizes also
 * where gamma is the same for every class (a select on it made gcc branch in a scalar loop). */
static inline __attribute__((always_inline)) float integer_power(float q, float gamma)
{
    const float q2 = q * q, q4 = q2 * q2;
    const float b2 = gamma >= 4.0f ? 1.0f : 0.0f, low = gamma - 4.0f * b2;
    const float b1 = low >= 2.0f ? 1.0f : 0.0f, b0 = low - 2.0f * b1;
    return (q4 * b2 + (1.0f - b2)) * (q2 * b1 + (1.0f - b1)) * (q * b0 + (1.0f - b0));
}

/* The focal factor (1 - p)^gamma from q = 1 - p: by integer_power for whole gammas (`integer`), else
 * exp(gamma log q), and 1 at gamma = 0 (never 0^0 = exp(0 * -inf)). */
static inline __attribute__((always_inline)) float focal_factor(float q, float gamma, int integer)
{
    if (integer)
        return integer_power(q, gamma);
    const float power = exp_nonpositive(gamma * log_positive(q));
    return gamma > 0.0f ? power : 1.0f;
}

/* smoothed_focal_row's third sweep with a gradient: sum_c w_c term_c and sum_c w_c h_c (focal_term's, in float;
 * w_c h_c written into out[c]), given log s as log_s_hi + log_s_lo. Always inlined with kind, integer and weighted
 * constants, so that each copy is a plain vector loop, whose partial sums over CHUNK classes are added in double, as
 * family_sums'. Per class:
 *     log p = (z - log_s_hi) - log_s_lo, to a float ulp of log p (log s in two floats: one float would shift every
 *             log p by its rounding, up to 5e-7 at 32,000 classes)
 *     q = 1 - p, or -expm1(log p) where p > 1/2: q keeps its digits as p -> 1 (for the true class of a confident row,
 *             q is the whole of its focal factor)
 *     f = q^gamma = exp(gamma log q), 1 for gamma = 0 (not exp(0 * -inf)) and 0 for q = 0
 *     h = f - gamma (f / q) p log p, whose second part's limit at q = 0 is 0 (there f / q would be 0 / 0)
 * f's relative error is about |gamma log q| float ulps (exp's argument's rounding, as in any float pow): where that
 * is large, f is below 1e-7 times the classes' other terms. With `integer` (every gamma a whole number up to 7, as
 * the focal losses' usual 1, 2, 3 and FLSD-53's 3 and 5), f is q's powers multiplied instead, faster and exact to
 * an ulp or two. A -inf logit (p = 0, log p = -inf) gives term = +inf and
 * h = NaN for gamma > 0, as focal_term does: the row's loss is reported as NaN. */
static inline __attribute__((always_inline)) void smoothed_focal_sums(const float *restrict x, float *restrict out,
                                                                       int64_t n_classes, const float *restrict w,
                                                                       float row_max, float log_s_hi, float log_s_lo,
                                                                       const float *gammas, int kind, int integer,
                                                                       int weighted, double *terms, double *hs)
{
    const float log_threshold = gammas[0], gamma_below = gammas[1], gamma_above = gammas[2];
    for (int64_t start = 0; start < n_classes; start += CHUNK) {
        const int64_t stop = start + CHUNK < n_classes ? start + CHUNK : n_classes;
        float t_part = 0.0f, h_part = 0.0f;
#pragma omp simd reduction(+ : t_part, h_part)
        for (int64_t c = start; c < stop; c++) {
            /* Every value is computed in every lane and then selected: a call inside a condition (its bit casts)
             * would keep the loop from being if-converted, and so from vectorizing. */
            const float log_p = ((x[c] - row_max) - log_s_hi) - log_s_lo;
            const float p = exp_nonpositive(log_p), q_near_1 = minus_expm1_small(log_p);
            const float q = p > 0.5f ? q_near_1 : 1.0f - p;
            const float gamma = kind == FOCAL ? gamma_below : log_p < log_threshold ? gamma_below : gamma_above;
            const float f = focal_factor(q, gamma, integer);
            const float slope = gamma * (f / q) * p * log_p;
            const float h = f - ((gamma > 0.0f) & (q > 0.0f) ? slope : 0.0f);
            const float w_c = weighted ? w[c] : 1.0f;
            out[c] = w_c * h;
            t_part += w_c * (-f * log_p);
            h_part += w_c * h;
        }
        *terms += t_part;
        *hs += h_part;
    }
}

/* smoothed_focal_row's third sweep without a gradient: sum_c w_c term_c alone, from e_c = exp(z_c) as sweep 2 kept
 * them, so that no class needs an exp or an expm1 of its own: p = e_c / s, and q = 1 - p except at the max, where
 * q = rest / s (sweep 2's rest, exact as p_max -> 1). Only a class at the max can have p > 1/2, and a tied class
 * there has q = 1 - 1 / s = rest / s too. log p and f are smoothed_focal_sums'; h is not needed. */
static inline __attribute__((always_inline)) void smoothed_focal_terms(const float *restrict x,
                                                                        const float *restrict e, int64_t n_classes,
                                                                        const float *restrict w, float row_max,
                                                                        float log_s_hi, float log_s_lo, float inv_s,
                                                                        float q_max, const float *gammas, int kind,
                                                                        int integer, int weighted, double *terms)
{
    const float log_threshold = gammas[0], gamma_below = gammas[1], gamma_above = gammas[2];
    for (int64_t start = 0; start < n_classes; start += CHUNK) {
        const int64_t stop = start + CHUNK < n_classes ? start + CHUNK : n_classes;
        float t_part = 0.0f;
#pragma omp simd reduction(+ : t_part)
        for (int64_t c = start; c < stop; c++) {
            const float z = x[c] - row_max;
            const float log_p = (z - log_s_hi) - log_s_lo;
            const float p = e[c] * inv_s; /* read in every lane: a load under the select would not vectorize */
            const float q = z == 0.0f ? q_max : 1.0f - p;
            const float gamma = kind == FOCAL ? gamma_below : log_p < log_threshold ? gamma_below : gamma_above;
            const float f = focal_factor(q, gamma, integer);
            t_part += (weighted ? w[c] : 1.0f) * (-f * log_p);
        }
        *terms += t_part;
    }
}

/* The adaptive focal loss picks gamma_below where log p < log(threshold), both rounded to float, as the formula
 * compares float32 log-probabilities (family_formulas.adaptive_focal_rows): comparing p itself rounds differently
 * where p is the threshold (all-equal logits with threshold 1/C) and picked the other gamma there. */
static inline float adaptive_log_threshold(double threshold)
{
    return threshold > 0.0 ? (float)log(threshold) : -INFINITY;
}

/* Whether gamma is one of 0, 1, ..., 7: smoothed_focal_sums then multiplies powers of q. */
static inline int small_whole(double gamma)
{
    return gamma >= 0.0 && gamma <= 7.0 && gamma == floor(gamma);
}

/* smoothed_focal_row's second sweep: rest = sum_c exp(z_c) - 1 (see there), with `store` each exp(z_c) written into
 * e[c]. Always inlined with `store` constant. */
static inline __attribute__((always_inline)) void smoothed_focal_rest(const float *restrict x, float *restrict e,
                                                                       int64_t n_classes, float row_max, int store,
                                                                       double *rest)
{
    for (int64_t start = 0; start < n_classes; start += CHUNK) {
        const int64_t stop = start + CHUNK < n_classes ? start + CHUNK : n_classes;
        float r_part = 0.0f, ties = 0.0f;
#pragma omp simd reduction(+ : r_part, ties)
        for (int64_t c = start; c < stop; c++) {
            const float z = x[c] - row_max, e_c = exp_nonpositive(z);
            if (store)
                e[c] = e_c;
            r_part += z == 0.0f ? 0.0f : e_c;
            ties += z == 0.0f ? 1.0f : 0.0f;
        }
        *rest += r_part;
        *rest += ties;
    }
}

/* The label-smoothed focal losses (FOCAL, ADAPTIVE_FOCAL with eps = p[EPS] > 0), from the row's max:
 *     loss = sum_c a_c term_c,  a_c = (1 - eps) w_y [c == y] + (eps / C) w_c,  term_c = -(1 - p_c)^gamma_c log p_c
 *     grad_j = p_j sum_c a_c h_c - a_j h_j  (focal_term's h; gamma_c not differentiated)
 * plus the z-loss. Sweep 2 sums exp(z) (as 1 + the rest), sweep 3 (smoothed_focal_sums) the classes' terms in float
 * vector lanes (writing w_c h_c into grad), and sweep 4 turns that into the gradient, recomputing exp(z_c) while the
 * row is in cache. Without a gradient, sweep 2 keeps exp(z) in `scratch` (n_classes floats of the calling thread's
 * own) and sweep 3 is smoothed_focal_terms, which then needs no exp per class. The true class's own term, (1 - eps)
 * of the row's loss, is focal_term's in double. Compiled for each of VECTOR_CLONES' targets itself: family_row's
 * copies of its loops did not vectorize. */
VECTOR_CLONES __attribute__((noinline))
static float smoothed_focal_row(const float *restrict x, float *restrict grad, int64_t n_classes, int64_t y,
                                const float *restrict w, int kind, const double *p, double scale, float row_max,
                                float *restrict scratch)
{
    const double eps = p[EPS], z_loss = p[Z_LOSS];
    /* s = 1 + rest: rest sums exp(z_c) over the classes below the max, and adds the ties with it, so that
     * log s = log1p(rest) keeps its digits where p_max -> 1 (a float sum s would round 1 + 6e-6 to 6e-8, 1%, and
     * 1 - p_max with it). A NaN logit makes rest NaN. */
    double rest = -1.0; /* the first class at the max is the 1 */
    if (grad)
        smoothed_focal_rest(x, NULL, n_classes, row_max, 0, &rest);
    else /* kept in scratch for sweep 3 */
        smoothed_focal_rest(x, scratch, n_classes, row_max, 1, &rest);
    const double s = 1.0 + rest, log_s = log1p(rest);
    const float log_s_hi = (float)log_s, log_s_lo = (float)(log_s - log_s_hi);
    /* {log threshold, gamma below it, gamma above it}; the focal loss's one gamma is the second */
    const float gammas[3] = {kind == FOCAL ? 0.0f : adaptive_log_threshold(p[0]), (float)(kind == FOCAL ? p[0] : p[1]),
                             (float)(kind == FOCAL ? p[0] : p[2])};
    double w_terms = 0.0, w_hs = 0.0;
    const int integer = kind == FOCAL ? small_whole(p[0]) : small_whole(p[1]) && small_whole(p[2]);
    const float inv_s = (float)(1.0 / s), q_max = (float)(rest / s);
#define SMOOTHED_FOCAL_SUMS(KIND, INTEGER, WEIGHTED)                                                                   \
    smoothed_focal_sums(x, grad, n_classes, w, row_max, log_s_hi, log_s_lo, gammas, KIND, INTEGER, WEIGHTED, &w_terms, \
                        &w_hs)
#define SMOOTHED_FOCAL_TERMS(KIND, INTEGER, WEIGHTED)                                                                  \
    smoothed_focal_terms(x, scratch, n_classes, w, row_max, log_s_hi, log_s_lo, inv_s, q_max, gammas, KIND, INTEGER,   \
                         WEIGHTED, &w_terms)
#define SMOOTHED_FOCAL_KIND(KIND, INTEGER)                                                                             \
    (grad ? (w ? SMOOTHED_FOCAL_SUMS(KIND, INTEGER, 1) : SMOOTHED_FOCAL_SUMS(KIND, INTEGER, 0))                        \
          : (w ? SMOOTHED_FOCAL_TERMS(KIND, INTEGER, 1) : SMOOTHED_FOCAL_TERMS(KIND, INTEGER, 0)))
    if (kind == FOCAL)
        integer ? SMOOTHED_FOCAL_KIND(FOCAL, 1) : SMOOTHED_FOCAL_KIND(FOCAL, 0);
    else
        integer ? SMOOTHED_FOCAL_KIND(ADAPTIVE_FOCAL, 1) : SMOOTHED_FOCAL_KIND(ADAPTIVE_FOCAL, 0);
#undef SMOOTHED_FOCAL_KIND
#undef SMOOTHED_FOCAL_TERMS
#undef SMOOTHED_FOCAL_SUMS
    const double log_p_y = ((double)x[y] - row_max) - log_s, q_y = -expm1(log_p_y); /* q_y = 1 - p_y, exact near 1 */
    const double gamma_y = kind == FOCAL ? p[0] : (float)log_p_y < gammas[0] ? p[1] : p[2];
    double term_y, h_y;
    focal_term(log_p_y, q_y, gamma_y, &term_y, &h_y);
    const double w_y = w ? w[y] : 1.0, smooth = eps / n_classes;
    double loss = (1.0 - eps) * w_y * term_y + smooth * w_terms;
    double a = ((1.0 - eps) * w_y * h_y + smooth * w_hs) / s; /* times exp(z_j): p_j sum_c a_c h_c */
    if (z_loss > 0.0) {
        const double lse = (double)row_max + log_s;
        loss += z_loss * w_y * lse * lse;
        a += 2.0 * z_loss * w_y * lse / s;
    }
    if (grad) {
        const float af = (float)(scale * a), bf = (float)(scale * smooth);
#pragma omp simd
        for (int64_t c = 0; c < n_classes; c++)
            grad[c] = af * exp_nonpositive(x[c] - row_max) - bf * grad[c];
        grad[y] -= (float)(scale * (1.0 - eps) * w_y * h_y);
    }
    return reported(loss);
}

VECTOR_CLONES
static float family_row(const float *restrict x, float *restrict grad, int64_t n_classes, int64_t y,
                        const float *restrict w, int kind, const double *p, double scale, float *restrict scratch)
{
    float row_max = -INFINITY;
    double sum_sq = 0.0;
#pragma omp simd reduction(max : row_max)
    for (int64_t c = 0; c < n_classes; c++)
        row_max = x[c] > row_max ? x[c] : row_max;
    if ((kind == FOCAL || kind == ADAPTIVE_FOCAL) && p[EPS] > 0.0)
        return smoothed_focal_row(x, grad, n_classes, y, w, kind, p, scale, row_max, scratch);
    if (kind == LOGITNORM) {
#pragma omp simd reduction(+ : sum_sq)
        for (int64_t c = 0; c < n_classes; c++)
            sum_sq += (double)x[c] * x[c];
    }
    const double norm = sqrt(sum_sq);
    /* LogitNorm's logits are x k: k > 0, so their largest is row_max k, and z_c = k (x_c - row_max) <= 0. */
    const double k = kind == LOGITNORM ? 1.0 / (p[0] * (norm + 1e-7)) : 1.0;
    const float kf = (float)k;
    const double margin = kind == MARGIN ? p[0] : 0.0;
    const float below = (float)(row_max - margin); /* MbLS: x_c < below is a class whose relu is positive */

    /* Sweep 2: s = sum_c exp(z_c) (written into grad when there is one), and the kind's own row sum. Each kind, with
     * and without a gradient, gets its own copy of the loop (kind and store are constants there), so that each
     * vectorizes. */
    double s = 0.0, extra = 0.0, n_active = 0.0;
#define FAMILY_SUMS(KIND)                                                                                              \
    (grad ? family_sums(x, grad, n_classes, w, row_max, kf, below, KIND, 1, &s, &extra, &n_active)                     \
          : family_sums(x, grad, n_classes, w, row_max, kf, below, KIND, 0, &s, &extra, &n_active))
    switch (kind) {
    case FOCAL:
    case ADAPTIVE_FOCAL:
    case ADA_FOCAL: FAMILY_SUMS(FOCAL); break;
    case MARGIN: FAMILY_SUMS(MARGIN); break;
    case MAXSUP: FAMILY_SUMS(MAXSUP); break;
    case LOGITNORM: FAMILY_SUMS(LOGITNORM); break;
    default: FAMILY_SUMS(CONFIDENCE_PENALTY); break;
    }
#undef FAMILY_SUMS
    const double log_s = log(s);
    const double z_y = k * ((double)x[y] - row_max);
    const double w_y = w ? w[y] : 1.0;
    double loss, a, b = 0.0, t;           /* grad_c = a e_c - b (w_c, or [active], or x_c...) - t [c == y] */
    double arg_add = 0.0;                 /* added on the first largest logit (MbLS, MaxSup) */
    switch (kind) {
    case FOCAL:
    case ADAPTIVE_FOCAL:
    case ADA_FOCAL: {
        const double ce = w_y * (log_s - z_y);
        const double log_p = z_y - log_s, p_y = exp(log_p), q = -expm1(log_p); /* q = 1 - p_y, exact near 1 */
        double gamma = kind == FOCAL ? p[0] : kind == ADAPTIVE_FOCAL ? ((float)log_p < adaptive_log_threshold(p[0])
                                                                        ? p[1] : p[2])
                                                                     : ada_focal_gamma(p, expf((float)log_p));
        double f, K;
        if (kind == ADA_FOCAL && gamma < p[0]) {
            /* AdaFocal's inverse focal loss, f = (1 + p_y)^g, g = |gamma|: d f / d z_c = g (1 + p_y)^(g - 1) p_y
             * ([c == y] - p_c), so K below is ce g (1 + p_y)^(g - 1) p_y with the opposite sign. */
            gamma = fabs(gamma);
            f = gamma > 0.0 ? pow(1.0 + p_y, gamma) : 1.0;
            K = gamma > 0.0 ? -ce * gamma * pow(1.0 + p_y, gamma - 1.0) * p_y : 0.0;
        } else {
            f = gamma > 0.0 ? pow(q, gamma) : 1.0;
            /* d f / d z_c = -gamma q^(gamma - 1) p_y ([c == y] - p_c): with K = ce gamma q^(gamma - 1) p_y,
             * grad_c = (f w_y + K) p_c - (f w_y + K) [c == y]. */
            K = gamma > 0.0 && q > 0.0 ? ce * gamma * pow(q, gamma - 1.0) * p_y : 0.0; /* q = 0: ce = 0 */
        }
        loss = f * ce;
        a = (f * w_y + K) / s;
        t = f * w_y + K;
        break;
    }
    case MARGIN:
        loss = w_y * (log_s - z_y + p[1] / n_classes * extra);
        a = w_y / s;
        b = w_y * p[1] / n_classes;
        t = w_y;
        arg_add = b * n_active;
        break;
    case MAXSUP:
        loss = w_y * (log_s - z_y - p[0] * extra / n_classes);
        a = w_y / s;
        b = w_y * p[0] / n_classes;
        t = w_y;
        arg_add = w_y * p[0];
        break;
    case LOGITNORM:
        /* d/dx_j = k g_j - x_j (sum_i g_i x_i) / (norm tau (norm + 1e-7)^2), g = w_y (softmax - onehot) */
        loss = w_y * (log_s - z_y);
        a = w_y * k / s;
        b = norm > 0.0 ? w_y * (extra / s - x[y]) / (norm * p[0] * (norm + 1e-7) * (norm + 1e-7)) : 0.0;
        t = w_y * k;
        break;
    default: {
        /* CONFIDENCE_PENALTY: H = log s - sum_c p_c z_c; grad_c = w_y (p_c (1 + beta (z_c - sum p z)) - [c == y]) */
        const double pz = extra / s;
        loss = w_y * (log_s - z_y - p[0] * (log_s - pz));
        a = w_y / s;
        b = pz;
        t = w_y;
        break;
    }
    }
    double zc = 0.0; /* the z-loss's gradient zc exp(x_c - row_max), on LogitNorm's and the penalty's own loops */
    if (p[Z_LOSS] > 0.0) {
        /* lse of the raw logits: LogitNorm's s is that of the normalized ones, so it sweeps the row once more. */
        double s_raw = s, unused;
        if (kind == LOGITNORM)
            row_sums(x, NULL, n_classes, NULL, row_max, 0, &s_raw, &unused);
        const double lse = (double)row_max + log(s_raw);
        loss += p[Z_LOSS] * w_y * lse * lse;
        zc = 2.0 * p[Z_LOSS] * w_y * lse / s_raw;
        if (kind != LOGITNORM && kind != CONFIDENCE_PENALTY) { /* their exp(z_c) is exp(x_c - row_max) */
            a += zc;
            zc = 0.0;
        }
    }
    if (grad) {
        const float af = (float)(scale * a), bf = (float)(scale * b), zf = (float)(scale * zc);
        if (kind == FOCAL || kind == ADAPTIVE_FOCAL || kind == ADA_FOCAL) {
#pragma omp simd
            for (int64_t c = 0; c < n_classes; c++)
                grad[c] = af * grad[c];
        } else if (kind == MARGIN) {
#pragma omp simd
            for (int64_t c = 0; c < n_classes; c++)
                grad[c] = af * grad[c] - (x[c] < below ? bf : 0.0f);
        } else if (kind == MAXSUP) {
#pragma omp simd
            for (int64_t c = 0; c < n_classes; c++)
                grad[c] = af * grad[c] - bf;
        } else if (kind == LOGITNORM && zc != 0.0) {
#pragma omp simd
            for (int64_t c = 0; c < n_classes; c++)
                grad[c] = af * grad[c] - bf * x[c] + zf * exp_nonpositive(x[c] - row_max);
        } else if (kind == LOGITNORM) {
#pragma omp simd
            for (int64_t c = 0; c < n_classes; c++)
                grad[c] = af * grad[c] - bf * x[c];
        } else if (zc != 0.0) {
            const float beta = (float)p[0], pzf = (float)b;
#pragma omp simd
            for (int64_t c = 0; c < n_classes; c++) {
                const float e = grad[c];
                grad[c] = e > 0.0f ? af * e * (1.0f + beta * (kf * (x[c] - row_max) - pzf)) + zf * e : 0.0f;
            }
        } else {
            const float beta = (float)p[0], pzf = (float)b;
#pragma omp simd
            for (int64_t c = 0; c < n_classes; c++) {
                const float e = grad[c];
                grad[c] = e > 0.0f ? af * e * (1.0f + beta * (kf * (x[c] - row_max) - pzf)) : 0.0f;
            }
        }
        grad[y] -= (float)(scale * t);
        if (arg_add != 0.0) {
            int64_t arg = 0;
            while (arg < n_classes - 1 && !(x[arg] == row_max))
                arg++;
            grad[arg] += (float)(scale * arg_add);
        }
    }
    return reported(loss);
}

/* Per-row losses of x (n_rows x n_classes, rows x_row_stride floats apart, classes contiguous) against class ids y,
 * and, when grad is not NULL, the gradient of the reduced loss written into grad (contiguous). The reduced loss,
 * written to *reduced, is the sum of the row losses, or with `mean` PyTorch's 'mean': that sum over the sum of w_y
 * (the count without weights) of the rows not ignored, NaN when that is 0 (as in PyTorch, whose gradient is then
 * NaN on every kept row). Rows whose id is ignore_index get loss 0 and a zero gradient, whatever their logits
 * hold. `w` (one float per class) may be NULL; `loss` may be NULL when only the reduced loss is wanted, `reduced`
 * when only the per-row losses are. kind LABEL_SMOOTHING is row_loss with p = {eps, z_loss}; the other kinds are
 * family_row's.
 *
 * Everything is checked before anything is written: returns BAD_WEIGHT for a negative or non-finite weight, else
 * the first row whose id is neither a class nor ignore_index, else NO_MEMORY or DONE. Each id is read from the
 * caller's memory exactly once, and checked and used from a private copy: the caller (Python, through ctypes)
 * releases the GIL, so another thread may write the ids meanwhile, and an id read twice could pass the check and
 * then index out of bounds. */
static int64_t run_rows(const float *x, int64_t n_rows, int64_t n_classes, int64_t x_row_stride, const int64_t *y,
                        int64_t ignore_index, const float *w, int kind, const double *p, int mean, float *grad,
                        float *loss, float *reduced, int n_threads)
{
    double w_sum = (double)n_classes;
    if (w) {
        w_sum = 0.0;
        for (int64_t c = 0; c < n_classes; c++) {
            const float w_c = ((const volatile float *)w)[c];
            if (!(w_c >= 0.0f) || isinf(w_c)) /* NaN fails the comparison */
                return BAD_WEIGHT;
            w_sum += w_c;
        }
    }
    /* The ids' private copy, -1 for an ignored row, and the per-row losses when the caller wants none back. */
    int64_t *ids = malloc((size_t)n_rows * (sizeof *ids + (loss ? 0 : sizeof *loss)) + 1);
    if (!ids)
        return NO_MEMORY;
    float *row_losses = loss ? loss : (float *)(ids + n_rows);
    double divisor = 0.0;
    for (int64_t row = 0; row < n_rows; row++) {
        const int64_t id = ((const volatile int64_t *)y)[row];
        if (id == ignore_index) {
            ids[row] = -1;
            continue;
        }
        if (id < 0 || id >= n_classes) {
            free(ids);
            return row;
        }
        ids[row] = id;
        divisor += w ? w[id] : 1.0;
    }
    const double scale = !mean ? 1.0 : divisor > 0.0 ? 1.0 / divisor : NAN;
    /* The label-smoothed focal losses without a gradient keep each row's exp(z) in a scratch row, one per thread. */
    float *scratch = NULL;
    if (!grad && (kind == FOCAL || kind == ADAPTIVE_FOCAL) && p[EPS] > 0.0) {
        scratch = malloc((size_t)(n_threads > 1 ? n_threads : 1) * (size_t)n_classes * sizeof *scratch);
        if (!scratch) {
            free(ids);
            return NO_MEMORY;
        }
    }
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t row = 0; row < n_rows; row++) {
        float *grad_row = grad ? grad + row * n_classes : NULL;
        if (ids[row] < 0) {
            if (grad_row)
                memset(grad_row, 0, n_classes * sizeof *grad_row);
            row_losses[row] = 0.0f;
            continue;
        }
        const float *x_row = x + row * x_row_stride;
#ifdef _OPENMP
        float *scratch_row = scratch ? scratch + (size_t)omp_get_thread_num() * (size_t)n_classes : NULL;
#else
        float *scratch_row = scratch;
#endif
        row_losses[row] = kind == LABEL_SMOOTHING
                              ? row_loss(x_row, grad_row, n_classes, ids[row], w, w_sum, p[0], p[1], scale)
                              : family_row(x_row, grad_row, n_classes, ids[row], w, kind, p, scale, scratch_row);
    }
    free(scratch);
    /* Added up after the parallel loop, in row order: the same bits whatever the number of threads. */
    double total = 0.0;
    for (int64_t row = 0; row < n_rows; row++)
        total += row_losses[row];
    free(ids);
    if (reduced)
        *reduced = (float)(!mean ? total : divisor > 0.0 ? total / divisor : NAN);
    return DONE;
}

/* The label-smoothing cross-entropy (with the z-loss z_loss lambda w_y lse^2): see run_rows. */
int64_t fused_cpu_loss_and_grad(const float *x, int64_t n_rows, int64_t n_classes, int64_t x_row_stride,
                                const int64_t *y, int64_t ignore_index, const float *w, double eps, int mean,
                                float *grad, float *loss, float *reduced, int n_threads, double z_loss)
{
    const double p[2] = {eps, z_loss};
    return run_rows(x, n_rows, n_classes, x_row_stride, y, ignore_index, w, LABEL_SMOOTHING, p, mean, grad, loss,
                    reduced, n_threads);
}

/* A loss of the family (kind, with its parameters p: see family_row): see run_rows. */
int64_t fused_cpu_family(const float *x, int64_t n_rows, int64_t n_classes, int64_t x_row_stride, const int64_t *y,
                         int64_t ignore_index, const float *w, int kind, const double *p, int mean, float *grad,
                         float *loss, float *reduced, int n_threads)
{
    if (kind < FOCAL || kind > ADA_FOCAL)
        return BAD_KIND;
    return run_rows(x, n_rows, n_classes, x_row_stride, y, ignore_index, w, kind, p, mean, grad, loss, reduced,
                    n_threads);
}
