// scSE's primitives (concurrent spatial and channel squeeze-and-excitation). The same contract as
// attn_kernels/triton/scse.py:
//
//   scse_reduce(a, b, weight) -> (channel_sum, pixel_sum)                   one read of a (and b)
//       t = a*b (a without b):  channel_sum[n,c] = sum_p t[n,c,p],  pixel_sum[n,p] = sum_c weight[c] t[n,c,p]
//       (sum_c t without weight)
//   scse_apply(a, gc, gs, x, cbias, pcoef, weight) -> (out, dweight)        one read of a (and x), one write
//       out = a*(gc[n,c] + gs[n,p]) (+ cbias[n,c] + pcoef[n,p]*weight[c]),
//       dweight[c] = sum_n,p pcoef[n,p] x[n,c,p]   (x, cbias, pcoef and weight: all or none)
//
// The tile of attention_pool.cu (pixel_tile.cuh): one block per (n, split of H*W) stages P pixels
// with all C channels in shared memory, a warp per pixel sums over C, a thread per channel over
// the tile's pixels. scse_reduce stages t = a*b in the accumulator type, so the product is rounded
// once, as the Triton kernel's. scse_apply computes out element by element in memory order and,
// in the backward, stages x for dweight's per-channel sums.
#include "pixel_tile.cuh"

namespace attn_kernels {
namespace {

template <typename scalar_t, typename acc_t, bool kHasB, bool kHasWeight>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<acc_t>) scse_reduce_kernel(
    dev_ptr<const scalar_t> a, dev_ptr<const scalar_t> b, dev_ptr<const acc_t> weight, dev_ptr<acc_t> part_csum,
    dev_ptr<acc_t> pixel_sum, int64_t N, int64_t C, int64_t HW, int64_t hw_per_split, int tile_pixels, bool nhwc) {
  AK_DYNAMIC_SHARED(acc_t, tile);
  const int64_t stride = tile_stride(C, sizeof(acc_t));  // of the tile's rows

  const int64_t n = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t begin = split * hw_per_split, end = min(HW, begin + hw_per_split);

  acc_t acc[kChannelsPerThread];
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) acc[k] = 0;

  for (int64_t hw0 = begin; hw0 < end; hw0 += tile_pixels) {
    const int pixels = int(min(int64_t(tile_pixels), end - hw0));
    stage_tile(tile, pixels, n, hw0, C, HW, nhwc, [&](int64_t i) {
      const acc_t v = static_cast<acc_t>(a[i]);
      if constexpr (kHasB) {
        return v * static_cast<acc_t>(b[i]);
      } else {
        return v;
      }
    });
    for (int p = warp; p < pixels; p += kWarps) {
      acc_t sum;
      if constexpr (kHasWeight) {
        sum = pixel_dot<acc_t>(tile + p * stride, weight, C, lane);
      } else {
        sum = 0;
        for (int c = lane; c < C; c += 32) sum += tile[p * stride + c];
        sum = warp_sum(sum);
      }
      if (lane == 0) pixel_sum[n * HW + hw0 + p] = sum;
    }
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      const int64_t c = threadIdx.x + k * kThreads;
      if (c < C) {
        acc_t sum = 0;
        for (int p = 0; p < pixels; ++p) sum += tile[p * stride + c];
        acc[k] += sum;
      }
    }
    __syncthreads();  // the next tile overwrites this one
  }
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) {
    const int64_t c = threadIdx.x + k * kThreads;
    if (c < C) part_csum[(split * N + n) * C + c] = acc[k];
  }
}

