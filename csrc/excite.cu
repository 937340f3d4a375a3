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

#include "excite.cuh"

namespace attn_kernels {
namespace {

constexpr int kThreads = kBlockThreads;  // every kernel of this file

// The modes' names, in the order of excite.cuh's enums.
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

// ---- the reduction, grouped by sample ----------------------------------------------------------

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

  excite_sample<kMax>(ex, g, layout, ws, mean, xmax, gate, n);
}

// ---- backward ----------------------------------------------------------------------------------

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

  excite_backward_sample<kMax>(ex, g, layout, ws, mean, xmax, gate, bias, tie, n);
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

}  // namespace

// ---- host side ---------------------------------------------------------------------------------

// The per-sample counters of the device x lives on: at least `samples` int32, zero between
// launches (the kernels reset what they count). Created zeroed, grown when a batch needs more;
// never freed (a static's destructor could run after the CUDA runtime's teardown).
namespace {
std::mutex tickets_mutex;
std::unordered_map<c10::Device, at::Tensor>& tickets_per_device() {
  static auto* per_device = new std::unordered_map<c10::Device, at::Tensor>();
  return *per_device;
}
}  // namespace

at::Tensor sample_tickets(const at::Tensor& x, int64_t samples) {
  const std::lock_guard<std::mutex> lock(tickets_mutex);
  at::Tensor& tickets = tickets_per_device()[x.device()];
  if (!tickets.defined() || tickets.numel() < samples) {
    tickets = at::zeros({std::max<int64_t>(samples, 1024)}, x.options().dtype(at::kInt));
  }
  return tickets;
}

namespace {

// The checked modes and weights of an excitation, the shapes its kernels need.
struct ExciteConfig {
  Pool pool;
  Mix mix;
  Act act, gate;
  int64_t R, K;
};

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
