// Spatial-gate primitives: CBAM (channel gate ca, then spatial gate sa) and its spatial attention
// alone (no ca). The same contract as attn_kernels/triton/spatial_gate.py:
//
//   spatial_pool(x, ca) -> (mean, max, ties)                  reads x
//       over C per pixel: mean and max of u = x*ca[n,c] (u = x without ca), and max's tie count
//   spatial_grad_reduce(dy, x, ca, sa) -> (dsa, dca)          reads dy, x
//       dsa[n,hw] = sum_c dy*u;  dca[n,c] = sum_hw dy*x*sa[n,hw] (empty without ca)
//   spatial_pool_grad_reduce(x, ca, smax, pmean, pmax, cmax) -> (dca, cties)   reads x
//       dca[n,c] = sum_hw x*(pmean[n,hw] + (u == smax[n,hw])*pmax[n,hw]);  cties = count(x == cmax[n,c])
//   spatial_gate_apply(a, ca, sa, x, smax, pmean, pmax, cbias, cmax, ctie) -> out   reads a (x), writes out
//       out = ca*(a*sa + pmean + (u == smax)*pmax) + cbias + (x == cmax)*ctie
//
// u is never written: each kernel recomputes it as acc_t(x) * ca, so ties found by one pass are
// found again by the next. Per-pixel statistics are (N, H*W), per-channel ones (N, C), in the
// accumulator type. Fixed reduction order, no atomics: bitwise reproducible.
#include <algorithm>

#include "reduce_hw.cuh"

namespace attn_kernels {
namespace {

// NHWC reductions over C: pixels a warp walks per channel chunk. Pooling keeps 3 accumulators per
// pixel and lane (sum, max, ties): 8 pixels hold it near 64 registers, where 16 took 100 to 150.
// The gradient keeps one, and writes its share of dca per warp tile and channel, (H*W / pixels)
// partials read again: 16 pixels keep them to 1/16 of dy's bytes per 4-byte partial (at 32 the
// unrolled pixel loop takes over 200 registers). Left to itself ptxas gives the gradient 119 to 163
// registers (its 2 * 16 loads in flight), one block per SM: the kernel's launch bounds ask for two
// (at most 128 registers: 101 to 124 on sm_90a, no spills in any dtype). Three would take 40 to 70
// registers but spill in fp64's pooling.
template <bool kGrad>
constexpr int kPixelsPerWarp = kGrad ? 16 : 8;

// The reductions over C split the channels into chunks of `chunk` (a multiple of 32), one warp per
// (sample, pixel tile, chunk), when the samples' pixel tiles alone would leave the GPU idle: at
// 2048x7x7 and N = 32 that is 64 warps (NCHW) on 132 SMs. Enough chunks for 8 warps per SM, of at
// least kMinChunk channels: a chunk's partials (3 per pixel, written and read again) cost at most
// 24 / (kMinChunk * sizeof(x)) of x's bytes, 9% in bf16. Combined in chunk order
// (spatial_combine_kernel): reproducible.
constexpr int64_t kMinChunk = 128;
inline int64_t channel_chunk(int64_t warps_without_split, int64_t C) {
  const int64_t wanted = int64_t(num_sms()) * 8;
  const int64_t splits = std::clamp<int64_t>((wanted + warps_without_split - 1) / warps_without_split, 1,
                                             std::max<int64_t>(1, C / kMinChunk));
  return ((C + splits - 1) / splits + 31) / 32 * 32;
}

// Folds (max, ties) of another partial into this one.
// NaN wins, as in torch.amax; a NaN max has no ties (x == NaN never holds).
template <typename acc_t>
__device__ __forceinline__ void merge_max(acc_t& m, acc_t& ties, acc_t other_m, acc_t other_ties) {
  if (other_m > m || (other_m != other_m && m == m)) {
    m = other_m;
    ties = other_ties;
  } else if (other_m == m) {
    ties += other_ties;
  }
}

template <typename acc_t>
__device__ __forceinline__ void warp_merge_max(acc_t& m, acc_t& ties) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc_t other_m = __shfl_xor_sync(0xffffffffu, m, offset);
    const acc_t other_ties = __shfl_xor_sync(0xffffffffu, ties, offset);
    merge_max(m, ties, other_m, other_ties);
  }
}

