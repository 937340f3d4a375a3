// CUDA's execution model on the CPU, as the kernels of csrc/ use it, so that the same sources
// compile as host C++ (AK_EMULATION) and their kernels run on CPU tensors in tests:
//
// - a launch runs the grid one block at a time; a block's threads are cooperative fibers that
//   switch only at __syncthreads() and warp shuffles, in an order that is a parameter (forward,
//   reverse, seeded random), which also orders the blocks (grid order, reversed, shuffled). Every
//   launch runs under at least two orders and fails unless their results are bitwise identical: a
//   result that depends on the order of threads, or of blocks, is a race.
// - atomicAdd on int is a plain read-modify-write, and __threadfence() does nothing: a block runs
//   alone and switches threads only at barriers and shuffles, so nothing can come between the
//   read and the write, and every write is seen by every later read. Which block or thread draws
//   which value follows the order, so a result that depends on it fails as a race.
// - __syncthreads() is a barrier of all the block's threads: reached by only some of them, or at
//   two different places, it is an error (undefined behaviour on the GPU), as is a deadlock.
// - __shfl_xor_sync exchanges values among the lanes named in its mask, all of which must be
//   at the same shuffle: a named lane that has exited or waits elsewhere is an error.
// - launches are validated as the driver validates them (grid and block limits, shared memory).
// - every pointer a kernel receives is a CheckedPtr carrying the extent of the tensor it came
//   from: an access outside it, or a misaligned vector access, fails naming the kernel, the
//   thread, the tensor and the index. Shared memory is checked the same way, and poisoned (all
//   bits set: NaN) at the start of every block.
// - device math follows CUDA, not the host library: max/min of floats ignore NaN as fmaxf does.
// - ATTN_KERNELS_EMULATION_GRID=edges runs only the first two and last two blocks along each grid
//   dimension, so that launches at the grid's limits can be tested in reasonable time.
// - an H100's properties: 132 SMs, 48 KB of shared memory per block without opt-in.
// - every launch is logged for the ledger (attn_kernels.ledger): its kernel, grid, block, shared
//   memory, and the global-memory bytes its threads read and wrote through the kernel's pointer
//   parameters in the first thread order (shared memory is not counted): requested (every access)
//   and unique (each byte of a tensor once per launch: DRAM's traffic when caches keep what a
//   launch reuses). Accesses through a pointer to const are reads, through a pointer to non-const
//   writes: the kernels of csrc/ never read their outputs. ATTN_KERNELS_EMULATION_GRID=none logs
//   launches without running any block.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace ak_emu {

// The device the emulation describes (an H100 SXM).
constexpr int kSmCount = 132;
constexpr size_t kSharedPerBlock = 48 * 1024;
constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;

// An error found while a kernel runs (out-of-bounds access, race, barrier misuse, bad launch).
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Where the running thread is: the kernel, its block and thread indices, for error messages.
std::string where();
[[noreturn]] void fail(const std::string& what);

// The built-in variables of the running thread.
struct ThreadIds {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern const ThreadIds* current_ids;

// Per-launch shared memory: the dynamic buffer and the static arrays of AK_SHARED.
void* dynamic_shared(size_t* bytes);
void* static_shared(const void* key, size_t bytes);

// Global-memory traffic of the running launch, counted while `on` (its first thread order).
struct Traffic {
  bool on = false;
  // Records an access to elements [at, at + count) of the tensor at `base` (`extent` elements of
  // `element_size` bytes).
  void touch(bool read, const void* base, int64_t extent, size_t element_size, int64_t at, int64_t count);
  // Bytes read and written: requested, and unique per tensor; clears the counts.
  struct Totals {
    int64_t requested_read = 0, requested_written = 0, read = 0, written = 0;
  };
  Totals take();
};
extern Traffic traffic;

// A pointer into one tensor (or shared array) that knows the extent it may touch.
template <typename T>
class CheckedPtr {
 public:
  CheckedPtr() = default;
  CheckedPtr(std::nullptr_t) {}  // NOLINT: converts like a raw pointer
  // `global`: a tensor's memory, whose traffic is counted (shared memory is not).
  CheckedPtr(T* base, int64_t extent, const char* name, bool global = false)
      : base_(base), extent_(extent), name_(name), global_(global) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  CheckedPtr(const CheckedPtr<U>& other)  // NOLINT: T* from U*, as for raw pointers
      : base_(other.base_), extent_(other.extent_), offset_(other.offset_), name_(other.name_), global_(other.global_) {}

