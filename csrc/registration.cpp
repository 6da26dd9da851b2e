// Registers the CUDA operations as kldwrm_fast::<op>_cuda, with the schemas of the operation table
// kldwrm_fast/ops/table.py (tests/test_operation_table.py checks each against it), and makes kldwrm_fast._C an
// importable Python module.
#include <Python.h>
#include <torch/library.h>

#include "operations.h"

TORCH_LIBRARY_FRAGMENT(kldwrm_fast, m) {
  m.def(
      "factor_update_cuda(Tensor x, Tensor(a1!) ea, Tensor(a2!) reweighted, float scale, float rho, float reweight, "
      "bool first, bool with_reweighted) -> Tensor");
  m.def("precondition_cuda(Tensor q_g, Tensor d_g, Tensor q_a, Tensor d_a, Tensor v, float damping) -> Tensor");
  m.def(
      "q_precondition_cuda(Tensor q_g, Tensor d_g, Tensor q_a, Tensor d_a, Tensor g_hat, float damping, "
      "float lr, Tensor ea_g, Tensor ea_a) -> (Tensor, Tensor)");
  m.def(
      "ghat_recursion_cuda(Tensor[] v_new, Tensor(a1!)[] g_hat, Tensor(a2!)[] v_prev, Tensor[] m, float coef) -> ()");
  m.def("eigh_cuda(Tensor matrix) -> (Tensor eigenvalues, Tensor eigenvectors, Tensor info)");
}

TORCH_LIBRARY_IMPL(kldwrm_fast, CUDA, m) {
  m.impl("factor_update_cuda", &kldwrm::factor_update_cuda);
  m.impl("precondition_cuda", &kldwrm::precondition_cuda);
  m.impl("q_precondition_cuda", &kldwrm::q_precondition_cuda);
  m.impl("ghat_recursion_cuda", &kldwrm::ghat_recursion_cuda);
  m.impl("eigh_cuda", &kldwrm::eigh_cuda);
}

// Importing kldwrm_fast._C runs the static registrations above; the module itself has no attributes.
static PyModuleDef module_definition = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_definition); }