// Reduction over C per pixel, NCHW: a thread per pixel walks the channels of its chunk (a warp
// reads 32 consecutive pixels of one channel). kGrad=false (a = x): first = sum_c u / divisor, max,
// ties. kGrad=true (a = dy, b = x): first = sum_c dy*u and, with kHasCa, each warp's share of
// sum_hw dy*x*sa per channel into dca_part[n, warp tile, c]. The per-pixel outputs are the
// chunk's: (chunks, N, H*W), indexed [chunk][n][hw].
template <bool kGrad, bool kHasCa, typename scalar_t, typename acc_t>
__global__ void spatial_reduce_nchw_kernel(dev_ptr<const scalar_t> a, dev_ptr<const scalar_t> b,
                                           dev_ptr<const acc_t> ca, dev_ptr<const acc_t> sa, dev_ptr<acc_t> first,
                                           dev_ptr<acc_t> xmax, dev_ptr<acc_t> ties, dev_ptr<acc_t> dca_part,
                                           int64_t N, int64_t C, int64_t HW, int64_t chunk, acc_t divisor) {
  const int64_t tiles = (HW + 31) / 32, chunks = (C + chunk - 1) / chunk;
  const int64_t warp = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (warp >= N * tiles * chunks) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const int64_t split = warp % chunks, n = warp / chunks / tiles, tile = warp / chunks - n * tiles;
  const int64_t c_begin = split * chunk, c_end = min(C, c_begin + chunk);
  const int64_t hw = tile * 32 + lane;
  const bool valid = hw < HW;
  const int64_t base = n * C * HW + (valid ? hw : 0);
  acc_t sa_hw = 0;
  if constexpr (kGrad) sa_hw = valid ? sa[n * HW + hw] : acc_t(0);

  acc_t total = 0, m = -INFINITY, count = 0;
  for (int64_t c = c_begin; c < c_end; ++c) {
    const acc_t scale = kHasCa ? ca[n * C + c] : acc_t(1);
    const acc_t va = valid ? static_cast<acc_t>(a[base + c * HW]) : acc_t(0);
    if constexpr (kGrad) {
      const acc_t p = valid ? va * static_cast<acc_t>(b[base + c * HW]) : acc_t(0);
      total += p * scale;
      if constexpr (kHasCa) {
        const acc_t share = warp_sum(p * sa_hw);
        if (lane == 0) dca_part[(n * tiles + tile) * C + c] = share;
      }
    } else {
      const acc_t u = va * scale;
      total += u;
      merge_max(m, count, u, acc_t(1));
    }
  }
  if (!valid) return;
  const int64_t out = (split * N + n) * HW + hw;
  first[out] = total / divisor;
  if constexpr (!kGrad) {
    xmax[out] = m;
    ties[out] = count;
  }
}

