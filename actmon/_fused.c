/* Fused CPU statistics kernels for actmon (optional: actmon.stats falls back to torch ops).
 *
 * One pass over a contiguous float32 tensor computes everything the torch-op path computes
 * in 6 to 10 passes: sum and sum of squares (double accumulators), max and min (NaN
 * propagating, as torch.amax), the exact non-zero count, the saturated count, the 2048-bin
 * bit-pattern histogram ((bits >> 21) + 1024) and, for layers with units, each unit's maximum.
 * The tensor is read as [outer, units, inner] (units = 1 for a flat pass, one row per thread).
 *
 * Speed:
 * - The per-element loops (actmon/_fused_scan.h) are compiled for AVX-512, AVX2 and the base
 *   instruction set; the best the CPU runs is chosen at import (isa() says which).
 * - The GIL is released, and a pass above 2**15 elements is split over OpenMP threads (stats.py
 *   passes how many). Built with -fopenmp, this module uses the OpenMP runtime torch has
 *   already loaded (the same libgomp.so.1), so the work goes to torch's own idle workers
 *   instead of competing with them.
 * Arguments are raw addresses (tensor.data_ptr()): the caller owns every buffer and checks
 * dtypes, contiguity and sizes (actmon/stats.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ACTMON_X86_VARIANTS 1
#include <immintrin.h>
#endif

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
    /* 4 interleaved copies, so repeated bins do not wait on each other; padded, because rows
     * exactly 8 KB apart make the same bin of two copies alias in the store buffer. */
    uint32_t hist[4][BINS + 16];
} job_t;

/* The units in [u0, u1) with a NaN among rows [0, rows) of x read as [rows, row_stride] with
 * each unit's `inner` elements contiguous: their maxima to NaN. The unit loops take maxima that
 * skip NaN (a plain vector max); this puts NaN back for a group whose pass saw one. */
static void mark_nan_units(float *unit_max, const float *x, int64_t rows, int64_t row_stride,
                           int64_t u0, int64_t u1, int64_t inner) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t u = u0; u < u1; u++)
            for (int64_t i = 0; i < inner; i++) {
                const float v = x[r * row_stride + u * inner + i];
                if (v != v) unit_max[u] = __builtin_nanf("");
            }
}

#define VARIANT(name) name##_generic
#define HIST_COMPRESS 0
#include "_fused_scan.h"
#undef VARIANT
#undef HIST_COMPRESS

#ifdef ACTMON_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define VARIANT(name) name##_avx2
#define HIST_COMPRESS 0
#include "_fused_scan.h"
#undef VARIANT
#undef HIST_COMPRESS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt")
#define VARIANT(name) name##_avx512
#define HIST_COMPRESS 1
#include "_fused_scan.h"
#undef VARIANT
#undef HIST_COMPRESS
#pragma GCC pop_options
#endif

typedef struct {
    const char *name;
    void (*run_job)(job_t *);
    double (*sumsq)(const float *, int64_t);
} isa_t;

static const isa_t ISAS[] = {
#ifdef ACTMON_X86_VARIANTS
    {"avx512", run_job_avx512, sumsq_avx512},
    {"avx2", run_job_avx2, sumsq_avx2},
#endif
    {"generic", run_job_generic, sumsq_generic},
};
#define N_ISAS ((int)(sizeof(ISAS) / sizeof(ISAS[0])))

static const isa_t *ISA = &ISAS[N_ISAS - 1];

/* Whether this CPU runs the variant named. */
static int cpu_runs(const char *name) {
#ifdef ACTMON_X86_VARIANTS
    __builtin_cpu_init();
    if (!strcmp(name, "avx512"))
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("popcnt");
    if (!strcmp(name, "avx2"))
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return !strcmp(name, "generic");
}

/* Threads a pass uses: one below 2**15 elements, or without OpenMP. */
static int plan(int threads, int64_t outer, int64_t n) {
#ifndef _OPENMP
    threads = 1;
#endif
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > outer) threads = (int)outer;
    if (n < (1 << 15) || threads < 1) threads = 1;
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

