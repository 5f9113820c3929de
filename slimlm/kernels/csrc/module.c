/* Python bindings of the IntQuant kernels: arguments are tensor data pointers (ints)
 * and sizes, checked by slimlm/kernels/intq.py before the call. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "intq.h"

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

static PyMethodDef methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, "y (M, out) = x (M, in) @ W.T from repacked codes"},
    {"dequant", (PyCFunction)(void (*)(void))py_dequant, METH_FASTCALL, "dequantized (out, in) float32 weights"},
    {"matmul_i8", (PyCFunction)(void (*)(void))py_matmul_i8, METH_FASTCALL, "matmul of the int8 path (int8 activations)"},
    {"dequant_i8", (PyCFunction)(void (*)(void))py_dequant_i8, METH_FASTCALL, "dequant from the int8-path layout"},
    {"layout_i8", (PyCFunction)(void (*)(void))py_layout_i8, METH_FASTCALL, "(B, row_codes) of the int8-path layout"},
    {"has_vnni", py_has_vnni, METH_NOARGS, "whether the int8 path runs its AVX-512 VNNI kernel here"},
    {"isa", py_isa, METH_NOARGS, "the instruction set the kernels run with"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "slimlm IntQuant CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
