// Registers the structprune operators with the PyTorch dispatcher and makes the shared
// library importable as the Python module `structprune._C`.
//
// The forward ops are what users call (through structprune._cpp_ops); the backward ops are
// called by the autograd formulas registered in Python (torch.library.register_autograd),
// next to the fake implementations that let torch.compile trace the ops.
// Python.h first, as the CPython docs require (it sets feature macros for the system headers).
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(structprune, m) {
  m.def(
      "gated_ffn_fwd(Tensor x, Tensor w_up, Tensor? b_up, Tensor w_down, Tensor? b_down, "
      "Tensor? neuron_gate, str activation, Tensor? w_gate) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gated_ffn_bwd(Tensor grad_out, Tensor x, Tensor w_up, Tensor? b_up, Tensor w_down, "
      "Tensor? b_down, Tensor? neuron_gate, str activation, Tensor? w_gate, Tensor up_pre, "
      "Tensor gate_pre, bool[7] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "masked_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? head_gate, "
      "Tensor? key_padding_mask, bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "masked_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? head_gate, "
      "Tensor? key_padding_mask, bool causal, float scale, Tensor out, Tensor lse) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(structprune, CPU, m) {
  m.impl("gated_ffn_fwd", &structprune::gated_ffn_fwd);
  m.impl("gated_ffn_bwd", &structprune::gated_ffn_bwd);
  m.impl("masked_attention_fwd", &structprune::masked_attention_fwd);
  m.impl("masked_attention_bwd", &structprune::masked_attention_bwd);
}

// A module with no Python functions: importing it loads this library, which runs the
// registrations above. The ops are then reached as torch.ops.structprune.*.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "C++ CPU kernels of structprune, registered as torch.ops.structprune.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
