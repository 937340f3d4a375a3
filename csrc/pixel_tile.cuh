// The pixel tile of the kernels that reduce over C per pixel and over H*W per channel from one
// read of the activation (GC's attention pooling, scSE): one block per (n, split of H*W) stages a
// tile of P pixels with all C channels in shared memory, a warp per pixel reduces over C, a thread
// per channel over the tile's pixels (its accumulators in registers), and the splits' per-channel
// partial results are combined in a fixed order on the host. No atomics: bitwise reproducible.
#pragma once
#include <algorithm>

#include "common.cuh"

namespace attn_kernels {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Equal to ATTENTION_POOL_MAX_CHANNELS in attn_kernels/ops/primitives.py: each thread keeps the
// accumulators of C / kThreads channels in registers.
constexpr int kMaxChannels = 4096;
constexpr int kChannelsPerThread = kMaxChannels / kThreads;
constexpr int kTileBytes = 32 * 1024;  // x staged per step
constexpr int kMaxTilePixels = 32;     // the softmax update of a tile runs on one warp
// The blocks per SM both kernels are compiled for: four in float32 (at most 64 registers), two in
// float64. Left to choose, ptxas spilled: the backward 40 to 96 bytes per thread at 48 registers
// on sm_80, the forward 40 bytes in float64 on sm_90a. So bounded, neither spills on sm_80 or
// sm_90a (58 to 64 registers in float32, 96 to 103 in float64).
template <typename acc_t>
constexpr int kMinBlocksPerSm = sizeof(acc_t) == 8 ? 2 : 4;

// Where element i of a tile of `pixels` pixels starting at hw0 lies: tile[p*stride + c] in shared
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

// The row stride (elements) of a staged tile: C padded to an odd number of 4-byte words (8-byte
// units for fp64). In NCHW consecutive threads stage consecutive pixels of one channel, a row
// apart: with C a multiple of 32 words, unpadded, all of a warp's stores would hit one bank.
__host__ __device__ __forceinline__ int64_t tile_stride(int64_t C, int64_t element_size) {
  return element_size == 2 ? C + (6 - C % 4) % 4  // = 2 (mod 4): an odd number of words
                           : C | 1;
}

// Stages the tile of `pixels` pixels from hw0 of sample n in shared memory, as tile[p*stride + c]:
// element `offset` of the activation is load(offset) (x[offset], or a product of two tensors').
template <typename tile_t, typename Load>
__device__ __forceinline__ void stage_tile(dev_ptr<tile_t> tile, int pixels, int64_t n, int64_t hw0, int64_t C,
                                           int64_t HW, bool nhwc, const Load& load) {
  const int64_t stride = tile_stride(C, sizeof(tile_t));
  for (int i = threadIdx.x; i < pixels * C; i += kThreads) {
    const TileIndex t = tile_index(i, pixels, n, hw0, C, HW, nhwc);
    tile[t.p * stride + t.c] = static_cast<tile_t>(load(t.offset));
  }
  __syncthreads();
}

// sum_c tile_p[c] * v[c] for one pixel of the tile, by one warp.
template <typename acc_t, typename TilePtr, typename VectorPtr>
__device__ __forceinline__ acc_t pixel_dot(TilePtr tile_p, VectorPtr v, int64_t C, int lane) {
  acc_t sum = 0;
  for (int c = lane; c < C; c += 32) sum += static_cast<acc_t>(tile_p[c]) * v[c];
  return warp_sum(sum);
}

// (tile pixels, splits, pixels per split) for x, staged as elements of tile_element_size
// bytes: a tile fills kTileBytes, and H*W is split until
// the grid has a few blocks per SM.
struct Plan {
  int tile_pixels;
  int64_t splits;
  int64_t per_split;
  size_t tile_bytes;  // the dynamic shared memory of a block: tile_pixels padded rows
};

inline Plan plan_for(const at::Tensor& x, int64_t tile_element_size) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t per_pixel = tile_stride(C, tile_element_size) * tile_element_size;
  const int tile_pixels = int(std::max<int64_t>(1, std::min<int64_t>({kMaxTilePixels, kTileBytes / per_pixel, HW})));
  const int64_t want = (int64_t(num_sms()) * 4 + N - 1) / N;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, (HW + tile_pixels - 1) / tile_pixels));
  int64_t per_split = (HW + splits - 1) / splits;
  per_split = (per_split + tile_pixels - 1) / tile_pixels * tile_pixels;  // whole tiles
  splits = (HW + per_split - 1) / per_split;
  return {tile_pixels, splits, per_split, size_t(tile_pixels * per_pixel)};
}

}  // namespace attn_kernels
