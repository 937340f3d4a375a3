"""The CPU emulation of the CUDA kernels (csrc/emulation/): that it catches what it claims to,
and the CUDA kernels' own edges (splits, launch limits, argument checks) that the block tests,
which run every kernel backend through `kernel_backend`, do not reach.

The emulation is built by scripts/test.sh (ATTN_KERNELS_BUILD_EMULATION=1); elsewhere these
tests skip with the reason.
"""
import pytest
import torch

from conftest import HAS_GPU, require_cpu_backend
from helpers import make_x

LAYOUTS = ["nchw", "channels_last"]

pytestmark = pytest.mark.skipif(HAS_GPU, reason="the emulation runs CUDA kernels on CPU tensors, for machines without a GPU")


@pytest.fixture(scope="module")
def ops():
    require_cpu_backend("cuda")
    from attn_kernels import _emulated  # noqa: F401

    return torch.ops.attn_kernels_emulated


# ---- what the emulation catches ---------------------------------------------------------------

def test_defect_free_kernel_runs(ops):
    x = torch.arange(100, dtype=torch.float32)
    assert torch.equal(ops._selftest("copy", x), x)


@pytest.mark.parametrize("name, message", [
    ("overrun", r"out-of-bounds access to 'x'\[100\]: 'x' has 100 elements \[in overrun_kernel, block \(1, 0, 0\), "
                r"thread \(36, 0, 0\)\]"),
    ("misaligned", r"misaligned address to 'x'\[1..4\]: a 16-byte access"),
    ("missing_barrier", r"race: 'out'\[0\] differs between thread orders forward and reverse"),
    ("divergent_barrier", r"__syncthreads\(\) at selftest.cpp:\d+ reached by 32 of 64 threads; the other 32 have exited"),
    ("shuffle_exited_lane", r"__shfl_xor_sync at common.cuh:\d+ with mask 4294967295: lane 16 named in the mask has exited"),
    ("grid_y_too_large", r"invalid configuration argument .*grid \(1, 65536, 1\) exceeds \(2147483647, 65535, 65535\)"),
    ("block_too_large", r"invalid configuration argument .*block \(2048, 1, 1\) is not within"),
    ("too_much_shared_memory", r"invalid configuration argument .*49153 bytes of dynamic shared memory exceed"),
])
def test_defect_is_caught(ops, name, message):
    with pytest.raises(RuntimeError, match=message):
        ops._selftest(name, torch.arange(100, dtype=torch.float32))
    # The emulation is usable again after a failed launch.
    assert torch.equal(ops._selftest("copy", torch.ones(3)), torch.ones(3))


def test_thread_orders_are_a_parameter(ops, monkeypatch):
    x = torch.arange(100, dtype=torch.float32)
    monkeypatch.setenv("ATTN_KERNELS_EMULATION_ORDERS", "random:1,random:2,reverse")
    assert torch.equal(ops._selftest("copy", x), x)
    with pytest.raises(RuntimeError, match=r"race: 'out'\[\d+\] differs between thread orders random:1 and random:2"):
        ops._selftest("missing_barrier", x)
    monkeypatch.setenv("ATTN_KERNELS_EMULATION_ORDERS", "sideways")
    with pytest.raises(RuntimeError, match="unknown thread order 'sideways'"):
        ops._selftest("copy", x)


