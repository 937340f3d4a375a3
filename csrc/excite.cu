// The channel-gate blocks (SE and its variants, ECA, CECA, CBAM's channel attention) with their
// per-sample math inside the kernels: the CUDA twin of attn_kernels/triton/excite.py.
//
//   pool_excite  1 launch, one read of x: mean (and max) over H*W per (n, c) on the reduction
//                engine of reduce_hw.cuh; the last block of each sample folds the partials of its
//                sample in a fixed order and computes the gate, gate(mix(pooled)): the MLP or the
//                channel conv, its activation, the gate.
//   grad_excite  2 launches: the reduction of dy*x (and of the ties of the max), whose last block
//                of each sample recomputes the excitation and differentiates it by hand into the
//                gate, bias = d mean / HW and tie_coef = d max / ties of
//                dx = dy*gate + bias + (x == xmax)*tie_coef (channel_gate_apply's third pass), and
//                keeps the per-sample terms of the weight gradients; then the weight gradients,
//                those terms summed over N in a fixed order.
//
// "The last block of each sample": after writing its partials, every block of the reduction takes
// a ticket from its sample's int32 counter (atomicAdd); the block that draws the last ticket sees
// every partial of the sample, and resets the counter to 0. The counters live in a buffer per
// device that the kernels leave zeroed: no memset per call, no host synchronization, capturable in
// a CUDA graph (after a first call outside it has created the buffer). Kernels of this file must
// not run on two streams of one device at once, which would share the counters. No float atomics:
// bitwise reproducible.
//
// The modes are those of attn_kernels/ops/excite.py, the activations those of
// attn_kernels/activations.py (PyTorch's NaN and inf behaviour, its choices at kinks). The pooled
// statistics, the hidden layer and every per-sample gradient are in the accumulator dtype
// (float32; float64 for float64 x); weights are read in their own dtype, at any strides, and their
// gradients written in it.
#include <array>
#include <mutex>
#include <string>
#include <unordered_map>

#include "reduce_hw.cuh"

