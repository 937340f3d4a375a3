// scSE (concurrent spatial and channel squeeze-and-excitation) with its per-sample math inside the
// kernels: the CUDA twin of attn_kernels/triton/scse.py, 2 launches forward and 3 backward.
//
//   scse_pool_excite(x, w1, b1, w2, b2, sse_weight, sse_bias) -> (gate, mean, logits)     1 launch
//       one read of x: per pixel the spatial logits w . x[n, :, p] + b; per channel the split
//       partials of the channel sums; the last block of each sample folds them into the mean and
//       computes cSE's gate gc = sigmoid(fc2(relu(fc1(mean)))) (excite.cuh's MLP)
//   scse_grad_excite(dy, x, mean, logits, w1, b1, w2, b2)
//       -> (gate, cbias, dlogits, dlogit_sums, d w1, d b1, d w2, d b2)                   2 launches
//       one read of dy and x: per pixel d logits = (sum_c dy x) gs (1 - gs); per channel the split
//       partials of d gc = sum_p dy x; the last block of each sample differentiates cSE (cbias =
//       d mean / HW) and sums its d logits; then the MLP's weight gradients, summed over N in order
//   scse_apply(a, gate, logits[, x, cbias, dlogits, dlogit_sums, sse_weight, sse_bias])
//       -> (out, d sse_weight, d sse_bias)                                                1 launch
//       out = a*(gc[n,c] + gs[n,p]), gs = sigmoid(logits), and in the backward + cbias[n,c] +
//       dlogits[n,p]*w[c], where the same read of x gives the split partials of d w; the grid's last
//       block folds them, and the samples' sums of d logits into d b, in a fixed order
//
// The tile of attention_pool.cu (pixel_tile.cuh): one block per (n, split of H*W) stages P pixels
// with all C channels in shared memory, a warp per pixel sums over C, a thread per channel over
// the tile's pixels. The grad kernel stages t = dy*x in the accumulator type, so the product is
// rounded once, as the Triton kernel's. The tickets (excite.cuh's last_block_of_sample, on the
// per-device counters of sample_tickets), the fixed orders and the counters left at zero are
// excite.cu's: no float atomics, bitwise reproducible, no host synchronization. Statistics are in
// the accumulator dtype (float32; float64 for float64 x); weights are read in their own dtype and
// their gradients written in it.
#include "excite.cuh"
#include "pixel_tile.cuh"

namespace attn_kernels {
namespace {

// The per-sample math of excite.cuh assumes blocks of kBlockThreads.
static_assert(kThreads == kBlockThreads, "scSE's blocks must have the threads excite.cuh's per-sample math uses");

// A gradient written in its weight's dtype: element i is data[i*s0]. One pointer is set, the one
// of the weight's dtype; none for an absent weight.
struct GradOut {
  dev_ptr<float> f32 = nullptr;
  dev_ptr<double> f64 = nullptr;
  dev_ptr<at::Half> f16 = nullptr;
  dev_ptr<at::BFloat16> bf16 = nullptr;
  int64_t s0 = 0;

  __device__ __forceinline__ bool present() const { return f32 || f64 || f16 || bf16; }
  template <typename T>
  __device__ __forceinline__ void store(int64_t i, T v) const {
    const int64_t k = i * s0;
    if (f32) {
      f32[k] = static_cast<float>(v);
    } else if (f64) {
      f64[k] = static_cast<double>(v);
    } else if (f16) {
      f16[k] = static_cast<at::Half>(static_cast<float>(v));
    } else {
      bf16[k] = static_cast<at::BFloat16>(static_cast<float>(v));
    }
  }
};

// Sample n and split of H*W of this block: a sample's splits are consecutive blocks along x, whose
// limit (2^31 - 1) is far above y's and z's 65535.
struct BlockSpan {
  int64_t n, split, begin, end;
};

__device__ __forceinline__ BlockSpan block_span(const SampleGrid& g) {
  const int64_t n = blockIdx.x / g.splits, split = blockIdx.x % g.splits;
  const int64_t begin = split * g.per_split;
  return {n, split, begin, min(g.HW, begin + g.per_split)};
}

// One read of x: logits[n, p] = w . x[n, :, p] + b per pixel and the split partials of the channel
// sums into ws (splits, N, C); then, in the last block of each sample, mean and cSE's gate.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<acc_t>) scse_pool_excite_kernel(
    dev_ptr<const scalar_t> x, Weight sse_weight, Weight sse_bias, Excitation ex, SampleGrid g, WorkspaceLayout layout,
    int tile_pixels, bool nhwc, dev_ptr<acc_t> ws, dev_ptr<int> tickets, dev_ptr<acc_t> mean, dev_ptr<acc_t> logits,
    dev_ptr<acc_t> gate) {
  AK_DYNAMIC_SHARED(scalar_t, tile);
  const int64_t C = g.C, HW = g.HW;
  const int64_t stride = tile_stride(C, sizeof(scalar_t));  // of the tile's rows
  const BlockSpan s = block_span(g);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  acc_t acc[kChannelsPerThread];
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) acc[k] = 0;

