/* One instruction-set variant of the per-element loops of actmon/_fused.c.
 *
 * _fused.c includes this file once per variant, under "#pragma GCC target" for the SIMD ones,
 * with VARIANT(name) naming this copy's functions (scan_avx512, ...) and HIST_COMPRESS set
 * where AVX-512 can pack the non-zero elements' bins before counting them. Counts, extrema,
 * histograms and unit maxima are the same in every variant; float sums are added in the same
 * 4096-element blocks, but in as many lanes as the vectors hold, so they differ in rounding.
 */

/* The block's bins into the job's 4 interleaved histograms. */
static inline void VARIANT(hist_block)(job_t *j, const int32_t *b, int64_t n) {
#if HIST_COMPRESS
    /* +0.0 (all bits clear) goes straight to its bin: ReLU outputs and their gradients are
     * mostly zeros. The other elements' bins are packed into idx and counted after. */
    uint32_t idx[4096 + 16];
    const __m512i half = _mm512_set1_epi32(1024);
    int64_t i = 0, packed = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i v = _mm512_loadu_si512(b + i);
        const __mmask16 nonzero = _mm512_test_epi32_mask(v, v);
        const __m512i bin = _mm512_add_epi32(_mm512_srai_epi32(v, 21), half);
        _mm512_storeu_si512(idx + packed, _mm512_maskz_compress_epi32(nonzero, bin));
        packed += __builtin_popcount(nonzero);
    }
    j->hist[0][1024] += (uint32_t)(i - packed);
    for (; i < n; i++) idx[packed++] = (uint32_t)((b[i] >> 21) + 1024);
    int64_t k = 0;
    for (; k + 4 <= packed; k += 4) {
        j->hist[0][idx[k]]++;
        j->hist[1][idx[k + 1]]++;
        j->hist[2][idx[k + 2]]++;
        j->hist[3][idx[k + 3]]++;
    }
    for (; k < packed; k++) j->hist[0][idx[k]]++;
#else
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        j->hist[0][(b[i] >> 21) + 1024]++;
        j->hist[1][(b[i + 1] >> 21) + 1024]++;
        j->hist[2][(b[i + 2] >> 21) + 1024]++;
        j->hist[3][(b[i + 3] >> 21) + 1024]++;
    }
    for (; i < n; i++) j->hist[0][(b[i] >> 21) + 1024]++;
#endif
}

/* Saturation as one test for every kind: v < lo or v > hi (strict). The caller turns tanh's
 * |v| > hi into (-hi, hi) and clipping's inclusive bounds into the next floats inward; with no
 * saturation both are infinite and nothing counts. NaN compares false everywhere. */
static inline int VARIANT(scan)(job_t *j, const float *seg, int64_t len, const int grad) {
    const int32_t *bits = (const int32_t *)seg;
    const float lo = j->lo, hi = j->hi;
    int nan = 0;
    /* Blocks keep float partial sums short (accurate) and let the loop vectorize. */
    for (int64_t start = 0; start < len; start += 4096) {
        const int64_t n = len - start < 4096 ? len - start : 4096;
        const float *p = seg + start;
        const int32_t *b = bits + start;
        float s = 0.0f, q = 0.0f, mx = -__builtin_inff(), mn = __builtin_inff();
        int32_t nz = 0, sat = 0, nf = 0, nn = 0, isnan = 0;
        if (grad) { /* output gradients: sum of squares, extrema, NaN / Inf counts */
#pragma omp simd reduction(+ : q, nf, nn, isnan) reduction(max : mx) reduction(min : mn)
            for (int64_t i = 0; i < n; i++) {
                const float v = p[i];
                const int32_t m = b[i] & 0x7fffffff;
                q += v * v;
                mx = v > mx ? v : mx;
                mn = v < mn ? v : mn;
                nf += m >= 0x7f800000;
                nn += m > 0x7f800000;
                isnan += v != v;
            }
        } else { /* activations: NaN / Inf come from the histogram's bins */
            /* Moments around the block's first value c (0 if it is not finite): sums of x and
             * x*x in float32 cancel catastrophically (a constant 1e5 read std 79, N(1e4, 1)
             * read 0); around c they hold the spread, and the raw sums are rebuilt in double. */
            const float c = p[0] - p[0] == 0.0f ? p[0] : 0.0f;
#pragma omp simd reduction(+ : s, q, nz, sat, isnan) reduction(max : mx) reduction(min : mn)
            for (int64_t i = 0; i < n; i++) {
                const float v = p[i];
                const float d = v - c;
                s += d;
                q += d * d;
                mx = v > mx ? v : mx;
                mn = v < mn ? v : mn;
                nz += (b[i] & 0x7fffffff) != 0;
                isnan += v != v;
                sat += (v < lo) | (v > hi);
            }
            double sd = s, qd = q;
            if (!isnan && (__builtin_isinf(s) || __builtin_isinf(q))) {
                /* Overflow of a finite block (a spread beyond ~1.8e19): again in double. */
                sd = qd = 0.0;
                for (int64_t i = 0; i < n; i++) {
                    const double d = (double)p[i] - (double)c;
                    sd += d;
                    qd += d * d;
                }
            }
            j->sum += sd + (double)n * c;
            j->sumsq += qd + 2.0 * c * sd + (double)n * c * c;
        }
        if (j->want_hist) VARIANT(hist_block)(j, b, n); /* the same block while it is in L1 */
        if (grad) j->sumsq += q;
        j->mx = mx > j->mx ? mx : j->mx;
        j->mn = mn < j->mn ? mn : j->mn;
        nan |= isnan != 0;
        j->nonzero += nz;
        j->nonfinite += nf;
        j->nanc += nn;
        j->sat += sat;
    }
    j->nan |= nan;
    return nan;
}

