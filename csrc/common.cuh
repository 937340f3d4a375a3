// Shared helpers for the attn_kernels CUDA kernels: argument checks that name the argument,
// the two dense layouts every kernel accepts, warp reductions, and the few constructs through
// which the same sources compile twice: with nvcc for the GPU, and as host C++ (AK_EMULATION)
// against emulation/cuda_emulation.h, whose kernels run on CPU tensors in the tests.
//   dev_ptr<T>            a kernel's pointer parameter: T* __restrict__, or a bounds-checked pointer
//   device_ptr<T>(t, n)   the host's pointer to tensor t's data, named n for error messages
//   load_pack/store_pack  vector (16-byte) memory access
//   load_written          a load of what other blocks of the launch wrote
//   AK_SHARED, AK_DYNAMIC_SHARED   shared memory arrays
//   launch<kernel>(...)   a kernel launch, checked
//   DeviceGuard, on_kernel_device, num_sms   the device the kernels run on
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>

#include "library.h"

#ifdef AK_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace attn_kernels {

// Checks name the op and the argument, so a user sees which input was wrong and what was expected.
#define AK_CHECK(cond, op, ...) TORCH_CHECK(cond, op, "(): ", __VA_ARGS__)
#define AK_CHECK_DEVICE(op, t) \
  AK_CHECK(on_kernel_device(t), op, "argument '" #t "' must be a ", kKernelDevice, " tensor, got device ", (t).device())
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
// A statistic of x: contiguous, of the given shape, in x's accumulator dtype (float32, float64
// for float64 input) and on x's device (a kernel given another GPU's pointer reads garbage).
#define AK_CHECK_STAT_SHAPE(op, t, x, shape_name, ...)                                                  \
  AK_CHECK((t).device() == (x).device() && (t).is_contiguous() && (t).sizes() == at::IntArrayRef(__VA_ARGS__) && \
               (t).scalar_type() == at::toAccumulateType((x).scalar_type(), true),                      \
           op, "argument '" #t "' must be a contiguous tensor of shape " shape_name " = ",              \
           at::IntArrayRef(__VA_ARGS__), " and dtype ", at::toAccumulateType((x).scalar_type(), true), \
           " on x's device ", (x).device(), ", got ", (t).sizes(), " ", (t).scalar_type(), " on ", (t).device())
// Per-(n, c) statistics, (N, C).
#define AK_CHECK_STAT(op, t, x) AK_CHECK_STAT_SHAPE(op, t, x, "(N, C)", {(x).size(0), (x).size(1)})
// Per-pixel statistics, (N, H*W).
#define AK_CHECK_PIXEL_STAT(op, t, x) \
  AK_CHECK_STAT_SHAPE(op, t, x, "(N, H*W)", {(x).size(0), (x).size(2) * (x).size(3)})

// An activation argument: a 4-D floating CUDA tensor with something to pool over.
#define check_activation(op, x)                                                                    \
  do {                                                                                             \
    AK_CHECK_DEVICE(op, x);                                                                        \
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

#ifdef AK_EMULATION
constexpr const char* kKernelDevice = "CPU (the CUDA emulation build)";
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
inline int num_sms() { return ak_emu::kSmCount; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
template <typename T>
using dev_ptr = ak_emu::CheckedPtr<T>;
using ak_emu::load_pack;
using ak_emu::store_pack;
#define AK_SHARED(T, name, count)             \
  static const char ak_shared_key_##name = 0; \
  const auto name = ::ak_emu::static_shared_array<T>(&ak_shared_key_##name, (count), #name)
#define AK_DYNAMIC_SHARED(T, name) const auto name = ::ak_emu::dynamic_shared_array<T>(#name)
#else
constexpr const char* kKernelDevice = "CUDA";
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
using DeviceGuard = c10::cuda::CUDAGuard;
template <typename T>
using dev_ptr = T* __restrict__;
template <typename P, typename T>
__device__ __forceinline__ P load_pack(const T* p, int64_t i) {
  return *reinterpret_cast<const P*>(p + i);
}
template <typename P, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const P& v) {
  *reinterpret_cast<P*>(p + i) = v;
}
#define AK_SHARED(T, name, count) __shared__ T name[count]
#define AK_DYNAMIC_SHARED(T, name)                              \
  extern __shared__ __align__(16) unsigned char ak_dynamic_shared[]; \
  T* name = reinterpret_cast<T*>(ak_dynamic_shared)
#endif

// The pointer to t's data that a kernel receives (null for an absent optional tensor).
template <typename T>
dev_ptr<T> device_ptr(const at::Tensor* t, const char* name) {
  if (t == nullptr) return nullptr;
  T* data = t->data_ptr<std::remove_const_t<T>>();
#ifdef AK_EMULATION
  int64_t extent = t->numel() == 0 ? 0 : 1;  // from the first element to the last
  for (int64_t d = 0; d < t->dim() && extent; ++d) extent += (t->size(d) - 1) * t->stride(d);
  return dev_ptr<T>(data, extent, name, /*global=*/true);
#else
  (void)name;
  return data;
#endif
}
template <typename T>
dev_ptr<T> device_ptr(const at::Tensor& t, const char* name) {
  return device_ptr<T>(&t, name);
}

// Element i of a buffer that this launch writes (a partial result of another block, a value of
// this block stored before a barrier): loaded from L2, past the SM's L1, which does not see other
// SMs' writes. Under the emulation memory is coherent, and the access is counted as a read.
template <typename T>
__device__ __forceinline__ std::remove_const_t<T> load_written(dev_ptr<T> p, int64_t i) {
#ifdef AK_EMULATION
  return dev_ptr<const T>(p)[i];
#else
  return __ldcg(p + i);
#endif
}

// Launches kKernel on the current stream (or under the emulation), failing loudly on an
// invalid launch. Grid sizes are computed in int64 and must fit CUDA's unsigned dimensions.
template <auto kKernel, typename... Args>
void launch(const char* op, int64_t grid_x, int64_t grid_y, dim3 block, size_t shared_bytes, Args&&... args) {
  AK_CHECK(grid_x <= std::numeric_limits<unsigned>::max() && grid_y <= std::numeric_limits<unsigned>::max(), op,
           "a grid of (", grid_x, ", ", grid_y, ") blocks is more than CUDA can launch");
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
#ifdef AK_EMULATION
  ak_emu::launch_kernel<kKernel>(grid, block, shared_bytes, std::forward<Args>(args)...);
#else
  kKernel<<<grid, block, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// A kernel as a value, for generic code that launches one of several: launch<decltype(k)::value>.
template <auto kKernel>
using Kernel = std::integral_constant<decltype(kKernel), kKernel>;

// Elementwise kernels: 256 threads, a grid-stride loop over `packs` packs, at most 32 blocks per SM.
constexpr int kElementwiseThreads = 256;
inline int64_t elementwise_blocks(int64_t packs) {
  const int64_t wanted = (packs + kElementwiseThreads - 1) / kElementwiseThreads;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(num_sms()) * 32));
}

// The elements per memory instruction of an elementwise kernel: the widest power of two, up to 16
// bytes, that divides `contiguous` (the length of the rows a pack must not straddle: H*W in NCHW,
// C in NHWC) and the alignment of every tensor given (null ones aside). bf16 at 7x7 takes 1, at
// 14x14 4 (8 bytes), where 16-byte packs alone would leave both one element at a time.
template <typename scalar_t>
int pack_elements(int64_t contiguous, std::initializer_list<const at::Tensor*> tensors) {
  int vec = 16 / int(sizeof(scalar_t));
  const auto fits = [&](int v) {
    if (contiguous % v != 0) return false;
    for (const at::Tensor* t : tensors) {
      if (t != nullptr && reinterpret_cast<uintptr_t>(t->data_ptr()) % (v * sizeof(scalar_t)) != 0) return false;
    }
    return true;
  };
  while (vec > 1 && !fits(vec)) vec /= 2;
  return vec;
}

// Calls f(std::integral_constant<int, vec>{}) for a width pack_elements<scalar_t> returned.
template <typename scalar_t, typename F>
void with_pack(int vec, const F& f) {
  constexpr int kMax = 16 / int(sizeof(scalar_t));
  if constexpr (kMax >= 8) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (kMax >= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (kMax >= 2) {
    if (vec == 2) return f(std::integral_constant<int, 2>{});
  }
  f(std::integral_constant<int, 1>{});
}

// The larger of a and b, NaN if either is NaN, as torch.amax (CUDA's max and fmaxf drop a NaN).
template <typename T>
__device__ __forceinline__ T max_nan(T a, T b) {
  return (a != a || a > b) ? a : b;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Packs of VEC elements moved with one 16-byte (or narrower) memory instruction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

}  // namespace attn_kernels