// Reduction over C per pixel, NHWC: a warp walks kPixelsPerWarp<kGrad> consecutive pixels of one sample
// through the channels of its chunk, 32 at a time (a coalesced read of each pixel's channels),
// each lane keeping per-pixel partials that are reduced across the warp at the end. Same outputs
// as the NCHW kernel.
template <bool kGrad, bool kHasCa, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 2) spatial_reduce_nhwc_kernel(dev_ptr<const scalar_t> a, dev_ptr<const scalar_t> b,
                                           dev_ptr<const acc_t> ca, dev_ptr<const acc_t> sa, dev_ptr<acc_t> first,
                                           dev_ptr<acc_t> xmax, dev_ptr<acc_t> ties, dev_ptr<acc_t> dca_part,
                                           int64_t N, int64_t C, int64_t HW, int64_t chunk, acc_t divisor) {
  constexpr int kPixels = kPixelsPerWarp<kGrad>;
  const int64_t tiles = (HW + kPixels - 1) / kPixels, chunks = (C + chunk - 1) / chunk;
  const int64_t warp = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (warp >= N * tiles * chunks) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const int64_t split = warp % chunks, n = warp / chunks / tiles, tile = warp / chunks - n * tiles;
  const int64_t c_begin = split * chunk, c_end = min(C, c_begin + chunk);
  const int64_t hw0 = tile * kPixels;

  acc_t total[kPixels], m[kPixels], count[kPixels];
#pragma unroll
  for (int k = 0; k < kPixels; ++k) {
    total[k] = 0;
    m[k] = -INFINITY;
    count[k] = 0;
  }
  for (int64_t c0 = c_begin; c0 < c_end; c0 += 32) {
    const int64_t c = c0 + lane;
    const bool valid_c = c < c_end;
    const acc_t scale = kHasCa ? (valid_c ? ca[n * C + c] : acc_t(0)) : acc_t(1);
    acc_t dca_share = 0;
#pragma unroll
    for (int k = 0; k < kPixels; ++k) {
      const int64_t hw = hw0 + k;
      if (hw >= HW) break;  // the same for every lane
      const int64_t offset = (n * HW + hw) * C + c;
      const acc_t va = valid_c ? static_cast<acc_t>(a[offset]) : acc_t(0);
      if constexpr (kGrad) {
        const acc_t p = valid_c ? va * static_cast<acc_t>(b[offset]) : acc_t(0);
        total[k] += p * scale;
        if constexpr (kHasCa) dca_share += p * sa[n * HW + hw];
      } else if (valid_c) {
        const acc_t u = va * scale;
        total[k] += u;
        merge_max(m[k], count[k], u, acc_t(1));
      }
    }
    if constexpr (kGrad && kHasCa) {
      if (valid_c) dca_part[(n * tiles + tile) * C + c] = dca_share;
    }
  }
#pragma unroll
  for (int k = 0; k < kPixels; ++k) {
    const int64_t hw = hw0 + k;
    if (hw >= HW) break;
    const acc_t sum = warp_sum(total[k]);
    if constexpr (!kGrad) warp_merge_max(m[k], count[k]);
    if (lane == 0) {
      const int64_t out = (split * N + n) * HW + hw;
      first[out] = sum / divisor;
      if constexpr (!kGrad) {
        xmax[out] = m[k];
        ties[out] = count[k];
      }
    }
  }
}

// Folds the channel chunks' partials of each pixel, in chunk order: first = sum / divisor and,
// with kMax, the max and its ties (merge_max, as within a chunk).
template <bool kMax, typename acc_t>
__global__ void spatial_combine_kernel(dev_ptr<const acc_t> part_first, dev_ptr<const acc_t> part_max,
                                       dev_ptr<const acc_t> part_ties, dev_ptr<acc_t> first, dev_ptr<acc_t> xmax,
                                       dev_ptr<acc_t> ties, int64_t pixels, int64_t chunks, acc_t divisor) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t total = 0, m = -INFINITY, count = 0;
    for (int64_t split = 0; split < chunks; ++split) {
      total += part_first[split * pixels + i];
      if constexpr (kMax) merge_max(m, count, part_max[split * pixels + i], part_ties[split * pixels + i]);
    }
    first[i] = total / divisor;
    if constexpr (kMax) {
      xmax[i] = m;
      ties[i] = count;
    }
  }
}