namespace attn_kernels {
namespace {

constexpr int kThreads = kWarpsPerBlock * 32;  // every kernel of this file: 8 warps

// The modes, in the order of their names below (the ACTIVATIONS of attn_kernels/activations.py).
enum class Pool : int { kAvg, kMix, kAvgMax, kMax };
enum class Mix : int { kMlp, kConv, kCircularConv };
enum class Act : int { kIdentity, kRelu, kRelu6, kSilu, kGelu, kTanh, kSigmoid, kHardSigmoid, kHardSwish };
constexpr std::array<const char*, 4> kPoolNames = {"avg", "mix", "avg+max", "max"};
constexpr std::array<const char*, 3> kMixNames = {"mlp", "conv", "circular_conv"};
constexpr std::array<const char*, 9> kActNames = {"identity", "relu",    "relu6",        "silu",      "gelu",
                                                  "tanh",     "sigmoid", "hard_sigmoid", "hard_swish"};

template <typename Mode, size_t kCount>
Mode parse_mode(const char* op, const char* argument, const std::string& value,
                const std::array<const char*, kCount>& names) {
  std::string known;
  for (size_t i = 0; i < kCount; ++i) {
    if (value == names[i]) return Mode(i);
    known += std::string(i ? ", '" : "'") + names[i] + "'";
  }
  AK_CHECK(false, op, "argument '", argument, "' must be one of ", known, ", got '", value, "'");
  return Mode(0);
}

// ---- activations, as attn_kernels/activations.py computes them --------------------------------

constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;
// PyTorch's hardsigmoid backward scales by 1/6 rounded to float32 in every dtype.
constexpr float kOneSixth = static_cast<float>(1.0 / 6.0);

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }
__device__ __forceinline__ float erf_of(float v) { return erff(v); }
__device__ __forceinline__ double erf_of(double v) { return erf(v); }
__device__ __forceinline__ float tanh_of(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_of(double v) { return tanh(v); }

template <typename T>
__device__ __forceinline__ T sigmoid_of(T h) {
  return T(1) / (T(1) + exp_of(-h));
}

// act(h). Selects rather than clamps, so NaN passes through as torch's clamps let it.
template <typename T>
__device__ T activation(Act act, T h) {
  switch (act) {
    case Act::kIdentity:
      return h;
    case Act::kRelu:
      return h <= T(0) ? T(0) : h;
    case Act::kRelu6:
      return h <= T(0) ? T(0) : (h >= T(6) ? T(6) : h);
    case Act::kSilu:
      return h / (T(1) + exp_of(-h));
    case Act::kGelu:
      return T(0.5) * h * (T(1) + erf_of(h * T(kInvSqrt2)));
    case Act::kTanh:
      return tanh_of(h);
    case Act::kSigmoid:
      return sigmoid_of(h);
    default: {  // hard_sigmoid, hard_swish
      const T s = h + T(3);
      const T relu6 = s <= T(0) ? T(0) : (s >= T(6) ? T(6) : s);
      return act == Act::kHardSigmoid ? relu6 / T(6) : h * relu6 / T(6);
    }
  }
}

// d loss / dh from grad = d loss / d act(h), with PyTorch's choices at kinks and for NaN h: the
// piecewise activations select, so a flat piece stops an inf or NaN grad.
template <typename T>
__device__ T activation_backward(Act act, T grad, T h) {
  switch (act) {
    case Act::kIdentity:
      return grad;
    case Act::kRelu:
      return h <= T(0) ? T(0) : grad;
    case Act::kRelu6:
      return (h <= T(0) || h >= T(6)) ? T(0) : grad;
    case Act::kSilu: {
      const T s = sigmoid_of(h);
      return grad * (s * (T(1) + h * (T(1) - s)));
    }
    case Act::kGelu:
      return grad * (T(0.5) * (T(1) + erf_of(h * T(kInvSqrt2))) + h * exp_of(T(-0.5) * h * h) * T(kInvSqrt2Pi));
    case Act::kTanh: {
      const T t = tanh_of(h);
      return grad * (T(1) - t * t);
    }
    case Act::kSigmoid: {
      const T s = sigmoid_of(h);
      return grad * (s * (T(1) - s));
    }
    case Act::kHardSigmoid:
      return (h > T(-3) && h < T(3)) ? grad * T(kOneSixth) : T(0);
    default:  // hard_swish
      return h <= T(-3) ? T(0) : (h < T(3) ? grad * (h / T(3) + T(0.5)) : grad);
  }
}

// ---- the excitation's description --------------------------------------------------------------

// A weight or bias of the excitation, read in its own dtype: element (i, j) is data[i*s0 + j*s1].
// One pointer is set, the one of its dtype; none for an absent weight.
struct Weight {
  dev_ptr<const float> f32 = nullptr;
  dev_ptr<const double> f64 = nullptr;
  dev_ptr<const at::Half> f16 = nullptr;
  dev_ptr<const at::BFloat16> bf16 = nullptr;
  int64_t s0 = 0, s1 = 0;

  __device__ __forceinline__ bool present() const { return f32 || f64 || f16 || bf16; }
  template <typename T>
  __device__ __forceinline__ T at(int64_t i, int64_t j = 0) const {
    const int64_t k = i * s0 + j * s1;
    if (f32) return static_cast<T>(f32[k]);
    if (f64) return static_cast<T>(f64[k]);
    if (f16) return static_cast<T>(static_cast<float>(f16[k]));
    return static_cast<T>(static_cast<float>(bf16[k]));
  }
};

// The per-sample function from pooled statistics to the gate (ops/excite.py):
//   mlp:   z = sum over branches b of W2 act(W1 p_b + b1) + b2; W1 (R, C), W2 (C, R), with 1x1-conv or
//          linear weights. Without fc1, z = W2 p + b2 and R = C.
//   conv:  z[c] = b2 + sum over maps r and taps j of w2[r, j] h_r[c + j - K/2], h_r = act(w1[r] p + b1[r])
//          (h_0 = p without fc1), zero padded or (circular_conv) wrapped around; only with pool avg.
struct Excitation {
  Weight w1, b1, w2, b2;
  int64_t R;  // mlp: the width W2 reads; conv: the hidden maps
  int64_t K;  // conv: the taps (1 for mlp)
  Pool pool;
  Mix mix;
  Act act, gate;

  __device__ __forceinline__ int branches() const { return pool == Pool::kAvgMax ? 2 : 1; }
  __device__ __forceinline__ bool has_fc1() const { return w1.present(); }
};

// The reduction's blocks, grouped by sample: blocks_per_sample consecutive blocks per sample, each
// reducing its part of the sample's (channel, split) tasks, H*W cut into `splits` of `per_split`.
struct SampleGrid {
  int64_t N, C, HW;
  int64_t splits, per_split;
  int64_t blocks_per_sample;
};

// Offsets in the workspace (accumulator dtype): the partials of the reduction's first result at 0
// (splits, N, C) and of its second (max, or ties) at splits*N*C; then the hidden layer before the
// activation (N, branches, R) for an MLP with fc1; the backward's dz (N, C) and dh, (N, R) for an
// MLP, (N, R, C) for a channel conv with fc1.
struct WorkspaceLayout {
  int64_t hidden, dz, dh;
};

// Strides of the weight gradients (their tensors' own), as Weight's s0, s1.
struct GradStrides {
  int64_t dw1_s0, dw1_s1, db1_s0, dw2_s0, dw2_s1, db2_s0;
};

// ---- per-sample pieces, run by the last block of a sample ---------------------------------------

__device__ __forceinline__ int thread_rank() { return threadIdx.y * blockDim.x + threadIdx.x; }

// The pooled vector of branch b at element i = n*C + c (ops/excite.py's _branches).
template <typename acc_t, typename Ptr>
__device__ __forceinline__ acc_t pooled(Pool pool, int b, Ptr mean, Ptr xmax, int64_t i) {
  switch (pool) {
    case Pool::kAvg:
      return load_written(mean, i);
    case Pool::kMax:
      return load_written(xmax, i);
    case Pool::kMix:
      return acc_t(0.5) * load_written(mean, i) + acc_t(0.5) * load_written(xmax, i);
    default:  // avg+max
      return b == 0 ? load_written(mean, i) : load_written(xmax, i);
  }
}

// The partials of element i over the splits, summed (or maxed) in split order.
template <bool kMax, typename acc_t>
__device__ acc_t fold_partials(dev_ptr<acc_t> part, int64_t i, int64_t NC, int64_t splits) {
  acc_t acc = kMax ? acc_t(-INFINITY) : acc_t(0);
  for (int64_t split = 0; split < splits; ++split) {
    const acc_t v = load_written(part, split * NC + i);
    acc = kMax ? max_nan(acc, v) : acc + v;
  }
  return acc;
}

// hidden[n, b, r] = (W1 p_b)[r] + b1[r]: a warp per r, its lanes over the channels.
template <typename acc_t, typename Ptr>
__device__ void mlp_hidden(const Excitation& ex, Ptr mean, Ptr xmax, dev_ptr<acc_t> hidden, int64_t n, int64_t C) {
  const int warp = thread_rank() / 32, lane = thread_rank() % 32;
  const int B = ex.branches();
  for (int64_t r = warp; r < ex.R; r += kWarpsPerBlock) {
    for (int b = 0; b < B; ++b) {
      acc_t h = 0;
      for (int64_t c = lane; c < C; c += 32) h += ex.w1.at<acc_t>(r, c) * pooled<acc_t>(ex.pool, b, mean, xmax, n * C + c);
      h = warp_sum(h);
      if (lane == 0) hidden[(n * B + b) * ex.R + r] = ex.b1.present() ? h + ex.b1.at<acc_t>(r) : h;
    }
  }
}

// z[c] of an MLP, computed by a whole warp (its lanes over the hidden width), in every lane.
template <typename acc_t, typename Ptr>
__device__ acc_t mlp_logit(const Excitation& ex, Ptr mean, Ptr xmax, dev_ptr<acc_t> hidden, int64_t n, int64_t C,
                           int64_t c) {
  const int lane = thread_rank() % 32;
  const int B = ex.branches();
  acc_t z = 0;
  for (int b = 0; b < B; ++b) {
    acc_t zb = 0;
    for (int64_t r = lane; r < ex.R; r += 32) {
      const acc_t h = ex.has_fc1() ? activation(ex.act, load_written(hidden, (n * B + b) * ex.R + r))
                                   : pooled<acc_t>(ex.pool, b, mean, xmax, n * C + r);
      zb += ex.w2.at<acc_t>(c, r) * h;
    }
    zb = warp_sum(zb);  // the same sum in every lane: the butterfly pairs every two lanes' terms alike
    if (ex.b2.present()) zb += ex.b2.at<acc_t>(c);
    z += zb;
  }
  return z;
}

// The channel a tap of the channel conv reads: `src` wrapped around (circular_conv), or -1 where
// it falls in the zero padding.
__device__ __forceinline__ int64_t conv_source(Mix mix, int64_t src, int64_t C) {
  if (mix == Mix::kCircularConv) return ((src % C) + C) % C;
  return (src >= 0 && src < C) ? src : -1;
}

// The hidden map r of a channel conv before its activation, at a channel whose pooled value is p.
template <typename acc_t>
__device__ __forceinline__ acc_t conv_hidden_pre(const Excitation& ex, acc_t p, int64_t r) {
  if (!ex.has_fc1()) return p;
  const acc_t h = ex.w1.at<acc_t>(r) * p;
  return ex.b1.present() ? h + ex.b1.at<acc_t>(r) : h;
}

template <typename acc_t>
__device__ __forceinline__ acc_t conv_hidden(const Excitation& ex, acc_t p, int64_t r) {
  const acc_t h = conv_hidden_pre(ex, p, r);
  return ex.has_fc1() ? activation(ex.act, h) : h;
}

// z[c] of a channel conv over the pooled row of sample n, by one thread.
template <typename acc_t, typename Ptr>
__device__ acc_t conv_logit(const Excitation& ex, Ptr mean, int64_t n, int64_t C, int64_t c) {
  const int64_t pad = ex.K / 2;
  acc_t z = 0;
  for (int64_t r = 0; r < ex.R; ++r) {
    for (int64_t j = 0; j < ex.K; ++j) {
      const int64_t src = conv_source(ex.mix, c + j - pad, C);
      if (src >= 0) z += ex.w2.at<acc_t>(r, j) * conv_hidden(ex, acc_t(load_written(mean, n * C + src)), r);
    }
  }
  return ex.b2.present() ? z + ex.b2.at<acc_t>(0) : z;
}

// ---- the reduction, grouped by sample, and the ticket ------------------------------------------

// This block's part of sample n's reduction (the engine of reduce_hw.cuh), its partials into ws.
template <Reduce kMode, bool kSecond, bool kNhwc, typename scalar_t, typename acc_t>
__device__ __forceinline__ void reduce_block_of_sample(dev_ptr<const scalar_t> a, dev_ptr<const scalar_t> b,
                                                       dev_ptr<const acc_t> xmax, dev_ptr<acc_t> ws,
                                                       const SampleGrid& g, int64_t n, int64_t block) {
  const int64_t NC = g.N * g.C;
  const PixelTerms<acc_t> no_pixel_terms;
  if constexpr (kNhwc) {
    reduce_nhwc_tile<kMode, kSecond, scalar_t>(a, b, xmax, no_pixel_terms, ws, ws + g.splits * NC, g.N, g.C, g.HW,
                                               g.per_split, n, block / g.splits, block % g.splits);
  } else {
    const int64_t task = block * kWarpsPerBlock + threadIdx.x / 32;  // (channel, split) within the sample
    if (task < g.C * g.splits) {
      reduce_nchw_row<kMode, kSecond, scalar_t>(a, b, xmax, no_pixel_terms, ws, ws + g.splits * NC, NC, g.C, g.HW,
                                                g.per_split, n * g.C + task / g.splits, task % g.splits,
                                                threadIdx.x % 32);
    }
  }
}

// Whether this block is the last of sample n's `blocks` to finish its partials; that block
// resets the sample's counter for the next launch. Every thread of the block calls it.
__device__ __forceinline__ bool last_block_of_sample(dev_ptr<int> tickets, int64_t n, int64_t blocks) {
  AK_SHARED(int, is_last, 1);
  __threadfence();  // this thread's partials, before the ticket that announces them
  __syncthreads();
  if (thread_rank() == 0) {
    const bool last = atomicAdd(tickets + n, 1) == blocks - 1;
    if (last) {
      tickets[n] = 0;
      __threadfence();  // the other blocks' partials, before this block reads them
    }
    is_last[0] = last;
  }
  __syncthreads();
  return is_last[0] != 0;
}

// ---- forward -----------------------------------------------------------------------------------

// One read of x: the sample's partial sums (and maxima), then in the last block of each sample
// mean, xmax and gate = gate(mix(pooled)).
template <bool kNhwc, bool kMax, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pool_excite_kernel(dev_ptr<const scalar_t> x, Excitation ex, SampleGrid g, WorkspaceLayout layout,
                       dev_ptr<acc_t> ws, dev_ptr<int> tickets, dev_ptr<acc_t> mean, dev_ptr<acc_t> xmax,
                       dev_ptr<acc_t> gate) {
  const int64_t n = blockIdx.x / g.blocks_per_sample;
  reduce_block_of_sample<Reduce::kPool, kMax, kNhwc, scalar_t, acc_t>(x, x, nullptr, ws, g,
                                                                      n, blockIdx.x % g.blocks_per_sample);
  if (!last_block_of_sample(tickets, n, g.blocks_per_sample)) return;

  const int tid = thread_rank(), warp = tid / 32, lane = tid % 32;
  const int64_t C = g.C, NC = g.N * g.C;
  for (int64_t c = tid; c < C; c += kThreads) {
    mean[n * C + c] = fold_partials<false>(ws, n * C + c, NC, g.splits) / acc_t(g.HW);
    if constexpr (kMax) xmax[n * C + c] = fold_partials<true>(ws + g.splits * NC, n * C + c, NC, g.splits);
  }
  __syncthreads();
  if (ex.mix == Mix::kMlp) {
    const auto hidden = ws + layout.hidden;
    if (ex.has_fc1()) {
      mlp_hidden(ex, mean, xmax, hidden, n, C);
      __syncthreads();
    }
    for (int64_t c = warp; c < C; c += kWarpsPerBlock) {
      const acc_t z = mlp_logit(ex, mean, xmax, hidden, n, C, c);
      if (lane == 0) gate[n * C + c] = activation(ex.gate, z);
    }
  } else {
    for (int64_t c = tid; c < C; c += kThreads) gate[n * C + c] = activation(ex.gate, conv_logit<acc_t>(ex, mean, n, C, c));
  }
}

// ---- backward ----------------------------------------------------------------------------------

// From d loss / d p_b at element i: bias = d mean / HW and, where the max is pooled,
// tie = d max / ties (amax's gradient is shared equally by tied maxima; a NaN max, which no
// element equals, makes the bias NaN, as eager's gradient is).
template <bool kMax, typename acc_t>
__device__ void store_bias_and_tie(Pool pool, acc_t dp0, acc_t dp1, dev_ptr<acc_t> ties, dev_ptr<const acc_t> xmax,
                                   dev_ptr<acc_t> bias, dev_ptr<acc_t> tie, int64_t i, int64_t NC, int64_t splits,
                                   int64_t HW) {
  if constexpr (!kMax) {
    bias[i] = dp0 / acc_t(HW);
  } else {
    acc_t dmean, dmax;
    if (pool == Pool::kMix) {
      dmean = dmax = acc_t(0.5) * dp0;
    } else if (pool == Pool::kAvgMax) {
      dmean = dp0;
      dmax = dp1;
    } else {  // max
      dmean = 0;
      dmax = dp0;
    }
    const acc_t m = xmax[i];
    bias[i] = m != m ? acc_t(NAN) : dmean / acc_t(HW);
    tie[i] = dmax / fold_partials<false>(ties, i, NC, splits);
  }
}

// One read of dy and x: the sample's partial sums of dy*x (d loss / d gate) and counts of x tying
// the max; then in the last block of each sample the excitation again and its derivative: gate,
// bias, tie, and the per-sample terms of the weight gradients (dz, dh) into the workspace.
template <bool kNhwc, bool kMax, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_excite_kernel(dev_ptr<const scalar_t> dy, dev_ptr<const scalar_t> x, dev_ptr<const acc_t> mean,
                       dev_ptr<const acc_t> xmax, Excitation ex, SampleGrid g, WorkspaceLayout layout,
                       dev_ptr<acc_t> ws, dev_ptr<int> tickets, dev_ptr<acc_t> gate, dev_ptr<acc_t> bias,
                       dev_ptr<acc_t> tie) {
  const int64_t n = blockIdx.x / g.blocks_per_sample;
  reduce_block_of_sample<Reduce::kGrad, kMax, kNhwc, scalar_t, acc_t>(dy, x, xmax, ws, g, n,
                                                                      blockIdx.x % g.blocks_per_sample);
  if (!last_block_of_sample(tickets, n, g.blocks_per_sample)) return;

  const int tid = thread_rank(), warp = tid / 32, lane = tid % 32;
  const int64_t C = g.C, NC = g.N * g.C, R = ex.R;
  const int B = ex.branches();
  const auto hidden = ws + layout.hidden;
  const auto dz = ws + layout.dz;
  const auto dh = ws + layout.dh;
  const auto ties = ws + g.splits * NC;
  const bool mlp = ex.mix == Mix::kMlp;
  if (mlp && ex.has_fc1()) {
    mlp_hidden(ex, mean, xmax, hidden, n, C);
    __syncthreads();
  }
  // The gate, and dz = d loss / d logits.
  if (mlp) {
    for (int64_t c = warp; c < C; c += kWarpsPerBlock) {
      const acc_t z = mlp_logit(ex, mean, xmax, hidden, n, C, c);
      if (lane == 0) {
        gate[n * C + c] = activation(ex.gate, z);
        dz[n * C + c] = activation_backward(ex.gate, fold_partials<false>(ws, n * C + c, NC, g.splits), z);
      }
    }
  } else {
    for (int64_t c = tid; c < C; c += kThreads) {
      const acc_t z = conv_logit<acc_t>(ex, mean, n, C, c);
      gate[n * C + c] = activation(ex.gate, z);
      dz[n * C + c] = activation_backward(ex.gate, fold_partials<false>(ws, n * C + c, NC, g.splits), z);
    }
  }
  __syncthreads();
  if (mlp) {
    // dh = W2^T dz over the width W2 reads (rd_channels; C without fc1), the same for every
    // branch: a warp per r, its lanes over the channels.
    for (int64_t r = warp; r < R; r += kWarpsPerBlock) {
      acc_t s = 0;
      for (int64_t c = lane; c < C; c += 32) s += ex.w2.at<acc_t>(c, r) * load_written(dz, n * C + c);
      s = warp_sum(s);
      if (lane == 0) dh[n * R + r] = s;
    }
    __syncthreads();
    // d p_b = W1^T act'(h_b) dh, or dh itself without fc1: a warp per channel.
    for (int64_t c = warp; c < C; c += kWarpsPerBlock) {
      acc_t dp0, dp1;
      if (ex.has_fc1()) {
        dp0 = dp1 = 0;
        for (int64_t r = lane; r < R; r += 32) {
          const acc_t w = ex.w1.at<acc_t>(r, c);
          const acc_t d = load_written(dh, n * R + r);
          dp0 += w * activation_backward(ex.act, d, load_written(hidden, n * B * R + r));
          if (B == 2) dp1 += w * activation_backward(ex.act, d, load_written(hidden, (n * B + 1) * R + r));
        }
        dp0 = warp_sum(dp0);
        if (B == 2) dp1 = warp_sum(dp1);
      } else {
        dp0 = dp1 = load_written(dh, n * R + c);
      }
      if (lane == 0) store_bias_and_tie<kMax>(ex.pool, dp0, dp1, ties, xmax, bias, tie, n * C + c, NC, g.splits, g.HW);
    }
  } else {
    // The channel conv's transpose: dh_r[c] = sum over taps j of w2[r, j] dz[c - j + K/2]; with
    // fc1, the maps' gradients before the activation are kept for w1's gradient.
    const int64_t pad = ex.K / 2;
    for (int64_t c = tid; c < C; c += kThreads) {
      acc_t dp = 0;
      for (int64_t r = 0; r < R; ++r) {
        acc_t d = 0;
        for (int64_t j = 0; j < ex.K; ++j) {
          const int64_t src = conv_source(ex.mix, c - j + pad, C);
          if (src >= 0) d += ex.w2.at<acc_t>(r, j) * load_written(dz, n * C + src);
        }
        if (ex.has_fc1()) {
          d = activation_backward(ex.act, d, conv_hidden_pre(ex, mean[n * C + c], r));
          dh[(n * R + r) * C + c] = d;
          dp += ex.w1.at<acc_t>(r) * d;
        } else {
          dp += d;
        }
      }
      store_bias_and_tie<kMax>(ex.pool, dp, dp, ties, xmax, bias, tie, n * C + c, NC, g.splits, g.HW);
    }
  }
}

// The weight gradients of an MLP, one thread per element, each summing its per-sample terms over
// n in order: dW2 (C, R), then db2 (C), dW1 (R, C), db1 (R) where present.
template <typename acc_t, typename w_t>
__global__ void __launch_bounds__(kThreads)
    mlp_weight_grad_kernel(dev_ptr<const acc_t> mean, dev_ptr<const acc_t> xmax, dev_ptr<const acc_t> ws,
                           WorkspaceLayout layout, Excitation ex, GradStrides s, dev_ptr<w_t> dw1, dev_ptr<w_t> db1,
                           dev_ptr<w_t> dw2, dev_ptr<w_t> db2, int64_t N, int64_t C) {
  const int64_t R = ex.R;
  const int B = ex.branches();
  const auto hidden = ws + layout.hidden;
  const auto dz = ws + layout.dz;
  const auto dh = ws + layout.dh;
  int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e < C * R) {
    const int64_t c = e / R, r = e % R;
    acc_t acc = 0;
    for (int64_t n = 0; n < N; ++n) {
      const acc_t d = dz[n * C + c];
      for (int b = 0; b < B; ++b) {
        acc += d * (ex.has_fc1() ? activation(ex.act, hidden[(n * B + b) * R + r])
                                 : pooled<acc_t>(ex.pool, b, mean, xmax, n * C + r));
      }
    }
    dw2[c * s.dw2_s0 + r * s.dw2_s1] = static_cast<w_t>(acc);
    return;
  }
  e -= C * R;
  if (db2) {
    if (e < C) {
      acc_t acc = 0;
      for (int64_t n = 0; n < N; ++n) acc += dz[n * C + e];
      db2[e * s.db2_s0] = static_cast<w_t>(acc * acc_t(B));  // b2 is added once per branch
      return;
    }
    e -= C;
  }
  if (!ex.has_fc1()) return;
  // d loss / d (W1 p_b + b1)[r] of sample n.
  const auto dh_pre = [&](int64_t n, int b, int64_t r) {
    return activation_backward(ex.act, acc_t(dh[n * R + r]), acc_t(hidden[(n * B + b) * R + r]));
  };
  if (e < R * C) {
    const int64_t r = e / C, c = e % C;
    acc_t acc = 0;
    for (int64_t n = 0; n < N; ++n) {
      for (int b = 0; b < B; ++b) acc += dh_pre(n, b, r) * pooled<acc_t>(ex.pool, b, mean, xmax, n * C + c);
    }
    dw1[r * s.dw1_s0 + c * s.dw1_s1] = static_cast<w_t>(acc);
    return;
  }
  e -= R * C;
  if (db1 && e < R) {
    acc_t acc = 0;
    for (int64_t n = 0; n < N; ++n) {
      for (int b = 0; b < B; ++b) acc += dh_pre(n, b, e);
    }
    db1[e * s.db1_s0] = static_cast<w_t>(acc);
  }
}

// The sum of v over the block's threads, in a fixed order, in every thread.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  AK_SHARED(acc_t, warp_sums, kWarpsPerBlock);
  v = warp_sum(v);
  if (thread_rank() % 32 == 0) warp_sums[thread_rank() / 32] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kWarpsPerBlock; ++w) total += warp_sums[w];
  __syncthreads();  // before the next call overwrites warp_sums
  return total;
}

