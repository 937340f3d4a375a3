// The per-channel reduction engine: for every (n, c), a reduction over H*W of x (and dy), split
// into chunks so that the grid fills the GPU, each chunk reduced by one warp (NCHW) or one block
// (NHWC) in a fixed order, the chunks' partial results summed in order: no atomics, bitwise
// reproducible. channel_gate.cu and spatial_gate.cu run their per-channel passes on it.
#pragma once

#include <array>

#include "common.cuh"

namespace attn_kernels {

constexpr int kWarpsPerBlock = 8;
constexpr int kTileC = 32;   // NHWC reduce: channels per block (one warp's width)
constexpr int kTileHW = 8;   // NHWC reduce: pixels in flight per block

// What a reduction pass accumulates per element at pixel hw of (n, c).
//   kPool:     first = sum(a),     second = max(a)                (a = x)
//   kGrad:     first = sum(a * b), second = count(b == xmax[n,c]) (a = dy, b = x)
//   kGradSum:  first = sum(a * b), second = sum(a)                (a = dy, b = x)
//   kPoolGrad: first = sum(a * (pmean[hw] + (a*ca[n,c] == smax[hw]) * pmax[hw])),
//              second = count(a == xmax[n,c])                    (a = x; CBAM's backward)
enum class Reduce { kPool, kGrad, kGradSum, kPoolGrad };

// Whether a mode reads b (x) beside a.
constexpr bool reads_b(Reduce mode) { return mode == Reduce::kGrad || mode == Reduce::kGradSum; }
// Whether a mode with a second result compares with a per-(n, c) max.
constexpr bool compares_max(Reduce mode) { return mode == Reduce::kGrad || mode == Reduce::kPoolGrad; }

// Per-pixel (N, H*W) and per-channel (N, C) inputs of kPoolGrad (pmean, pmax, smax, ca); null otherwise.
template <typename acc_t>
struct PixelTerms {
  dev_ptr<const acc_t> pmean = nullptr;
  dev_ptr<const acc_t> pmax = nullptr;
  dev_ptr<const acc_t> smax = nullptr;
  dev_ptr<const acc_t> ca = nullptr;
};

template <Reduce kMode, bool kSecond, typename acc_t>
struct Accumulator {
  acc_t first;
  acc_t second;
  acc_t xmax;  // kGrad with ties, kPoolGrad: the forward max this (n, c) is compared with
  acc_t ca;    // kPoolGrad: the channel gate of this (n, c)
  PixelTerms<acc_t> pixel;  // kPoolGrad: offset to sample n

  __device__ __forceinline__ void init(dev_ptr<const acc_t> xmax_nc, const PixelTerms<acc_t>& terms, int64_t n,
                                       int64_t nc, int64_t HW) {
    first = 0;
    second = kMode == Reduce::kPool ? acc_t(-INFINITY) : acc_t(0);
    if constexpr (compares_max(kMode) && kSecond) xmax = xmax_nc[nc];
    if constexpr (kMode == Reduce::kPoolGrad) {
      ca = terms.ca[nc];
      pixel = {terms.pmean + n * HW, terms.pmax + n * HW, terms.smax + n * HW, nullptr};
    }
  }
  __device__ __forceinline__ void add(acc_t a, acc_t b, int64_t hw) {
    if constexpr (kMode == Reduce::kPool) {
      first += a;
      if constexpr (kSecond) second = max_nan(second, a);
    } else if constexpr (kMode == Reduce::kGrad) {
      first += a * b;
      if constexpr (kSecond) second += (b == xmax) ? acc_t(1) : acc_t(0);
    } else if constexpr (kMode == Reduce::kGradSum) {
      first += a * b;
      second += a;
    } else {
      first += a * (pixel.pmean[hw] + (a * ca == pixel.smax[hw] ? pixel.pmax[hw] : acc_t(0)));
      second += (a == xmax) ? acc_t(1) : acc_t(0);
    }
  }
  __device__ __forceinline__ void merge(acc_t other_first, acc_t other_second) {
    first += other_first;
    if constexpr (kSecond) {
      second = kMode == Reduce::kPool ? max_nan(second, other_second) : second + other_second;
    }
  }
  __device__ __forceinline__ void warp_reduce() {
    first = warp_sum(first);
    if constexpr (kSecond) second = kMode == Reduce::kPool ? warp_max(second) : warp_sum(second);
  }
};

// NCHW: one warp per (row = n*C + c, split); the row's H*W elements are contiguous. The warp
// writes the partial results of its split of the row.
template <Reduce kMode, bool kSecond, typename scalar_t, typename acc_t>
__device__ __forceinline__ void reduce_nchw_row(dev_ptr<const scalar_t> a, dev_ptr<const scalar_t> b,
                                                dev_ptr<const acc_t> xmax, const PixelTerms<acc_t>& terms,
                                                dev_ptr<acc_t> part_first, dev_ptr<acc_t> part_second, int64_t rows,
                                                int64_t C, int64_t cols, int64_t cols_per_split, int64_t row,
                                                int64_t split, int lane) {
  const int64_t begin = split * cols_per_split;
  const int64_t end = min(cols, begin + cols_per_split);
  const auto a_row = a + row * cols;
  const auto b_row = reads_b(kMode) ? b + row * cols : a_row;

  Accumulator<kMode, kSecond, acc_t> acc;
  acc.init(xmax, terms, row / C, row, cols);
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
    for (int u = 0; u < 4; ++u) acc.add(va[u], vb[u], j + 32 * u);
  }
  for (; j < end; j += 32) acc.add(static_cast<acc_t>(a_row[j]), static_cast<acc_t>(b_row[j]), j);
  acc.warp_reduce();
  if (lane == 0) {
    part_first[split * rows + row] = acc.first;
    if constexpr (kSecond) part_second[split * rows + row] = acc.second;
  }
}