// Runs a reduction over C; returns the (N, H*W) outputs and, for kGrad with ca, dca (N, C).
template <bool kGrad>
std::vector<at::Tensor> spatial_reduce(const at::Tensor& a, const at::Tensor& b, const at::Tensor* ca,
                                       const at::Tensor* sa, Layout layout) {
  const int64_t N = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  const auto options = a.options().dtype(at::toAccumulateType(a.scalar_type(), true));
  const int64_t per_warp = layout == Layout::kNHWC ? kPixelsPerWarp<kGrad> : 32;
  const int64_t tiles = (HW + per_warp - 1) / per_warp;
  const int64_t chunk = channel_chunk(N * tiles, C), chunks = (C + chunk - 1) / chunk;
  at::Tensor first = at::empty({N, HW}, options);
  at::Tensor xmax = kGrad ? at::Tensor() : at::empty({N, HW}, options);
  at::Tensor ties = kGrad ? at::Tensor() : at::empty({N, HW}, options);
  // One chunk writes the outputs; several write partials, combined after.
  const auto partial = [&](const at::Tensor& t) {
    return chunks == 1 || !t.defined() ? t : at::empty({chunks, N, HW}, options);
  };
  const at::Tensor part_first = partial(first), part_max = partial(xmax), part_ties = partial(ties);
  at::Tensor dca_part = kGrad && ca ? at::empty({N, tiles, C}, options) : at::Tensor();
  const int64_t blocks = (N * tiles * chunks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const auto defined = [](const at::Tensor& t) { return t.defined() ? &t : nullptr; };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "spatial_reduce", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t mean_divisor = kGrad ? acc_t(1) : static_cast<acc_t>(C);
    const auto run = [&](auto kernel) {
      launch<decltype(kernel)::value>(
          "spatial_reduce", blocks, 1, kWarpsPerBlock * 32, 0, device_ptr<const scalar_t>(a, kGrad ? "dy" : "x"),
          device_ptr<const scalar_t>(kGrad ? &b : nullptr, "x"), device_ptr<const acc_t>(ca, "ca"),
          device_ptr<const acc_t>(sa, "sa"), device_ptr<acc_t>(part_first, "first"),
          device_ptr<acc_t>(defined(part_max), "max"), device_ptr<acc_t>(defined(part_ties), "ties"),
          device_ptr<acc_t>(defined(dca_part), "dca_part"), N, C, HW, chunk,
          chunks == 1 ? mean_divisor : acc_t(1));
    };
    const auto run_layout = [&](auto has_ca) {
      constexpr bool kHasCa = decltype(has_ca)::value;
      if (layout == Layout::kNCHW) {
        run(Kernel<spatial_reduce_nchw_kernel<kGrad, kHasCa, scalar_t, acc_t>>{});
      } else {
        run(Kernel<spatial_reduce_nhwc_kernel<kGrad, kHasCa, scalar_t, acc_t>>{});
      }
    };
    if (ca) {
      run_layout(std::true_type{});
    } else {
      run_layout(std::false_type{});
    }
    if (chunks > 1) {
      launch<spatial_combine_kernel<!kGrad, acc_t>>(
          "spatial_reduce", elementwise_blocks(N * HW), 1, kElementwiseThreads, 0,
          device_ptr<const acc_t>(part_first, "part_first"), device_ptr<const acc_t>(defined(part_max), "part_max"),
          device_ptr<const acc_t>(defined(part_ties), "part_ties"), device_ptr<acc_t>(first, "first"),
          device_ptr<acc_t>(defined(xmax), "max"), device_ptr<acc_t>(defined(ties), "ties"), N * HW, chunks,
          mean_divisor);
    }
  });
  if (kGrad) return {first, dca_part.defined() ? dca_part.sum(1) : at::empty({0}, options)};
  return {first, xmax, ties};
}

// out = ca*(a*sa + pmean + (u == smax)*pmax) + cbias + (x == cmax)*ctie, VEC elements a time;
// VEC divides the contiguous dimension, so a pack has one channel (NCHW) or one pixel (NHWC).
template <typename scalar_t, typename acc_t, int VEC, bool kHasCa, bool kSpatialGrad, bool kChannelGrad>
__global__ void spatial_apply_kernel(dev_ptr<const scalar_t> a, dev_ptr<const acc_t> ca, dev_ptr<const acc_t> sa,
                                     dev_ptr<const scalar_t> x, dev_ptr<const acc_t> smax,
                                     dev_ptr<const acc_t> pmean, dev_ptr<const acc_t> pmax,
                                     dev_ptr<const acc_t> cbias, dev_ptr<const acc_t> cmax, dev_ptr<const acc_t> ctie,
                                     dev_ptr<scalar_t> out, int64_t numel, int64_t C, int64_t HW, bool nhwc) {
  using P = Pack<scalar_t, VEC>;
  const int64_t packs = numel / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t i = p * VEC;
    int64_t channel, pixel;  // (n, c) and (n, hw) indices of the pack's first element
    if (nhwc) {
      pixel = i / C;
      const int64_t n = pixel / HW;
      channel = n * C + (i - pixel * C);
    } else {
      channel = i / HW;
      const int64_t n = channel / C;
      pixel = n * HW + (i - channel * HW);
    }
    const P pa = load_pack<P>(a, i);
    P px;
    if constexpr (kSpatialGrad) px = load_pack<P>(x, i);
    P po;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t ck = nhwc ? channel + k : channel;
      const int64_t pk = nhwc ? pixel : pixel + k;
      const acc_t scale = kHasCa ? ca[ck] : acc_t(1);
      acc_t r = static_cast<acc_t>(pa.v[k]) * sa[pk];
      if constexpr (kSpatialGrad) {
        const acc_t xv = static_cast<acc_t>(px.v[k]);
        r += pmean[pk] + (xv * scale == smax[pk] ? pmax[pk] : acc_t(0));
        if constexpr (kHasCa) r *= scale;
        if constexpr (kChannelGrad) r += cbias[ck] + (xv == cmax[ck] ? ctie[ck] : acc_t(0));
      } else if constexpr (kHasCa) {
        r *= scale;
      }
      po.v[k] = static_cast<scalar_t>(r);
    }
    store_pack(out, i, po);
  }
}

