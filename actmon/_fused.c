/* Fused CPU statistics kernels for actmon (optional: actmon.stats falls back to torch ops).
 *
 * One pass over a contiguous float32 tensor computes everything the torch-op path computes
 * in 6 to 10 passes: sum and sum of squares (double accumulators), max and min (NaN
 * propagating, as torch.amax), the exact non-zero count, the saturated count, the 2048-bin
 * bit-pattern histogram ((bits >> 21) + 1024) and, for layers with units, each unit's maximum.
 * The tensor is read as [outer, units, inner] (units = 1, inner = 1 for a flat pass).
 * The GIL is released. A pass can be split over threads on the outer axis (stats.py passes
 * ACTMON_FUSED_THREADS, one by default), above 2**18 elements.
 * Arguments are raw addresses (tensor.data_ptr()): the caller owns every buffer and checks
 * dtypes, contiguity and sizes (actmon/stats.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define BINS 2048
#define MAX_THREADS 64

typedef struct {
    const float *x;
    int64_t o0, o1, units, inner;
    float lo, hi; /* saturated: v < lo or v > hi (see scan()) */
    int want_hist, want_units, grad;
    double sum, sumsq;
    float mx, mn;
    int nan;
    int64_t nonzero, nonfinite, nanc, sat;
    float *unit_max; /* this job's own copy (units floats) or NULL */
    uint32_t hist[4][BINS]; /* 4 interleaved copies: repeated bins do not wait on each other */
} job_t;

/* Saturation as one test for every kind: v < lo or v > hi (strict). The caller turns tanh's
 * |v| > hi into (-hi, hi) and clipping's inclusive bounds into the next floats inward; with no
 * saturation both are infinite and nothing counts. NaN compares false everywhere. */
static inline void scan(job_t *j, const float *seg, int64_t len, float *umax, const int grad) {
    const int32_t *bits = (const int32_t *)seg;
    const float lo = j->lo, hi = j->hi;
    float seg_max = -__builtin_inff();
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
#pragma omp simd reduction(+ : s, q, nz, sat, isnan) reduction(max : mx) reduction(min : mn)
            for (int64_t i = 0; i < n; i++) {
                const float v = p[i];
                s += v;
                q += v * v;
                mx = v > mx ? v : mx;
                mn = v < mn ? v : mn;
                nz += (b[i] & 0x7fffffff) != 0;
                isnan += v != v;
                sat += (v < lo) | (v > hi);
            }
        }
        if (j->want_hist) { /* the same block again while it is in L1 */
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) {
                j->hist[0][(b[i] >> 21) + 1024]++;
                j->hist[1][(b[i + 1] >> 21) + 1024]++;
                j->hist[2][(b[i + 2] >> 21) + 1024]++;
                j->hist[3][(b[i + 3] >> 21) + 1024]++;
            }
            for (; i < n; i++) j->hist[0][(b[i] >> 21) + 1024]++;
        }
        j->sum += s;
        j->sumsq += q;
        j->mx = mx > j->mx ? mx : j->mx;
        j->mn = mn < j->mn ? mn : j->mn;
        seg_max = mx > seg_max ? mx : seg_max;
        nan |= isnan != 0;
        j->nonzero += nz;
        j->nonfinite += nf;
        j->nanc += nn;
        j->sat += sat;
    }
    if (umax) *umax = (nan || *umax != *umax) ? __builtin_nanf("") : (seg_max > *umax ? seg_max : *umax);
    j->nan |= nan;
}

static void *run_job(void *arg) {
    job_t *j = (job_t *)arg;
    for (int64_t o = j->o0; o < j->o1; o++) {
        const float *row = j->x + o * j->units * j->inner;
        if (!j->want_units) {
            if (j->grad) /* two inlined copies of scan(), one per kind of tensor */
                scan(j, row, j->units * j->inner, NULL, 1);
            else
                scan(j, row, j->units * j->inner, NULL, 0);
        } else if (j->inner == 1) { /* units on the last axis: one element per unit */
            for (int64_t u = 0; u < j->units; u++) {
                const float v = row[u];
                float *um = &j->unit_max[u];
                *um = (v > *um || v != v) ? v : *um;
            }
            scan(j, row, j->units, NULL, 0);
        } else {
            for (int64_t u = 0; u < j->units; u++)
                scan(j, row + u * j->inner, j->inner, &j->unit_max[u], 0);
        }
    }
    return NULL;
}

/* Threads a pass uses: one below 2**18 elements (starting a thread costs ~20 us). */
static int plan(int threads, int64_t outer, int64_t n) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > outer) threads = (int)outer;
    if (n < (1 << 18) || threads < 1) threads = 1;
    return threads;
}