/* Per calling thread and kept between calls: the jobs (33 KB each) and their per-unit maxima.
 * Allocating and freeing ~100 KB per call churned the heap between torch's large allocations
 * (and zeroed it twice). A thread's buffers only grow; they live as long as the process. */
static __thread void *tls_jobs, *tls_units;
static __thread int64_t tls_jobs_bytes, tls_units_bytes;

/* *buffer with at least `bytes` bytes (grown with realloc, never shrunk), or NULL. */
static void *borrow(void **buffer, int64_t *capacity, int64_t bytes) {
    if (bytes > *capacity) {
        void *grown = realloc(*buffer, bytes);
        if (!grown) return NULL;
        *buffer = grown;
        *capacity = bytes;
    }
    return *buffer;
}

static job_t *borrow_jobs(int n) {
    return (job_t *)borrow(&tls_jobs, &tls_jobs_bytes, (int64_t)sizeof(job_t) * n);
}

static float *borrow_units(int64_t n) {
    return (float *)borrow(&tls_units, &tls_units_bytes, (int64_t)sizeof(float) * n);
}

static int run(job_t *jobs, int threads, const float *x, int64_t outer, int64_t units,
               int64_t inner, float lo, float hi, int want_hist, int want_units, int grad) {
    threads = plan(threads, outer, outer * units * inner);
    float *unit_max = want_units ? borrow_units(threads * units) : NULL;
    if (want_units && !unit_max) return -1;
    for (int t = 0; t < threads; t++) {
        job_t *j = &jobs[t];
        init_job(j, x, outer * t / threads, outer * (t + 1) / threads, units, inner, lo, hi,
                 want_hist, want_units, grad);
        if (want_units) {
            j->unit_max = unit_max + t * units;
            for (int64_t u = 0; u < units; u++) j->unit_max[u] = -__builtin_inff();
        }
    }
    if (threads == 1) {
        ISA->run_job(&jobs[0]);
        return 1;
    }
#ifdef _OPENMP
    /* Dynamic: if the runtime gives fewer threads than asked, every job still runs. */
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int t = 0; t < threads; t++) ISA->run_job(&jobs[t]);
#endif
    return threads;
}

/* A flat pass: one equal chunk per thread, and the tail that does not divide into them as one
 * more job. Returns the number of jobs used. */
