// Channel-gate primitives: the activation-sized passes of every "pool, tiny function, rescale"
// attention block (SE now; ECA and CBAM's channel half reuse them).
//
//   channel_pool        one read of x:            mean and (optionally) max over H*W per (n, c)
//   channel_grad_reduce one read of dy and x:     sum over H*W of dy*x, and how many x tie the max
//                                                 or (with_dy_sum) the sum of dy
//   channel_gate_apply  one read of a (and x), one write:
//                       out = a*gate[n,c] + bias[n,c] + (x == xmax[n,c]) * tie_coef[n,c]
//
// Forward is channel_pool + channel_gate_apply(x, gate): 3|x| of DRAM traffic. Backward is
// channel_grad_reduce + channel_gate_apply(dy, gate, dmean/HW[, x, xmax, dmax/ties]): 4|x|
// (5|x| when the max is pooled, since finding the arg-max positions needs x again).
//
// Reductions run in the accumulator type (float32; float64 for float64 input) on the engine of
// reduce_hw.cuh: fixed order, no atomics, bitwise reproducible.
#include "reduce_hw.cuh"

namespace attn_kernels {
namespace {

// out = a*gate[s] + bias[s] + (x == xmax[s]) * tie_coef[s], s the (n, c) index of the element.
// VEC elements per memory instruction (pack_elements); VEC divides the contiguous dimension (H*W or
// C), so a pack never straddles two (n, c) statistics in NCHW and covers VEC consecutive channels in NHWC.
template <typename scalar_t, typename acc_t, int VEC, bool kBias, bool kTies>
__global__ void gate_apply_kernel(dev_ptr<const scalar_t> a, dev_ptr<const acc_t> gate, dev_ptr<const acc_t> bias,
                                  dev_ptr<const scalar_t> x, dev_ptr<const acc_t> xmax,
                                  dev_ptr<const acc_t> tie_coef, dev_ptr<scalar_t> out, int64_t numel, int64_t C,
                                  int64_t HW, bool nhwc) {
  using P = Pack<scalar_t, VEC>;
  const int64_t packs = numel / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t i = p * VEC;
    int64_t s;
    if (nhwc) {
      const int64_t pixel = i / C;
      s = (pixel / HW) * C + (i - pixel * C);
    } else {
      s = i / HW;
    }
    const P pa = load_pack<P>(a, i);
    P px;
    if constexpr (kTies) px = load_pack<P>(x, i);
    P po;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t sk = nhwc ? s + k : s;
      acc_t r = static_cast<acc_t>(pa.v[k]) * gate[sk];
      if constexpr (kBias) r += bias[sk];
      if constexpr (kTies) r += static_cast<acc_t>(px.v[k]) == xmax[sk] ? tie_coef[sk] : acc_t(0);
      po.v[k] = static_cast<scalar_t>(r);
    }
    store_pack(out, i, po);
  }
}

