// Schemas of the compiled primitives. The implementations register themselves in the .cu files;
// Python reaches them as torch.ops.attn_kernels_cuda.<name> (or attn_kernels_emulated, see
// library.h).
#include <Python.h>
#include <torch/library.h>

#include "library.h"

// `import attn_kernels._C` (or `._emulated`) loads this library, which runs the registrations below.
extern "C" {
PyObject* AK_MODULE_INIT(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, AK_MODULE_NAME, nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

AK_TORCH_LIBRARY(AK_LIBRARY, m) {
  // Mean (and max, when with_max) of x over H*W per (n, c), in float32 (float64 for float64 x).
  m.def("channel_pool(Tensor x, bool with_max) -> (Tensor mean, Tensor max)");
  // Sum over H*W of dy*x per (n, c); how many elements of x equal xmax[n, c] when given; the sum
  // of dy when with_dy_sum (not with xmax). Results not asked for are empty.
  m.def("channel_grad_reduce(Tensor dy, Tensor x, Tensor? xmax, bool with_dy_sum) -> (Tensor dot, Tensor ties, Tensor dy_sum)");
  // a*gate[n, c] + bias[n, c] + (x == xmax[n, c]) * tie_coef[n, c], in a's dtype and layout.
  m.def(
      "channel_gate_apply(Tensor a, Tensor gate, Tensor? bias, Tensor? x, Tensor? xmax, "
      "Tensor? tie_coef) -> Tensor");
  // The channel-gate blocks' forward (csrc/excite.cu): mean (and max, unless pool is 'avg') of x
  // over H*W per (n, c), and gate = gate(mix(pooled)) with the modes of attn_kernels/ops/excite.py;
  // all three in float32 (float64 for float64 x), xmax empty without the max.
  m.def(
      "pool_excite(Tensor x, Tensor? fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, str pool, "
      "str mix, str act, str gate) -> (Tensor gate, Tensor mean, Tensor xmax)");
  // Its backward, from dy: gate, bias and tie_coef of dx = channel_gate_apply(dy, gate, bias, x, xmax,
  // tie_coef) (tie_coef empty without the max), and the weights' gradients in their shapes and
  // dtypes (empty for absent weights).
  m.def(
      "grad_excite(Tensor dy, Tensor x, Tensor? fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
      "Tensor mean, Tensor xmax, str pool, str mix, str act, str gate) -> (Tensor gate, Tensor bias, "
      "Tensor tie_coef, Tensor dfc1_weight, Tensor dfc1_bias, Tensor dfc2_weight, Tensor dfc2_bias)");
  // Attention pooling (GC): context = sum over H*W of softmax(weight . x + bias) * x per (n, c),
  // and the log-sum-exp of the logits per n.
  m.def("attention_pool(Tensor x, Tensor weight, Tensor bias) -> (Tensor context, Tensor lse)");
  // The backward of y = x*gate + t(context) through attention_pool: dx, and d weight.
  m.def(
      "attention_pool_backward(Tensor dy, Tensor x, Tensor? gate, Tensor context, Tensor dcontext, "
      "Tensor weight, Tensor bias, Tensor lse) -> (Tensor dx, Tensor dweight)");
  // scSE's forward (csrc/scse.cu): cSE's gate gc = sigmoid(fc2(relu(fc1(mean)))) and the mean of x
  // over H*W per (n, c), and sSE's logits = sse_weight . x[n, :, p] + sse_bias per pixel (N, H*W);
  // all in float32 (float64 for float64 x).
  m.def(
      "scse_pool_excite(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
      "Tensor sse_weight, Tensor? sse_bias) -> (Tensor gate, Tensor mean, Tensor logits)");
  // Its backward, from dy: gate, cbias (N, C), dlogits (N, H*W) and their per-sample sums (N,) for
  // scse_apply's backward, and cSE's weight gradients in their shapes and dtypes (empty for absent
  // biases).
  m.def(
      "scse_grad_excite(Tensor dy, Tensor x, Tensor mean, Tensor logits, Tensor fc1_weight, Tensor? fc1_bias, "
      "Tensor fc2_weight, Tensor? fc2_bias) -> (Tensor gate, Tensor cbias, Tensor dlogits, Tensor dlogit_sums, "
      "Tensor dfc1_weight, Tensor dfc1_bias, Tensor dfc2_weight, Tensor dfc2_bias)");
  // a*(gate[n, c] + sigmoid(logits[n, p])) in a's dtype and layout; in the backward (x, cbias,
  // dlogits, dlogit_sums and sse_weight given) plus cbias[n, c] + dlogits[n, p]*sse_weight[c], with
  // d sse_weight = sum dlogits*x and d sse_bias = sum dlogit_sums in the weights' dtypes (empty when
  // not asked for).
  m.def(
      "scse_apply(Tensor a, Tensor gate, Tensor logits, Tensor? x, Tensor? cbias, Tensor? dlogits, "
      "Tensor? dlogit_sums, Tensor? sse_weight, Tensor? sse_bias) -> (Tensor out, Tensor dsse_weight, "
      "Tensor dsse_bias)");
  // Over C per pixel: mean and max of u = x*ca (x without ca) and the count of u tying the max.
  m.def("spatial_pool(Tensor x, Tensor? ca) -> (Tensor mean, Tensor max, Tensor ties)");
  // sum_c dy*u per pixel, and sum_hw dy*x*sa per channel (empty without ca).
  m.def("spatial_grad_reduce(Tensor dy, Tensor x, Tensor? ca, Tensor sa) -> (Tensor dsa, Tensor dca)");
  // sum_hw x*(pmean + (u == smax)*pmax) per channel, and the count of x tying cmax.
  m.def(
      "spatial_pool_grad_reduce(Tensor x, Tensor ca, Tensor smax, Tensor pmean, Tensor pmax, Tensor cmax) "
      "-> (Tensor dca, Tensor cties)");
  // ca*(a*sa + pmean + (u == smax)*pmax) + cbias + (x == cmax)*ctie, in a's dtype and layout.
  m.def(
      "spatial_gate_apply(Tensor a, Tensor? ca, Tensor sa, Tensor? x, Tensor? smax, Tensor? pmean, "
      "Tensor? pmax, Tensor? cbias, Tensor? cmax, Tensor? ctie) -> Tensor");
}