static int run_flat(job_t *jobs, int threads, const float *x, int64_t n, float lo, float hi,
                    int want_hist, int grad) {
    int64_t outer = plan(threads, n, n), inner = n / outer, rest = n - outer * inner;
    int used = run(jobs, threads, x, outer, 1, inner, lo, hi, want_hist, 0, grad);
    if (used > 0 && rest) {
        job_t *tail = &jobs[used];
        init_job(tail, x + outer * inner, 0, 1, 1, rest, lo, hi, want_hist, 0, grad);
        ISA->run_job(tail);
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

/* NaN-propagating max, as torch.maximum and amax. */
static inline float nanmax(float a, float b) {
    return (a != a || b != b) ? __builtin_nanf("") : (a > b ? a : b);
}

static inline int64_t hist_total(const job_t *a, int k) {
    return (int64_t)a->hist[0][k] + a->hist[1][k] + a->hist[2][k] + a->hist[3][k];
}

/* Non-finite bins of the raw histogram: +-Inf and NaN (see actmon/stats.py). */
static const int NONFINITE_BINS[] = {1024 + 1020, 1020, 1024 + 1021, 1024 + 1022, 1024 + 1023,
                                     1021, 1022, 1023};

/* One activation pass merged into (*out)[0] (this thread's jobs); the saturation mode
 * turned into bounds: 0 none, 1 tanh (|v| > hi), 2 sigmoid (v < lo or v > hi), 3 clipping
 * (v <= lo or v >= hi). Returns the number of jobs used, or -1 out of memory. */
static int activation_pass(job_t **out, const float *x, int64_t outer, int64_t units,
                           int64_t inner, int mode, float lo, float hi, int want_units,
                           int threads) {
    const int64_t n = outer * units * inner;
    job_t *jobs = borrow_jobs(plan(threads, want_units ? outer : n, n) + 1);
    *out = jobs;
    if (!jobs) return -1;
    if (mode == 0) {
        lo = -__builtin_inff();
        hi = __builtin_inff();
    } else if (mode == 1) {
        lo = -hi;
    } else if (mode == 3) { /* inclusive bounds: v <= lo  <=>  v < nextafter(lo, +inf) */
        lo = nextafterf(lo, __builtin_inff());
        hi = nextafterf(hi, -__builtin_inff());
    }
    int used;
    Py_BEGIN_ALLOW_THREADS
    if (want_units)
        used = run(jobs, threads, x, outer, units, inner, lo, hi, 1, 1, 0);
    else
        used = run_flat(jobs, threads, x, n, lo, hi, 1, 0);
    if (used > 0) merge(jobs, used, units, want_units);
    Py_END_ALLOW_THREADS
    return used; /* -1: the per-unit buffer could not be allocated */
}

/* The arguments activation() and activation_into() share, parsed, and the pass run:
 * (x, outer, units, inner, mode, lo, hi, 4 output addresses, unit_max address or 0, threads). */
typedef struct {
    unsigned long long out[4], unit_max;
    long long units;
    job_t *jobs;
} activation_call_t;

static int activation_call(PyObject *args, activation_call_t *c) {
    unsigned long long x;
    long long outer, inner;
    int mode, threads;
    float lo, hi;
    if (!PyArg_ParseTuple(args, "KLLLiffKKKKKi", &x, &outer, &c->units, &inner, &mode, &lo, &hi,
                          &c->out[0], &c->out[1], &c->out[2], &c->out[3], &c->unit_max, &threads))
        return 0;
    if (activation_pass(&c->jobs, (const float *)x, outer, c->units, inner, mode, lo, hi,
                        c->unit_max != 0, threads) < 0) {
        PyErr_NoMemory();
        return 0;
    }
    return 1;
}

/* activation(x, outer, units, inner, mode, lo, hi, sums, maxes, counts, hist, unit_max, threads)
 * sums: float64 [sum, sumsq]; maxes: float32 [max, min]; counts: int32 [nonzero, saturated];
 * hist: int64 [2048] (overwritten); unit_max: float32 [units] or 0 (overwritten). */
static PyObject *activation(PyObject *self, PyObject *args) {
    activation_call_t c;
    if (!activation_call(args, &c)) return NULL;
    const job_t *a = &c.jobs[0];
    double *sums = (double *)c.out[0];
    float *maxes = (float *)c.out[1];
    int32_t *counts = (int32_t *)c.out[2];
    int64_t *hist = (int64_t *)c.out[3];
    sums[0] = a->sum;
    sums[1] = a->sumsq;
    maxes[0] = a->mx;
    maxes[1] = a->mn;
    counts[0] = (int32_t)a->nonzero;
    counts[1] = (int32_t)a->sat;
    for (int k = 0; k < BINS; k++) hist[k] = hist_total(a, k);
    if (c.unit_max) memcpy((void *)c.unit_max, a->unit_max, sizeof(float) * c.units);
    Py_RETURN_NONE;
}

/* activation_into(x, outer, units, inner, mode, lo, hi, sum_row, max_row, count_row, hist_row,
 *                 unit_max, threads) -> this call's count of non-finite elements
 * The same pass added straight into one layer's rows of the window buffers (no per-call slots
 * and no fold): sum_row float64 [sum, sumsq] +=; max_row float32 [max, -min] max=;
 * count_row int64 [nonzero, saturated] +=; hist_row int64 [2048] +=; unit_max float32 [units]
 * max= (the step's per-unit maxima) or 0. Maxima propagate NaN, as the fold's amax does. */
static PyObject *activation_into(PyObject *self, PyObject *args) {
    activation_call_t c;
    if (!activation_call(args, &c)) return NULL;
    const job_t *a = &c.jobs[0];
    double *sums = (double *)c.out[0];
    float *maxes = (float *)c.out[1];
    int64_t *counts = (int64_t *)c.out[2], *hist = (int64_t *)c.out[3];
    sums[0] += a->sum;
    sums[1] += a->sumsq;
    maxes[0] = nanmax(maxes[0], a->mx);
    maxes[1] = nanmax(maxes[1], -a->mn);
    counts[0] += a->nonzero;
    counts[1] += a->sat;
    int64_t nonfinite = 0;
    for (int k = 0; k < BINS; k++) hist[k] += hist_total(a, k);
    for (int k = 0; k < 8; k++) nonfinite += hist_total(a, NONFINITE_BINS[k]);
    if (c.unit_max) {
        float *um = (float *)c.unit_max;
        for (int64_t u = 0; u < c.units; u++) um[u] = nanmax(um[u], a->unit_max[u]);
    }
    return PyLong_FromLongLong(nonfinite);
}

/* One output-gradient pass merged into jobs[0]; returns the jobs used (-1: out of memory). */
static int gradient_pass(job_t **out, const float *g, int64_t n, int want_hist, int threads) {
    job_t *jobs = borrow_jobs(plan(threads, n, n) + 1);
    *out = jobs;
    if (!jobs) return -1;
    int used;
    Py_BEGIN_ALLOW_THREADS
    used = run_flat(jobs, threads, g, n, -__builtin_inff(), __builtin_inff(), want_hist, 1);
    merge(jobs, used, 1, 0);
    Py_END_ALLOW_THREADS
    return used;
}

/* gradient(g, n, sums, maxes, hist, threads)
 * sums: float32 [sum of squares, non-finite count, NaN count]; maxes: float32 [max, min];
 * hist: int64 [2048] (overwritten) or 0 for none. */
static PyObject *gradient(PyObject *self, PyObject *args) {
    unsigned long long g, sums, maxes, hist;
    long long n;
    int threads;
    if (!PyArg_ParseTuple(args, "KLKKKi", &g, &n, &sums, &maxes, &hist, &threads)) return NULL;
    job_t *jobs;
    const int used = gradient_pass(&jobs, (const float *)g, n, hist != 0, threads);
    if (used < 0) return PyErr_NoMemory();
    job_t *a = &jobs[0];
    ((float *)sums)[0] = (float)a->sumsq;
    ((float *)sums)[1] = (float)a->nonfinite;
    ((float *)sums)[2] = (float)a->nanc;
    ((float *)maxes)[0] = a->mx;
    ((float *)maxes)[1] = a->mn;
    if (hist)
        for (int k = 0; k < BINS; k++) ((int64_t *)hist)[k] = hist_total(a, k);
    Py_RETURN_NONE;
}

/* gradient_into(g, n, sum_row, max_row, hist_row, threads): the same pass added into one
 * layer's window rows: sum_row float64 [sum of squares, non-finite, NaN] +=; max_row float32
 * [max, -min] max=; hist_row int64 [2048] += (or 0 for none). */
static PyObject *gradient_into(PyObject *self, PyObject *args) {
    unsigned long long g, sum_row, max_row, hist_row;
    long long n;
    int threads;
    if (!PyArg_ParseTuple(args, "KLKKKi", &g, &n, &sum_row, &max_row, &hist_row, &threads))
        return NULL;
    job_t *jobs;
    const int used = gradient_pass(&jobs, (const float *)g, n, hist_row != 0, threads);
    if (used < 0) return PyErr_NoMemory();
    job_t *a = &jobs[0];
    double *sums = (double *)sum_row;
    float *maxes = (float *)max_row;
    sums[0] += a->sumsq;
    sums[1] += (double)a->nonfinite;
    sums[2] += (double)a->nanc;
    maxes[0] = nanmax(maxes[0], a->mx);
    maxes[1] = nanmax(maxes[1], -a->mn);
    if (hist_row)
        for (int k = 0; k < BINS; k++) ((int64_t *)hist_row)[k] += hist_total(a, k);
    Py_RETURN_NONE;
}

/* fold_units(step_max, unit_max, unit_layer, batch_dead, n): the end of a sampled step for the
 * per-unit buffers (float32 step_max and unit_max, int64 unit_layer, float64 batch_dead):
 * unit_max = max(unit_max, step_max) (NaN propagates); a unit whose step maximum is <= 0 (and
 * that ran: not -inf) adds 1 to its layer's batch_dead; step_max is reset to -inf. */
static PyObject *fold_units(PyObject *self, PyObject *args) {
    unsigned long long step_max, unit_max, unit_layer, batch_dead;
    long long n;
    if (!PyArg_ParseTuple(args, "KKKKL", &step_max, &unit_max, &unit_layer, &batch_dead, &n))
        return NULL;
    float *sm = (float *)step_max, *um = (float *)unit_max;
    const int64_t *layer = (const int64_t *)unit_layer;
    double *dead = (double *)batch_dead;
    for (long long u = 0; u < n; u++) {
        const float v = sm[u];
        um[u] = nanmax(um[u], v);
        if (v <= 0.0f && v != -__builtin_inff()) dead[layer[u]] += 1.0;
        sm[u] = -__builtin_inff();
    }
    Py_RETURN_NONE;
}

/* norms(addresses, sizes, out, threads): out[i] = L2 norm of the float32 array at addresses[i]
 * with sizes[i] elements (float32 results, double accumulation; Inf and NaN propagate). One
 * call for every parameter of a model: the per-tensor dispatch of torch._foreach_norm on a CPU
 * costs more than the arithmetic for small parameters. The arrays are cut into fixed chunks
 * (the same sums whatever the threads) that OpenMP threads share: parameters and gradients
 * are cold in the cache by the time the optimizer steps, so this is bandwidth-bound. */
#define NORM_CHUNK (1 << 16)
static PyObject *norms(PyObject *self, PyObject *args) {
    PyObject *addresses, *sizes;
    unsigned long long out;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOK|i", &addresses, &sizes, &out, &threads)) return NULL;
    PyObject *a = PySequence_Fast(addresses, "addresses must be a sequence");
    if (!a) return NULL;
    PyObject *z = PySequence_Fast(sizes, "sizes must be a sequence");
    if (!z) {
        Py_DECREF(a);
        return NULL;
    }
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(a);
    if (PySequence_Fast_GET_SIZE(z) != count) {
        Py_DECREF(a);
        Py_DECREF(z);
        PyErr_SetString(PyExc_ValueError, "addresses and sizes differ in length");
        return NULL;
    }
    const float **base = (const float **)malloc(sizeof(float *) * (count + 1));
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (count + 1)); /* first chunk of each */
    int64_t *len = (int64_t *)malloc(sizeof(int64_t) * (count + 1));
    int64_t chunks = 0;
    for (Py_ssize_t t = 0; base && first && len && t < count; t++) {
        base[t] = (const float *)PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(a, t));
        len[t] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(z, t));
        first[t] = chunks;
        chunks += (len[t] + NORM_CHUNK - 1) / NORM_CHUNK;
    }
    Py_DECREF(a);
    Py_DECREF(z);
    double *part = base && first && len ? (double *)malloc(sizeof(double) * (chunks + 1)) : NULL;
    if (!part || PyErr_Occurred()) {
        free(base);
        free(first);
        free(len);
        free(part);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    first[count] = chunks;
    Py_BEGIN_ALLOW_THREADS
    if (chunks < 8 || threads < 2) threads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
#endif
    for (Py_ssize_t t = 0; t < count; t++)
        for (int64_t c = first[t]; c < first[t + 1]; c++) {
            const int64_t start = (c - first[t]) * NORM_CHUNK;
            const int64_t n = len[t] - start < NORM_CHUNK ? len[t] - start : NORM_CHUNK;
            part[c] = ISA->sumsq(base[t] + start, n);
        }
    for (Py_ssize_t t = 0; t < count; t++) {
        double total = 0.0;
        for (int64_t c = first[t]; c < first[t + 1]; c++) total += part[c];
        ((float *)out)[t] = (float)sqrt(total);
    }
    Py_END_ALLOW_THREADS
    free(base);
    free(first);
    free(len);
    free(part);
    Py_RETURN_NONE;
}

