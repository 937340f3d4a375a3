// Attention-pooling primitives (GC's context modeling). The same contract as
// attn_kernels/triton/attention_pool.py:
//
//   attention_pool(x, weight, bias) -> (context, lse)                         one read of x
//       l[n,p] = sum_c weight[c] x[n,c,p] + bias[0],  a = softmax over p of l,
//       context[n,c] = sum_p a[n,p] x[n,c,p],  lse[n] = logsumexp over p of l
//   attention_pool_backward(dy, x, gate, context, dcontext, weight, bias, lse) -> (dx, dweight)
//                                                                 one read of dy and x, one write
//       dx = dy*gate[n,c] + a*(dcontext[n,c] + (u - k[n])*weight[c]),  dweight[c] = sum_n,p dl*x
//       with u = sum_c dcontext*x per pixel, k[n] = sum_c dcontext*context, dl = a*(u - k)
//
// One block per (split of H*W, n). Each step stages a tile of x (P pixels, all C channels) in
// shared memory: one read of x from DRAM serves both the logits (a reduction over C per pixel,
// a warp per pixel) and the weighted sums over pixels (a thread per channel, its accumulators in
// registers). The softmax is online, in the accumulator type: the running max and sum are
// rescaled as each tile arrives, and the splits' partial results are combined in a fixed order.
// No atomics: bitwise reproducible.
#include "common.cuh"

namespace attn_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Equal to ATTENTION_POOL_MAX_CHANNELS in attn_kernels/ops/primitives.py: each thread keeps the
// accumulators of C / kThreads channels in registers.
constexpr int kMaxChannels = 4096;
constexpr int kChannelsPerThread = kMaxChannels / kThreads;
constexpr int kTileBytes = 32 * 1024;  // x staged per step
constexpr int kMaxTilePixels = 32;     // the softmax update of a tile runs on one warp

template <typename T>
__device__ __forceinline__ T exp_acc(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return expf(v);
  } else {
    return exp(v);
  }
}

// Where element i of a tile of `pixels` pixels starting at hw0 lies: tile[p*C + c] in shared
// memory, offset in x. Consecutive i are consecutive in memory in either layout.
struct TileIndex {
  int p;
  int c;
  int64_t offset;
};

__device__ __forceinline__ TileIndex tile_index(int i, int pixels, int64_t n, int64_t hw0, int64_t C, int64_t HW,
                                                bool nhwc) {
  if (nhwc) {
    const int p = i / int(C), c = i - p * int(C);
    return {p, c, (n * HW + hw0 + p) * C + c};
  }
  const int c = i / pixels, p = i - c * pixels;
  return {p, c, (n * C + c) * HW + hw0 + p};
}

// Stages the tile of `pixels` pixels from hw0 of sample n in shared memory, as tile[p*C + c].
template <typename scalar_t>
__device__ __forceinline__ void load_tile(scalar_t* tile, const scalar_t* __restrict__ x, int pixels, int64_t n,
                                          int64_t hw0, int64_t C, int64_t HW, bool nhwc) {
  for (int i = threadIdx.x; i < pixels * C; i += kThreads) {
    const TileIndex t = tile_index(i, pixels, n, hw0, C, HW, nhwc);
    tile[t.p * C + t.c] = x[t.offset];
  }
  __syncthreads();
}

// sum_c tile_p[c] * v[c] for one pixel of the tile, by one warp.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t pixel_dot(const scalar_t* tile_p, const acc_t* __restrict__ v, int64_t C,
                                           int lane) {
  acc_t sum = 0;
  for (int c = lane; c < C; c += 32) sum += static_cast<acc_t>(tile_p[c]) * v[c];
  return warp_sum(sum);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) attention_pool_kernel(
    const scalar_t* __restrict__ x, const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
    acc_t* __restrict__ part_acc, acc_t* __restrict__ part_max, acc_t* __restrict__ part_sum, int64_t N, int64_t C,
    int64_t HW, int64_t hw_per_split, int tile_pixels, bool nhwc) {
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem);
  __shared__ acc_t logits[kMaxTilePixels];
  __shared__ acc_t tile_max_rescale[2];  // the tile's new running max, and exp(old max - new max)

  const int64_t split = blockIdx.x, n = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t begin = split * hw_per_split, end = min(HW, begin + hw_per_split);
  const acc_t b = bias[0];

  acc_t acc[kChannelsPerThread];
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) acc[k] = 0;
  acc_t run_max = -INFINITY, run_sum = 0;  // run_sum: kept by warp 0

  for (int64_t hw0 = begin; hw0 < end; hw0 += tile_pixels) {
    const int pixels = int(min(int64_t(tile_pixels), end - hw0));
    load_tile(tile, x, pixels, n, hw0, C, HW, nhwc);
    for (int p = warp; p < pixels; p += kWarps) {
      const acc_t l = pixel_dot(tile + p * C, weight, C, lane) + b;
      if (lane == 0) logits[p] = l;
    }
    __syncthreads();
    if (warp == 0) {
      const acc_t l = lane < pixels ? logits[lane] : acc_t(-INFINITY);
      const acc_t new_max = max(run_max, warp_max(l));
      const acc_t e = lane < pixels ? exp_acc(l - new_max) : acc_t(0);
      const acc_t rescale = exp_acc(run_max - new_max);  // 0 on the first tile
      run_sum = run_sum * rescale + warp_sum(e);
      if (lane < pixels) logits[lane] = e;  // the tile's softmax numerators, in place
      if (lane == 0) {
        tile_max_rescale[0] = new_max;
        tile_max_rescale[1] = rescale;
      }
    }
    __syncthreads();
    run_max = tile_max_rescale[0];
    const acc_t rescale = tile_max_rescale[1];
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      const int64_t c = threadIdx.x + k * kThreads;
      if (c < C) {
        acc_t sum = 0;
        for (int p = 0; p < pixels; ++p) sum += logits[p] * static_cast<acc_t>(tile[p * C + c]);
        acc[k] = acc[k] * rescale + sum;
      }
    }
    __syncthreads();  // the next tile overwrites tile and logits
  }
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) {
    const int64_t c = threadIdx.x + k * kThreads;
    if (c < C) part_acc[(split * N + n) * C + c] = acc[k];
  }
  if (threadIdx.x == 0) {
    part_max[split * N + n] = run_max;
    part_sum[split * N + n] = run_sum;
  }
}