template <typename scalar_t, typename acc_t, bool kGrad>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<acc_t>) scse_apply_kernel(
    dev_ptr<const scalar_t> a, dev_ptr<const acc_t> gc, dev_ptr<const acc_t> gs, dev_ptr<const scalar_t> x,
    dev_ptr<const acc_t> cbias, dev_ptr<const acc_t> pcoef, dev_ptr<const acc_t> weight, dev_ptr<scalar_t> out,
    dev_ptr<acc_t> part_dweight, int64_t N, int64_t C, int64_t HW, int64_t hw_per_split, int tile_pixels, bool nhwc) {
  AK_DYNAMIC_SHARED(scalar_t, tile);  // x's tile, in the backward
  const int64_t stride = tile_stride(C, sizeof(scalar_t));
  AK_SHARED(acc_t, tile_pcoef, kMaxTilePixels);

  const int64_t n = blockIdx.x, split = blockIdx.y;
  const int64_t begin = split * hw_per_split, end = min(HW, begin + hw_per_split);

  acc_t dw[kChannelsPerThread];
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) dw[k] = 0;

  for (int64_t hw0 = begin; hw0 < end; hw0 += tile_pixels) {
    const int pixels = int(min(int64_t(tile_pixels), end - hw0));
    for (int i = threadIdx.x; i < pixels * C; i += kThreads) {
      const TileIndex t = tile_index(i, pixels, n, hw0, C, HW, nhwc);
      const int64_t pixel = n * HW + hw0 + t.p;
      acc_t r = static_cast<acc_t>(a[t.offset]) * (gc[n * C + t.c] + gs[pixel]);
      if constexpr (kGrad) {
        r += cbias[n * C + t.c] + pcoef[pixel] * weight[t.c];
        tile[t.p * stride + t.c] = x[t.offset];
      }
      out[t.offset] = static_cast<scalar_t>(r);
    }
    if constexpr (kGrad) {
      if (int(threadIdx.x) < pixels) tile_pcoef[threadIdx.x] = pcoef[n * HW + hw0 + threadIdx.x];
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kChannelsPerThread; ++k) {
        const int64_t c = threadIdx.x + k * kThreads;
        if (c < C) {
          acc_t sum = 0;
          for (int p = 0; p < pixels; ++p) sum += tile_pcoef[p] * static_cast<acc_t>(tile[p * stride + c]);
          dw[k] += sum;
        }
      }
      __syncthreads();  // the next tile overwrites tile and tile_pcoef
    }
  }
  if constexpr (kGrad) {
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      const int64_t c = threadIdx.x + k * kThreads;
      if (c < C) part_dweight[(split * N + n) * C + c] = dw[k];
    }
  }
}

void check_channels(const char* op, const at::Tensor& a) {
  AK_CHECK(a.size(1) <= kMaxChannels, op, "argument 'a' has ", a.size(1), " channels; at most ", kMaxChannels,
           " are supported");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> scse_reduce(const at::Tensor& a, const c10::optional<at::Tensor>& b_opt,
                                               const c10::optional<at::Tensor>& weight_opt) {
  constexpr const char* op = "scse_reduce";
  check_activation(op, a);
  const Layout layout = layout_of(op, a, "a");
  check_channels(op, a);
  if (b_opt.has_value()) {
    const at::Tensor& b = *b_opt;
    AK_CHECK_SAME(op, a, b);
    AK_CHECK(layout_of(op, b, "b") == layout, op, "argument 'b' must have the same memory format as 'a'");
  }
  if (weight_opt.has_value()) {
    const at::Tensor& weight = *weight_opt;
    AK_CHECK_STAT_SHAPE(op, weight, a, "(C,)", {a.size(1)});
  }
  const DeviceGuard guard(a.device());
  const int64_t N = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  const auto stat_options = a.options().dtype(at::toAccumulateType(a.scalar_type(), true));
  if (a.numel() == 0) return {at::zeros({N, C}, stat_options), at::zeros({N, HW}, stat_options)};

  const Plan plan = plan_for(a, stat_options.dtype().itemsize());  // the tile holds a*b in acc_t
  at::Tensor part_csum = at::empty({plan.splits, N, C}, stat_options);
  at::Tensor pixel_sum = at::empty({N, HW}, stat_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto run = [&](auto kernel) {
      launch<decltype(kernel)::value>(
          op, N, plan.splits, kThreads, plan.tile_bytes, device_ptr<const scalar_t>(a, "a"),
          device_ptr<const scalar_t>(b_opt.has_value() ? &*b_opt : nullptr, "b"),
          device_ptr<const acc_t>(weight_opt.has_value() ? &*weight_opt : nullptr, "weight"),
          device_ptr<acc_t>(part_csum, "part_csum"), device_ptr<acc_t>(pixel_sum, "pixel_sum"), N, C, HW,
          plan.per_split, plan.tile_pixels, layout == Layout::kNHWC);
    };
    if (b_opt.has_value() && weight_opt.has_value()) {
      run(Kernel<scse_reduce_kernel<scalar_t, acc_t, true, true>>{});
    } else if (b_opt.has_value()) {
      run(Kernel<scse_reduce_kernel<scalar_t, acc_t, true, false>>{});
    } else if (weight_opt.has_value()) {
      run(Kernel<scse_reduce_kernel<scalar_t, acc_t, false, true>>{});
    } else {
      run(Kernel<scse_reduce_kernel<scalar_t, acc_t, false, false>>{});
    }
  });
  return {part_csum.sum(0), pixel_sum};
}

