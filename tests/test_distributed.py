"""Several processes (gloo on localhost; tests/helpers.run_in_processes spawns them, each test
bounded in time): the fused blocks' synchronized BatchNorm against one process that sees the whole
batch.

PyTorch's own nn.SyncBatchNorm refuses CPU tensors, so here the processes run the fused blocks
without a DDP wrapper and all-reduce the parameter gradients themselves; each loss is the sum of
y * dy over the process's share, so the gradients of the shares add up to the whole batch's.
"""
import contextlib
import copy
import os

import pytest
import torch
from torch import nn

import attn_kernels
from attn_kernels import batch_norm
from conftest import require_cpu_backend
from helpers import init_process_group, make_x, randomized, run_in_processes

# One pytest-xdist worker runs them all (scripts/test.sh: --dist loadgroup), so the module's
# spawned processes run once and two of them at a time.
pytestmark = pytest.mark.xdist_group("distributed")

WORLD = 2
N = 5  # the whole batch; the shares below split it among the processes
SHARES = {"even": None, "uneven": (4, 1), "empty": (5, 0), "compiled": None}  # compiled: torch.compile, even shares
SHAPE = (N, 8, 5, 6)


def make_block(block):
    """(a float64 module with random weights and BatchNorm affine parameters, its BatchNorm)."""
    torch.manual_seed(0)
    if block == "cbam":
        module = attn_kernels.FusedCBAM(8, rd_ratio=0.25)
        bn = module.spatial.conv.bn
    elif block == "spatial_attn":
        module = attn_kernels.FusedSpatialAttn()
        bn = module.conv.bn
    else:  # "sk": the whole block; its branches' BatchNorms in eval, only the attention's converted (below)
        module = attn_kernels.FusedSelectiveKernel(8, rd_channels=4)
        bn = module.attn.bn
    module = randomized(module).double().train()
    if block == "sk":
        module.paths.eval()
    return module, bn


def convert(module, block):
    """The block with its fused BatchNorm an nn.SyncBatchNorm. SK's branches keep plain BatchNorms
    (in eval: per-process statistics would differ from the whole batch's): they are timm's
    ConvNormAct, outside the fused op, and nn.SyncBatchNorm does not run on CPU."""
    if block == "sk":
        module.attn = nn.SyncBatchNorm.convert_sync_batchnorm(module.attn)
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def bounds(shares, rank):
    shares = shares or [N // WORLD + (r < N % WORLD) for r in range(WORLD)]
    start = sum(shares[:rank])
    return start, start + shares[rank]


def state(module):
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


CASES = [(block, backend, split) for block, backends in
         (("cbam", ("reference", "cuda", "triton")), ("spatial_attn", ("cuda",)), ("sk", ("reference", "triton")))
         for backend in backends for split in SHARES if split != "compiled"] + [("cbam", "cuda", "compiled")]


def sync_bn_worker(rank, world_size, port, out_dir, cases):
    import torch.distributed as dist

    init_process_group(rank, world_size, port)
    results = {}
    for block, backend, split in cases:
        module, _ = make_block(block)
        module = convert(module, block)
        x, dy = make_x(SHAPE, torch.float64, kind="relu"), make_x(SHAPE, torch.float64, seed=1)
        start, end = bounds(SHARES[split], rank)
        x_share = x[start:end].clone().requires_grad_()
        run = module
        if split == "compiled":  # fullgraph: the synchronization traces without a graph break
            torch._dynamo.reset()
            run = torch.compile(module, fullgraph=True, backend="aot_eager")
        with attn_kernels.use_backend(backend):
            choice = module.dispatch(x_share).backend
            y = run(x_share)
        y.backward(dy[start:end])
        g = grads(module)
        for t in g.values():
            dist.all_reduce(t)  # data parallelism's reduction of the parameter gradients
        results[(block, backend, split)] = {"y": y.detach(), "dx": x_share.grad, "grads": g, "state": state(module),
                                            "backend": choice}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def results_of(worker, out_dir, *args):
    """Runs worker(rank, world_size, port, out_dir, *args) in WORLD processes, each saving its
    results to out_dir/rank<rank>.pt; returns them, rank by rank."""
    run_in_processes(worker, WORLD, out_dir, *args)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def sync_bn_results(tmp_path_factory):
    """Every case run once in WORLD processes (spawning them costs seconds): rank -> case -> results."""
    return results_of(sync_bn_worker, str(tmp_path_factory.mktemp("sync_bn")), CASES)


@pytest.mark.parametrize("block, backend, split", CASES, ids=lambda v: str(v))
def test_sync_batch_norm_matches_the_whole_batch(sync_bn_results, block, backend, split):
    """Outputs, x's gradient, every parameter's gradient (summed over the processes), the running
    statistics and num_batches_tracked equal those of one process with the whole batch and a plain
    BatchNorm2d, in float64."""
    if backend != "reference":
        require_cpu_backend(backend)
    module, _ = make_block(block)
    x, dy = make_x(SHAPE, torch.float64, kind="relu"), make_x(SHAPE, torch.float64, seed=1)
    x.requires_grad_()
    with attn_kernels.use_backend("reference"):
        y = module(x)
    y.backward(dy)
    ranks = [r[(block, backend, split)] for r in sync_bn_results]
    got_y = torch.cat([r["y"] for r in ranks])
    got_dx = torch.cat([r["dx"] for r in ranks])
    close = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_y, y.detach(), **close, msg="y")
    torch.testing.assert_close(got_dx, x.grad, **close, msg="dx")
    want_grads, want_state = grads(module), state(module)
    for rank, r in enumerate(ranks):
        start, end = bounds(SHARES[split], rank)
        if end > start:  # a process with an empty share falls back on the reference: say nothing of it
            assert r["backend"] == backend, r["backend"]
        assert r["grads"].keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(r["grads"][name], want_grads[name], **close, msg=name)
        assert r["state"].keys() == want_state.keys()
        for name in want_state:  # running statistics and num_batches_tracked too
            torch.testing.assert_close(r["state"][name], want_state[name], **close, msg=name)


