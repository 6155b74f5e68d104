/* tensortap._bins: a histogram's counts on about equal bins, in one call that releases the GIL.
 *
 * The compiled form of reductions._linear_counts (read its docstring first), in the values' own
 * type, with the same counts: those of the rule (reductions.histogram_counts). A value's position
 * is w = (x - lo) * scale, clipped into [0.5, bins - 0.5]; its bin is w truncated, unless w may
 * lie within tol of an integer or is not finite: those few values are binned exactly, by
 * searching the bounds (numpy.searchsorted(interior, x, side="right")), NaN and infinite values
 * in no bin. "May lie within tol" is tested as trunc(w - 2 tol) != trunc(w + 2 tol): true for
 * every w within tol of an integer (the rounding of w +- 2 tol is below tol/4, as tol includes
 * 8 ulp of bins), and for a few more, which the search bins exactly too. That form (no rint, a
 * libm call without SSE4.1, and no test of w - trunc(w), which gcc 12 compiles to a branchy
 * scalar loop) keeps the loop over a chunk branch-free and vectorised (bench/profiles/histogram.md).
 * Each chunk is counted in four tables, so consecutive values in one bin do not wait on each
 * other's increment.
 *
 * Built with setuptools as an optional extension (pyproject.toml): where it cannot be built,
 * tensortap counts with NumPy's passes (reductions._linear_counts), with the same counts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 4096 /* values whose codes are computed, then counted, at a time */
#define TABLES 4

/* count_f32 and count_f64, from one text (_bins_count.h) included once per type. */
#define T float
#define T_MAX FLT_MAX
#define UPPER upper_f32
#define COUNT count_f32
#include "_bins_count.h"
#define T double
#define T_MAX DBL_MAX
#define UPPER upper_f64
#define COUNT count_f64
#include "_bins_count.h"

/* Whether view holds values of the struct format code in this machine's byte order
 * ("f", "=f", "@f", and "<f" on a little-endian machine). */
static int is_format(const Py_buffer *view, char code, Py_ssize_t itemsize) {
    const char native = PY_LITTLE_ENDIAN ? '<' : '>';
    const char *f = view->format;
    if (f == NULL || view->itemsize != itemsize) return 0;
    if (f[0] == '@' || f[0] == '=' || f[0] == native) f++;
    return f[0] == code && f[1] == '\0';
}

PyDoc_STRVAR(count_linear_doc,
             "count_linear(x, lo, scale, tol, interior, counts)\n--\n\n"
             "Add to ``counts`` (int64, one per bin, C-contiguous, writable) the counts of ``x`` (float32\n"
             "or float64, C-contiguous) on about equal bins: ``reductions._linear_counts``'s arithmetic,\n"
             "with ``interior`` (the bounds between the bins, of ``x``'s type). The GIL is released\n"
             "while counting.");

static PyObject *count_linear(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *xo, *interioro, *countso;
    double lo, scale, tol;
    if (!PyArg_ParseTuple(args, "OdddOO:count_linear", &xo, &lo, &scale, &tol, &interioro, &countso))
        return NULL;
    Py_buffer x, interior, counts;
    const int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT;
    if (PyObject_GetBuffer(xo, &x, flags) < 0) return NULL;
    if (PyObject_GetBuffer(interioro, &interior, flags) < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    if (PyObject_GetBuffer(countso, &counts, flags | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&x);
        PyBuffer_Release(&interior);
        return NULL;
    }
    PyObject *result = NULL;
    const int f32 = is_format(&x, 'f', 4) && is_format(&interior, 'f', 4);
    const int f64 = is_format(&x, 'd', 8) && is_format(&interior, 'd', 8);
    const Py_ssize_t bins = counts.len / 8;
    if (!(f32 || f64)) {
        PyErr_SetString(PyExc_TypeError, "count_linear: x and interior must be float32 or float64 alike");
    } else if (!(is_format(&counts, 'l', 8) || is_format(&counts, 'q', 8))) {
        PyErr_SetString(PyExc_TypeError, "count_linear: counts must be int64");
    } else if (bins < 1 || bins > INT32_MAX - 1 || interior.len != (bins - 1) * x.itemsize) {
        PyErr_SetString(PyExc_ValueError, "count_linear: interior must hold one bound fewer than counts");
    } else if (!(scale > 0) || !(tol >= 0 && tol < 0.25)) {
        PyErr_SetString(PyExc_ValueError, "count_linear: scale must be > 0 and tol in [0, 0.25)");
    } else {
        int32_t *work = malloc(sizeof(int32_t) * (CHUNK + TABLES * (size_t)(bins + 1)));
        if (work == NULL) {
            PyErr_NoMemory();
        } else {
            const Py_ssize_t n = x.len / x.itemsize;
            Py_BEGIN_ALLOW_THREADS
            if (f32)
                count_f32(x.buf, n, (float)lo, (float)scale, (float)tol, interior.buf, bins, counts.buf, work);
            else
                count_f64(x.buf, n, lo, scale, tol, interior.buf, bins, counts.buf, work);
            Py_END_ALLOW_THREADS
            free(work);
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&interior);
    PyBuffer_Release(&counts);
    return result;
}

static PyMethodDef methods[] = {
    {"count_linear", count_linear, METH_VARARGS, count_linear_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_bins", "Histogram counting in one call that releases the GIL.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bins(void) { return PyModule_Create(&module); }