/* A job over rows [o0, o1) of x read as [outer, units, inner], its statistics empty. */
static void init_job(job_t *j, const float *x, int64_t o0, int64_t o1, int64_t units,
                     int64_t inner, float lo, float hi, int want_hist, int want_units, int grad) {
    memset(j, 0, sizeof(*j));
    j->x = x;
    j->o0 = o0;
    j->o1 = o1;
    j->units = units;
    j->inner = inner;
    j->lo = lo;
    j->hi = hi;
    j->want_hist = want_hist;
    j->want_units = want_units;
    j->grad = grad;
    j->mx = -__builtin_inff();
    j->mn = __builtin_inff();
}

static int run(job_t *jobs, int threads, const float *x, int64_t outer, int64_t units,
               int64_t inner, float lo, float hi, int want_hist, int want_units, int grad) {
    threads = plan(threads, outer, outer * units * inner);
    for (int t = 0; t < threads; t++) {
        job_t *j = &jobs[t];
        init_job(j, x, outer * t / threads, outer * (t + 1) / threads, units, inner, lo, hi,
                 want_hist, want_units, grad);
        if (want_units) {
            j->unit_max = (float *)malloc(sizeof(float) * units);
            if (!j->unit_max) return -1;
            for (int64_t u = 0; u < units; u++) j->unit_max[u] = -__builtin_inff();
        }
    }
    pthread_t tids[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tids[t], NULL, run_job, &jobs[t]) != 0) break;
        started = t;
    }
    run_job(&jobs[0]);
    for (int t = started + 1; t < threads; t++) run_job(&jobs[t]); /* threads that failed to start */
    for (int t = 1; t <= started; t++) pthread_join(tids[t], NULL);
    return threads;
}

/* A flat pass: 1024 equal chunks on the outer axis (so threads get equal shares), and the tail
 * that does not divide into them as one more job. Returns the number of jobs used. */
static int run_flat(job_t *jobs, int threads, const float *x, int64_t n, float lo, float hi,
                    int want_hist, int grad) {
    int64_t outer = n >= 1024 ? 1024 : 1, inner = n / outer, rest = n - outer * inner;
    int used = run(jobs, threads, x, outer, 1, inner, lo, hi, want_hist, 0, grad);
    if (used > 0 && rest) {
        job_t *tail = &jobs[used];
        init_job(tail, x + outer * inner, 0, 1, 1, rest, lo, hi, want_hist, 0, grad);
        run_job(tail);
        used += 1;
    }
    return used;
}

static void merge(job_t *jobs, int threads, int64_t units, int want_units) {
    job_t *a = &jobs[0];
    for (int t = 1; t < threads; t++) {
        job_t *b = &jobs[t];
        a->sum += b->sum;
        a->sumsq += b->sumsq;
        a->mx = b->mx > a->mx ? b->mx : a->mx;
        a->mn = b->mn < a->mn ? b->mn : a->mn;
        a->nan |= b->nan;
        a->nonzero += b->nonzero;
        a->nonfinite += b->nonfinite;
        a->nanc += b->nanc;
        a->sat += b->sat;
        for (int c = 0; c < 4; c++)
            for (int k = 0; k < BINS; k++) a->hist[c][k] += b->hist[c][k];
        if (want_units)
            for (int64_t u = 0; u < units; u++) {
                const float v = b->unit_max[u];
                a->unit_max[u] = (v > a->unit_max[u] || v != v) ? v : a->unit_max[u];
            }
    }
    if (a->nan) a->mx = a->mn = __builtin_nanf("");
}

static void release(job_t *jobs, int threads) {
    for (int t = 0; t < threads; t++) free(jobs[t].unit_max);
    free(jobs);
}

/* activation(x, outer, units, inner, mode, lo, hi, sums, maxes, counts, hist, unit_max, threads)
 * sums: float32 [sum, sumsq]; maxes: float32 [max, min]; counts: int32 [nonzero, saturated];
 * hist: int64 [2048] (overwritten); unit_max: float32 [units] or 0 (overwritten). */