  for (int64_t hw0 = s.begin; hw0 < s.end; hw0 += tile_pixels) {
    const int pixels = int(min(int64_t(tile_pixels), s.end - hw0));
    stage_tile(tile, pixels, s.n, hw0, C, HW, nhwc, [&](int64_t i) { return x[i]; });
    for (int p = warp; p < pixels; p += kWarps) {
      acc_t sum = 0;
      for (int c = lane; c < C; c += 32) sum += static_cast<acc_t>(tile[p * stride + c]) * sse_weight.at<acc_t>(c);
      sum = warp_sum(sum);
      if (lane == 0) logits[s.n * HW + hw0 + p] = sse_bias.present() ? sum + sse_bias.at<acc_t>(0) : sum;
    }
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      const int64_t c = threadIdx.x + k * kThreads;
      if (c < C) {
        acc_t sum = 0;
        for (int p = 0; p < pixels; ++p) sum += static_cast<acc_t>(tile[p * stride + c]);
        acc[k] += sum;
      }
    }
    __syncthreads();  // the next tile overwrites this one
  }
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) {
    const int64_t c = threadIdx.x + k * kThreads;
    if (c < C) ws[(s.split * g.N + s.n) * C + c] = acc[k];
  }
  if (!last_block_of_sample(tickets, s.n, g.splits)) return;
  excite_sample<false, acc_t>(ex, g, layout, ws, mean, nullptr, gate, s.n);
}

// One read of dy and x: dlogits[n, p] = (sum_c dy x) gs (1 - gs) per pixel and the split partials
// of d gc = sum_p dy x into ws (splits, N, C); then, in the last block of each sample, the sum of
// its d logits and cSE's backward: gate, cbias = d mean / HW, and the terms of the weight gradients.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<acc_t>) scse_grad_excite_kernel(
    dev_ptr<const scalar_t> dy, dev_ptr<const scalar_t> x, dev_ptr<const acc_t> mean, dev_ptr<const acc_t> logits,
    Excitation ex, SampleGrid g, WorkspaceLayout layout, int tile_pixels, bool nhwc, dev_ptr<acc_t> ws,
    dev_ptr<int> tickets, dev_ptr<acc_t> gate, dev_ptr<acc_t> cbias, dev_ptr<acc_t> dlogits,
    dev_ptr<acc_t> dlogit_sums) {
  AK_DYNAMIC_SHARED(acc_t, tile);
  const int64_t C = g.C, HW = g.HW;
  const int64_t stride = tile_stride(C, sizeof(acc_t));
  const BlockSpan s = block_span(g);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  acc_t acc[kChannelsPerThread];
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) acc[k] = 0;

  for (int64_t hw0 = s.begin; hw0 < s.end; hw0 += tile_pixels) {
    const int pixels = int(min(int64_t(tile_pixels), s.end - hw0));
    stage_tile(tile, pixels, s.n, hw0, C, HW, nhwc,
               [&](int64_t i) { return static_cast<acc_t>(dy[i]) * static_cast<acc_t>(x[i]); });
    for (int p = warp; p < pixels; p += kWarps) {
      acc_t sum = 0;
      for (int c = lane; c < C; c += 32) sum += tile[p * stride + c];
      sum = warp_sum(sum);
      if (lane == 0) {
        const int64_t pixel = s.n * HW + hw0 + p;
        const acc_t gs = sigmoid_of(acc_t(logits[pixel]));
        dlogits[pixel] = sum * (gs * (acc_t(1) - gs));
      }
    }
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      const int64_t c = threadIdx.x + k * kThreads;
      if (c < C) {
        acc_t sum = 0;
        for (int p = 0; p < pixels; ++p) sum += tile[p * stride + c];
        acc[k] += sum;
      }
    }
    __syncthreads();  // the next tile overwrites this one
  }
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) {
    const int64_t c = threadIdx.x + k * kThreads;
    if (c < C) ws[(s.split * g.N + s.n) * C + c] = acc[k];
  }
  if (!last_block_of_sample(tickets, s.n, g.splits)) return;
  acc_t total = 0;
  for (int64_t p = threadIdx.x; p < HW; p += kThreads) total += load_written(dlogits, s.n * HW + p);
  total = block_sum(total);
  if (threadIdx.x == 0) dlogit_sums[s.n] = total;
  excite_backward_sample<false, acc_t>(ex, g, layout, ws, mean, nullptr, gate, cbias, nullptr, s.n);
}