template <typename scalar_t, typename acc_t, bool kHasGate>
__global__ void __launch_bounds__(kThreads) attention_pool_backward_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const acc_t* __restrict__ gate,
    const acc_t* __restrict__ dcontext, const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
    const acc_t* __restrict__ lse, const acc_t* __restrict__ k_dot, scalar_t* __restrict__ dx,
    acc_t* __restrict__ part_dweight, int64_t N, int64_t C, int64_t HW, int64_t hw_per_split, int tile_pixels,
    bool nhwc) {
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem);
  __shared__ acc_t attn[kMaxTilePixels];
  __shared__ acc_t dlogits[kMaxTilePixels];

  const int64_t split = blockIdx.x, n = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t begin = split * hw_per_split, end = min(HW, begin + hw_per_split);
  const acc_t b = bias[0], lse_n = lse[n], k_n = k_dot[n];
  const acc_t* dctx = dcontext + n * C;
  const acc_t* g = kHasGate ? gate + n * C : nullptr;

  acc_t dw[kChannelsPerThread];
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) dw[k] = 0;

  for (int64_t hw0 = begin; hw0 < end; hw0 += tile_pixels) {
    const int pixels = int(min(int64_t(tile_pixels), end - hw0));
    load_tile(tile, x, pixels, n, hw0, C, HW, nhwc);
    for (int p = warp; p < pixels; p += kWarps) {
      const acc_t l = pixel_dot(tile + p * C, weight, C, lane) + b;
      const acc_t u = pixel_dot(tile + p * C, dctx, C, lane);
      if (lane == 0) {
        const acc_t a = exp_acc(l - lse_n);
        attn[p] = a;
        dlogits[p] = a * (u - k_n);
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < pixels * C; i += kThreads) {
      const TileIndex t = tile_index(i, pixels, n, hw0, C, HW, nhwc);
      const acc_t d = static_cast<acc_t>(dy[t.offset]);
      acc_t r = attn[t.p] * dctx[t.c] + dlogits[t.p] * weight[t.c];
      r += kHasGate ? d * g[t.c] : d;
      dx[t.offset] = static_cast<scalar_t>(r);
    }
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      const int64_t c = threadIdx.x + k * kThreads;
      if (c < C) {
        acc_t sum = 0;
        for (int p = 0; p < pixels; ++p) sum += dlogits[p] * static_cast<acc_t>(tile[p * C + c]);
        dw[k] += sum;
      }
    }
    __syncthreads();  // the next tile overwrites tile, attn and dlogits
  }
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) {
    const int64_t c = threadIdx.x + k * kThreads;
    if (c < C) part_dweight[(split * N + n) * C + c] = dw[k];
  }
}

// (tile pixels, splits, pixels per split) for x: a tile fills kTileBytes, and H*W is split until
// the grid has a few blocks per SM.
struct Plan {
  int tile_pixels;
  int64_t splits;
  int64_t per_split;
};

Plan plan_for(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t per_pixel = C * x.element_size();
  const int tile_pixels = int(std::max<int64_t>(1, std::min<int64_t>({kMaxTilePixels, kTileBytes / per_pixel, HW})));
  const int64_t want = (int64_t(num_sms()) * 4 + N - 1) / N;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, (HW + tile_pixels - 1) / tile_pixels));
  int64_t per_split = (HW + splits - 1) / splits;
  per_split = (per_split + tile_pixels - 1) / tile_pixels * tile_pixels;  // whole tiles
  splits = (HW + per_split - 1) / per_split;
  return {tile_pixels, splits, per_split};
}

