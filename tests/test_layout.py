"""Dispatch layout: the torch reference against a brute-force definition (CPU), the kernel against
the reference (GPU, eager and CUDA-graph replay), input validation, and offline loading of cubins
precompiled on a CPU-only machine."""
import os
from pathlib import Path

import pytest
import torch

from epkern import get_dispatch_layout
from epkern.codegen import compiler, jit, runtime
from epkern.deployment import Deployment
from epkern.layout import MAX_RANKS, LayoutSpec, _Workspace, deployment_specs, layout_reference

REPO = Path(__file__).resolve().parents[1]


def brute_force(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """The definition, one token and one slot at a time."""
    experts_per_rank = num_experts // num_ranks
    per_rank = [0] * num_ranks
    per_expert = [0] * num_experts
    in_rank = [[False] * num_ranks for _ in range(topk_idx.shape[0])]
    for t, row in enumerate(topk_idx.tolist()):
        ranks = set()
        for e in row:
            if e >= 0:
                per_expert[e] += 1  # every top-k occurrence counts
                ranks.add(e // experts_per_rank)
        for r in ranks:  # a token counts once per rank it reaches
            in_rank[t][r] = True
            per_rank[r] += 1
    return (torch.tensor(per_rank, dtype=torch.int32), torch.tensor(per_expert, dtype=torch.int32),
            torch.tensor(in_rank, dtype=torch.bool).reshape(topk_idx.shape[0], num_ranks))


def random_topk(num_tokens, num_topk, num_experts, seed=0, p_none=0.1, unique=True, device="cpu"):
    """Random routing: distinct experts per row (or repeats allowed), some slots -1."""
    g = torch.Generator().manual_seed(seed)
    if unique and num_topk <= num_experts:
        idx = torch.rand(num_tokens, num_experts, generator=g).argsort(dim=1)[:, :num_topk]
    else:
        idx = torch.randint(0, num_experts, (num_tokens, num_topk), generator=g)
    idx = idx.to(torch.int64).contiguous()
    idx[torch.rand(num_tokens, num_topk, generator=g) < p_none] = -1
    return idx.to(device)


def edge_inputs(num_experts, num_topk):
    """Named edge cases for one (E, K)."""
    return {
        "0 tokens": torch.empty(0, num_topk, dtype=torch.int64),
        "1 token": random_topk(1, num_topk, num_experts, seed=1, p_none=0.0),
        "all -1": torch.full((37, num_topk), -1, dtype=torch.int64),
        "one expert": torch.full((53, num_topk), num_experts - 1, dtype=torch.int64),
        "expert 0 only": torch.zeros(19, num_topk, dtype=torch.int64),
        "duplicates in rows": random_topk(64, num_topk, max(1, num_experts // 8), seed=2, unique=False),
        "last expert and -1": torch.tensor([[num_experts - 1] + [-1] * (num_topk - 1)] * 5, dtype=torch.int64),
    }


def assert_layout_equal(got, want):
    names = ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank")
    for name, g, w in zip(names, got, want):
        g = g.cpu()
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype}, expected {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        assert torch.equal(g, w), f"{name} differs at {torch.nonzero(g != w)[:5].tolist()}"


# -- CPU: reference vs definition -----------------------------------------------------------------
RANDOM_CASES = [  # (tokens, top-k, experts, ranks)
    (1000, 8, 256, 8), (777, 8, 256, 2), (500, 6, 60, 5), (300, 4, 64, 64), (257, 1, 7, 1),
    (400, 16, 160, 10), (129, 9, 126, 63), (64, 12, 24, 3),
]


@pytest.mark.parametrize("num_tokens, num_topk, num_experts, num_ranks", RANDOM_CASES)
def test_reference_matches_definition_on_random_inputs(num_tokens, num_topk, num_experts, num_ranks):
    for seed in range(3):
        topk = random_topk(num_tokens, num_topk, num_experts, seed=seed, unique=seed != 2)
        want = brute_force(topk, num_experts, num_ranks)
        assert_layout_equal(get_dispatch_layout(topk, num_experts, num_ranks), want)
        assert_layout_equal(layout_reference(topk, num_experts, num_ranks), want)


@pytest.mark.parametrize("num_experts, num_ranks, num_topk", [(256, 8, 8), (60, 6, 4), (64, 64, 3), (8, 1, 2)])
def test_reference_matches_definition_on_edge_inputs(num_experts, num_ranks, num_topk):
    for name, topk in edge_inputs(num_experts, num_topk).items():
        want = brute_force(topk, num_experts, num_ranks)
        try:
            assert_layout_equal(get_dispatch_layout(topk, num_experts, num_ranks), want)
        except AssertionError as exc:
            raise AssertionError(f"edge case {name!r}: {exc}") from None


def test_known_small_example():
    # 4 experts on 2 ranks (experts 0-1 on rank 0, 2-3 on rank 1)
    topk = torch.tensor([[0, 1], [1, 3], [-1, -1], [2, 2]], dtype=torch.int64)
    per_rank, per_expert, in_rank = get_dispatch_layout(topk, 4, 2)
    assert per_rank.tolist() == [2, 2]
    assert per_expert.tolist() == [1, 2, 2, 1]
    assert in_rank.tolist() == [[True, False], [True, True], [False, False], [False, True]]


# -- input validation -----------------------------------------------------------------------------
GOOD = torch.zeros(4, 2, dtype=torch.int64)


@pytest.mark.parametrize("args, error, pattern", [
    ((GOOD.to(torch.int32), 8, 2), TypeError, r"topk_idx: dtype torch.int32 not supported; expected torch.int64"),
    ((GOOD.float(), 8, 2), TypeError, r"topk_idx: dtype"),
    ((GOOD.flatten(), 8, 2), ValueError, r"topk_idx: expected a 2-D tensor"),
    ((GOOD.reshape(2, 2, 2), 8, 2), ValueError, r"topk_idx: expected a 2-D tensor"),
    ((torch.zeros(4, 0, dtype=torch.int64), 8, 2), ValueError, r"topk_idx: needs at least one column"),
    ((torch.zeros(4, 4, dtype=torch.int64)[:, ::2], 8, 2), ValueError, r"topk_idx: must be contiguous"),
    ((GOOD.tolist(), 8, 2), TypeError, r"topk_idx: expected a torch.Tensor"),
    ((GOOD + 8, 8, 2), ValueError, r"topk_idx: value 8 out of range; allowed values are in \[-1, 8\)"),
    ((GOOD - 2, 8, 2), ValueError, r"topk_idx: value -2 out of range; allowed values are in \[-1, 8\)"),
    ((GOOD, 10, 4), ValueError, r"num_experts=10 must be divisible by num_ranks=4"),
    ((GOOD, 130, MAX_RANKS + 1), ValueError, rf"num_ranks={MAX_RANKS + 1}: at most {MAX_RANKS} ranks"),
    ((GOOD, 8, 0), ValueError, r"num_ranks=0: expected an int >= 1"),
    ((GOOD, 0, 1), ValueError, r"num_experts=0: expected an int >= 1"),
    ((GOOD, 8.0, 2), ValueError, r"num_experts=8.0"),
])
def test_invalid_inputs_are_rejected(args, error, pattern):
    with pytest.raises(error, match=pattern):
        get_dispatch_layout(*args)


def test_value_check_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("EPKERN_CHECK_VALUES", "0")
    get_dispatch_layout(GOOD, 8, 2)  # in range: runs; out-of-range ids are then the caller's promise


# -- GPU: the kernel against the reference --------------------------------------------------------
GPU_CASES = [  # (tokens, top-k, experts, ranks)
    (4096, 8, 256, 2), (4096, 8, 256, 8), (4096, 8, 256, 4), (1000, 8, 256, 16), (1000, 8, 256, 32),
    (1000, 8, 256, 64), (999, 6, 60, 3), (999, 6, 60, 5), (999, 6, 60, 6), (500, 12, 120, 12),
    (500, 9, 126, 63), (300, 4, 48, 24), (300, 4, 40, 40), (300, 2, 7, 1), (100000, 8, 256, 8),
    (100000, 8, 256, 2), (100000, 16, 160, 10), (131 * 256 + 17, 8, 256, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens, num_topk, num_experts, num_ranks", GPU_CASES)
def test_kernel_matches_reference(num_tokens, num_topk, num_experts, num_ranks):
    for seed in range(2):
        topk = random_topk(num_tokens, num_topk, num_experts, seed=seed, unique=seed == 0)
        want = layout_reference(topk, num_experts, num_ranks)
        got = get_dispatch_layout(topk.cuda(), num_experts, num_ranks)
        assert_layout_equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("num_experts, num_ranks, num_topk", [(256, 8, 8), (256, 2, 8), (60, 6, 4), (64, 64, 3),
                                                              (8, 1, 2)])
def test_kernel_on_edge_inputs(num_experts, num_ranks, num_topk):
    for name, topk in edge_inputs(num_experts, num_topk).items():
        want = brute_force(topk, num_experts, num_ranks)
        try:
            assert_layout_equal(get_dispatch_layout(topk.cuda(), num_experts, num_ranks), want)
        except AssertionError as exc:
            raise AssertionError(f"edge case {name!r}: {exc}") from None


@pytest.mark.gpu
def test_kernel_repeats_and_side_streams():
    """The last-block ticket resets itself: back-to-back launches on two streams stay correct."""
    topks = [random_topk(3000, 8, 256, seed=s, device="cuda") for s in range(4)]
    side = torch.cuda.Stream()
    torch.cuda.synchronize()  # the inputs were copied on the default stream
    for stream in (torch.cuda.current_stream(), side, torch.cuda.current_stream()):
        with torch.cuda.stream(stream):
            outs = [get_dispatch_layout(t, 256, 8) for t in topks]
        stream.synchronize()
        for t, got in zip(topks, outs):
            assert_layout_equal(got, layout_reference(t.cpu(), 256, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens, num_ranks", [(4096, 2), (4096, 8), (777, 6), (0, 8)])
def test_kernel_under_cuda_graph(num_tokens, num_ranks):
    num_experts, num_topk = 240, 8
    static = random_topk(num_tokens, num_topk, num_experts, seed=0, device="cuda")
    get_dispatch_layout(static, num_experts, num_ranks)  # compile and load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = get_dispatch_layout(static, num_experts, num_ranks)
    for seed in (1, 2, 3, 3):
        fresh = random_topk(num_tokens, num_topk, num_experts, seed=seed, unique=seed != 2, device="cuda")
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert_layout_equal(outputs, layout_reference(fresh.cpu(), num_experts, num_ranks))
    # eager launches still agree after the replays
    assert_layout_equal(get_dispatch_layout(static, num_experts, num_ranks),
                        layout_reference(static.cpu(), num_experts, num_ranks))


@pytest.mark.gpu
def test_workspace_first_made_during_capture_is_zeroed_by_each_graph():
    """The last-block ticket first allocated inside a capture may hold anything (recycled pool memory)
    until an eager launch zeroes it: every graph captured meanwhile must zero it itself."""
    num_experts, num_ranks, num_topk = 40, 5, 3  # a spec no other test uses on this stream
    inputs = [random_topk(1000, num_topk, num_experts, seed=s, device="cuda") for s in range(2)]
    get_dispatch_layout(inputs[0], num_experts, num_ranks)  # compile and load outside the capture
    torch.cuda.synchronize()
    capture_stream = torch.cuda.Stream()
    graphs, outputs = [], []
    for x in inputs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture_stream):
            outputs.append(get_dispatch_layout(x, num_experts, num_ranks))
        graphs.append(graph)
    spec = LayoutSpec(num_experts=num_experts, num_ranks=num_ranks, num_topk=num_topk)
    ws = _Workspace._cache[(spec, inputs[0].device.index, capture_stream.cuda_stream)]
    for i in (1, 0, 1):
        ws.ticket.fill_(7)  # garbage, as recycled memory may hold
        graphs[i].replay()
        torch.cuda.synchronize()
        assert_layout_equal(outputs[i], layout_reference(inputs[i].cpu(), num_experts, num_ranks))
    ws.ticket.fill_(7)
    torch.cuda.synchronize()
    with torch.cuda.stream(capture_stream):  # eager on that stream: zeroed once, trusted afterwards
        got = get_dispatch_layout(inputs[1], num_experts, num_ranks)
    capture_stream.synchronize()
    assert_layout_equal(got, layout_reference(inputs[1].cpu(), num_experts, num_ranks))
    assert ws.trusted


@pytest.mark.gpu
def test_kernel_reports_out_of_range_ids_at_the_next_check():
    """Checked on the device (no sync at the call): check_errors() names the API, the kernel and a bad id."""
    import epkern

    epkern.check_errors()  # nothing pending from earlier tests
    topk = torch.full((8, 2), 256, dtype=torch.int64, device="cuda")
    topk[3, 1] = -7
    per_rank, per_expert, in_rank = get_dispatch_layout(topk, 256, 8)  # no error yet: no sync
    with pytest.raises(ValueError, match=r"get_dispatch_layout: topk_idx \(layout_e256_r8_k2\) outside \[-1, 256\): "
                                         r"16 bad value\(s\)"):
        epkern.check_errors()
    assert per_rank.tolist() == [0] * 8 and per_expert.sum().item() == 0 and not in_rank.any()
    epkern.check_errors()  # reported once
    get_dispatch_layout(topk, 256, 8)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="out of range"):  # the next checked call raises it too
        get_dispatch_layout(topk[:0], 256, 8)


@pytest.mark.gpu
def test_debug_level_checks_on_the_host_before_the_launch(monkeypatch):
    monkeypatch.setenv("EPKERN_CHECK_VALUES", "2")
    with pytest.raises(ValueError, match="topk_idx: value 256 out of range"):
        get_dispatch_layout(torch.full((8, 2), 256, dtype=torch.int64, device="cuda"), 256, 8)


@pytest.mark.gpu
def test_kernel_ignores_unchecked_out_of_range_ids(monkeypatch):
    """With value checks off (as under graph capture) ids >= E must not write out of bounds."""
    monkeypatch.setenv("EPKERN_CHECK_VALUES", "0")
    topk = random_topk(2000, 8, 256, seed=5)
    bad = torch.rand(topk.shape, generator=torch.Generator().manual_seed(6)) < 0.05
    want = layout_reference(torch.where(bad, torch.full_like(topk, -1), topk), 256, 8)
    got = get_dispatch_layout(torch.where(bad, topk + 256 * 1000, topk).cuda(), 256, 8)
    torch.cuda.synchronize()
    assert_layout_equal(got, want)


# -- GPU: cubins precompiled on a CPU-only machine load offline -----------------------------------
def _precompiled_cache() -> Path:
    return Path(os.environ.get("PRECOMPILED_CACHE_DIR", REPO / ".gpu_cache"))


def _snapshot(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*.cubin")}


@pytest.mark.gpu
def test_precompiled_cubins_load_offline(monkeypatch):
    """Built by scripts/prepare_gpu_cache.sh (any NVRTC, no GPU), loaded here with EPKERN_JIT=0."""
    root = _precompiled_cache()
    if not (root / "kernels").is_dir():
        pytest.skip(f"no precompiled cache at {root}: run scripts/prepare_gpu_cache.sh first (make test-gpu does)")
    monkeypatch.setenv("EPKERN_CACHE_DIR", str(root))
    monkeypatch.setenv("EPKERN_JIT", "0")
    saved = dict(runtime._modules)
    runtime._modules.clear()
    before = _snapshot(root)
    try:
        deployment = Deployment()
        for spec in deployment_specs(deployment):
            entry = jit.build(spec)
            print(f"offline: {spec.name} built by NVRTC {entry.meta['nvrtc']}, loaded under NVRTC "
                  f"{compiler.nvrtc_version()} for {compiler.target_arch()}")
            topk = random_topk(4096, deployment.num_topk, deployment.num_experts, seed=spec.num_ranks)
            got = get_dispatch_layout(topk.cuda(), deployment.num_experts, spec.num_ranks)
            assert_layout_equal(got, layout_reference(topk, deployment.num_experts, spec.num_ranks))
    finally:
        runtime._modules.clear()
        runtime._modules.update(saved)
    assert _snapshot(root) == before, "offline mode wrote to the cache"