// out = a*(gc[n,c] + gs[n,p]) element by element in memory order; in the backward (kGrad) plus
// cbias[n,c] + dlogits[n,p]*w[c], with x staged for the split partials of d w = sum dlogits*x into
// part_dw (splits, N, C), which the grid's last block folds in (split, n) order, and d b = the sum
// of dlogit_sums in n order. Its ticket is counter 0: the per-sample counters are all back at zero
// once the kernels before it on the stream have run.
template <typename scalar_t, typename acc_t, bool kGrad>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<acc_t>) scse_apply_kernel(
    dev_ptr<const scalar_t> a, dev_ptr<const acc_t> gate, dev_ptr<const acc_t> logits, dev_ptr<const scalar_t> x,
    dev_ptr<const acc_t> cbias, dev_ptr<const acc_t> dlogits, dev_ptr<const acc_t> dlogit_sums, Weight sse_weight,
    SampleGrid g, int tile_pixels, bool nhwc, dev_ptr<scalar_t> out, dev_ptr<acc_t> part_dw, dev_ptr<int> tickets,
    GradOut dsse_weight, GradOut dsse_bias) {
  AK_DYNAMIC_SHARED(scalar_t, tile);  // x's tile, in the backward
  const int64_t C = g.C, HW = g.HW, N = g.N;
  const int64_t stride = tile_stride(C, sizeof(scalar_t));
  AK_SHARED(acc_t, tile_gs, kMaxTilePixels);
  AK_SHARED(acc_t, tile_dl, kMaxTilePixels);
  const BlockSpan s = block_span(g);

  acc_t dw[kChannelsPerThread];
#pragma unroll
  for (int k = 0; k < kChannelsPerThread; ++k) dw[k] = 0;

  for (int64_t hw0 = s.begin; hw0 < s.end; hw0 += tile_pixels) {
    const int pixels = int(min(int64_t(tile_pixels), s.end - hw0));
    if (int(threadIdx.x) < pixels) {
      const int64_t pixel = s.n * HW + hw0 + threadIdx.x;
      tile_gs[threadIdx.x] = sigmoid_of(acc_t(logits[pixel]));
      if constexpr (kGrad) tile_dl[threadIdx.x] = dlogits[pixel];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < pixels * C; i += kThreads) {
      const TileIndex t = tile_index(i, pixels, s.n, hw0, C, HW, nhwc);
      acc_t r = static_cast<acc_t>(a[t.offset]) * (gate[s.n * C + t.c] + tile_gs[t.p]);
      if constexpr (kGrad) {
        r += cbias[s.n * C + t.c] + tile_dl[t.p] * sse_weight.at<acc_t>(t.c);
        tile[t.p * stride + t.c] = x[t.offset];
      }
      out[t.offset] = static_cast<scalar_t>(r);
    }
    if constexpr (kGrad) {
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kChannelsPerThread; ++k) {
        const int64_t c = threadIdx.x + k * kThreads;
        if (c < C) {
          acc_t sum = 0;
          for (int p = 0; p < pixels; ++p) sum += tile_dl[p] * static_cast<acc_t>(tile[p * stride + c]);
          dw[k] += sum;
        }
      }
    }
    __syncthreads();  // the next tile overwrites tile, tile_gs and tile_dl
  }
  if constexpr (kGrad) {
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      const int64_t c = threadIdx.x + k * kThreads;
      if (c < C) part_dw[(s.split * N + s.n) * C + c] = dw[k];
    }
    if (!last_block_of_sample(tickets, 0, N * g.splits)) return;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      acc_t sum = 0;
      for (int64_t row = 0; row < g.splits * N; ++row) sum += load_written(part_dw, row * C + c);
      dsse_weight.store(c, sum);
    }
    if (dsse_bias.present()) {
      acc_t sum = 0;
      for (int64_t i = threadIdx.x; i < N; i += kThreads) sum += dlogit_sums[i];
      sum = block_sum(sum);
      if (threadIdx.x == 0) dsse_bias.store(0, sum);
    }
  }
}

