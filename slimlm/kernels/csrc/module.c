/* Python bindings of the IntQuant kernels: arguments are tensor data pointers (ints)
 * and sizes, checked by slimlm/kernels/intq.py before the call. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "intq.h"
#include "lean.h"
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static int parse_w(PyObject *const *a, intq_t *W) {
    W->codes = PyLong_AsVoidPtr(a[0]);
    W->scales = PyLong_AsVoidPtr(a[1]);
    W->mins = PyLong_AsVoidPtr(a[2]);
    W->out = (int)PyLong_AsLong(a[3]);
    W->in = (int)PyLong_AsLong(a[4]);
    W->group = (int)PyLong_AsLong(a[5]);
    W->bits = (int)PyLong_AsLong(a[6]);
    if (PyErr_Occurred()) return -1;
    if (W->bits < 2 || W->bits > 8 || W->out < 1 || W->in < 1 || W->group < 1 || W->group > W->in) {
        PyErr_SetString(PyExc_ValueError, "intq kernel: bad shape or bit width");
        return -1;
    }
    W->G = (W->in + W->group - 1) / W->group;
    W->gpad = (W->group + 15) / 16 * 16;
    W->nsb = (W->G * W->gpad + 63) / 64;
    intq_i8_geometry(W);
    return 0;
}

/* matmul(codes, scales, mins, out, in, group, bits, x, M, y) and matmul_i8 (the int8-path layout) */
static PyObject *matmul(PyObject *const *a, Py_ssize_t n, int (*fn)(const intq_t *, const float *, int, float *)) {
    intq_t W;
    if (n != 10) return PyErr_Format(PyExc_TypeError, "matmul takes 10 arguments, got %zd", n);
    if (parse_w(a, &W)) return NULL;
    const float *x = PyLong_AsVoidPtr(a[7]);
    int M = (int)PyLong_AsLong(a[8]);
    float *y = PyLong_AsVoidPtr(a[9]);
    if (PyErr_Occurred()) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = fn(&W, x, M, y);
    Py_END_ALLOW_THREADS if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* dequant(codes, scales, mins, out, in, group, bits, w) and dequant_i8 */
static PyObject *dequant(PyObject *const *a, Py_ssize_t n, int (*fn)(const intq_t *, float *)) {
    intq_t W;
    if (n != 8) return PyErr_Format(PyExc_TypeError, "dequant takes 8 arguments, got %zd", n);
    if (parse_w(a, &W)) return NULL;
    float *w = PyLong_AsVoidPtr(a[7]);
    if (PyErr_Occurred()) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = fn(&W, w);
    Py_END_ALLOW_THREADS if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_matmul(PyObject *self, PyObject *const *a, Py_ssize_t n) { return matmul(a, n, intq_matmul); }
static PyObject *py_matmul_i8(PyObject *self, PyObject *const *a, Py_ssize_t n) { return matmul(a, n, intq_matmul_i8); }
static PyObject *py_dequant(PyObject *self, PyObject *const *a, Py_ssize_t n) { return dequant(a, n, intq_dequant); }
static PyObject *py_dequant_i8(PyObject *self, PyObject *const *a, Py_ssize_t n) { return dequant(a, n, intq_dequant_i8); }

/* layout_i8(in, group) -> (B, row_codes): the int8-path activation block and repacked row length */
static PyObject *py_layout_i8(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    intq_t W = {0};
    if (n != 2) return PyErr_Format(PyExc_TypeError, "layout_i8 takes 2 arguments, got %zd", n);
    W.in = (int)PyLong_AsLong(a[0]);
    W.group = (int)PyLong_AsLong(a[1]);
    if (PyErr_Occurred()) return NULL;
    if (W.in < 1 || W.group < 1 || W.group > W.in) {
        PyErr_SetString(PyExc_ValueError, "intq kernel: bad shape");
        return NULL;
    }
    W.G = (W.in + W.group - 1) / W.group;
    intq_i8_geometry(&W);
    return Py_BuildValue("(ii)", W.B, W.row_codes);
}

static PyObject *py_has_vnni(PyObject *self, PyObject *unused) { return PyBool_FromLong(intq_has_vnni()); }

static PyObject *py_isa(PyObject *self, PyObject *unused) { return PyUnicode_FromString(intq_isa()); }

static PyObject *py_isas(PyObject *self, PyObject *unused) { return PyUnicode_FromString(intq_isas()); }

/* set_isa(name or None): the int8 kernels to use from now on (None: the best this CPU has) */
static PyObject *py_set_isa(PyObject *self, PyObject *arg) {
    const char *name = arg == Py_None ? NULL : PyUnicode_AsUTF8(arg);
    if (arg != Py_None && !name) return NULL;
    const int rc = intq_set_isa(name);
    if (rc == -1) return PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s kernels (it can run: %s)", name, intq_isas());
    if (rc == -2)
        return PyErr_Format(PyExc_ValueError, "no kernels are called %s (this CPU can run: %s)", name, intq_isas());
    Py_RETURN_NONE;
}

/* threads(n): the OpenMP threads of every later kernel call (n >= 1); threads(): the current count */
static PyObject *py_threads(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    if (n > 1) return PyErr_Format(PyExc_TypeError, "threads takes 0 or 1 arguments, got %zd", n);
#ifdef _OPENMP
    if (n == 1) {
        const long t = PyLong_AsLong(a[0]);
        if (PyErr_Occurred()) return NULL;
        if (t < 1) return PyErr_Format(PyExc_ValueError, "threads must be at least 1, got %ld", t);
        omp_set_num_threads((int)t);
    }
    return PyLong_FromLong(omp_get_max_threads());
#else
    if (n == 1 && PyLong_AsLong(a[0]) < 1 && !PyErr_Occurred())
        return PyErr_Format(PyExc_ValueError, "threads must be at least 1");
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLong(1);
#endif
}

static PyObject *py_openmp(PyObject *self, PyObject *unused) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}


/* ---- fused decode step (lean.c) ------------------------------------------------------------ */

static int parse_linear(PyObject *t, lean_linear_t *L) {
    int kind;
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 1) goto bad;
    kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(t, 0));
    if (PyErr_Occurred()) return -1;
    L->kind = kind;
    if (kind == LEAN_INTQ) {
        unsigned long long bias;
        if (PyTuple_GET_SIZE(t) != 9) goto bad;
        if (parse_w(&PyTuple_GET_ITEM(t, 1), &L->W)) return -1; /* items 1..7 as matmul's first seven arguments */
        bias = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 8));
        if (PyErr_Occurred()) return -1;
        L->bias = (const float *)(uintptr_t)bias;
        L->in = L->W.in, L->total = L->W.out, L->nparts = 1;
        if (!(L->prep = intq_i8_prepare(&L->W, LEAN_MAX_T))) {
            PyErr_NoMemory();
            return -1;
        }
        return 0;
    }
    if (kind == LEAN_DENSE) {
        unsigned long long bias;
        PyObject *parts;
        int dummy;
        if (!PyArg_ParseTuple(t, "iiKO!", &dummy, &L->in, &bias, &PyTuple_Type, &parts)) return -1;
        L->bias = (const float *)(uintptr_t)bias;
        L->nparts = (int)PyTuple_GET_SIZE(parts);
        if (L->nparts < 1 || L->nparts > LEAN_MAX_PARTS || L->in < 1) goto bad;
        L->total = 0;
        for (int p = 0; p < L->nparts; p++) {
            unsigned long long w;
            if (!PyArg_ParseTuple(PyTuple_GET_ITEM(parts, p), "Ki", &w, &L->out[p])) return -1;
            if (L->out[p] < 1) goto bad;
            L->w[p] = (const float *)(uintptr_t)w;
            L->total += L->out[p];
        }
        return 0;
    }