// The weight gradients of a channel conv, one block per scalar: w2[r, j] (R*K blocks), then with
// fc1 (w1[r], b1[r]) (R blocks), then b2 (1 block); each sums over (n, c), its threads striding
// over them and their sums added in a fixed order.
template <typename acc_t, typename w_t>
__global__ void __launch_bounds__(kThreads)
    conv_weight_grad_kernel(dev_ptr<const acc_t> mean, dev_ptr<const acc_t> ws, WorkspaceLayout layout,
                            Excitation ex, GradStrides s, dev_ptr<w_t> dw1, dev_ptr<w_t> db1, dev_ptr<w_t> dw2,
                            dev_ptr<w_t> db2, int64_t N, int64_t C) {
  const int64_t R = ex.R, K = ex.K, NC = N * C;
  const auto dz = ws + layout.dz;
  const auto dh = ws + layout.dh;
  const int64_t out = blockIdx.x;
  acc_t first = 0, second = 0;
  if (out < R * K) {
    const int64_t r = out / K, j = out % K;
    for (int64_t i = threadIdx.x; i < NC; i += kThreads) {
      const int64_t n = i / C;
      const int64_t src = conv_source(ex.mix, i - n * C + j - K / 2, C);
      if (src >= 0) first += dz[i] * conv_hidden(ex, mean[n * C + src], r);
    }
  } else if (out < R * K + (ex.has_fc1() ? R : 0)) {
    const int64_t r = out - R * K;
    for (int64_t i = threadIdx.x; i < NC; i += kThreads) {
      const int64_t n = i / C;
      const acc_t d = dh[(n * R + r) * C + (i - n * C)];
      first += d * mean[i];
      second += d;
    }
  } else {
    for (int64_t i = threadIdx.x; i < NC; i += kThreads) first += dz[i];
  }
  first = block_sum(first);
  second = block_sum(second);
  if (threadIdx.x != 0) return;
  if (out < R * K) {
    dw2[(out / K) * s.dw2_s0 + (out % K) * s.dw2_s1] = static_cast<w_t>(first);
  } else if (out < R * K + (ex.has_fc1() ? R : 0)) {
    dw1[(out - R * K) * s.dw1_s0] = static_cast<w_t>(first);
    if (db1) db1[(out - R * K) * s.db1_s0] = static_cast<w_t>(second);
  } else {
    db2[0] = static_cast<w_t>(first);
  }
}