/* add_squares(values, positions, acc, stride, column, counts): for each i, with p =
 * positions[i]: acc[p * stride + column] += values[i]**2 (float32 values, float64 acc) and, when
 * counts is not 0, counts[p] += 1 (int64). The window's per-parameter squared norms on a CPU,
 * without a torch op. */
static PyObject *add_squares(PyObject *self, PyObject *args) {
    unsigned long long values, acc, counts;
    PyObject *positions;
    long long stride, column;
    if (!PyArg_ParseTuple(args, "KOKLLK", &values, &positions, &acc, &stride, &column, &counts))
        return NULL;
    PyObject *p = PySequence_Fast(positions, "positions must be a sequence");
    if (!p) return NULL;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(p);
    for (Py_ssize_t i = 0; i < n; i++) {
        const long long pos = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(p, i));
        if (PyErr_Occurred()) {
            Py_DECREF(p);
            return NULL;
        }
        const double v = ((const float *)values)[i];
        ((double *)acc)[pos * stride + column] += v * v;
        if (counts) ((int64_t *)counts)[pos] += 1;
    }
    Py_DECREF(p);
    Py_RETURN_NONE;
}

/* isa() -> the instruction-set variant in use; set_isa(name) picks another (tests compare them):
 * ValueError if this build or CPU lacks it. variants() -> those this CPU runs, best first. */