static void VARIANT(run_job)(job_t *j) {
    if (!j->want_units) { /* one stretch of rows: two inlined copies of scan(), one per kind */
        const float *rows = j->x + j->o0 * j->units * j->inner;
        const int64_t n = (j->o1 - j->o0) * j->units * j->inner;
        if (j->grad)
            VARIANT(scan)(j, rows, n, 1);
        else
            VARIANT(scan)(j, rows, n, 0);
    } else if (j->inner == 1) {
        /* Units on the last axis: groups of rows of about a block, each unit's max over the
         * group's rows, then one pass over the group while it is in L1. The max skips NaN and
         * keeps one already there; mark_nan_units() mends a group whose pass saw a NaN. */
        float *um = j->unit_max;
        const int64_t units = j->units;
        const int64_t group = units >= 4096 ? 1 : 4096 / units;
        for (int64_t o = j->o0; o < j->o1; o += group) {
            const int64_t end = o + group < j->o1 ? o + group : j->o1;
            for (int64_t r = o; r < end; r++) {
                const float *row = j->x + r * units;
#pragma omp simd
                for (int64_t u = 0; u < units; u++) um[u] = row[u] > um[u] ? row[u] : um[u];
            }
            if (VARIANT(scan)(j, j->x + o * units, (end - o) * units, 0))
                mark_nan_units(um, j->x + o * units, end - o, units, 0, units, 1);
        }
    } else {
        /* Units with an inner extent (N, C, H, W): groups of whole units of about a block,
         * each unit's max over its own extent, then one pass over the group while it is in L1
         * (a pass per unit costs its fixed part per 7x7 or 4x4 map: several times the work). */
        float *um = j->unit_max;
        const int64_t inner = j->inner;
        const int64_t group = inner >= 4096 ? 1 : 4096 / inner;
        for (int64_t o = j->o0; o < j->o1; o++) {
            const float *row = j->x + o * j->units * inner;
            for (int64_t u0 = 0; u0 < j->units; u0 += group) {
                const int64_t u1 = u0 + group < j->units ? u0 + group : j->units;
                for (int64_t u = u0; u < u1; u++) {
                    const float *p = row + u * inner;
                    float mx = -__builtin_inff();
#pragma omp simd reduction(max : mx)
                    for (int64_t i = 0; i < inner; i++) mx = p[i] > mx ? p[i] : mx;
                    um[u] = mx > um[u] ? mx : um[u]; /* NaN skipped; one already there kept */
                }
                if (VARIANT(scan)(j, row + u0 * inner, (u1 - u0) * inner, 0))
                    mark_nan_units(um, row, 1, 0, u0, u1, inner);
            }
        }
    }
}

/* Sum of squares of n floats (float partial sums per 4096-element block, double total). */
static double VARIANT(sumsq)(const float *x, int64_t n) {
    double total = 0.0;
    for (int64_t start = 0; start < n; start += 4096) {
        const int64_t len = n - start < 4096 ? n - start : 4096;
        const float *p = x + start;
        float q = 0.0f;
#pragma omp simd reduction(+ : q)
        for (int64_t i = 0; i < len; i++) q += p[i] * p[i];
        total += q;
    }
    return total;
}