# ---- the CUDA kernels' own paths ------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_reductions_split_over_hw(ops, layout, poisoned):
    """Sizes where the CUDA reduction splits H*W (NCHW: over 512 elements a split; NHWC: over 64
    pixels) and the partial results are combined; exact in float64."""
    x = make_x((1, 3, 41, 43), torch.float64, layout=layout, kind="quantized")
    dy = make_x((1, 3, 41, 43), torch.float64, layout=layout, seed=2)
    mean, xmax = ops.channel_pool(x, True)
    torch.testing.assert_close(mean, x.mean((2, 3)), rtol=0, atol=1e-14)
    assert torch.equal(xmax, x.amax((2, 3)))
    dot, ties, _ = ops.channel_grad_reduce(dy, x, xmax, False)
    torch.testing.assert_close(dot, (dy * x).sum((2, 3)), rtol=0, atol=1e-12)
    assert torch.equal(ties, (x == xmax[:, :, None, None]).sum((2, 3)).double())
    dot, _, dy_sum = ops.channel_grad_reduce(dy, x, None, True)
    torch.testing.assert_close(dy_sum, dy.sum((2, 3)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_pool_over_many_tiles_and_splits(ops, layout, poisoned):
    """Enough pixels per sample that each block walks several tiles and H*W is split: the online
    softmax rescales across tiles and the host combines the splits; with peaked logits."""
    N, C = 64, 5
    x = make_x((N, C, 32, 32), torch.float64, layout=layout)
    weight, bias = torch.randn(C, dtype=torch.float64) * 20, torch.randn(1, dtype=torch.float64)
    context, lse = ops.attention_pool(x, weight, bias)
    logits = torch.einsum("nchw,c->nhw", x, weight).reshape(N, -1) + bias
    expected = torch.einsum("ncp,np->nc", x.reshape(N, C, -1), logits.softmax(-1))
    torch.testing.assert_close(context, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, logits.logsumexp(-1), rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scse_primitives_over_many_tiles_and_splits(ops, layout, poisoned):
    """scSE's pixel tile (csrc/scse.cu) where each block walks several tiles and H*W is split: the
    per-pixel logits and d logits, the mean and d gc folded over the splits by each sample's last
    block, and the backward's d sse_weight and d sse_bias folded by the apply's last block; exact to
    rounding in float64 against the formulas written out."""
    N, C, HW = 64, 5, 32 * 32
    x = make_x((N, C, 32, 32), torch.float64, layout=layout)
    dy = make_x((N, C, 32, 32), torch.float64, layout=layout, seed=1)
    g = torch.Generator().manual_seed(0)
    w1, b1, w2, b2, sw, sb = (torch.randn(shape, generator=g, dtype=torch.float64)
                              for shape in ((2, C, 1, 1), (2,), (C, 2, 1, 1), (C,), (1, C, 1, 1), (1,)))
    pixel = lambda v: v.reshape(N, 1, 32, 32)  # noqa: E731
    channel = lambda v: v[:, :, None, None]  # noqa: E731

    gate, mean, logits = ops.scse_pool_excite(x, w1, b1, w2, b2, sw, sb)
    torch.testing.assert_close(mean, x.mean((2, 3)), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(logits, (x * sw).sum(1).reshape(N, HW) + sb, rtol=1e-13, atol=1e-12)
    m = mean.clone().requires_grad_()
    gc = torch.sigmoid(torch.relu(m @ w1[:, :, 0, 0].t() + b1) @ w2[:, :, 0, 0].t() + b2)
    torch.testing.assert_close(gate, gc.detach(), rtol=1e-13, atol=1e-13)
    gs = logits.sigmoid()
    y, dsw, dsb = ops.scse_apply(x, gate, logits, None, None, None, None, None, None)
    torch.testing.assert_close(y, x * (channel(gate) + pixel(gs)), rtol=1e-13, atol=1e-13)
    assert y.stride() == x.stride() and dsw.numel() == 0 and dsb.numel() == 0

    gate2, cbias, dlogits, dlogit_sums, *_ = ops.scse_grad_excite(dy, x, mean, logits, w1, b1, w2, b2)
    assert torch.equal(gate2, gate)
    torch.testing.assert_close(dlogits, (dy * x).sum(1).reshape(N, HW) * gs * (1 - gs), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(dlogit_sums, dlogits.sum(1), rtol=1e-13, atol=1e-12)
    gc.backward((dy * x).sum((2, 3)))
    torch.testing.assert_close(cbias, m.grad / HW, rtol=1e-12, atol=1e-13)
    dx, dsw, dsb = ops.scse_apply(dy, gate, logits, x, cbias, dlogits, dlogit_sums, sw, sb)
    expected = dy * (channel(gate) + pixel(gs)) + channel(cbias) + pixel(dlogits) * sw
    torch.testing.assert_close(dx, expected, rtol=1e-13, atol=1e-12)
    assert dx.stride() == x.stride()
    torch.testing.assert_close(dsw, (x * pixel(dlogits)).sum((0, 2, 3)).reshape(1, C, 1, 1), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(dsb, dlogit_sums.sum().reshape(1), rtol=1e-13, atol=1e-12)
    assert not ops._sample_tickets().any()


@pytest.mark.parametrize("N", [65535, 65536])
def test_attention_pool_at_the_grid_limit(ops, N, monkeypatch, poisoned):
    """One block per sample and split: N at and past 65535, the limit of a grid's y and z
    dimensions (samples run along x, whose limit is 2^31 - 1). The launch is validated whole; only
    the first and last blocks run (ATTN_KERNELS_EMULATION_GRID=edges), and their samples are
    checked, forward and backward."""
    monkeypatch.setenv("ATTN_KERNELS_EMULATION_GRID", "edges")
    edges = [0, 1, N - 2, N - 1]
    x = make_x((N, 2, 1, 1), torch.float64)
    weight, bias = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64)
    context, lse = ops.attention_pool(x, weight, bias)
    torch.testing.assert_close(context[edges], x.reshape(N, 2)[edges])  # one pixel: the softmax is 1
    torch.testing.assert_close(lse[edges], (x.reshape(N, 2) @ weight + bias)[edges])
    dy = make_x((N, 2, 1, 1), torch.float64, seed=1)
    dcontext = make_x((N, 2, 1, 1), torch.float64, seed=2).reshape(N, 2)
    dx, _ = ops.attention_pool_backward(dy, x, None, context, dcontext, weight, bias, lse)
    torch.testing.assert_close(dx[edges], (dy + dcontext.reshape(N, 2, 1, 1))[edges])  # the softmax's gradient is 0
    assert dx[2:N - 2].isnan().all()  # the blocks that did not run left their output poisoned


def test_inputs_past_the_grids_limits_fall_back_with_a_reason(ops):
    """From 2^34 elements the per-channel reduction's grid could pass 2^31 - 1 blocks: such an
    input goes to another backend, with the reason (a zero-stride view stands in for 64 GB)."""
    from attn_kernels import backends

    huge = torch.empty(1, 1, 1, 1).expand(2**17, 2**17, 1, 1)
    assert "fewer than 2^34" in backends.unavailable_reason("cuda", huge)
    assert backends.unavailable_reason("cuda", torch.empty(2, 3, 4, 4)) is None