static PyObject *isa(PyObject *self, PyObject *args) { return PyUnicode_FromString(ISA->name); }

static PyObject *set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    for (int k = 0; k < N_ISAS; k++)
        if (!strcmp(ISAS[k].name, name) && cpu_runs(name)) {
            ISA = &ISAS[k];
            Py_RETURN_NONE;
        }
    return PyErr_Format(PyExc_ValueError, "instruction set '%s' is not available here (this CPU and build run: see variants())", name);
}

static PyObject *variants(PyObject *self, PyObject *args) {
    PyObject *out = PyList_New(0);
    for (int k = 0; out && k < N_ISAS; k++)
        if (cpu_runs(ISAS[k].name)) {
            PyObject *name = PyUnicode_FromString(ISAS[k].name);
            if (!name || PyList_Append(out, name) < 0) Py_CLEAR(out);
            Py_XDECREF(name);
        }
    return out;
}

/* openmp() -> the address this module's omp_get_max_threads resolved to (stats.py compares it
 * with torch's: the same runtime, the same worker threads), or None without OpenMP. */
static PyObject *openmp(PyObject *self, PyObject *args) {
#ifdef _OPENMP
    return PyLong_FromVoidPtr((void *)&omp_get_max_threads);
#else
    Py_RETURN_NONE;
#endif
}