bad:
    PyErr_SetString(PyExc_ValueError, "lean_new: a linear is (0, codes, scales, mins, out, in, group, bits, bias) "
                                      "or (1, in, bias, ((w, out), ...))");
    return -1;
}

static void free_layers(lean_model_t *M) {
    for (int i = 0; M->layers && i < M->n_layers; i++) {
        lean_layer_t *B = &M->layers[i];
        intq_i8_release(B->qkv.prep);
        intq_i8_release(B->o.prep);
        intq_i8_release(B->gate_up.prep);
        intq_i8_release(B->down.prep);
    }
    free(M->layers);
}

static void lean_free(PyObject *cap) {
    lean_model_t *M = PyCapsule_GetPointer(cap, "slimlm.lean");
    if (!M) return;
    free_layers(M);
    free(M->scratch);
    free(M);
}

#define MAX2(a, b) ((a) > (b) ? (a) : (b))

/* lean_new(dim, hd, eps, max_cap, cos, sin, norm, layers) -> capsule; layers: a list of
 * (ln1, ln2, q_norm, k_norm, nq, nkv, ffn, window, qkv, o, gate_up, down), pointers as ints (0: none). */
static PyObject *py_lean_new(PyObject *self, PyObject *args) {
    int dim, hd, max_cap;
    float eps;
    unsigned long long cos, sin, norm;
    PyObject *layers;
    if (!PyArg_ParseTuple(args, "iifiKKKO!", &dim, &hd, &eps, &max_cap, &cos, &sin, &norm, &PyList_Type, &layers))
        return NULL;
    const Py_ssize_t n = PyList_GET_SIZE(layers);
    if (dim < 1 || hd < 2 || hd % 2 || max_cap < 1 || n < 1) {
        PyErr_SetString(PyExc_ValueError, "lean_new: bad model shape");
        return NULL;
    }
    lean_model_t *M = calloc(1, sizeof *M);
    if (!M || !(M->layers = calloc(n, sizeof *M->layers))) {
        free(M);
        return PyErr_NoMemory();
    }
    *M = (lean_model_t){(int)n, dim, hd, max_cap, eps, (const float *)(uintptr_t)cos, (const float *)(uintptr_t)sin,
                        (const float *)(uintptr_t)norm, M->layers, dim, dim, NULL};
    int maxq = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        lean_layer_t *B = &M->layers[i];
        unsigned long long ln1, ln2, qn, kn;
        PyObject *lin[4];
        if (!PyArg_ParseTuple(PyList_GET_ITEM(layers, i), "KKKKiiiiOOOO", &ln1, &ln2, &qn, &kn, &B->nq, &B->nkv,
                              &B->ffn, &B->window, &lin[0], &lin[1], &lin[2], &lin[3]))
            goto fail;
        B->ln1 = (const float *)(uintptr_t)ln1, B->ln2 = (const float *)(uintptr_t)ln2;
        B->q_norm = (const float *)(uintptr_t)qn, B->k_norm = (const float *)(uintptr_t)kn;
        if (parse_linear(lin[0], &B->qkv) || parse_linear(lin[1], &B->o) || parse_linear(lin[2], &B->gate_up) ||
            parse_linear(lin[3], &B->down))
            goto fail;
        const int qo = B->nq * hd, ko = B->nkv * hd;
        if (B->nq < 1 || B->nkv < 1 || B->nq % B->nkv || B->qkv.in != dim || B->qkv.total != qo + 2 * ko ||
            B->o.in != qo || B->o.total != dim || B->gate_up.in != dim || B->gate_up.total != 2 * B->ffn ||
            B->down.in != B->ffn || B->down.total != dim || (!B->q_norm) != (!B->k_norm)) {
            PyErr_Format(PyExc_ValueError, "lean_new: layer %zd has inconsistent shapes", i);
            goto fail;
        }
        M->big = MAX2(M->big, MAX2(B->qkv.total, B->gate_up.total));
        M->att = MAX2(M->att, qo);
        maxq = MAX2(maxq, B->nq);
    }
    if (!(M->scratch = malloc(LEAN_MAX_T * ((size_t)dim + M->big + M->att + (size_t)maxq * max_cap) * sizeof(float)))) {
        PyErr_NoMemory();
        goto fail;
    }
    PyObject *cap = PyCapsule_New(M, "slimlm.lean", lean_free);
    if (cap) return cap;
