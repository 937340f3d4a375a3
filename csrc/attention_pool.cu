// Attention-pooling primitives (GC's context modeling). The same contract as
// attn_kernels/triton/attention_pool.py:
//
//   attention_pool(x, weight, bias) -> (context, lse)                         one read of x
//       l[n,p] = sum_c weight[c] x[n,c,p] + bias[0],  a = softmax over p of l,
//       context[n,c] = sum_p a[n,p] x[n,c,p],  lse[n] = logsumexp over p of l
//   attention_pool_backward(dy, x, gate, context, dcontext, weight, bias, lse) -> (dx, dweight)
//                                                                 one read of dy and x, one write
//       dx = dy*gate[n,c] + a*dcontext[n,c] + dl*weight[c],  dweight[c] = sum_n,p dl*x
//       with dl = a * sum_c dcontext[n,c]*(x[n,c,p] - context[n,c]) per pixel: the logits' gradient
//       a*(u - k), u = sum_c dcontext*x and k = sum_c dcontext*context, with the difference taken
//       before the sum. Where the softmax is peaked, context is close to the dominant pixel and u - k
//       is a small difference of two large sums: rounded apart, it lost up to half of its bits.
//
// One block per (n, split of H*W). Each step stages a tile of x (P pixels, all C channels) in
// shared memory: one read of x from DRAM serves both the logits (a reduction over C per pixel,
// a warp per pixel) and the weighted sums over pixels (a thread per channel, its accumulators in
// registers). The softmax is online, in the accumulator type: the running max and sum are
// rescaled as each tile arrives, and the splits' partial results are combined in a fixed order.
// No atomics: bitwise reproducible.
#include "pixel_tile.cuh"

namespace attn_kernels {
namespace {

template <typename T>
__device__ __forceinline__ T exp_acc(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return expf(v);
  } else {
    return exp(v);
  }
}

// sum_c v[c] * (tile_p[c] - center[c]) over one pixel's channels, on the calling warp.
template <typename acc_t, typename TilePtr, typename VectorPtr>
__device__ __forceinline__ acc_t pixel_centered_dot(TilePtr tile_p, VectorPtr center, VectorPtr v, int64_t C, int lane) {
  acc_t sum = 0;
  for (int c = lane; c < C; c += 32) sum += (static_cast<acc_t>(tile_p[c]) - center[c]) * v[c];
  return warp_sum(sum);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<acc_t>) attention_pool_kernel(
    dev_ptr<const scalar_t> x, dev_ptr<const acc_t> weight, dev_ptr<const acc_t> bias, dev_ptr<acc_t> part_acc,
    dev_ptr<acc_t> part_max, dev_ptr<acc_t> part_sum, int64_t N, int64_t C, int64_t HW, int64_t hw_per_split,
    int tile_pixels, bool nhwc) {
  AK_DYNAMIC_SHARED(scalar_t, tile);
  const int64_t stride = tile_stride(C, sizeof(scalar_t));  // of the tile's rows
  AK_SHARED(acc_t, logits, kMaxTilePixels);
  AK_SHARED(acc_t, tile_max_rescale, 2);  // the tile's new running max, and exp(old max - new max)

  const int64_t n = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t begin = split * hw_per_split, end = min(HW, begin + hw_per_split);
  const acc_t b = bias[0];

  acc_t acc[kChannelsPerThread];
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) acc[k] = 0;
  acc_t run_max = -INFINITY, run_sum = 0;  // run_sum: kept by warp 0