def test_group_name_is_empty_without_a_process_group():
    """Without torch.distributed initialized (or in eval) a SyncBatchNorm inside a fused block
    normalizes as BatchNorm2d does."""
    module, bn = make_block("cbam")
    plain = copy.deepcopy(module)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    assert isinstance(synced.spatial.conv.bn, nn.SyncBatchNorm)
    assert batch_norm.group_name(synced.spatial.conv.bn) == ""
    x = make_x(SHAPE, torch.float64)
    for train in (True, False):
        plain.train(train), synced.train(train)
        torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)


def test_patch_report_names_the_synchronized_batch_norms():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, block_args={"attn_layer": "cbam"}, num_classes=4)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(attn_kernels.patch(model))
    report = attn_kernels.patch_report(model)
    assert len(report.with_status("patched")) == 8
    for entry in report.with_status("patched"):
        assert entry.detail.endswith("; synchronized BatchNorm (spatial.conv.bn): in training, the statistics of "
                                     "its process group"), entry
    assert "synchronized" not in str(attn_kernels.patch_report(attn_kernels.patch(
        timm.create_model("resnet18", pretrained=False, block_args={"attn_layer": "cbam"}, num_classes=4))))


# ---- DistributedDataParallel: a step on shares of the batch equals a step on the whole batch ----

IMAGE = (4, 3, 16, 16)  # the whole batch; each of the WORLD processes takes an equal share
DDP_VARIANTS = ("plain", "static_graph", "small_buckets", "no_sync")
DDP_CASES = [("fused", torch.float64, "reference", v) for v in DDP_VARIANTS] + [
    ("timm_cbam", torch.float64, "reference", "plain")] + [
    (model, torch.float32, backend, "plain") for model in ("fused", "timm_cbam") for backend in ("triton", "cuda")] + [
    ("fused", torch.float32, "cuda", "compile")]  # DDP(torch.compile(model, fullgraph=True))


def make_model(name, dtype):
    """A patched timm model or a model built from the drop-ins, its BatchNorms outside the fused
    blocks in eval (per-process batch statistics would differ from the whole batch's)."""
    torch.manual_seed(0)
    if name == "timm_cbam":
        import timm

        model = attn_kernels.patch(timm.create_model("resnet18", pretrained=False, num_classes=4,
                                                     block_args={"attn_layer": "cbam"}))
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), attn_kernels.FusedSE(16), nn.ReLU(), attn_kernels.FusedECA(16),
            attn_kernels.FusedGC(16), nn.Conv2d(16, 16, 3, padding=1), attn_kernels.FusedCBAM(16, rd_ratio=0.25),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
        )
    model = model.to(dtype).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and not isinstance(m, nn.SyncBatchNorm):
            m.eval()
    return model


def batch(dtype, micro_step=0):
    g = torch.Generator().manual_seed(micro_step)
    return torch.randn(IMAGE, generator=g, dtype=torch.float64).to(dtype), torch.randint(4, (IMAGE[0],), generator=g)