template <bool kBias, bool kTies>
void launch_gate_apply(const at::Tensor& a, const at::Tensor& gate, const at::Tensor* bias,
                       const at::Tensor* x, const at::Tensor* xmax, const at::Tensor* tie_coef,
                       at::Tensor& out, Layout layout) {
  const int64_t numel = a.numel();
  const int64_t C = a.size(1), HW = a.size(2) * a.size(3);
  const int64_t contiguous_dim = layout == Layout::kNHWC ? C : HW;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "channel_gate_apply", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const int vec = pack_elements<scalar_t>(contiguous_dim, {&a, &out, kTies ? x : nullptr});
    with_pack<scalar_t>(vec, [&](auto vec) {
      constexpr int kPack = decltype(vec)::value;
      launch<gate_apply_kernel<scalar_t, acc_t, kPack, kBias, kTies>>(
          "channel_gate_apply", elementwise_blocks(numel / kPack), 1, kElementwiseThreads, 0,
          device_ptr<const scalar_t>(a, "a"), device_ptr<const acc_t>(gate, "gate"),
          device_ptr<const acc_t>(bias, "bias"), device_ptr<const scalar_t>(x, "x"),
          device_ptr<const acc_t>(xmax, "xmax"), device_ptr<const acc_t>(tie_coef, "tie_coef"),
          device_ptr<scalar_t>(out, "out"), numel, C, HW, layout == Layout::kNHWC);
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_pool(const at::Tensor& x, bool with_max) {
  constexpr const char* op = "channel_pool";
  check_activation(op, x);
  const Layout layout = layout_of(op, x, "x");
  const DeviceGuard guard(x.device());
  const auto stat_options = x.options().dtype(at::toAccumulateType(x.scalar_type(), true));
  if (x.numel() == 0) {
    return {at::zeros({x.size(0), x.size(1)}, stat_options),
            with_max ? at::zeros({x.size(0), x.size(1)}, stat_options) : at::empty({0}, stat_options)};
  }
  at::Tensor sum, max;
  if (with_max) {
    std::tie(sum, max) = reduce_pass<Reduce::kPool, true>(x, x, at::Tensor(), layout);
  } else {
    std::tie(sum, max) = reduce_pass<Reduce::kPool, false>(x, x, at::Tensor(), layout);
  }
  return {sum.div_(x.size(2) * x.size(3)), max};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_grad_reduce(const at::Tensor& dy, const at::Tensor& x,
                                                                   const c10::optional<at::Tensor>& xmax,
                                                                   bool with_dy_sum) {
  constexpr const char* op = "channel_grad_reduce";
  check_activation(op, x);
  AK_CHECK_SAME(op, x, dy);
  const Layout layout = layout_of(op, x, "x");
  AK_CHECK(layout_of(op, dy, "dy") == layout, op,
           "argument 'dy' must have the same memory format as 'x'");
  if (xmax.has_value()) AK_CHECK_STAT(op, (*xmax), x);
  AK_CHECK(!(xmax.has_value() && with_dy_sum), op, "arguments 'xmax' and 'with_dy_sum' cannot be used together");
  const DeviceGuard guard(x.device());
  const auto stat_options = x.options().dtype(at::toAccumulateType(x.scalar_type(), true));
  const auto stat = [&](bool wanted) {
    return wanted ? at::zeros({x.size(0), x.size(1)}, stat_options) : at::empty({0}, stat_options);
  };
  if (x.numel() == 0) return {stat(true), stat(xmax.has_value()), stat(with_dy_sum)};
  if (xmax.has_value()) {
    auto [dot, ties] = reduce_pass<Reduce::kGrad, true>(dy, x, *xmax, layout);
    return {dot, ties, stat(false)};
  }
  if (with_dy_sum) {
    auto [dot, dy_sum] = reduce_pass<Reduce::kGradSum, true>(dy, x, at::Tensor(), layout);
    return {dot, stat(false), dy_sum};
  }
  return {std::get<0>(reduce_pass<Reduce::kGrad, false>(dy, x, at::Tensor(), layout)), stat(false), stat(false)};
}

at::Tensor channel_gate_apply(const at::Tensor& a, const at::Tensor& gate,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& x,
                              const c10::optional<at::Tensor>& xmax,
                              const c10::optional<at::Tensor>& tie_coef) {
  constexpr const char* op = "channel_gate_apply";
  check_activation(op, a);
  const Layout layout = layout_of(op, a, "a");
  AK_CHECK_STAT(op, gate, a);
  if (bias.has_value()) AK_CHECK_STAT(op, (*bias), a);
  const bool ties = xmax.has_value();
  AK_CHECK(ties == tie_coef.has_value() && ties == x.has_value(), op,
           "arguments 'x', 'xmax' and 'tie_coef' must be given together or not at all");
  if (ties) {
    AK_CHECK_SAME(op, a, (*x));
    AK_CHECK(layout_of(op, *x, "x") == layout, op, "argument 'x' must have the same memory format as 'a'");
    AK_CHECK_STAT(op, (*xmax), a);
    AK_CHECK_STAT(op, (*tie_coef), a);
  }
  AK_CHECK(!ties || bias.has_value(), op, "argument 'bias' is required when 'xmax' is given");
  const DeviceGuard guard(a.device());
  // Same strides as a (also in size-1 dimensions), as the op's fake implementation promises.
  at::Tensor out = at::empty_like(a);
  if (a.numel() == 0) return out;
  if (ties) {
    launch_gate_apply<true, true>(a, gate, &*bias, &*x, &*xmax, &*tie_coef, out, layout);
  } else if (bias.has_value()) {
    launch_gate_apply<true, false>(a, gate, &*bias, nullptr, nullptr, nullptr, out, layout);
  } else {
    launch_gate_apply<false, false>(a, gate, nullptr, nullptr, nullptr, nullptr, out, layout);
  }
  return out;
}

AK_LIBRARY_IMPL(AK_LIBRARY, AK_DISPATCH_KEY, m) {
  m.impl("channel_pool", &channel_pool);
  m.impl("channel_grad_reduce", &channel_grad_reduce);
  m.impl("channel_gate_apply", &channel_gate_apply);
}

}  // namespace attn_kernels
