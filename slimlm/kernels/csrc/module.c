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
    return 0;
}

/* matmul(codes, scales, mins, out, in, group, bits, x, M, y) */
static PyObject *py_matmul(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    intq_t W;
    if (n != 10) return PyErr_Format(PyExc_TypeError, "matmul takes 10 arguments, got %zd", n);
    if (parse_w(a, &W)) return NULL;
    const float *x = PyLong_AsVoidPtr(a[7]);
    int M = (int)PyLong_AsLong(a[8]);
    float *y = PyLong_AsVoidPtr(a[9]);
    if (PyErr_Occurred()) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = intq_matmul(&W, x, M, y);
    Py_END_ALLOW_THREADS if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* dequant(codes, scales, mins, out, in, group, bits, w) */
static PyObject *py_dequant(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    intq_t W;
    if (n != 8) return PyErr_Format(PyExc_TypeError, "dequant takes 8 arguments, got %zd", n);
    if (parse_w(a, &W)) return NULL;
    float *w = PyLong_AsVoidPtr(a[7]);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS intq_dequant(&W, w);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *unused) { return PyUnicode_FromString(intq_isa()); }

static PyMethodDef methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, "y (M, out) = x (M, in) @ W.T from repacked codes"},
    {"dequant", (PyCFunction)(void (*)(void))py_dequant, METH_FASTCALL, "dequantized (out, in) float32 weights"},
    {"isa", py_isa, METH_NOARGS, "the instruction set the kernels run with"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "slimlm IntQuant CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