def train_step(model, backend, micro_batches, wrap=None, share=slice(None)):
    """One SGD step over the micro-batches (gradients accumulated), the model wrapped by `wrap`
    (DDP) or not; returns (gradients, parameters after the step)."""
    run = wrap(model) if wrap else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with attn_kernels.use_backend(backend):
        for i, (x, labels) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            context = run.no_sync() if wrap and not last else contextlib.nullcontext()
            with context:
                loss = torch.nn.functional.cross_entropy(run(x[share]), labels[share])
                loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def ddp_worker(rank, world_size, port, out_dir, cases):
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_process_group(rank, world_size, port)
    share = slice(rank * IMAGE[0] // world_size, (rank + 1) * IMAGE[0] // world_size)
    results = {}
    for model_name, dtype, backend, variant in cases:
        options = {"static_graph": {"static_graph": True}, "small_buckets": {"bucket_cap_mb": 0.004}}.get(variant, {})
        micro = [batch(dtype, i) for i in range(2 if variant == "no_sync" else 1)]
        wrap = lambda m: DDP(m, **options)  # noqa: E731
        if variant == "compile":
            # fullgraph=True raises at any graph break in the model, the fused blocks included.
            # (torch.compile(DDP(model)) also runs; it breaks in DDP's own forward, PyTorch's code.)
            torch._dynamo.reset()
            wrap = lambda m: DDP(torch.compile(m, fullgraph=True, backend="aot_eager"))  # noqa: E731
        results[(model_name, dtype, backend, variant)] = train_step(
            make_model(model_name, dtype), backend, micro, wrap=wrap, share=share)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return results_of(ddp_worker, str(tmp_path_factory.mktemp("ddp")), DDP_CASES)


@pytest.mark.parametrize("model_name, dtype, backend, variant", DDP_CASES, ids=lambda v: str(v))
def test_ddp_step_matches_one_process(ddp_results, model_name, dtype, backend, variant):
    """Every process's gradients (DDP's average of the shares') and parameters after one SGD step
    equal those of one process stepping on the whole batch, with the same backend and dtype: to
    float64 rounding, and in float32 to the rounding of the different summation order (shares
    first) that data parallelism implies."""
    if backend != "reference":
        require_cpu_backend(backend)
    micro = [batch(dtype, i) for i in range(2 if variant == "no_sync" else 1)]
    # The whole batch's loss is the mean of the shares' means: accumulate over them as DDP does.
    want_grads, want_params = train_step(make_model(model_name, dtype), backend, micro)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-6)
    for rank, result in enumerate(ddp_results):
        grads, params = result[(model_name, dtype, backend, variant)]
        assert grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=rtol, atol=atol, msg=f"rank {rank} d {name}")
            torch.testing.assert_close(params[name], want_params[name], rtol=rtol, atol=atol, msg=f"rank {rank} {name}")


# ---- FSDP2 (fully_shard): a sharded step equals one process's; state_dicts round-trip ----

FSDP_MODELS = ("fused", "timm_cbam")


def fsdp_worker(rank, world_size, port, out_dir, model_name):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    init_process_group(rank, world_size, port)

    def sharded_model():
        """Sharded per block: each fused block of the model built from them; each residual block
        of the timm ResNet's stages (its fused CBAM inside)."""
        model = make_model(model_name, torch.float64)
        if model_name == "fused":
            blocks = [m for m in model if isinstance(m, attn_kernels.nn.FusedModule)]
        else:
            blocks = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
        for block in blocks:
            fully_shard(block)
        return fully_shard(model)

    full = StateDictOptions(full_state_dict=True)
    model = sharded_model()
    share = slice(rank * IMAGE[0] // world_size, (rank + 1) * IMAGE[0] // world_size)
    x, labels = batch(torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with attn_kernels.use_backend("reference"):
        torch.nn.functional.cross_entropy(model(x[share]), labels[share]).backward()
    optimizer.step()
    stepped = get_model_state_dict(model, options=full)
    # Round trips into freshly built sharded models: the sharded state_dict (each rank its shards)
    # and the full one.
    from_sharded, from_full = sharded_model(), sharded_model()
    from_sharded.load_state_dict(model.state_dict())
    set_model_state_dict(from_full, stepped, options=full)
    def plain(state_dict):  # full tensors, not DTensors, whichever the state_dict API returns
        return {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in state_dict.items()}

    torch.save({"stepped": plain(stepped), "from_sharded": plain(get_model_state_dict(from_sharded, options=full)),
                "from_full": plain(get_model_state_dict(from_full, options=full))},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("model_name", FSDP_MODELS)
def test_fsdp2_step_and_state_dict_round_trips(tmp_path, model_name):
    """The parameters after a sharded step, and after loading them into freshly sharded models from
    the sharded and from the full state_dict, equal one process's step on the whole batch."""
    results = results_of(fsdp_worker, str(tmp_path), model_name)
    _, want = train_step(make_model(model_name, torch.float64), "reference", [batch(torch.float64)])
    for rank, result in enumerate(results):
        for key in ("stepped", "from_sharded", "from_full"):
            got = {name: t for name, t in result[key].items() if name in want}
            assert got.keys() == want.keys(), key
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=f"rank {rank} {key} {name}")