static PyObject *activation(PyObject *self, PyObject *args) {
    unsigned long long x, sums, maxes, counts, hist, unit_max;
    long long outer, units, inner;
    int mode, threads;
    float lo, hi;
    if (!PyArg_ParseTuple(args, "KLLLiffKKKKKi", &x, &outer, &units, &inner, &mode, &lo, &hi,
                          &sums, &maxes, &counts, &hist, &unit_max, &threads))
        return NULL;
    int want_units = unit_max != 0;
    const int64_t n = outer * units * inner;
    const int njobs = plan(threads, want_units ? outer : (n >= 1024 ? 1024 : 1), n) + 1;
    if (mode == 0) {
        lo = -__builtin_inff();
        hi = __builtin_inff();
    } else if (mode == 1) {
        lo = -hi;
    } else if (mode == 3) { /* inclusive bounds: v <= lo  <=>  v < nextafter(lo, +inf) */
        lo = nextafterf(lo, __builtin_inff());
        hi = nextafterf(hi, -__builtin_inff());
    }
    job_t *jobs = (job_t *)calloc(njobs, sizeof(job_t));
    if (!jobs) return PyErr_NoMemory();
    int used;
    Py_BEGIN_ALLOW_THREADS
    if (want_units)
        used = run(jobs, threads, (const float *)x, outer, units, inner, lo, hi, 1, 1, 0);
    else
        used = run_flat(jobs, threads, (const float *)x, n, lo, hi, 1, 0);
    if (used > 0) merge(jobs, used, units, want_units);
    Py_END_ALLOW_THREADS
    if (used < 0) {
        release(jobs, njobs);
        return PyErr_NoMemory();
    }
    job_t *a = &jobs[0];
    ((float *)sums)[0] = (float)a->sum;
    ((float *)sums)[1] = (float)a->sumsq;
    ((float *)maxes)[0] = a->mx;
    ((float *)maxes)[1] = a->mn;
    ((int32_t *)counts)[0] = (int32_t)a->nonzero;
    ((int32_t *)counts)[1] = (int32_t)a->sat;
    for (int k = 0; k < BINS; k++)
        ((int64_t *)hist)[k] = (int64_t)a->hist[0][k] + a->hist[1][k] + a->hist[2][k] + a->hist[3][k];
    if (want_units) memcpy((void *)unit_max, a->unit_max, sizeof(float) * units);
    release(jobs, used);
    Py_RETURN_NONE;
}

/* gradient(g, n, sums, maxes, hist, threads)
 * sums: float32 [sum of squares, non-finite count, NaN count]; maxes: float32 [max, min];
 * hist: int64 [2048] (overwritten) or 0 for none. */
static PyObject *gradient(PyObject *self, PyObject *args) {
    unsigned long long g, sums, maxes, hist;
    long long n;
    int threads;
    if (!PyArg_ParseTuple(args, "KLKKKi", &g, &n, &sums, &maxes, &hist, &threads)) return NULL;
    job_t *jobs = (job_t *)calloc(plan(threads, n >= 1024 ? 1024 : 1, n) + 1, sizeof(job_t));
    if (!jobs) return PyErr_NoMemory();
    int used;
    Py_BEGIN_ALLOW_THREADS
    used = run_flat(jobs, threads, (const float *)g, n, -__builtin_inff(), __builtin_inff(),
                    hist != 0, 1);
    merge(jobs, used, 1, 0);
    Py_END_ALLOW_THREADS
    job_t *a = &jobs[0];
    ((float *)sums)[0] = (float)a->sumsq;
    ((float *)sums)[1] = (float)a->nonfinite;
    ((float *)sums)[2] = (float)a->nanc;
    ((float *)maxes)[0] = a->mx;
    ((float *)maxes)[1] = a->mn;
    if (hist)
        for (int k = 0; k < BINS; k++)
        ((int64_t *)hist)[k] = (int64_t)a->hist[0][k] + a->hist[1][k] + a->hist[2][k] + a->hist[3][k];
    release(jobs, used);
    Py_RETURN_NONE;
}

/* norms(addresses, sizes, out): out[i] = L2 norm of the float32 array at addresses[i] with
 * sizes[i] elements (float32 results, double accumulation; Inf and NaN propagate). One call
 * for every parameter of a model: the per-tensor dispatch of torch._foreach_norm on a CPU
 * costs more than the arithmetic for small parameters. */
static PyObject *norms(PyObject *self, PyObject *args) {
    PyObject *addresses, *sizes;
    unsigned long long out;
    if (!PyArg_ParseTuple(args, "OOK", &addresses, &sizes, &out)) return NULL;
    PyObject *a = PySequence_Fast(addresses, "addresses must be a sequence");
    if (!a) return NULL;
    PyObject *z = PySequence_Fast(sizes, "sizes must be a sequence");
    if (!z) {
        Py_DECREF(a);
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(a);
    if (PySequence_Fast_GET_SIZE(z) != count) {
        Py_DECREF(a);
        Py_DECREF(z);
        PyErr_SetString(PyExc_ValueError, "addresses and sizes differ in length");
        return NULL;
    }
    for (Py_ssize_t t = 0; t < count; t++) {
        const float *x = (const float *)PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(a, t));
        const long long n = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(z, t));
        if (PyErr_Occurred()) {
            Py_DECREF(a);
            Py_DECREF(z);
            return NULL;
        }
        double total = 0.0;
        for (long long start = 0; start < n; start += 4096) {
            const long long len = n - start < 4096 ? n - start : 4096;
            const float *p = x + start;
            float q = 0.0f;
#pragma omp simd reduction(+ : q)
            for (long long i = 0; i < len; i++) q += p[i] * p[i];
            total += q;
        }
        ((float *)out)[t] = (float)sqrt(total);
    }
    Py_DECREF(a);
    Py_DECREF(z);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"norms", norms, METH_VARARGS, "L2 norms of many float32 arrays (see actmon/_fused.c)."},
    {"activation", activation, METH_VARARGS, "Fused activation statistics (see actmon/_fused.c)."},
    {"gradient", gradient, METH_VARARGS, "Fused output-gradient statistics (see actmon/_fused.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