static PyMethodDef methods[] = {
    {"isa", isa, METH_NOARGS, "The instruction-set variant in use."},
    {"set_isa", set_isa, METH_VARARGS, "Use another instruction-set variant (tests)."},
    {"variants", variants, METH_NOARGS, "The variants this CPU runs, best first."},
    {"openmp", openmp, METH_NOARGS, "The OpenMP runtime's omp_get_max_threads, or None."},
    {"norms", norms, METH_VARARGS, "L2 norms of many float32 arrays (see actmon/_fused.c)."},
    {"activation", activation, METH_VARARGS, "Fused activation statistics (see actmon/_fused.c)."},
    {"gradient", gradient, METH_VARARGS, "Fused output-gradient statistics (see actmon/_fused.c)."},
    {"activation_into", activation_into, METH_VARARGS, "activation() added into window rows."},
    {"gradient_into", gradient_into, METH_VARARGS, "gradient() added into window rows."},
    {"fold_units", fold_units, METH_VARARGS, "End-of-step fold of the per-unit buffers."},
    {"add_squares", add_squares, METH_VARARGS, "Squared norms added into the window (CPU)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused(void) {
    for (int k = 0; k < N_ISAS; k++) /* the best variant this CPU runs */
        if (cpu_runs(ISAS[k].name)) {
            ISA = &ISAS[k];
            break;
        }
    return PyModule_Create(&module);
}