  // A read through a pointer to const, a write otherwise (see the header comment).
  T& operator[](int64_t i) const {
    T* p = element(i, 1, alignof(T));
    touch(std::is_const_v<T>, i, 1);
    return *p;
  }
  T& operator*() const { return (*this)[0]; }
  CheckedPtr operator+(int64_t d) const {
    CheckedPtr p = *this;
    p.offset_ += d;
    return p;
  }
  CheckedPtr operator-(int64_t d) const { return *this + (-d); }
  explicit operator bool() const { return base_ != nullptr; }
  // The whole extent, for snapshots of a kernel's outputs.
  T* base() const { return base_; }
  int64_t extent() const { return extent_; }
  const char* name() const { return name_; }
  void touch(bool read, int64_t i, int64_t count) const {
    if (global_ && traffic.on) traffic.touch(read, base_, extent_, sizeof(T), offset_ + i, count);
  }

  // The address of elements [i, i + count), checked to lie in the extent and to be aligned to
  // `align` bytes (a misaligned vector access faults on the GPU).
  T* element(int64_t i, int64_t count, size_t align) const {
    const int64_t at = offset_ + i;
    if (base_ == nullptr) fail("access through a null pointer" + describe(at, count));
    if (at < 0 || at + count > extent_) {
      fail("out-of-bounds access" + describe(at, count) + ": '" + name_ + "' has " + std::to_string(extent_) +
           " elements");
    }
    T* p = base_ + at;
    if (reinterpret_cast<uintptr_t>(p) % align != 0) {
      fail("misaligned address" + describe(at, count) + ": a " + std::to_string(align) +
           "-byte access at an address that is not a multiple of " + std::to_string(align));
    }
    return p;
  }

