// Python entry point of razor_vllm._C. Importing it loads the library, whose static TORCH_LIBRARY
// registrations (razor_attention.cpp) make the ops available as torch.ops.razor_vllm.*.
// Plain CPython API rather than pybind11: nothing is bound here, and it keeps the build fast.
#include <Python.h>

static PyModuleDef razor_module = {
    PyModuleDef_HEAD_INIT, "_C", "RazorAttention CPU kernels (registered as torch.ops.razor_vllm.*).", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&razor_module); }