GradOut grad_out(const at::Tensor* t, const char* name, int dim) {
  GradOut g;
  if (t == nullptr) return g;
  g.s0 = t->stride(dim);
  switch (t->scalar_type()) {
    case at::kFloat:
      g.f32 = device_ptr<float>(*t, name);
      break;
    case at::kDouble:
      g.f64 = device_ptr<double>(*t, name);
      break;
    case at::kHalf:
      g.f16 = device_ptr<at::Half>(*t, name);
      break;
    default:
      g.bf16 = device_ptr<at::BFloat16>(*t, name);
      break;
  }
  return g;
}

// x's channels fit the per-thread accumulators of pixel_tile.cuh.
void check_channels(const char* op, const at::Tensor& x, const char* name) {
  AK_CHECK(x.size(1) <= kMaxChannels, op, "argument '", name, "' has ", x.size(1), " channels; at most ",
           kMaxChannels, " are supported");
}

// cSE's MLP (1x1 convs or linear weights: fc1 (R, C), fc2 (C, R)) and sSE's (1, C, 1, 1) conv
// with its (1,) bias, checked against x.
int64_t check_scse_weights(const char* op, const at::Tensor& x, const at::Tensor& fc1_weight,
                           const c10::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                           const c10::optional<at::Tensor>& fc2_bias, const at::Tensor* sse_weight,
                           const c10::optional<at::Tensor>* sse_bias) {
  const int64_t C = x.size(1);
  AK_CHECK(fc1_weight.dim() >= 1, op, "argument 'fc1_weight' must be (R, C) or (R, C, 1, 1), got shape ",
           fc1_weight.sizes());
  const int64_t R = fc1_weight.size(0);
  check_weight(op, fc1_weight, "fc1_weight", x, {R, C}, true);
  if (fc1_bias.has_value()) check_weight(op, *fc1_bias, "fc1_bias", x, {R}, false);
  check_weight(op, fc2_weight, "fc2_weight", x, {C, R}, true);
  if (fc2_bias.has_value()) check_weight(op, *fc2_bias, "fc2_bias", x, {C}, false);
  if (sse_weight != nullptr) check_weight(op, *sse_weight, "sse_weight", x, {1, C, 1, 1}, false);
  if (sse_bias != nullptr && sse_bias->has_value()) check_weight(op, **sse_bias, "sse_bias", x, {1}, false);
  return R;
}

Excitation cse_excitation(const at::Tensor& fc1_weight, const c10::optional<at::Tensor>& fc1_bias,
                          const at::Tensor& fc2_weight, const c10::optional<at::Tensor>& fc2_bias) {
  Excitation ex;
  ex.w1 = weight_ref(fc1_weight, "fc1_weight", 0, 1);
  ex.b1 = weight_ref(fc1_bias, "fc1_bias", 0);
  ex.w2 = weight_ref(fc2_weight, "fc2_weight", 0, 1);
  ex.b2 = weight_ref(fc2_bias, "fc2_bias", 0);
  ex.R = fc1_weight.size(0);
  ex.K = 1;
  ex.pool = Pool::kAvg;
  ex.mix = Mix::kMlp;
  ex.act = Act::kRelu;
  ex.gate = Act::kSigmoid;
  return ex;
}

