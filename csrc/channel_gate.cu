// Channel-gate primitives: the activation-sized passes of every "pool, tiny function, rescale"
// attention block (SE now; ECA and CBAM's channel half reuse them).
//
//   channel_pool        one read of x:            mean and (optionally) max over H*W per (n, c)
//   channel_grad_reduce one read of dy and x:     sum over H*W of dy*x, and how many x tie the max
//   channel_gate_apply  one read of a (and x), one write:
//                       out = a*gate[n,c] + bias[n,c] + (x == xmax[n,c]) * tie_coef[n,c]
//
// Forward is channel_pool + channel_gate_apply(x, gate): 3|x| of DRAM traffic. Backward is
// channel_grad_reduce + channel_gate_apply(dy, gate, dmean/HW[, x, xmax, dmax/ties]): 4|x|
// (5|x| when the max is pooled, since finding the arg-max positions needs x again).
//
// Reductions run in the accumulator type (float32; float64 for float64 input) in a fixed order:
// each (n, c) is split into `splits` chunks reduced by one warp or block each, and the partial
// results are combined by a sum over a small (splits, N, C) tensor. No atomics: the same inputs
// give bitwise the same outputs.
#include "common.cuh"

namespace attn_kernels {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kTileC = 32;   // NHWC reduce: channels per block (one warp's width)
constexpr int kTileHW = 8;   // NHWC reduce: pixels in flight per block

// What a reduction pass accumulates per element.
//   kPool: first = sum(a),     second = max(a)                (a = x)
//   kGrad: first = sum(a * b), second = count(b == xmax[n,c]) (a = dy, b = x)
enum class Reduce { kPool, kGrad };

template <Reduce kMode, bool kSecond, typename acc_t>
struct Accumulator {
  acc_t first;
  acc_t second;
  acc_t xmax;  // kGrad with ties only: the forward max this (n, c) is compared with

  __device__ __forceinline__ void init() {
    first = 0;
    second = kMode == Reduce::kPool ? acc_t(-INFINITY) : acc_t(0);
  }
  __device__ __forceinline__ void add(acc_t a, acc_t b) {
    if constexpr (kMode == Reduce::kPool) {
      first += a;
      if constexpr (kSecond) second = max(second, a);
    } else {
      first += a * b;
      if constexpr (kSecond) second += (b == xmax) ? acc_t(1) : acc_t(0);
    }
  }
  __device__ __forceinline__ void merge(acc_t other_first, acc_t other_second) {
    first += other_first;
    if constexpr (kSecond) {
      second = kMode == Reduce::kPool ? max(second, other_second) : second + other_second;
    }
  }
  __device__ __forceinline__ void warp_reduce() {
    first = warp_sum(first);
    if constexpr (kSecond) second = kMode == Reduce::kPool ? warp_max(second) : warp_sum(second);
  }
};

// NCHW: one warp per (row = n*C + c, split); the row's H*W elements are contiguous.
template <Reduce kMode, bool kSecond, typename scalar_t, typename acc_t>
__global__ void reduce_nchw_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                   const acc_t* __restrict__ xmax, acc_t* __restrict__ part_first,
                                   acc_t* __restrict__ part_second, int64_t rows, int64_t cols,
                                   int64_t cols_per_split, int64_t splits) {
  const int64_t task = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (task >= rows * splits) return;  // whole warps leave together
  const int64_t row = task / splits;
  const int64_t split = task - row * splits;
  const int64_t begin = split * cols_per_split;
  const int64_t end = min(cols, begin + cols_per_split);
  const scalar_t* a_row = a + row * cols;
  const scalar_t* b_row = kMode == Reduce::kGrad ? b + row * cols : a_row;

  Accumulator<kMode, kSecond, acc_t> acc;
  acc.init();
  if constexpr (kMode == Reduce::kGrad && kSecond) acc.xmax = xmax[row];
  int64_t j = begin + lane;
  // Four independent loads in flight per lane before the tail loop.
  for (; j + 96 < end; j += 128) {
    acc_t va[4], vb[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      va[u] = static_cast<acc_t>(a_row[j + 32 * u]);
      vb[u] = static_cast<acc_t>(b_row[j + 32 * u]);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) acc.add(va[u], vb[u]);
  }
  for (; j < end; j += 32) acc.add(static_cast<acc_t>(a_row[j]), static_cast<acc_t>(b_row[j]));
  acc.warp_reduce();
  if (lane == 0) {
    part_first[split * rows + row] = acc.first;
    if constexpr (kSecond) part_second[split * rows + row] = acc.second;
  }
}