template <Reduce kMode, bool kSecond, typename scalar_t, typename acc_t>
__global__ void reduce_nchw_kernel(dev_ptr<const scalar_t> a, dev_ptr<const scalar_t> b,
                                   dev_ptr<const acc_t> xmax, PixelTerms<acc_t> terms,
                                   dev_ptr<acc_t> part_first, dev_ptr<acc_t> part_second,
                                   int64_t rows, int64_t C, int64_t cols, int64_t cols_per_split,
                                   int64_t splits) {
  const int64_t task = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (task >= rows * splits) return;  // whole warps leave together
  const int64_t row = task / splits;
  reduce_nchw_row<kMode, kSecond, scalar_t>(a, b, xmax, terms, part_first, part_second, rows, C, cols,
                                            cols_per_split, row, task - row * splits, threadIdx.x % 32);
}

// NHWC: a block of kTileC channels x kTileHW pixel lanes per (n, channel tile, split); a warp
// reads kTileC consecutive channels of one pixel. Every thread of the block takes part (it holds
// a barrier); the partial results of the tile's split are written by the threads of threadIdx.y 0.
template <Reduce kMode, bool kSecond, typename scalar_t, typename acc_t>
__device__ __forceinline__ void reduce_nhwc_tile(dev_ptr<const scalar_t> a, dev_ptr<const scalar_t> b,
                                                 dev_ptr<const acc_t> xmax, const PixelTerms<acc_t>& terms,
                                                 dev_ptr<acc_t> part_first, dev_ptr<acc_t> part_second, int64_t N,
                                                 int64_t C, int64_t HW, int64_t hw_per_split, int64_t n,
                                                 int64_t c_tile, int64_t split) {
  const int64_t c = c_tile * kTileC + threadIdx.x;
  const int64_t begin = split * hw_per_split;
  const int64_t end = min(HW, begin + hw_per_split);

  Accumulator<kMode, kSecond, acc_t> acc;
  acc.init(xmax, terms, n, n * C + (c < C ? c : 0), HW);
  if (c < C) {
    const auto a_col = a + n * HW * C + c;
    const auto b_col = reads_b(kMode) ? b + n * HW * C + c : a_col;
    for (int64_t hw = begin + threadIdx.y; hw < end; hw += kTileHW)
      acc.add(static_cast<acc_t>(a_col[hw * C]), static_cast<acc_t>(b_col[hw * C]), hw);
  }
  // [kTileHW][kTileC]: each pixel lane's partials, merged by lane 0 in a fixed order.
  AK_SHARED(acc_t, tile_first, kTileHW * kTileC);
  AK_SHARED(acc_t, tile_second, kTileHW * kTileC);
  tile_first[threadIdx.y * kTileC + threadIdx.x] = acc.first;
  tile_second[threadIdx.y * kTileC + threadIdx.x] = acc.second;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int r = 1; r < kTileHW; ++r) acc.merge(tile_first[r * kTileC + threadIdx.x], tile_second[r * kTileC + threadIdx.x]);
    part_first[split * N * C + n * C + c] = acc.first;
    if constexpr (kSecond) part_second[split * N * C + n * C + c] = acc.second;
  }
}