SampleGrid sample_grid(const at::Tensor& x, const Plan& plan) {
  return {x.size(0), x.size(1), x.size(2) * x.size(3), plan.splits, plan.per_split, plan.splits};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> scse_pool_excite(
    const at::Tensor& x, const at::Tensor& fc1_weight, const c10::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const c10::optional<at::Tensor>& fc2_bias, const at::Tensor& sse_weight,
    const c10::optional<at::Tensor>& sse_bias) {
  constexpr const char* op = "scse_pool_excite";
  check_activation(op, x);
  check_pooled_extent(op, x);
  const Layout layout = layout_of(op, x, "x");
  check_channels(op, x, "x");
  const int64_t R = check_scse_weights(op, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, &sse_weight, &sse_bias);
  const DeviceGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto stat_options = x.options().dtype(at::toAccumulateType(x.scalar_type(), true));
  at::Tensor gate = at::empty({N, C}, stat_options);
  at::Tensor mean = at::empty({N, C}, stat_options);
  at::Tensor logits = at::empty({N, HW}, stat_options);
  if (x.numel() == 0) return {gate, mean, logits.zero_()};

  const Plan plan = plan_for(x, x.element_size());
  const SampleGrid g = sample_grid(x, plan);
  const WorkspaceLayout ws_layout{plan.splits * N * C, 0, 0};  // the partials, then the MLP's hidden layer
  at::Tensor workspace = at::empty({ws_layout.hidden + N * R}, stat_options);
  const at::Tensor tickets = sample_tickets(x, N);
  const Excitation ex = cse_excitation(fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    launch<scse_pool_excite_kernel<scalar_t, acc_t>>(
        op, N * plan.splits, 1, kThreads, plan.tile_bytes, device_ptr<const scalar_t>(x, "x"),
        weight_ref(sse_weight, "sse_weight", 1), weight_ref(sse_bias, "sse_bias", 0), ex, g, ws_layout,
        plan.tile_pixels, layout == Layout::kNHWC, device_ptr<acc_t>(workspace, "workspace"),
        device_ptr<int>(tickets, "tickets"), device_ptr<acc_t>(mean, "mean"), device_ptr<acc_t>(logits, "logits"),
        device_ptr<acc_t>(gate, "gate"));
  });
  return {gate, mean, logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
scse_grad_excite(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& logits,
                 const at::Tensor& fc1_weight, const c10::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                 const c10::optional<at::Tensor>& fc2_bias) {
  constexpr const char* op = "scse_grad_excite";
  check_activation(op, x);
  check_pooled_extent(op, x);
  AK_CHECK_SAME(op, x, dy);
  const Layout layout = layout_of(op, x, "x");
  AK_CHECK(layout_of(op, dy, "dy") == layout, op, "argument 'dy' must have the same memory format as 'x'");
  check_channels(op, x, "x");
  const int64_t R = check_scse_weights(op, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, nullptr, nullptr);
  AK_CHECK_STAT(op, mean, x);
  AK_CHECK_PIXEL_STAT(op, logits, x);
  // The MLP's gradients are written in one dtype, fc2_weight's.
  for (const auto& [t, name] : {std::make_pair(&fc1_bias, "fc1_bias"), std::make_pair(&fc2_bias, "fc2_bias")}) {
    AK_CHECK(!t->has_value() || (*t)->scalar_type() == fc2_weight.scalar_type(), op, "argument '", name,
             "' must have fc2_weight's dtype ", fc2_weight.scalar_type(), ", got ", (*t)->scalar_type());
  }
  AK_CHECK(fc1_weight.scalar_type() == fc2_weight.scalar_type(), op,
           "argument 'fc1_weight' must have fc2_weight's dtype ", fc2_weight.scalar_type(), ", got ",
           fc1_weight.scalar_type());
  const DeviceGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto stat_options = mean.options();
  at::Tensor gate = at::empty({N, C}, stat_options);
  at::Tensor cbias = at::empty({N, C}, stat_options);
  at::Tensor dlogits = at::empty({N, HW}, stat_options);
  at::Tensor dlogit_sums = at::empty({N}, stat_options);
  // Gradients in the weights' shapes, dtypes and strides (empty_like keeps a dense tensor's).
  const auto grad_of = [&](const c10::optional<at::Tensor>& w) {
    if (!w.has_value()) return at::empty({0}, stat_options);
    return x.numel() == 0 ? at::zeros_like(*w) : at::empty_like(*w);
  };
  at::Tensor dw1 = grad_of(fc1_weight), db1 = grad_of(fc1_bias), dw2 = grad_of(fc2_weight), db2 = grad_of(fc2_bias);
  if (x.numel() == 0) return {gate, cbias, dlogits, dlogit_sums.zero_(), dw1, db1, dw2, db2};

  const Plan plan = plan_for(x, stat_options.dtype().itemsize());  // the tile holds dy*x in acc_t
  const SampleGrid g = sample_grid(x, plan);
  // The partials of d gc, then the MLP's hidden layer (N, R), dz (N, C) and dh (N, R).
  WorkspaceLayout ws_layout;
  ws_layout.hidden = plan.splits * N * C;
  ws_layout.dz = ws_layout.hidden + N * R;
  ws_layout.dh = ws_layout.dz + N * C;
  at::Tensor workspace = at::empty({ws_layout.dh + N * R}, stat_options);
  const at::Tensor tickets = sample_tickets(x, N);
  const Excitation ex = cse_excitation(fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    launch<scse_grad_excite_kernel<scalar_t, acc_t>>(
        op, N * plan.splits, 1, kThreads, plan.tile_bytes, device_ptr<const scalar_t>(dy, "dy"),
        device_ptr<const scalar_t>(x, "x"), device_ptr<const acc_t>(mean, "mean"),
        device_ptr<const acc_t>(logits, "logits"), ex, g, ws_layout, plan.tile_pixels, layout == Layout::kNHWC,
        device_ptr<acc_t>(workspace, "workspace"), device_ptr<int>(tickets, "tickets"),
        device_ptr<acc_t>(gate, "gate"), device_ptr<acc_t>(cbias, "cbias"), device_ptr<acc_t>(dlogits, "dlogits"),
        device_ptr<acc_t>(dlogit_sums, "dlogit_sums"));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fc2_weight.scalar_type(), op, [&] {
      using w_t = scalar_t;
      const int64_t elements = 2 * C * R + (fc2_bias.has_value() ? C : 0) + (fc1_bias.has_value() ? R : 0);
      const GradStrides strides{dw1.stride(0), dw1.stride(1), fc1_bias.has_value() ? db1.stride(0) : 0,
                                dw2.stride(0), dw2.stride(1), fc2_bias.has_value() ? db2.stride(0) : 0};
      launch<mlp_weight_grad_kernel<acc_t, w_t>>(
          op, (elements + kThreads - 1) / kThreads, 1, kThreads, 0, device_ptr<const acc_t>(mean, "mean"),
          device_ptr<const acc_t>(nullptr, "xmax"), device_ptr<const acc_t>(workspace, "workspace"), ws_layout,
          ex, strides, device_ptr<w_t>(dw1, "dfc1_weight"),
          device_ptr<w_t>(fc1_bias.has_value() ? &db1 : nullptr, "dfc1_bias"), device_ptr<w_t>(dw2, "dfc2_weight"),
          device_ptr<w_t>(fc2_bias.has_value() ? &db2 : nullptr, "dfc2_bias"), N, C);
    });
  });
  return {gate, cbias, dlogits, dlogit_sums, dw1, db1, dw2, db2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scse_apply(
    const at::Tensor& a, const at::Tensor& gate, const at::Tensor& logits, const c10::optional<at::Tensor>& x,
    const c10::optional<at::Tensor>& cbias, const c10::optional<at::Tensor>& dlogits,
    const c10::optional<at::Tensor>& dlogit_sums, const c10::optional<at::Tensor>& sse_weight,
    const c10::optional<at::Tensor>& sse_bias) {
  constexpr const char* op = "scse_apply";
  check_activation(op, a);
  const Layout layout = layout_of(op, a, "a");
  check_channels(op, a, "a");
  AK_CHECK_STAT(op, gate, a);
  AK_CHECK_PIXEL_STAT(op, logits, a);
  const bool grad = x.has_value();
  AK_CHECK(cbias.has_value() == grad && dlogits.has_value() == grad && dlogit_sums.has_value() == grad &&
               sse_weight.has_value() == grad,
           op, "arguments 'x', 'cbias', 'dlogits', 'dlogit_sums' and 'sse_weight' must be all given or all None");
  AK_CHECK(grad || !sse_bias.has_value(), op, "argument 'sse_bias' must be None without 'x'");
  if (grad) {
    AK_CHECK_SAME(op, a, *x);
    AK_CHECK(layout_of(op, *x, "x") == layout, op, "argument 'x' must have the same memory format as 'a'");
    AK_CHECK_STAT(op, *cbias, a);
    AK_CHECK_PIXEL_STAT(op, *dlogits, a);
    AK_CHECK_STAT_SHAPE(op, *dlogit_sums, a, "(N,)", {a.size(0)});
    check_weight(op, *sse_weight, "sse_weight", a, {1, a.size(1), 1, 1}, false);
    if (sse_bias.has_value()) check_weight(op, *sse_bias, "sse_bias", a, {1}, false);
  }
  const DeviceGuard guard(a.device());
  const int64_t N = a.size(0), C = a.size(1);
  at::Tensor out = at::empty_like(a);
  // Gradients in the weights' shapes, dtypes and strides; empty where not asked for.
  const auto grad_of = [&](const c10::optional<at::Tensor>& w) {
    if (!grad || !w.has_value()) return at::empty({0}, gate.options());
    return a.numel() == 0 ? at::zeros_like(*w) : at::empty_like(*w);
  };
  at::Tensor dsse_weight = grad_of(sse_weight), dsse_bias = grad_of(sse_bias);
  if (a.numel() == 0) return {out, dsse_weight, dsse_bias};

  const Plan plan = plan_for(a, a.element_size());
  const SampleGrid g = sample_grid(a, plan);
  at::Tensor part_dw = at::empty({grad ? plan.splits * N * C : 0}, gate.options());
  const at::Tensor tickets = sample_tickets(a, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto run = [&](auto kernel, size_t shared_bytes) {
      launch<decltype(kernel)::value>(
          op, N * plan.splits, 1, kThreads, shared_bytes, device_ptr<const scalar_t>(a, "a"),
          device_ptr<const acc_t>(gate, "gate"), device_ptr<const acc_t>(logits, "logits"),
          device_ptr<const scalar_t>(grad ? &*x : nullptr, "x"),
          device_ptr<const acc_t>(grad ? &*cbias : nullptr, "cbias"),
          device_ptr<const acc_t>(grad ? &*dlogits : nullptr, "dlogits"),
          device_ptr<const acc_t>(grad ? &*dlogit_sums : nullptr, "dlogit_sums"),
          grad ? weight_ref(sse_weight, "sse_weight", 1) : Weight{}, g, plan.tile_pixels, layout == Layout::kNHWC,
          device_ptr<scalar_t>(out, "out"), device_ptr<acc_t>(grad ? &part_dw : nullptr, "part_dw"),
          device_ptr<int>(tickets, "tickets"), grad_out(grad ? &dsse_weight : nullptr, "dsse_weight", 1),
          grad_out(grad && sse_bias.has_value() ? &dsse_bias : nullptr, "dsse_bias", 0));
    };
    if (grad) {
      run(Kernel<scse_apply_kernel<scalar_t, acc_t, true>>{}, plan.tile_bytes);
    } else {
      run(Kernel<scse_apply_kernel<scalar_t, acc_t, false>>{}, 0);  // nothing staged
    }
  });
  return {out, dsse_weight, dsse_bias};
}

AK_LIBRARY_IMPL(AK_LIBRARY, AK_DISPATCH_KEY, m) {
  m.impl("scse_pool_excite", &scse_pool_excite);
  m.impl("scse_grad_excite", &scse_grad_excite);
  m.impl("scse_apply", &scse_apply);
}

}  // namespace attn_kernels