// NHWC: a block of kTileC channels x kTileHW pixel lanes per (n, channel tile, split); a warp
// reads kTileC consecutive channels of one pixel.
template <Reduce kMode, bool kSecond, typename scalar_t, typename acc_t>
__global__ void reduce_nhwc_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                   const acc_t* __restrict__ xmax, acc_t* __restrict__ part_first,
                                   acc_t* __restrict__ part_second, int64_t N, int64_t C, int64_t HW,
                                   int64_t hw_per_split, int64_t splits) {
  const int64_t c_tiles = (C + kTileC - 1) / kTileC;
  int64_t block = blockIdx.x;
  const int64_t split = block % splits;
  block /= splits;
  const int64_t c_tile = block % c_tiles;
  const int64_t n = block / c_tiles;
  const int64_t c = c_tile * kTileC + threadIdx.x;
  const int64_t begin = split * hw_per_split;
  const int64_t end = min(HW, begin + hw_per_split);

  Accumulator<kMode, kSecond, acc_t> acc;
  acc.init();
  if (c < C) {
    if constexpr (kMode == Reduce::kGrad && kSecond) acc.xmax = xmax[n * C + c];
    const scalar_t* a_col = a + n * HW * C + c;
    const scalar_t* b_col = kMode == Reduce::kGrad ? b + n * HW * C + c : a_col;
    for (int64_t hw = begin + threadIdx.y; hw < end; hw += kTileHW)
      acc.add(static_cast<acc_t>(a_col[hw * C]), static_cast<acc_t>(b_col[hw * C]));
  }
  __shared__ acc_t tile_first[kTileHW][kTileC];
  __shared__ acc_t tile_second[kTileHW][kTileC];
  tile_first[threadIdx.y][threadIdx.x] = acc.first;
  tile_second[threadIdx.y][threadIdx.x] = acc.second;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int r = 1; r < kTileHW; ++r) acc.merge(tile_first[r][threadIdx.x], tile_second[r][threadIdx.x]);
    part_first[split * N * C + n * C + c] = acc.first;
    if constexpr (kSecond) part_second[split * N * C + n * C + c] = acc.second;
  }
}