  for (int64_t hw0 = begin; hw0 < end; hw0 += tile_pixels) {
    const int pixels = int(min(int64_t(tile_pixels), end - hw0));
    stage_tile(tile, pixels, n, hw0, C, HW, nhwc, [&](int64_t i) { return x[i]; });
    for (int p = warp; p < pixels; p += kWarps) {
      const acc_t l = pixel_dot<acc_t>(tile + p * stride, weight, C, lane) + b;
      if (lane == 0) logits[p] = l;
    }
    __syncthreads();
    if (warp == 0) {
      const acc_t l = lane < pixels ? logits[lane] : acc_t(-INFINITY);
      // NaN propagates as in torch.softmax; a logit of -inf weighs 0 even while the running max
      // is -inf too (where exp(-inf - -inf) would be NaN).
      const acc_t new_max = max_nan(run_max, warp_max(l));
      const acc_t e = lane < pixels && l != acc_t(-INFINITY) ? exp_acc(l - new_max) : acc_t(0);
      const acc_t rescale = run_max == new_max ? acc_t(1) : exp_acc(run_max - new_max);  // 0 on the first tile
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
        for (int p = 0; p < pixels; ++p) sum += logits[p] * static_cast<acc_t>(tile[p * stride + c]);
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
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<acc_t>) attention_pool_backward_kernel(
    dev_ptr<const scalar_t> dy, dev_ptr<const scalar_t> x, dev_ptr<const acc_t> gate, dev_ptr<const acc_t> dcontext,
    dev_ptr<const acc_t> weight, dev_ptr<const acc_t> bias, dev_ptr<const acc_t> lse, dev_ptr<const acc_t> context,
    dev_ptr<scalar_t> dx, dev_ptr<acc_t> part_dweight, int64_t N, int64_t C, int64_t HW, int64_t hw_per_split,
    int tile_pixels, bool nhwc) {
  AK_DYNAMIC_SHARED(scalar_t, tile);
  const int64_t stride = tile_stride(C, sizeof(scalar_t));  // of the tile's rows
  AK_SHARED(acc_t, attn, kMaxTilePixels);
  AK_SHARED(acc_t, dlogits, kMaxTilePixels);

  const int64_t n = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t begin = split * hw_per_split, end = min(HW, begin + hw_per_split);
  const acc_t b = bias[0], lse_n = lse[n];
  const auto dctx = dcontext + n * C, ctx = context + n * C;
  const auto g = gate + (kHasGate ? n * C : 0);  // null without a gate

  acc_t dw[kChannelsPerThread];
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) dw[k] = 0;

  for (int64_t hw0 = begin; hw0 < end; hw0 += tile_pixels) {
    const int pixels = int(min(int64_t(tile_pixels), end - hw0));
    stage_tile(tile, pixels, n, hw0, C, HW, nhwc, [&](int64_t i) { return x[i]; });
    for (int p = warp; p < pixels; p += kWarps) {
      const acc_t l = pixel_dot<acc_t>(tile + p * stride, weight, C, lane) + b;
      const acc_t u_minus_k = pixel_centered_dot<acc_t>(tile + p * stride, ctx, dctx, C, lane);
      if (lane == 0) {
        const acc_t a = exp_acc(l - lse_n);
        attn[p] = a;
        dlogits[p] = a * u_minus_k;
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
        for (int p = 0; p < pixels; ++p) sum += dlogits[p] * static_cast<acc_t>(tile[p * stride + c]);
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

void check_weights(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  AK_CHECK(x.size(1) <= kMaxChannels, op, "argument 'x' has ", x.size(1), " channels; at most ", kMaxChannels,
           " are supported");
  AK_CHECK_STAT_SHAPE(op, weight, x, "(C,)", {x.size(1)});
  AK_CHECK_STAT_SHAPE(op, bias, x, "(1,)", {1});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_pool(const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& bias) {
  constexpr const char* op = "attention_pool";
  check_activation(op, x);
  const Layout layout = layout_of(op, x, "x");
  check_weights(op, x, weight, bias);
  const DeviceGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto stat_options = x.options().dtype(at::toAccumulateType(x.scalar_type(), true));
  if (x.numel() == 0) return {at::zeros({N, C}, stat_options), at::zeros({N}, stat_options)};

  const Plan plan = plan_for(x, x.element_size());
  at::Tensor part_acc = at::empty({plan.splits, N, C}, stat_options);
  at::Tensor part_max = at::empty({plan.splits, N}, stat_options);
  at::Tensor part_sum = at::empty({plan.splits, N}, stat_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    launch<attention_pool_kernel<scalar_t, acc_t>>(
        op, N, plan.splits, kThreads, plan.tile_bytes, device_ptr<const scalar_t>(x, "x"),
        device_ptr<const acc_t>(weight, "weight"), device_ptr<const acc_t>(bias, "bias"),
        device_ptr<acc_t>(part_acc, "part_acc"), device_ptr<acc_t>(part_max, "part_max"),
        device_ptr<acc_t>(part_sum, "part_sum"), N, C, HW, plan.per_split, plan.tile_pixels,
        layout == Layout::kNHWC);
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
  AK_CHECK_STAT_SHAPE(op, lse, x, "(N,)", {x.size(0)});
  const DeviceGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor dx = at::empty_like(dy);
  if (x.numel() == 0) return {dx, at::zeros({C}, weight.options())};

  const Plan plan = plan_for(x, x.element_size());
  at::Tensor part_dweight = at::empty({plan.splits, N, C}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto run = [&](auto kernel) {
      launch<decltype(kernel)::value>(
          op, N, plan.splits, kThreads, plan.tile_bytes,
          device_ptr<const scalar_t>(dy, "dy"), device_ptr<const scalar_t>(x, "x"),
          device_ptr<const acc_t>(gate.has_value() ? &*gate : nullptr, "gate"),
          device_ptr<const acc_t>(dcontext, "dcontext"), device_ptr<const acc_t>(weight, "weight"),
          device_ptr<const acc_t>(bias, "bias"), device_ptr<const acc_t>(lse, "lse"),
          device_ptr<const acc_t>(context, "context"), device_ptr<scalar_t>(dx, "dx"),
          device_ptr<acc_t>(part_dweight, "part_dweight"), N, C, HW, plan.per_split, plan.tile_pixels,
          layout == Layout::kNHWC);
    };
    if (gate.has_value()) {
      run(Kernel<attention_pool_backward_kernel<scalar_t, acc_t, true>>{});
    } else {
      run(Kernel<attention_pool_backward_kernel<scalar_t, acc_t, false>>{});
    }
  });
  return {dx, part_dweight.sum(at::IntArrayRef{0, 1})};
}

AK_LIBRARY_IMPL(AK_LIBRARY, AK_DISPATCH_KEY, m) {
  m.impl("attention_pool", &attention_pool);
  m.impl("attention_pool_backward", &attention_pool_backward);
}

}  // namespace attn_kernels