// ---- host side ---------------------------------------------------------------------------------

// The per-sample counters of the device x lives on: at least `samples` int32, zero between
// launches (the kernels reset what they count). Created zeroed, grown when a batch needs more;
// never freed (a static's destructor could run after the CUDA runtime's teardown).
std::mutex tickets_mutex;
std::unordered_map<c10::Device, at::Tensor>& tickets_per_device() {
  static auto* per_device = new std::unordered_map<c10::Device, at::Tensor>();
  return *per_device;
}

at::Tensor sample_tickets(const at::Tensor& x, int64_t samples) {
  const std::lock_guard<std::mutex> lock(tickets_mutex);
  at::Tensor& tickets = tickets_per_device()[x.device()];
  if (!tickets.defined() || tickets.numel() < samples) {
    tickets = at::zeros({std::max<int64_t>(samples, 1024)}, x.options().dtype(at::kInt));
  }
  return tickets;
}

// The checked modes and weights of an excitation, the shapes its kernels need.
struct ExciteConfig {
  Pool pool;
  Mix mix;
  Act act, gate;
  int64_t R, K;
};

// A weight of the expected sizes on x's device, a floating tensor: an MLP's may also be a 1x1
// conv's (R, C, 1, 1).
void check_weight(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x,
                  std::initializer_list<int64_t> sizes, bool conv_1x1_allowed) {
  const std::vector<int64_t> expected(sizes);
  std::vector<int64_t> as_1x1 = expected;
  as_1x1.insert(as_1x1.end(), {1, 1});
  const bool fits = t.sizes() == at::IntArrayRef(expected) || (conv_1x1_allowed && t.sizes() == at::IntArrayRef(as_1x1));
  AK_CHECK(fits, op, "argument '", name, "' must have shape ", at::IntArrayRef(expected),
           conv_1x1_allowed ? " (or that shape followed by 1, 1)" : "", ", got ", t.sizes());
  AK_CHECK(t.device() == x.device(), op, "argument '", name, "' must be on x's device ", x.device(), ", got ",
           t.device());
  const auto dtype = t.scalar_type();
  AK_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble, op,
           "argument '", name, "' must be float16, bfloat16, float32 or float64, got ", dtype);
}