// Runs one reduction pass and returns (first, second) of shape (N, C); second is empty unless
// kSecond. Splits are chosen so that the grid fills the GPU even when N*C is small.
template <Reduce kMode, bool kSecond>
std::tuple<at::Tensor, at::Tensor> reduce_pass(const at::Tensor& a, const at::Tensor& b,
                                               const at::Tensor& xmax, Layout layout) {
  const int64_t N = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  const auto acc_dtype = at::toAccumulateType(a.scalar_type(), true);
  const auto stat_options = a.options().dtype(acc_dtype);
  const int sms = num_sms();
  const auto stream = at::cuda::getCurrentCUDAStream();

  int64_t splits, per_split;
  if (layout == Layout::kNCHW) {
    const int64_t rows = N * C;
    const int64_t want = (int64_t(sms) * 64 + rows - 1) / rows;           // warps to fill the GPU
    splits = std::max<int64_t>(1, std::min(want, (HW + 511) / 512));     // >= 512 elements each
  } else {
    const int64_t tiles = N * ((C + kTileC - 1) / kTileC);
    const int64_t want = (int64_t(sms) * 8 + tiles - 1) / tiles;          // blocks to fill the GPU
    splits = std::max<int64_t>(1, std::min(want, (HW + 63) / 64));       // >= 64 pixels each
  }
  per_split = (HW + splits - 1) / splits;
  splits = (HW + per_split - 1) / per_split;

  at::Tensor part_first = at::empty({splits, N, C}, stat_options);
  at::Tensor part_second = kSecond ? at::empty({splits, N, C}, stat_options) : at::empty({0}, stat_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "reduce_pass", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto* a_ptr = a.data_ptr<scalar_t>();
    const auto* b_ptr = kMode == Reduce::kGrad ? b.data_ptr<scalar_t>() : nullptr;
    const auto* xmax_ptr = kMode == Reduce::kGrad && kSecond ? xmax.data_ptr<acc_t>() : nullptr;
    auto* first_ptr = part_first.data_ptr<acc_t>();
    auto* second_ptr = kSecond ? part_second.data_ptr<acc_t>() : nullptr;
    if (layout == Layout::kNCHW) {
      const int64_t tasks = N * C * splits;
      const int64_t blocks = (tasks + kWarpsPerBlock - 1) / kWarpsPerBlock;
      reduce_nchw_kernel<kMode, kSecond, scalar_t, acc_t><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
          a_ptr, b_ptr, xmax_ptr, first_ptr, second_ptr, N * C, HW, per_split, splits);
    } else {
      const int64_t blocks = N * ((C + kTileC - 1) / kTileC) * splits;
      reduce_nhwc_kernel<kMode, kSecond, scalar_t, acc_t><<<blocks, dim3(kTileC, kTileHW), 0, stream>>>(
          a_ptr, b_ptr, xmax_ptr, first_ptr, second_ptr, N, C, HW, per_split, splits);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  if (splits == 1) return {part_first[0], kSecond ? part_second[0] : part_second};
  at::Tensor first = part_first.sum(0);
  at::Tensor second = part_second;
  if constexpr (kSecond) second = kMode == Reduce::kPool ? part_second.amax(0) : part_second.sum(0);
  return {first, second};
}

// out = a*gate[s] + bias[s] + (x == xmax[s]) * tie_coef[s], s the (n, c) index of the element.
// VEC elements per memory instruction; VEC divides the contiguous dimension (H*W or C), so a
// pack never straddles two (n, c) statistics in NCHW and covers VEC consecutive channels in NHWC.
template <typename scalar_t, typename acc_t, int VEC, bool kBias, bool kTies>
__global__ void gate_apply_kernel(const scalar_t* __restrict__ a, const acc_t* __restrict__ gate,
                                  const acc_t* __restrict__ bias, const scalar_t* __restrict__ x,
                                  const acc_t* __restrict__ xmax, const acc_t* __restrict__ tie_coef,
                                  scalar_t* __restrict__ out, int64_t numel, int64_t C, int64_t HW,
                                  bool nhwc) {
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
    const P pa = *reinterpret_cast<const P*>(a + i);
    P px;
    if constexpr (kTies) px = *reinterpret_cast<const P*>(x + i);
    P po;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t sk = nhwc ? s + k : s;
      acc_t r = static_cast<acc_t>(pa.v[k]) * gate[sk];
      if constexpr (kBias) r += bias[sk];
      if constexpr (kTies) r += static_cast<acc_t>(px.v[k]) == xmax[sk] ? tie_coef[sk] : acc_t(0);
      po.v[k] = static_cast<scalar_t>(r);
    }
    *reinterpret_cast<P*>(out + i) = po;
  }
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <bool kBias, bool kTies>
void launch_gate_apply(const at::Tensor& a, const at::Tensor& gate, const at::Tensor* bias,
                       const at::Tensor* x, const at::Tensor* xmax, const at::Tensor* tie_coef,
                       at::Tensor& out, Layout layout) {
  const int64_t numel = a.numel();
  const int64_t C = a.size(1), HW = a.size(2) * a.size(3);
  const int64_t contiguous_dim = layout == Layout::kNHWC ? C : HW;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "channel_gate_apply", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* a_ptr = a.data_ptr<scalar_t>();
    const auto* x_ptr = kTies ? x->data_ptr<scalar_t>() : nullptr;
    auto* out_ptr = out.data_ptr<scalar_t>();
    const bool vectorize = contiguous_dim % kVec == 0 && aligned(a_ptr, 16) && aligned(out_ptr, 16) &&
                           (!kTies || aligned(x_ptr, 16));
    const int vec = vectorize ? kVec : 1;
    const int threads = 256;
    const int64_t packs = numel / vec;
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>((packs + threads - 1) / threads, int64_t(num_sms()) * 32));
    const acc_t* gate_ptr = gate.data_ptr<acc_t>();
    const acc_t* bias_ptr = kBias ? bias->data_ptr<acc_t>() : nullptr;
    const acc_t* xmax_ptr = kTies ? xmax->data_ptr<acc_t>() : nullptr;
    const acc_t* tie_ptr = kTies ? tie_coef->data_ptr<acc_t>() : nullptr;
    const bool nhwc = layout == Layout::kNHWC;
    if (vectorize) {
      gate_apply_kernel<scalar_t, acc_t, kVec, kBias, kTies><<<blocks, threads, 0, stream>>>(
          a_ptr, gate_ptr, bias_ptr, x_ptr, xmax_ptr, tie_ptr, out_ptr, numel, C, HW, nhwc);
    } else {
      gate_apply_kernel<scalar_t, acc_t, 1, kBias, kTies><<<blocks, threads, 0, stream>>>(
          a_ptr, gate_ptr, bias_ptr, x_ptr, xmax_ptr, tie_ptr, out_ptr, numel, C, HW, nhwc);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_activation(const char* op, const at::Tensor& x) {
  AK_CHECK_CUDA(op, x);
  AK_CHECK_NCHW(op, x);
  AK_CHECK_FLOAT(op, x);
  AK_CHECK(x.numel() == 0 || x.size(2) * x.size(3) > 0, op,
           "argument 'x' must have H*W >= 1 to pool over, got shape ", x.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_pool(const at::Tensor& x, bool with_max) {
  constexpr const char* op = "channel_pool";
  check_activation(op, x);
  const Layout layout = layout_of(op, x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
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

std::tuple<at::Tensor, at::Tensor> channel_grad_reduce(const at::Tensor& dy, const at::Tensor& x,
                                                       const c10::optional<at::Tensor>& xmax) {
  constexpr const char* op = "channel_grad_reduce";
  check_activation(op, x);
  AK_CHECK_SAME(op, x, dy);
  const Layout layout = layout_of(op, x, "x");
  AK_CHECK(layout_of(op, dy, "dy") == layout, op,
           "argument 'dy' must have the same memory format as 'x'");
  if (xmax.has_value()) AK_CHECK_STAT(op, (*xmax), x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stat_options = x.options().dtype(at::toAccumulateType(x.scalar_type(), true));
  if (x.numel() == 0) {
    return {at::zeros({x.size(0), x.size(1)}, stat_options),
            xmax.has_value() ? at::zeros({x.size(0), x.size(1)}, stat_options) : at::empty({0}, stat_options)};
  }
  if (xmax.has_value()) return reduce_pass<Reduce::kGrad, true>(dy, x, *xmax, layout);
  return reduce_pass<Reduce::kGrad, false>(dy, x, at::Tensor(), layout);
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
  const c10::cuda::CUDAGuard guard(a.device());
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

TORCH_LIBRARY_IMPL(attn_kernels_cuda, CUDA, m) {
  m.impl("channel_pool", &channel_pool);
  m.impl("channel_grad_reduce", &channel_grad_reduce);
  m.impl("channel_gate_apply", &channel_gate_apply);
}

}  // namespace attn_kernels