 private:
  template <typename U>
  friend class CheckedPtr;
  std::string describe(int64_t at, int64_t count) const {
    std::string s = std::string(" to '") + (name_ ? name_ : "?") + "'[" + std::to_string(at);
    if (count > 1) s += ".." + std::to_string(at + count - 1);
    return s + "]";
  }
  T* base_ = nullptr;
  int64_t extent_ = 0;
  int64_t offset_ = 0;
  const char* name_ = nullptr;
  bool global_ = false;
};

// The block's shared memory: the dynamic buffer of the launch, and the static arrays of
// AK_SHARED, each identified by the address of a static key of its declaration.
void* dynamic_shared(size_t* bytes);
void* static_shared(const void* key, size_t bytes);

template <typename T>
CheckedPtr<T> dynamic_shared_array(const char* name) {
  size_t bytes = 0;
  void* p = dynamic_shared(&bytes);
  return {static_cast<T*>(p), int64_t(bytes / sizeof(T)), name};
}

template <typename T>
CheckedPtr<T> static_shared_array(const void* key, int64_t count, const char* name) {
  return {static_cast<T*>(static_shared(key, sizeof(T) * count)), count, name};
}

// VEC-element packs moved by one vector instruction on the GPU.
template <typename P, typename T>
inline P load_pack(CheckedPtr<T> p, int64_t i) {
  constexpr int64_t kCount = sizeof(P) / sizeof(T);
  P v;
  std::memcpy(&v, p.element(i, kCount, alignof(P)), sizeof(P));
  p.touch(true, i, kCount);
  return v;
}

template <typename P, typename T>
inline void store_pack(CheckedPtr<T> p, int64_t i, const P& v) {
  constexpr int64_t kCount = sizeof(P) / sizeof(T);
  std::memcpy(p.element(i, kCount, alignof(P)), &v, sizeof(P));
  p.touch(false, i, kCount);
}

// Synchronization points of the running thread (fiber): they return when the block's
// threads, or the shuffle's lanes, have all arrived.
void barrier(const char* file, int line);
uint64_t shuffle(unsigned mask, uint64_t value, int src_lane_xor, int width, const char* file, int line);

// A type-erased launch: `run_thread` runs the kernel body for the current thread; `outputs`
// lists the bytes the kernel may write, snapshotted and compared between thread orders.
struct Output {
  void* data;
  size_t bytes;
  size_t element_size;
  const char* name;
};
void launch(const std::string& kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
            void (*run_thread)(const void*), const void* closure, const std::vector<Output>& outputs);

// The launches logged since the last call, one line each, the log cleared; launches are logged
// from now on if `keep_logging`. A line: kernel \t grid x,y,z \t block x,y,z \t dynamic shared
// bytes \t shared bytes in all (dynamic and static; 0 until a block has run) \t bytes read \t
// bytes written \t bytes requested by reads \t bytes requested by writes \t blocks run.
std::string take_launch_log(bool keep_logging);

// A kernel's outputs are its pointers to non-const.
template <typename T>
struct IsOutput : std::false_type {};
template <typename T>
struct IsOutput<CheckedPtr<T>> : std::bool_constant<!std::is_const_v<T>> {};

template <typename T>
void add_output(std::vector<Output>& outputs, const T& param) {
  if constexpr (IsOutput<T>::value) {
    constexpr size_t kSize = sizeof(*param.base());
    if (param) outputs.push_back({param.base(), size_t(param.extent()) * kSize, kSize, param.name()});
  }
}

template <typename T>
struct KernelParams;
template <typename... P>
struct KernelParams<void (*)(P...)> {
  using Tuple = std::tuple<std::decay_t<P>...>;
};

// "name<args>" of the kernel of a launch_kernel<kKernel> instantiation, from its signature.
std::string kernel_name(const char* pretty_function);

// Runs kKernel over the grid with the given arguments, converted to its parameters' types.
template <auto kKernel, typename... Args>
void launch_kernel(dim3 grid, dim3 block, size_t dynamic_shared_bytes, Args&&... args) {
  using Tuple = typename KernelParams<decltype(kKernel)>::Tuple;
  const Tuple params(std::forward<Args>(args)...);
  std::vector<Output> outputs;
  std::apply([&](const auto&... p) { (add_output(outputs, p), ...); }, params);
  launch(kernel_name(__PRETTY_FUNCTION__), grid, block, dynamic_shared_bytes,
         [](const void* closure) { std::apply(kKernel, *static_cast<const Tuple*>(closure)); }, &params, outputs);
}

}  // namespace ak_emu

// The built-in variables and qualifiers of CUDA C++.
#define threadIdx (::ak_emu::current_ids->thread_idx)
#define blockIdx (::ak_emu::current_ids->block_idx)
#define blockDim (::ak_emu::current_ids->block_dim)
#define gridDim (::ak_emu::current_ids->grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ak_emu::barrier(file, line);
}

inline int atomicAdd(ak_emu::CheckedPtr<int> address, int value) {
  int* p = address.element(0, 1, alignof(int));
  address.touch(false, 0, 1);
  const int old = *p;
  *p = old + value;
  return old;
}

inline void __threadfence() {}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = ak_emu::kWarpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = ak_emu::shuffle(mask, bits, lane_mask, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// CUDA's max/min: for floating point, fmax/fmin (a NaN argument is ignored), not std::max.
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline T max(T a, T b) {
  return a < b ? b : a;
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline T min(T a, T b) {
  return b < a ? b : a;
}