// Every (n, c) has an H*W to pool over: a gate of an empty mean would be made up.
void check_pooled_extent(const char* op, const at::Tensor& x) {
  AK_CHECK(x.size(0) * x.size(1) == 0 || x.size(2) * x.size(3) > 0, op,
           "argument 'x' must have H*W >= 1 to pool over, got shape ", x.sizes());
}

ExciteConfig check_excitation(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& fc1_weight,
                              const c10::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                              const c10::optional<at::Tensor>& fc2_bias, const std::string& pool,
                              const std::string& mix, const std::string& act, const std::string& gate) {
  ExciteConfig cfg{parse_mode<Pool>(op, "pool", pool, kPoolNames), parse_mode<Mix>(op, "mix", mix, kMixNames),
                   parse_mode<Act>(op, "act", act, kActNames), parse_mode<Act>(op, "gate", gate, kActNames), 0, 1};
  const int64_t C = x.size(1);
  AK_CHECK(fc1_weight.has_value() || !fc1_bias.has_value(), op,
           "argument 'fc1_bias' must be None when 'fc1_weight' is None");
  if (cfg.mix == Mix::kMlp) {
    AK_CHECK(!fc1_weight.has_value() || fc1_weight->dim() >= 1, op,
             "argument 'fc1_weight' must be (R, C) or (R, C, 1, 1), got shape ", fc1_weight->sizes());
    cfg.R = fc1_weight.has_value() ? fc1_weight->size(0) : C;
    if (fc1_weight.has_value()) check_weight(op, *fc1_weight, "fc1_weight", x, {cfg.R, C}, true);
    if (fc1_bias.has_value()) check_weight(op, *fc1_bias, "fc1_bias", x, {cfg.R}, false);
    check_weight(op, fc2_weight, "fc2_weight", x, {C, cfg.R}, true);
    if (fc2_bias.has_value()) check_weight(op, *fc2_bias, "fc2_bias", x, {C}, false);
  } else {
    AK_CHECK(cfg.pool == Pool::kAvg, op, "argument 'pool' must be 'avg' with mix '", mix, "', got '", pool, "'");
    AK_CHECK(fc2_weight.dim() == 3, op, "argument 'fc2_weight' must be a Conv1d weight (1, R, K), got shape ",
             fc2_weight.sizes());
    cfg.R = fc2_weight.size(1);
    cfg.K = fc2_weight.size(2);
    AK_CHECK(fc1_weight.has_value() || cfg.R == 1, op,
             "argument 'fc2_weight' must be (1, 1, K) without 'fc1_weight', got shape ", fc2_weight.sizes());
    check_weight(op, fc2_weight, "fc2_weight", x, {1, cfg.R, cfg.K}, false);
    AK_CHECK(cfg.mix == Mix::kConv || cfg.K / 2 <= C, op, "argument 'fc2_weight' has ", cfg.K,
             " taps, whose circular padding of ", cfg.K / 2, " wraps around the ", C, " channels more than once");
    if (fc1_weight.has_value()) check_weight(op, *fc1_weight, "fc1_weight", x, {cfg.R, 1, 1}, false);
    if (fc1_bias.has_value()) check_weight(op, *fc1_bias, "fc1_bias", x, {cfg.R}, false);
    if (fc2_bias.has_value()) check_weight(op, *fc2_bias, "fc2_bias", x, {1}, false);
  }
  return cfg;
}