struct ApplyArgs {
  const at::Tensor* ca;
  const at::Tensor* x;
  const at::Tensor* smax;
  const at::Tensor* pmean;
  const at::Tensor* pmax;
  const at::Tensor* cbias;
  const at::Tensor* cmax;
  const at::Tensor* ctie;
};

template <bool kHasCa, bool kSpatialGrad, bool kChannelGrad>
void launch_spatial_apply(const at::Tensor& a, const at::Tensor& sa, const ApplyArgs& args, at::Tensor& out,
                          Layout layout) {
  const int64_t numel = a.numel(), C = a.size(1), HW = a.size(2) * a.size(3);
  const int64_t contiguous_dim = layout == Layout::kNHWC ? C : HW;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "spatial_gate_apply", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const int vec = pack_elements<scalar_t>(contiguous_dim, {&a, &out, kSpatialGrad ? args.x : nullptr});
    with_pack<scalar_t>(vec, [&](auto vec) {
      constexpr int kPack = decltype(vec)::value;
      launch<spatial_apply_kernel<scalar_t, acc_t, kPack, kHasCa, kSpatialGrad, kChannelGrad>>(
          "spatial_gate_apply", elementwise_blocks(numel / kPack), 1, kElementwiseThreads, 0,
          device_ptr<const scalar_t>(a, "a"), device_ptr<const acc_t>(args.ca, "ca"),
          device_ptr<const acc_t>(sa, "sa"), device_ptr<const scalar_t>(args.x, "x"),
          device_ptr<const acc_t>(args.smax, "smax"), device_ptr<const acc_t>(args.pmean, "pmean"),
          device_ptr<const acc_t>(args.pmax, "pmax"), device_ptr<const acc_t>(args.cbias, "cbias"),
          device_ptr<const acc_t>(args.cmax, "cmax"), device_ptr<const acc_t>(args.ctie, "ctie"),
          device_ptr<scalar_t>(out, "out"), numel, C, HW, layout == Layout::kNHWC);
    });
  });
}