std::tuple<at::Tensor, at::Tensor> scse_apply(const at::Tensor& a, const at::Tensor& gc, const at::Tensor& gs,
                                              const c10::optional<at::Tensor>& x_opt,
                                              const c10::optional<at::Tensor>& cbias_opt,
                                              const c10::optional<at::Tensor>& pcoef_opt,
                                              const c10::optional<at::Tensor>& weight_opt) {
  constexpr const char* op = "scse_apply";
  check_activation(op, a);
  const Layout layout = layout_of(op, a, "a");
  check_channels(op, a);
  AK_CHECK_STAT(op, gc, a);
  AK_CHECK_PIXEL_STAT(op, gs, a);
  const bool grad = x_opt.has_value();
  AK_CHECK(cbias_opt.has_value() == grad && pcoef_opt.has_value() == grad && weight_opt.has_value() == grad, op,
           "arguments 'x', 'cbias', 'pcoef' and 'weight' must be all given or all None");
  if (grad) {
    const at::Tensor &x = *x_opt, &cbias = *cbias_opt, &pcoef = *pcoef_opt, &weight = *weight_opt;
    AK_CHECK_SAME(op, a, x);
    AK_CHECK(layout_of(op, x, "x") == layout, op, "argument 'x' must have the same memory format as 'a'");
    AK_CHECK_STAT(op, cbias, a);
    AK_CHECK_PIXEL_STAT(op, pcoef, a);
    AK_CHECK_STAT_SHAPE(op, weight, a, "(C,)", {a.size(1)});
  }
  const DeviceGuard guard(a.device());
  const int64_t N = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  at::Tensor out = at::empty_like(a);
  if (a.numel() == 0) return {out, at::zeros({grad ? C : 0}, gc.options())};

  const Plan plan = plan_for(a, a.element_size());
  at::Tensor part_dweight = at::empty(grad ? at::IntArrayRef{plan.splits, N, C} : at::IntArrayRef{0}, gc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto run = [&](auto kernel, size_t shared_bytes) {
      launch<decltype(kernel)::value>(
          op, N, plan.splits, kThreads, shared_bytes, device_ptr<const scalar_t>(a, "a"),
          device_ptr<const acc_t>(gc, "gc"), device_ptr<const acc_t>(gs, "gs"),
          device_ptr<const scalar_t>(grad ? &*x_opt : nullptr, "x"),
          device_ptr<const acc_t>(grad ? &*cbias_opt : nullptr, "cbias"),
          device_ptr<const acc_t>(grad ? &*pcoef_opt : nullptr, "pcoef"),
          device_ptr<const acc_t>(grad ? &*weight_opt : nullptr, "weight"), device_ptr<scalar_t>(out, "out"),
          device_ptr<acc_t>(grad ? &part_dweight : nullptr, "part_dweight"), N, C, HW, plan.per_split,
          plan.tile_pixels, layout == Layout::kNHWC);
    };
    if (grad) {
      run(Kernel<scse_apply_kernel<scalar_t, acc_t, true>>{}, plan.tile_bytes);
    } else {
      run(Kernel<scse_apply_kernel<scalar_t, acc_t, false>>{}, 0);  // nothing staged
    }
  });
  return {out, grad ? part_dweight.sum(at::IntArrayRef{0, 1}) : part_dweight};
}

AK_LIBRARY_IMPL(AK_LIBRARY, AK_DISPATCH_KEY, m) {
  m.impl("scse_reduce", &scse_reduce);
  m.impl("scse_apply", &scse_apply);
}

}  // namespace attn_kernels