Weight weight_ref(const c10::optional<at::Tensor>& t, const char* name, int dim0, int dim1 = -1) {
  Weight w;
  if (!t.has_value()) return w;
  w.s0 = t->stride(dim0);
  w.s1 = dim1 >= 0 ? t->stride(dim1) : 0;
  switch (t->scalar_type()) {
    case at::kFloat:
      w.f32 = device_ptr<const float>(*t, name);
      break;
    case at::kDouble:
      w.f64 = device_ptr<const double>(*t, name);
      break;
    case at::kHalf:
      w.f16 = device_ptr<const at::Half>(*t, name);
      break;
    default:
      w.bf16 = device_ptr<const at::BFloat16>(*t, name);
      break;
  }
  return w;
}

Excitation excitation(const ExciteConfig& cfg, const c10::optional<at::Tensor>& fc1_weight,
                      const c10::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                      const c10::optional<at::Tensor>& fc2_bias) {
  Excitation ex;
  const bool mlp = cfg.mix == Mix::kMlp;
  ex.w1 = mlp ? weight_ref(fc1_weight, "fc1_weight", 0, 1) : weight_ref(fc1_weight, "fc1_weight", 0);
  ex.b1 = weight_ref(fc1_bias, "fc1_bias", 0);
  ex.w2 = mlp ? weight_ref(fc2_weight, "fc2_weight", 0, 1) : weight_ref(fc2_weight, "fc2_weight", 1, 2);
  ex.b2 = weight_ref(fc2_bias, "fc2_bias", 0);
  ex.R = cfg.R;
  ex.K = cfg.K;
  ex.pool = cfg.pool;
  ex.mix = cfg.mix;
  ex.act = cfg.act;
  ex.gate = cfg.gate;
  return ex;
}