void check_weights(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const auto acc = at::toAccumulateType(x.scalar_type(), true);
  AK_CHECK(x.size(1) <= kMaxChannels, op, "argument 'x' has ", x.size(1), " channels; at most ", kMaxChannels,
           " are supported");
  AK_CHECK(weight.is_cuda() && weight.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(1) &&
               weight.scalar_type() == acc && weight.device() == x.device(),
           op, "argument 'weight' must be a contiguous CUDA tensor of shape (C,) = (", x.size(1), ",) and dtype ",
           acc, " on x's device, got ", weight.sizes(), " ", weight.scalar_type(), " ", weight.device());
  AK_CHECK(bias.is_cuda() && bias.dim() == 1 && bias.size(0) == 1 && bias.scalar_type() == acc &&
               bias.device() == x.device(),
           op, "argument 'bias' must be a CUDA tensor of shape (1,) and dtype ", acc, " on x's device, got ",
           bias.sizes(), " ", bias.scalar_type(), " ", bias.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_pool(const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& bias) {
  constexpr const char* op = "attention_pool";
  check_activation(op, x);
  const Layout layout = layout_of(op, x, "x");
  check_weights(op, x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto stat_options = x.options().dtype(at::toAccumulateType(x.scalar_type(), true));
  if (x.numel() == 0) return {at::zeros({N, C}, stat_options), at::zeros({N}, stat_options)};

  const Plan plan = plan_for(x);
  at::Tensor part_acc = at::empty({plan.splits, N, C}, stat_options);
  at::Tensor part_max = at::empty({plan.splits, N}, stat_options);
  at::Tensor part_sum = at::empty({plan.splits, N}, stat_options);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const size_t smem = size_t(plan.tile_pixels) * C * sizeof(scalar_t);
    attention_pool_kernel<scalar_t, acc_t><<<dim3(plan.splits, N), kThreads, smem, stream>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<acc_t>(), bias.data_ptr<acc_t>(), part_acc.data_ptr<acc_t>(),
        part_max.data_ptr<acc_t>(), part_sum.data_ptr<acc_t>(), N, C, HW, plan.per_split, plan.tile_pixels,
        layout == Layout::kNHWC);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Combine the splits' online-softmax partials, in split order.
  const at::Tensor total_max = std::get<0>(part_max.max(0));
  const at::Tensor rescale = (part_max - total_max).exp_();
  const at::Tensor total = (part_sum * rescale).sum(0);
  const at::Tensor context = (part_acc * rescale.unsqueeze(2)).sum(0).div_(total.unsqueeze(1));
  return {context, total_max + total.log()};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_backward(const at::Tensor& dy, const at::Tensor& x,
                                                           const c10::optional<at::Tensor>& gate,
                                                           const at::Tensor& context, const at::Tensor& dcontext,
                                                           const at::Tensor& weight, const at::Tensor& bias,
                                                           const at::Tensor& lse) {
  constexpr const char* op = "attention_pool_backward";
  check_activation(op, x);
  AK_CHECK_SAME(op, x, dy);
  const Layout layout = layout_of(op, x, "x");
  AK_CHECK(layout_of(op, dy, "dy") == layout, op, "argument 'dy' must have the same memory format as 'x'");
  check_weights(op, x, weight, bias);
  if (gate.has_value()) AK_CHECK_STAT(op, (*gate), x);
  AK_CHECK_STAT(op, context, x);
  AK_CHECK_STAT(op, dcontext, x);
  AK_CHECK(lse.is_cuda() && lse.is_contiguous() && lse.dim() == 1 && lse.size(0) == x.size(0) &&
               lse.scalar_type() == weight.scalar_type(),
           op, "argument 'lse' must be a contiguous CUDA tensor of shape (N,) = (", x.size(0), ",) and dtype ",
           weight.scalar_type(), ", got ", lse.sizes(), " ", lse.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor dx = at::empty_like(dy);
  if (x.numel() == 0) return {dx, at::zeros({C}, weight.options())};

  const at::Tensor k_dot = (dcontext * context).sum(1);
  const Plan plan = plan_for(x);
  at::Tensor part_dweight = at::empty({plan.splits, N, C}, weight.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const size_t smem = size_t(plan.tile_pixels) * C * sizeof(scalar_t);
    const acc_t* gate_ptr = gate.has_value() ? gate->data_ptr<acc_t>() : nullptr;
    auto launch = [&](auto kernel) {
      kernel<<<dim3(plan.splits, N), kThreads, smem, stream>>>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gate_ptr, dcontext.data_ptr<acc_t>(),
          weight.data_ptr<acc_t>(), bias.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), k_dot.data_ptr<acc_t>(),
          dx.data_ptr<scalar_t>(), part_dweight.data_ptr<acc_t>(), N, C, HW, plan.per_split, plan.tile_pixels,
          layout == Layout::kNHWC);
    };
    if (gate.has_value()) {
      launch(attention_pool_backward_kernel<scalar_t, acc_t, true>);
    } else {
      launch(attention_pool_backward_kernel<scalar_t, acc_t, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, part_dweight.sum(at::IntArrayRef{0, 1})};
}

TORCH_LIBRARY_IMPL(attn_kernels_cuda, CUDA, m) {
  m.impl("attention_pool", &attention_pool);
  m.impl("attention_pool_backward", &attention_pool_backward);
}

}  // namespace attn_kernels
