"""The portable backend under faults, 3 gloo processes on CPU (issue 18 item 5): a rank that never
calls dispatch makes the others raise within the timeout naming it; ranks that disagree on the
hidden size (or mix up handles, or call different ops) all raise one clear error, no SIGABRT."""
import datetime
import json
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, EXPERTS, TOKENS, TIMEOUT_S = 3, 6, 8, 1.5


SCENARIOS = ("missing", "hidden", "op", "healthy")


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for scenario in SCENARIOS:  # every failure is caught before a collective: the group stays usable
            results[scenario] = _scenario(rank, scenario)
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _scenario(rank, scenario):
    import epkern.buffer as B

    buffer = B.Buffer(dist.group.WORLD, backend="torch", timeout_s=TIMEOUT_S)
    gen = torch.Generator().manual_seed(rank)
    hidden = 128 if scenario == "hidden" and rank == 1 else 64
    x = torch.randn(TOKENS, hidden, generator=gen).to(torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(EXPERTS, generator=gen)[:2] for _ in range(TOKENS)])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, EXPERTS)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=torch.rand(TOKENS, 2, generator=gen))
    try:
        if scenario == "missing" and rank == WORLD - 1:
            time.sleep(TIMEOUT_S + 4)  # never calls dispatch; the others must not wait for it
            return {"skipped": True}
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, **args)
        if scenario == "op" and rank == 2:
            buffer.dispatch(x, **args)  # a second dispatch where the others combine
        else:
            combined, _, _ = buffer.combine(recv_x, handle)
            want = (x.float() * in_rank.sum(-1, keepdim=True)).to(torch.bfloat16)
            return {"ok": bool(torch.equal(combined, want))}
    except Exception as exc:  # recorded for the parent's checks
        return {"error": f"{type(exc).__name__}: {exc}"}


@pytest.fixture(scope="module")
def outcomes():
    """{scenario: [rank 0's result, ...]} from one spawn of WORLD processes running every scenario."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        per_rank = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(WORLD)]
    return {s: [per_rank[r][s] for r in range(WORLD)] for s in SCENARIOS}


def test_missing_rank_is_named_within_the_timeout(outcomes):
    results = outcomes["missing"]
    assert results[WORLD - 1] == {"skipped": True}
    for r in range(WORLD - 1):
        assert results[r]["error"].startswith("PeerTimeoutError: dispatch #1 on rank"), results[r]
        assert f"rank {WORLD - 1} did not arrive within {TIMEOUT_S:g} s" in results[r]["error"]


def test_mismatched_hidden_sizes_raise_on_every_rank(outcomes):
    results = outcomes["hidden"]
    for r in range(WORLD):
        assert results[r]["error"].startswith("ValueError: dispatch #1 on rank"), results[r]
        assert "disagree on hidden (rank 0: 64; rank 1: 128; rank 2: 64)" in results[r]["error"]


def test_different_calls_raise_on_every_rank(outcomes):
    results = outcomes["op"]
    for r in range(WORLD):
        assert results[r]["error"].startswith("ValueError: "), results[r]
        assert "#2" in results[r]["error"] and "disagree on op" in results[r]["error"]
        assert "rank 0: combine; rank 1: combine; rank 2: dispatch" in results[r]["error"]


def test_the_group_still_works_after_the_errors(outcomes):
    assert outcomes["healthy"] == [{"ok": True}] * WORLD
