"""The torch.distributed backends under faults, on CPU (issue 18 item 5, issue 14), for both paths:
the single-node torch backend (3 gloo processes, one node) and the two-hop internode backend (4
processes as 2 "nodes" of 2, EPKERN_RANKS_PER_NODE=2). A rank that never calls dispatch makes the
others raise within the timeout naming it; ranks that disagree on the hidden size, call different
ops or combine with handles of different dispatches all raise one clear error, no SIGABRT; the
group still works after every error."""
import pytest
import torch
import torch.distributed as dist

from epkern.testing import multiproc

EXPERTS_PER_RANK, TOKENS, TIMEOUT_S, AGREE_TIMEOUT_S = 2, 8, 1.5, 60.0
# path -> (processes, ranks per node, Buffer.backend); both are Buffer(backend="torch") over gloo
PATHS = {"torch": (3, 3, "torch"), "internode": (4, 2, "torch-internode")}
SCENARIOS = ("missing", "hidden", "op", "handle", "healthy")


def _worker(rank, world):
    results = {}
    for scenario in SCENARIOS:  # every failure is caught before a collective: the group stays usable
        results[scenario] = _scenario(rank, world, scenario)
        dist.barrier()
    return results


def _scenario(rank, world, scenario):
    import epkern.buffer as B

    # the short timeout only where a rank is missing: elsewhere a slow rank must not read as one
    buffer = B.Buffer(dist.group.WORLD, backend="torch",
                      timeout_s=TIMEOUT_S if scenario == "missing" else AGREE_TIMEOUT_S)
    experts = EXPERTS_PER_RANK * world
    gen = torch.Generator().manual_seed(rank)
    hidden = 128 if scenario == "hidden" and rank == 1 else 64
    x = torch.randn(TOKENS, hidden, generator=gen).to(torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, 2, generator=gen)

    def layout(n):
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx[:n], experts)
        return in_rank, dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                             topk_idx=topk_idx[:n], topk_weights=weights[:n])

    in_rank, args = layout(TOKENS)
    out = {"backend": buffer.backend}
    if scenario == "missing" and rank == world - 1:
        return dict(out, skipped=True)  # never calls dispatch: straight to the barrier the others reach late
    try:
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, **args)
        if scenario == "op" and rank == 2:
            buffer.dispatch(x, **args)  # a second dispatch where the others combine
        elif scenario == "handle":      # rank 1 combines the first of two dispatches, the others the second
            _, small = layout(2)
            recv_small, _, _, _, handle_small, _ = buffer.dispatch(x[:2], **small)
            buffer.combine(recv_x, handle) if rank == 1 else buffer.combine(recv_small, handle_small)
        else:
            combined, _, _ = buffer.combine(recv_x, handle)
            want = (x.float() * in_rank.sum(-1, keepdim=True)).to(torch.bfloat16)
            return dict(out, ok=bool(torch.equal(combined, want)))
        return dict(out, error=None)
    except Exception as exc:  # recorded for the parent's checks
        return dict(out, error=f"{type(exc).__name__}: {exc}")


@pytest.fixture(scope="module", params=list(PATHS))
def path(request):
    """(name, world, {scenario: [rank 0's result, ...]}) from one spawn of the path's processes."""
    world, per_node, backend = PATHS[request.param]
    per_rank = multiproc.run(_worker, world, "cpu", env={"EPKERN_RANKS_PER_NODE": str(per_node)}, timeout_s=300)
    assert all(r[s]["backend"] == backend for r in per_rank for s in SCENARIOS), per_rank
    return request.param, world, {s: [per_rank[r][s] for r in range(world)] for s in SCENARIOS}


def test_missing_rank_is_named_within_the_timeout(path):
    _, world, outcomes = path
    results = outcomes["missing"]
    assert results[world - 1].get("skipped") is True
    for r in range(world - 1):
        assert results[r]["error"].startswith("PeerTimeoutError: dispatch #1 on rank"), results[r]
        assert f"rank {world - 1} did not arrive within {TIMEOUT_S:g} s" in results[r]["error"]


def test_mismatched_hidden_sizes_raise_on_every_rank(path):
    _, world, outcomes = path
    per_rank = "; ".join(f"rank {r}: {128 if r == 1 else 64}" for r in range(world))
    for r, result in enumerate(outcomes["hidden"]):
        assert result["error"].startswith(f"ValueError: dispatch #1 on rank {r}"), result
        assert f"disagree on hidden ({per_rank})" in result["error"]


def test_different_calls_raise_on_every_rank(path):
    _, world, outcomes = path
    per_rank = "; ".join(f"rank {r}: {'dispatch' if r == 2 else 'combine'}" for r in range(world))
    for r, result in enumerate(outcomes["op"]):
        assert result["error"].startswith("ValueError: "), result
        assert "#2" in result["error"] and f"disagree on op ({per_rank})" in result["error"]


def test_handles_of_different_dispatches_raise_on_every_rank(path):
    name, world, outcomes = path
    for r, result in enumerate(outcomes["handle"]):
        assert result["error"] is not None and result["error"].startswith(f"ValueError: combine #3 on rank {r}"), \
            result
        assert "the handles come from different dispatches" in result["error"]
        # the two-hop backend checks each hop's sizes and names the hop
        assert (" hop, which expects" in result["error"]) == (name == "internode"), result


def test_the_group_still_works_after_the_errors(path):
    _, world, outcomes = path
    assert [{k: v for k, v in r.items() if k != "backend"} for r in outcomes["healthy"]] == [{"ok": True}] * world
