// Shared helpers for the attn_kernels CUDA kernels: argument checks that name the argument,
// the two dense layouts every kernel accepts, and warp reductions.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdint>
#include <limits>

namespace attn_kernels {

// Checks name the op and the argument, so a user sees which input was wrong and what was expected.
#define AK_CHECK(cond, op, ...) TORCH_CHECK(cond, op, "(): ", __VA_ARGS__)
#define AK_CHECK_CUDA(op, t) \
  AK_CHECK((t).is_cuda(), op, "argument '" #t "' must be a CUDA tensor, got device ", (t).device())
#define AK_CHECK_NCHW(op, t) \
  AK_CHECK((t).dim() == 4, op, "argument '" #t "' must be 4-D (N, C, H, W), got shape ", (t).sizes())
#define AK_CHECK_FLOAT(op, t)                                                                     \
  AK_CHECK(at::isFloatingType((t).scalar_type()), op, "argument '" #t                            \
           "' must be float16, bfloat16, float32 or float64, got ", (t).scalar_type())
#define AK_CHECK_SAME(op, a, b)                                                                    \
  AK_CHECK((a).sizes() == (b).sizes() && (a).scalar_type() == (b).scalar_type() &&              \
               (a).device() == (b).device(),                                                     \
           op, "argument '" #b "' must match '" #a "' in shape, dtype and device; got ",        \
           (b).sizes(), " ", (b).scalar_type(), " ", (b).device(), " vs ", (a).sizes(), " ",    \
           (a).scalar_type(), " ", (a).device())
// Per-(n, c) statistics are accumulator-typed (float32, float64 for float64 input), shape (N, C).
#define AK_CHECK_STAT(op, t, x)                                                                    \
  AK_CHECK((t).is_cuda() && (t).is_contiguous() && (t).dim() == 2 && (t).size(0) == (x).size(0) && \
               (t).size(1) == (x).size(1) &&                                                     \
               (t).scalar_type() == at::toAccumulateType((x).scalar_type(), true),               \
           op, "argument '" #t "' must be a contiguous CUDA tensor of shape (N, C) = (",         \
           (x).size(0), ", ", (x).size(1), ") and dtype ",                                        \
           at::toAccumulateType((x).scalar_type(), true), ", got ", (t).sizes(), " ",            \
           (t).scalar_type(), " ", (t).device())

// Per-pixel statistics: (N, H*W), same device and accumulator dtype.
#define AK_CHECK_PIXEL_STAT(op, t, x)                                                              \
  AK_CHECK((t).is_cuda() && (t).is_contiguous() && (t).dim() == 2 && (t).size(0) == (x).size(0) && \
               (t).size(1) == (x).size(2) * (x).size(3) &&                                       \
               (t).scalar_type() == at::toAccumulateType((x).scalar_type(), true),               \
           op, "argument '" #t "' must be a contiguous CUDA tensor of shape (N, H*W) = (",       \
           (x).size(0), ", ", (x).size(2) * (x).size(3), ") and dtype ",                          \
           at::toAccumulateType((x).scalar_type(), true), ", got ", (t).sizes(), " ",            \
           (t).scalar_type(), " ", (t).device())

// An activation argument: a 4-D floating CUDA tensor with something to pool over.
#define check_activation(op, x)                                                                    \
  do {                                                                                             \
    AK_CHECK_CUDA(op, x);                                                                          \
    AK_CHECK_NCHW(op, x);                                                                          \
    AK_CHECK_FLOAT(op, x);                                                                         \
    AK_CHECK((x).numel() == 0 || (x).size(2) * (x).size(3) > 0, op, "argument '" #x                \
             "' must have H*W >= 1 to pool over, got shape ", (x).sizes());                        \
  } while (0)

// The kernels see a 4-D activation as a dense 2-D array in memory order:
//   NCHW (contiguous):     rows = N*C pixels-planes, cols = H*W; statistic index = row
//   NHWC (channels_last):  rows = N*H*W pixels,      cols = C;   statistic index = n*C + col
// Either way no copy of x is made. Tensors with H*W == 1 or C == 1 are both; NCHW is chosen.
enum class Layout { kNCHW, kNHWC };

inline Layout layout_of(const char* op, const at::Tensor& t, const char* name) {
  if (t.is_contiguous()) return Layout::kNCHW;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::kNHWC;
  TORCH_CHECK(false, op, "(): argument '", name,
              "' must be contiguous NCHW or channels_last, got strides ", t.strides());
  return Layout::kNCHW;
}

inline int num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Elementwise kernels: 256 threads, a grid-stride loop over `packs` packs, at most 32 blocks per SM.
constexpr int kElementwiseThreads = 256;
inline int64_t elementwise_blocks(int64_t packs) {
  const int64_t wanted = (packs + kElementwiseThreads - 1) / kElementwiseThreads;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(num_sms()) * 32));
}

// Whether a pointer can be read with 16-byte vector instructions.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Packs of VEC elements moved with one 16-byte (or narrower) memory instruction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

}  // namespace attn_kernels