// The reduction's grid over x and the workspace's layout.
struct Plan {
  SampleGrid grid;
  WorkspaceLayout layout;
  int64_t workspace;  // elements
  dim3 block;
};

Plan plan(const at::Tensor& x, Layout layout, const ExciteConfig& cfg, bool has_fc1, bool backward) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const HwSplit split = split_hw(layout, N, C, HW);
  Plan p;
  const bool nhwc = layout == Layout::kNHWC;
  const int64_t blocks = nhwc ? (C + kTileC - 1) / kTileC * split.splits
                              : (C * split.splits + kWarpsPerBlock - 1) / kWarpsPerBlock;
  p.grid = {N, C, HW, split.splits, split.per_split, blocks};
  p.block = nhwc ? dim3(kTileC, kTileHW) : dim3(kThreads);
  const bool mlp = cfg.mix == Mix::kMlp;
  const int64_t branches = cfg.pool == Pool::kAvgMax ? 2 : 1;
  p.layout.hidden = (cfg.pool == Pool::kAvg ? 1 : 2) * split.splits * N * C;
  p.layout.dz = p.layout.hidden + (mlp && has_fc1 ? N * branches * cfg.R : 0);
  p.layout.dh = p.layout.dz + N * C;
  const int64_t dh = mlp ? N * cfg.R : (has_fc1 ? N * cfg.R * C : 0);
  p.workspace = backward ? p.layout.dh + dh : p.layout.dz;
  return p;
}