fail:
    free_layers(M);
    free(M->scratch);
    free(M);
    return NULL;
}

/* A single linear (the output head) as lean_step runs its block linears. */
static void linear_destroy(lean_linear_t *L) {
    intq_i8_release(L->prep);
    free(L);
}

static void lean_linear_free(PyObject *cap) {
    lean_linear_t *L = PyCapsule_GetPointer(cap, "slimlm.lean_linear");
    if (L) linear_destroy(L);
}

/* lean_linear_new(linear) -> capsule; linear as in lean_new's layers. */
static PyObject *py_lean_linear_new(PyObject *self, PyObject *args) {
    PyObject *t;
    if (!PyArg_ParseTuple(args, "O!", &PyTuple_Type, &t)) return NULL;
    lean_linear_t *L = calloc(1, sizeof *L);
    if (!L) return PyErr_NoMemory();
    if (parse_linear(t, L)) {
        linear_destroy(L);
        return NULL;
    }
    PyObject *cap = PyCapsule_New(L, "slimlm.lean_linear", lean_linear_free);
    if (!cap) linear_destroy(L);
    return cap;
}

/* lean_linear(linear, x, M, y): y (M, total) float32 = linear(x (M, in)), M <= LEAN_MAX_T. */
static PyObject *py_lean_linear(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    if (n != 4) return PyErr_Format(PyExc_TypeError, "lean_linear takes 4 arguments, got %zd", n);
    const lean_linear_t *L = PyCapsule_GetPointer(a[0], "slimlm.lean_linear");
    if (!L) return NULL;
    const float *x = PyLong_AsVoidPtr(a[1]);
    const int M = (int)PyLong_AsLong(a[2]);
    float *y = PyLong_AsVoidPtr(a[3]);
    if (PyErr_Occurred()) return NULL;
    if (M < 1 || M > LEAN_MAX_T)
        return PyErr_Format(PyExc_ValueError, "lean_linear: %d rows, expected 1 to %d", M, LEAN_MAX_T);
    Py_BEGIN_ALLOW_THREADS lean_linear(L, x, M, y);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* lean_step(plan, x, T, pos, kcache_ptrs, vcache_ptrs, cap): x (T, dim) float32 in place; *_ptrs: int64 (n_layers,) */
static PyObject *py_lean_step(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    if (n != 7) return PyErr_Format(PyExc_TypeError, "lean_step takes 7 arguments, got %zd", n);
    const lean_model_t *M = PyCapsule_GetPointer(a[0], "slimlm.lean");
    if (!M) return NULL;
    float *x = PyLong_AsVoidPtr(a[1]);
    const int T = (int)PyLong_AsLong(a[2]), pos = (int)PyLong_AsLong(a[3]);
    float *const *kc = PyLong_AsVoidPtr(a[4]), *const *vc = PyLong_AsVoidPtr(a[5]);
    const int cap = (int)PyLong_AsLong(a[6]);
    if (PyErr_Occurred()) return NULL;
    if (T < 1 || T > LEAN_MAX_T || pos < 0 || pos + T > cap || cap > M->max_cap) {
        PyErr_Format(PyExc_ValueError, "lean_step: %d tokens at position %d do not fit (at most %d tokens, cache %d of %d)",
                     T, pos, LEAN_MAX_T, cap, M->max_cap);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS lean_step(M, x, T, pos, kc, vc, cap);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, "y (M, out) = x (M, in) @ W.T from repacked codes"},
    {"dequant", (PyCFunction)(void (*)(void))py_dequant, METH_FASTCALL, "dequantized (out, in) float32 weights"},
    {"matmul_i8", (PyCFunction)(void (*)(void))py_matmul_i8, METH_FASTCALL, "matmul of the int8 path (int8 activations)"},
    {"dequant_i8", (PyCFunction)(void (*)(void))py_dequant_i8, METH_FASTCALL, "dequant from the int8-path layout"},
    {"layout_i8", (PyCFunction)(void (*)(void))py_layout_i8, METH_FASTCALL, "(B, row_codes) of the int8-path layout"},
    {"has_vnni", py_has_vnni, METH_NOARGS, "whether the int8 path runs its AVX-512 VNNI kernel here"},
    {"isa", py_isa, METH_NOARGS, "the int8-path kernels in use (avx512_vnni, avx_vnni, avx2, neon_dotprod, scalar)"},
    {"isas", py_isas, METH_NOARGS, "the int8-path kernels this CPU can run, best first, comma-separated"},
    {"set_isa", py_set_isa, METH_O, "use the named int8-path kernels (None: the best this CPU has)"},
    {"threads", (PyCFunction)(void (*)(void))py_threads, METH_FASTCALL, "set (n) or read () the kernels' thread count"},
    {"openmp", py_openmp, METH_NOARGS, "whether the kernels were built with OpenMP"},
    {"lean_new", py_lean_new, METH_VARARGS, "the plan of a fused decode step (lean.c)"},
    {"lean_linear_new", py_lean_linear_new, METH_VARARGS, "a single linear (the output head) for lean_linear"},
    {"lean_linear", (PyCFunction)(void (*)(void))py_lean_linear, METH_FASTCALL, "y = linear(x) for up to LEAN_MAX_T rows"},
    {"lean_step", (PyCFunction)(void (*)(void))py_lean_step, METH_FASTCALL, "all blocks for up to LEAN_MAX_T tokens, in place"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "slimlm IntQuant CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "LEAN_MAX_T", LEAN_MAX_T)) { /* tokens one lean_step takes */
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