const at::Tensor* ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_pool(const at::Tensor& x, const c10::optional<at::Tensor>& ca) {
  constexpr const char* op = "spatial_pool";
  check_activation(op, x);
  const Layout layout = layout_of(op, x, "x");
  if (ca.has_value()) AK_CHECK_STAT(op, (*ca), x);
  const DeviceGuard guard(x.device());
  if (x.numel() == 0) {
    const auto options = x.options().dtype(at::toAccumulateType(x.scalar_type(), true));
    const int64_t HW = x.size(2) * x.size(3);
    return {at::zeros({x.size(0), HW}, options), at::zeros({x.size(0), HW}, options),
            at::zeros({x.size(0), HW}, options)};
  }
  const auto out = spatial_reduce<false>(x, x, ptr(ca), nullptr, layout);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> spatial_grad_reduce(const at::Tensor& dy, const at::Tensor& x,
                                                       const c10::optional<at::Tensor>& ca, const at::Tensor& sa) {
  constexpr const char* op = "spatial_grad_reduce";
  check_activation(op, x);
  AK_CHECK_SAME(op, x, dy);
  const Layout layout = layout_of(op, x, "x");
  AK_CHECK(layout_of(op, dy, "dy") == layout, op, "argument 'dy' must have the same memory format as 'x'");
  if (ca.has_value()) AK_CHECK_STAT(op, (*ca), x);
  AK_CHECK_PIXEL_STAT(op, sa, x);
  const DeviceGuard guard(x.device());
  if (x.numel() == 0) {
    const auto options = x.options().dtype(at::toAccumulateType(x.scalar_type(), true));
    return {at::zeros({x.size(0), x.size(2) * x.size(3)}, options),
            ca.has_value() ? at::zeros({x.size(0), x.size(1)}, options) : at::empty({0}, options)};
  }
  const auto out = spatial_reduce<true>(dy, x, ptr(ca), &sa, layout);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> spatial_pool_grad_reduce(const at::Tensor& x, const at::Tensor& ca,
                                                            const at::Tensor& smax, const at::Tensor& pmean,
                                                            const at::Tensor& pmax, const at::Tensor& cmax) {
  constexpr const char* op = "spatial_pool_grad_reduce";
  check_activation(op, x);
  const Layout layout = layout_of(op, x, "x");
  AK_CHECK_STAT(op, ca, x);
  AK_CHECK_STAT(op, cmax, x);
  AK_CHECK_PIXEL_STAT(op, smax, x);
  AK_CHECK_PIXEL_STAT(op, pmean, x);
  AK_CHECK_PIXEL_STAT(op, pmax, x);
  const DeviceGuard guard(x.device());
  if (x.numel() == 0) {
    const auto options = x.options().dtype(at::toAccumulateType(x.scalar_type(), true));
    return {at::zeros({x.size(0), x.size(1)}, options), at::zeros({x.size(0), x.size(1)}, options)};
  }
  return reduce_pass<Reduce::kPoolGrad, true>(x, x, cmax, layout, {pmean, pmax, smax, ca});
}

at::Tensor spatial_gate_apply(const at::Tensor& a, const c10::optional<at::Tensor>& ca, const at::Tensor& sa,
                              const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& smax,
                              const c10::optional<at::Tensor>& pmean, const c10::optional<at::Tensor>& pmax,
                              const c10::optional<at::Tensor>& cbias, const c10::optional<at::Tensor>& cmax,
                              const c10::optional<at::Tensor>& ctie) {
  constexpr const char* op = "spatial_gate_apply";
  check_activation(op, a);
  const Layout layout = layout_of(op, a, "a");
  const bool spatial_grad = x.has_value(), channel_grad = cbias.has_value();
  AK_CHECK(smax.has_value() == spatial_grad && pmean.has_value() == spatial_grad && pmax.has_value() == spatial_grad,
           op, "arguments 'x', 'smax', 'pmean' and 'pmax' must be given together or not at all");
  AK_CHECK(cmax.has_value() == channel_grad && ctie.has_value() == channel_grad, op,
           "arguments 'cbias', 'cmax' and 'ctie' must be given together or not at all");
  AK_CHECK(!channel_grad || (ca.has_value() && spatial_grad), op,
           "the channel terms 'cbias', 'cmax', 'ctie' need 'ca' and the spatial terms");
  if (ca.has_value()) AK_CHECK_STAT(op, (*ca), a);
  AK_CHECK_PIXEL_STAT(op, sa, a);
  if (spatial_grad) {
    AK_CHECK_SAME(op, a, (*x));
    AK_CHECK(layout_of(op, *x, "x") == layout, op, "argument 'x' must have the same memory format as 'a'");
    AK_CHECK_PIXEL_STAT(op, (*smax), a);
    AK_CHECK_PIXEL_STAT(op, (*pmean), a);
    AK_CHECK_PIXEL_STAT(op, (*pmax), a);
  }
  if (channel_grad) {
    AK_CHECK_STAT(op, (*cbias), a);
    AK_CHECK_STAT(op, (*cmax), a);
    AK_CHECK_STAT(op, (*ctie), a);
  }
  const DeviceGuard guard(a.device());
  at::Tensor out = at::empty_like(a);  // a's exact strides, as the op's fake implementation promises
  if (a.numel() == 0) return out;
  const ApplyArgs args{ptr(ca), ptr(x), ptr(smax), ptr(pmean), ptr(pmax), ptr(cbias), ptr(cmax), ptr(ctie)};
  if (channel_grad) {
    launch_spatial_apply<true, true, true>(a, sa, args, out, layout);
  } else if (spatial_grad) {
    if (ca.has_value()) {
      launch_spatial_apply<true, true, false>(a, sa, args, out, layout);
    } else {
      launch_spatial_apply<false, true, false>(a, sa, args, out, layout);
    }
  } else if (ca.has_value()) {
    launch_spatial_apply<true, false, false>(a, sa, args, out, layout);
  } else {
    launch_spatial_apply<false, false, false>(a, sa, args, out, layout);
  }
  return out;
}

AK_LIBRARY_IMPL(AK_LIBRARY, AK_DISPATCH_KEY, m) {
  m.impl("spatial_pool", &spatial_pool);
  m.impl("spatial_grad_reduce", &spatial_grad_reduce);
  m.impl("spatial_pool_grad_reduce", &spatial_pool_grad_reduce);
  m.impl("spatial_gate_apply", &spatial_gate_apply);
}

}  // namespace attn_kernels