template <Reduce kMode, bool kSecond, typename scalar_t, typename acc_t>
__global__ void reduce_nhwc_kernel(dev_ptr<const scalar_t> a, dev_ptr<const scalar_t> b,
                                   dev_ptr<const acc_t> xmax, PixelTerms<acc_t> terms,
                                   dev_ptr<acc_t> part_first, dev_ptr<acc_t> part_second,
                                   int64_t N, int64_t C, int64_t HW, int64_t hw_per_split, int64_t splits) {
  const int64_t c_tiles = (C + kTileC - 1) / kTileC;
  int64_t block = blockIdx.x;
  const int64_t split = block % splits;
  block /= splits;
  reduce_nhwc_tile<kMode, kSecond, scalar_t>(a, b, xmax, terms, part_first, part_second, N, C, HW, hw_per_split,
                                             block / c_tiles, block % c_tiles, split);
}

// How a pass splits H*W so that the grid fills the GPU even when N*C is small: `splits` parts of
// `per_split` elements (NCHW) or pixels (NHWC), none empty.
struct HwSplit {
  int64_t splits;
  int64_t per_split;
};

inline HwSplit split_hw(Layout layout, int64_t N, int64_t C, int64_t HW) {
  const int sms = num_sms();
  int64_t splits;
  if (layout == Layout::kNCHW) {
    const int64_t rows = N * C;
    const int64_t want = (int64_t(sms) * 64 + rows - 1) / rows;           // warps to fill the GPU
    splits = std::max<int64_t>(1, std::min(want, (HW + 511) / 512));     // >= 512 elements each
  } else {
    const int64_t tiles = N * ((C + kTileC - 1) / kTileC);
    const int64_t want = (int64_t(sms) * 8 + tiles - 1) / tiles;          // blocks to fill the GPU
    splits = std::max<int64_t>(1, std::min(want, (HW + 63) / 64));       // >= 64 pixels each
  }
  const int64_t per_split = (HW + splits - 1) / splits;
  return {(HW + per_split - 1) / per_split, per_split};
}

// Runs one reduction pass and returns (first, second) of shape (N, C); second is empty unless
// kSecond.
template <Reduce kMode, bool kSecond>
std::tuple<at::Tensor, at::Tensor> reduce_pass(const at::Tensor& a, const at::Tensor& b,
                                               const at::Tensor& xmax, Layout layout,
                                               const std::array<at::Tensor, 4>& pixel_terms = {}) {
  const int64_t N = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  const auto acc_dtype = at::toAccumulateType(a.scalar_type(), true);
  const auto stat_options = a.options().dtype(acc_dtype);
  const HwSplit split = split_hw(layout, N, C, HW);
  const int64_t splits = split.splits, per_split = split.per_split;

  at::Tensor part_first = at::empty({splits, N, C}, stat_options);
  at::Tensor part_second = kSecond ? at::empty({splits, N, C}, stat_options) : at::empty({0}, stat_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "reduce_pass", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto a_ptr = device_ptr<const scalar_t>(a, "a");
    const auto b_ptr = device_ptr<const scalar_t>(reads_b(kMode) ? &b : nullptr, "b");
    const auto xmax_ptr = device_ptr<const acc_t>(compares_max(kMode) && kSecond ? &xmax : nullptr, "xmax");
    PixelTerms<acc_t> terms;
    if constexpr (kMode == Reduce::kPoolGrad) {
      terms = {device_ptr<const acc_t>(pixel_terms[0], "pmean"), device_ptr<const acc_t>(pixel_terms[1], "pmax"),
               device_ptr<const acc_t>(pixel_terms[2], "smax"), device_ptr<const acc_t>(pixel_terms[3], "ca")};
    }
    const auto first_ptr = device_ptr<acc_t>(part_first, "part_first");
    const auto second_ptr = device_ptr<acc_t>(kSecond ? &part_second : nullptr, "part_second");
    if (layout == Layout::kNCHW) {
      const int64_t tasks = N * C * splits;
      launch<reduce_nchw_kernel<kMode, kSecond, scalar_t, acc_t>>(
          "reduce_pass", (tasks + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, kWarpsPerBlock * 32, 0, a_ptr, b_ptr,
          xmax_ptr, terms, first_ptr, second_ptr, N * C, C, HW, per_split, splits);
    } else {
      launch<reduce_nhwc_kernel<kMode, kSecond, scalar_t, acc_t>>(
          "reduce_pass", N * ((C + kTileC - 1) / kTileC) * splits, 1, dim3(kTileC, kTileHW), 0, a_ptr, b_ptr,
          xmax_ptr, terms, first_ptr, second_ptr, N, C, HW, per_split, splits);
    }
  });

  if (splits == 1) return {part_first[0], kSecond ? part_second[0] : part_second};
  at::Tensor first = part_first.sum(0);
  at::Tensor second = part_second;
  if constexpr (kSecond) second = kMode == Reduce::kPool ? part_second.amax(0) : part_second.sum(0);
  return {first, second};
}

}  // namespace attn_kernels