// Calls f(acc_t{}) with the accumulator type of x's dtype.
template <typename F>
void with_accumulator(const at::Tensor& x, const F& f) {
  if (x.scalar_type() == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_excite(
    const at::Tensor& x, const c10::optional<at::Tensor>& fc1_weight, const c10::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const c10::optional<at::Tensor>& fc2_bias, c10::string_view pool,
    c10::string_view mix, c10::string_view act, c10::string_view gate) {
  constexpr const char* op = "pool_excite";
  check_activation(op, x);
  check_pooled_extent(op, x);
  const Layout layout = layout_of(op, x, "x");
  const ExciteConfig cfg = check_excitation(op, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, std::string(pool),
                                            std::string(mix), std::string(act), std::string(gate));
  const DeviceGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  const bool with_max = cfg.pool != Pool::kAvg;
  const auto stat_options = x.options().dtype(at::toAccumulateType(x.scalar_type(), true));
  at::Tensor gate_out = at::empty({N, C}, stat_options);
  at::Tensor mean = at::empty({N, C}, stat_options);
  at::Tensor xmax = with_max ? at::empty({N, C}, stat_options) : at::empty({0}, stat_options);
  if (N * C == 0) return {gate_out, mean, xmax};

  const Plan p = plan(x, layout, cfg, fc1_weight.has_value(), /*backward=*/false);
  at::Tensor workspace = at::empty({p.workspace}, stat_options);
  const at::Tensor tickets = sample_tickets(x, N);
  const Excitation ex = excitation(cfg, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto run = [&](auto nhwc, auto max) {
      launch<pool_excite_kernel<decltype(nhwc)::value, decltype(max)::value, scalar_t, acc_t>>(
          op, N * p.grid.blocks_per_sample, 1, p.block, 0, device_ptr<const scalar_t>(x, "x"), ex, p.grid, p.layout,
          device_ptr<acc_t>(workspace, "workspace"), device_ptr<int>(tickets, "tickets"),
          device_ptr<acc_t>(mean, "mean"), device_ptr<acc_t>(with_max ? &xmax : nullptr, "xmax"),
          device_ptr<acc_t>(gate_out, "gate"));
    };
    using No = std::false_type;
    using Yes = std::true_type;
    if (layout == Layout::kNHWC) {
      with_max ? run(Yes{}, Yes{}) : run(Yes{}, No{});
    } else {
      with_max ? run(No{}, Yes{}) : run(No{}, No{});
    }
  });
  return {gate_out, mean, xmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_excite(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& fc1_weight,
    const c10::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight, const c10::optional<at::Tensor>& fc2_bias,
    const at::Tensor& mean, const at::Tensor& xmax, c10::string_view pool, c10::string_view mix, c10::string_view act,
    c10::string_view gate) {
  constexpr const char* op = "grad_excite";
  check_activation(op, x);
  check_pooled_extent(op, x);
  AK_CHECK_SAME(op, x, dy);
  const Layout layout = layout_of(op, x, "x");
  AK_CHECK(layout_of(op, dy, "dy") == layout, op, "argument 'dy' must have the same memory format as 'x'");
  const ExciteConfig cfg = check_excitation(op, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, std::string(pool),
                                            std::string(mix), std::string(act), std::string(gate));
  AK_CHECK_STAT(op, mean, x);
  const bool with_max = cfg.pool != Pool::kAvg;
  if (with_max) AK_CHECK_STAT(op, xmax, x);
  // The gradients are written in one dtype, fc2_weight's.
  for (const auto& [t, name] : {std::make_pair(&fc1_weight, "fc1_weight"), std::make_pair(&fc1_bias, "fc1_bias"),
                                std::make_pair(&fc2_bias, "fc2_bias")}) {
    AK_CHECK(!t->has_value() || (*t)->scalar_type() == fc2_weight.scalar_type(), op, "argument '", name,
             "' must have fc2_weight's dtype ", fc2_weight.scalar_type(), ", got ", (*t)->scalar_type());
  }
  const DeviceGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  const auto stat_options = mean.options();
  at::Tensor gate_out = at::empty({N, C}, stat_options);
  at::Tensor bias = at::empty({N, C}, stat_options);
  at::Tensor tie = with_max ? at::empty({N, C}, stat_options) : at::empty({0}, stat_options);
  // Gradients in the weights' shapes, dtypes and strides (empty_like keeps a dense tensor's).
  const auto grad_of = [&](const c10::optional<at::Tensor>& w) {
    if (!w.has_value()) return at::empty({0}, stat_options);
    return N * C == 0 ? at::zeros_like(*w) : at::empty_like(*w);
  };
  at::Tensor dw1 = grad_of(fc1_weight), db1 = grad_of(fc1_bias), dw2 = grad_of(fc2_weight), db2 = grad_of(fc2_bias);
  if (N * C == 0) return {gate_out, bias, tie, dw1, db1, dw2, db2};

  const bool mlp = cfg.mix == Mix::kMlp;
  const Plan p = plan(x, layout, cfg, fc1_weight.has_value(), /*backward=*/true);
  at::Tensor workspace = at::empty({p.workspace}, stat_options);
  const at::Tensor tickets = sample_tickets(x, N);
  const Excitation ex = excitation(cfg, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto run = [&](auto nhwc, auto max) {
      launch<grad_excite_kernel<decltype(nhwc)::value, decltype(max)::value, scalar_t, acc_t>>(
          op, N * p.grid.blocks_per_sample, 1, p.block, 0, device_ptr<const scalar_t>(dy, "dy"),
          device_ptr<const scalar_t>(x, "x"), device_ptr<const acc_t>(mean, "mean"),
          device_ptr<const acc_t>(with_max ? &xmax : nullptr, "xmax"), ex, p.grid, p.layout,
          device_ptr<acc_t>(workspace, "workspace"), device_ptr<int>(tickets, "tickets"),
          device_ptr<acc_t>(gate_out, "gate"), device_ptr<acc_t>(bias, "bias"),
          device_ptr<acc_t>(with_max ? &tie : nullptr, "tie_coef"));
    };
    using No = std::false_type;
    using Yes = std::true_type;
    if (layout == Layout::kNHWC) {
      with_max ? run(Yes{}, Yes{}) : run(Yes{}, No{});
    } else {
      with_max ? run(No{}, Yes{}) : run(No{}, No{});
    }
  });

  const auto stride = [](const at::Tensor& t, int dim) { return t.numel() ? t.stride(dim) : 0; };
  const GradStrides strides = mlp ? GradStrides{stride(dw1, 0), stride(dw1, 1), stride(db1, 0), stride(dw2, 0),
                                                stride(dw2, 1), stride(db2, 0)}
                                  : GradStrides{stride(dw1, 0), 0, stride(db1, 0), stride(dw2, 1), stride(dw2, 2),
                                                stride(db2, 0)};
  const bool has_fc1 = fc1_weight.has_value();
  with_accumulator(x, [&](auto acc) {
    using acc_t = decltype(acc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fc2_weight.scalar_type(), op, [&] {
      using w_t = scalar_t;
      const auto grad = [&](const at::Tensor& g, bool present, const char* name) {
        return device_ptr<w_t>(present ? &g : nullptr, name);
      };
      const auto mean_ptr = device_ptr<const acc_t>(mean, "mean");
      const auto ws_ptr = device_ptr<const acc_t>(workspace, "workspace");
      if (mlp) {
        const int64_t elements = C * cfg.R + (fc2_bias.has_value() ? C : 0) + (has_fc1 ? cfg.R * C : 0) +
                                 (fc1_bias.has_value() ? cfg.R : 0);
        launch<mlp_weight_grad_kernel<acc_t, w_t>>(
            op, (elements + kThreads - 1) / kThreads, 1, kThreads, 0, mean_ptr,
            device_ptr<const acc_t>(with_max ? &xmax : nullptr, "xmax"), ws_ptr, p.layout, ex, strides,
            grad(dw1, has_fc1, "dfc1_weight"), grad(db1, fc1_bias.has_value(), "dfc1_bias"),
            grad(dw2, true, "dfc2_weight"), grad(db2, fc2_bias.has_value(), "dfc2_bias"), N, C);
      } else {
        const int64_t blocks = cfg.R * cfg.K + (has_fc1 ? cfg.R : 0) + (fc2_bias.has_value() ? 1 : 0);
        launch<conv_weight_grad_kernel<acc_t, w_t>>(
            op, blocks, 1, kThreads, 0, mean_ptr, ws_ptr, p.layout, ex, strides, grad(dw1, has_fc1, "dfc1_weight"),
            grad(db1, fc1_bias.has_value(), "dfc1_bias"), grad(dw2, true, "dfc2_weight"),
            grad(db2, fc2_bias.has_value(), "dfc2_bias"), N, C);
      }
    });
  });
  return {gate_out, bias, tie, dw1, db1, dw2, db2};
}

AK_LIBRARY_IMPL(AK_LIBRARY, AK_DISPATCH_KEY, m) {
  m.impl("pool_excite", &pool_excite);
  m.impl("grad_excite", &grad_excite);
}

#ifdef AK_EMULATION
// For the tests: a copy of the per-sample counters of the CPU (empty before a first launch), which
// every launch must leave at zero.
TORCH_LIBRARY_FRAGMENT(attn_kernels_emulated, m) {
  m.def("_sample_tickets() -> Tensor", [] {
    const std::lock_guard<std::mutex> lock(tickets_mutex);
    const auto found = tickets_per_device().find(c10::Device(c10::kCPU));
    return found == tickets_per_device().end() ? at::empty({0}, at::kInt) : found->second.clone();
  });
}
#endif

}  // namespace attn_kernels
