// Kernels with one deliberate defect each, in the emulation build only, so that the tests can
// show that the emulation catches what it claims to (tests/test_cuda_emulation.py):
//   attn_kernels_emulated::_selftest(name, x) runs the kernel `name` on x (float32, 1-D) and
//   returns its output; "copy" is the defect-free control.
// Also the emulation's launch log for the ledger: attn_kernels_emulated::_launch_log.
#include "common.cuh"

namespace attn_kernels {
namespace {

constexpr int kThreads = 64;

// out[i] = x[i], one block of kThreads threads per kThreads elements.
__global__ void copy_kernel(dev_ptr<const float> x, dev_ptr<float> out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i];
}

// An off-by-one tail: the guard lets the thread at n read x[n].
__global__ void overrun_kernel(dev_ptr<const float> x, dev_ptr<float> out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= n) out[i < n ? i : 0] = x[i];
}

// A vector load of 4 floats from an address that is not 16-byte aligned.
__global__ void misaligned_kernel(dev_ptr<const float> x, dev_ptr<float> out, int64_t n) {
  using P = Pack<float, 4>;
  if (threadIdx.x == 0 && n >= 5) {
    const P p = load_pack<P>(x, 1);
    out[0] = p.v[0];
  }
}

// A rotation through shared memory with the __syncthreads() between write and read missing:
// each thread reads its neighbour's slot, written or not yet depending on the thread order.
__global__ void missing_barrier_kernel(dev_ptr<const float> x, dev_ptr<float> out, int64_t n) {
  AK_SHARED(float, slots, kThreads);
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  slots[threadIdx.x] = i < n ? x[i] : 0.0f;
  if (i < n) out[i] = slots[(threadIdx.x + 1) % kThreads];
}

// Half of the block returns, the rest waits at a barrier the others never reach.
__global__ void divergent_barrier_kernel(dev_ptr<const float> x, dev_ptr<float> out, int64_t n) {
  if (threadIdx.x >= kThreads / 2) return;
  __syncthreads();
  if (threadIdx.x < n) out[threadIdx.x] = x[threadIdx.x];
}

// A full-warp shuffle after lanes 16-31 have returned.
__global__ void shuffle_exited_lane_kernel(dev_ptr<const float> x, dev_ptr<float> out, int64_t n) {
  if (threadIdx.x % 32 >= 16) return;
  const float v = warp_sum(threadIdx.x < n ? x[threadIdx.x] : 0.0f);
  if (threadIdx.x == 0) out[0] = v;
}

at::Tensor selftest(const std::string& name, const at::Tensor& x) {
  constexpr const char* op = "_selftest";
  AK_CHECK(x.is_cpu() && x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
           "argument 'x' must be a contiguous 1-D float32 CPU tensor");
  at::Tensor out = at::zeros_like(x);
  const int64_t n = x.numel();
  const int64_t blocks = std::max<int64_t>(1, (n + kThreads - 1) / kThreads);
  const auto in = device_ptr<const float>(x, "x");
  const auto result = device_ptr<float>(out, "out");
  if (name == "copy") {
    launch<copy_kernel>(op, blocks, 1, kThreads, 0, in, result, n);
  } else if (name == "overrun") {
    launch<overrun_kernel>(op, blocks, 1, kThreads, 0, in, result, n);
  } else if (name == "misaligned") {
    launch<misaligned_kernel>(op, 1, 1, kThreads, 0, in, result, n);
  } else if (name == "missing_barrier") {
    launch<missing_barrier_kernel>(op, blocks, 1, kThreads, 0, in, result, n);
  } else if (name == "divergent_barrier") {
    launch<divergent_barrier_kernel>(op, 1, 1, kThreads, 0, in, result, n);
  } else if (name == "shuffle_exited_lane") {
    launch<shuffle_exited_lane_kernel>(op, 1, 1, kThreads, 0, in, result, n);
  } else if (name == "grid_y_too_large") {
    launch<copy_kernel>(op, 1, 65536, kThreads, 0, in, result, n);
  } else if (name == "block_too_large") {
    launch<copy_kernel>(op, 1, 1, 2048, 0, in, result, n);
  } else if (name == "too_much_shared_memory") {
    launch<copy_kernel>(op, 1, 1, kThreads, 48 * 1024 + 1, in, result, n);
  } else {
    AK_CHECK(false, op, "argument 'name': unknown self-test '", name, "'");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attn_kernels_emulated, m) {
  m.def("_selftest(str name, Tensor x) -> Tensor", &selftest);
  // The ledger's view of the emulated launches (ak_emu::take_launch_log).
  m.def("_launch_log(bool keep_logging) -> str", [](bool keep_logging) { return ak_emu::take_launch_log(keep_logging); });
}

}  // namespace attn_kernels
