// The channel gate's excitation as device code: its description (modes, weights read in their own
// dtype), the activations, the per-sample math that the last block of a sample runs (the ticket of
// last_block_of_sample), the MLP's weight-gradient kernel, and the host's checks of the weights.
// Shared by excite.cu (SE and its variants) and scse.cu (cSE's MLP).
#pragma once

#include "reduce_hw.cuh"

namespace attn_kernels {

// The per-sample counters of x's device, defined in excite.cu: at least `samples` int32, zero
// between launches (the kernels reset what they count). One buffer per device for every kernel
// that takes tickets (excite.cu's and scse.cu's), which must not run on two streams of one device
// at once.
at::Tensor sample_tickets(const at::Tensor& x, int64_t samples);

namespace {

constexpr int kBlockThreads = kWarpsPerBlock * 32;  // the blocks that run the per-sample math: 8 warps

// The modes, in the order of their names in excite.cu (the ACTIVATIONS of attn_kernels/activations.py).
enum class Pool : int { kAvg, kMix, kAvgMax, kMax };
enum class Mix : int { kMlp, kConv, kCircularConv };
enum class Act : int { kIdentity, kRelu, kRelu6, kSilu, kGelu, kTanh, kSigmoid, kHardSigmoid, kHardSwish };

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

// The forward's per-sample math, by the last block of sample n: mean (and xmax) folded in split
// order from the partials at the start of ws, and gate = gate(mix(pooled)).
template <bool kMax, typename acc_t>
__device__ void excite_sample(const Excitation& ex, const SampleGrid& g, const WorkspaceLayout& layout,
                              dev_ptr<acc_t> ws, dev_ptr<acc_t> mean, dev_ptr<acc_t> xmax, dev_ptr<acc_t> gate,
                              int64_t n) {
  const int tid = thread_rank(), warp = tid / 32, lane = tid % 32;
  const int64_t C = g.C, NC = g.N * g.C;
  for (int64_t c = tid; c < C; c += kBlockThreads) {
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
    for (int64_t c = tid; c < C; c += kBlockThreads) {
      gate[n * C + c] = activation(ex.gate, conv_logit<acc_t>(ex, mean, n, C, c));
    }
  }
}

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

// The backward's per-sample math, by the last block of sample n, from the partials of d loss / d gate
// (and the ties) at the start of ws: the excitation again and its derivative: gate, bias, tie, and
// the per-sample terms of the weight gradients (dz, dh) into ws.
template <bool kMax, typename acc_t>
__device__ void excite_backward_sample(const Excitation& ex, const SampleGrid& g, const WorkspaceLayout& layout,
                                       dev_ptr<acc_t> ws, dev_ptr<const acc_t> mean, dev_ptr<const acc_t> xmax,
                                       dev_ptr<acc_t> gate, dev_ptr<acc_t> bias, dev_ptr<acc_t> tie, int64_t n) {
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
    for (int64_t c = tid; c < C; c += kBlockThreads) {
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
    for (int64_t c = tid; c < C; c += kBlockThreads) {
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
__global__ void __launch_bounds__(kBlockThreads)
    mlp_weight_grad_kernel(dev_ptr<const acc_t> mean, dev_ptr<const acc_t> xmax, dev_ptr<const acc_t> ws,
                           WorkspaceLayout layout, Excitation ex, GradStrides s, dev_ptr<w_t> dw1, dev_ptr<w_t> db1,
                           dev_ptr<w_t> dw2, dev_ptr<w_t> db2, int64_t N, int64_t C) {
  const int64_t R = ex.R;
  const int B = ex.branches();
  const auto hidden = ws + layout.hidden;
  const auto dz = ws + layout.dz;
  const auto dh = ws + layout.dh;
  int64_t e = int64_t(blockIdx.x) * kBlockThreads + threadIdx.x;
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

// ---- host side -------------------------------------------------------------------------------

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

}  // namespace
}  // namespace attn_kernels
