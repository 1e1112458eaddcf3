"""Traffic model of expert parallelism across nodes (no GPU needed): bytes per rank per step over the
network and over NVLink, and the times they imply, for DeepSeek-V3 shapes at EP 16, 32 and 64.

    python3 -m benchmarks.internode_model          # prints the table, writes results/internode_model.json

Routing is sampled (top-8 of 256 experts, uniform; and DeepSeek-V3's group-limited routing: 8 groups
of 32 experts, top-4 groups per token, the groups laid out over the nodes in order), 8 GPUs per node.
Normal mode (hierarchical, as epkern.internode and DeepEP's internode kernels): a token crosses the
network once per remote node it reaches and fans out over NVLink there. Low-latency mode (one message
per (token, rank), as epkern's intranode low-latency kernels): a token crosses the network once per
remote rank it reaches. Bytes per token: FP8 dispatch 7168 + 56 x 4 scale bytes + 8 x (8 + 4) top-k
bytes; BF16 combine 14336. Low-latency mode on the collective engine (epkern.internode.low_latency,
what runs across nodes today): fixed blocks, (M + 1) rows of DispatchRows.row_bytes to every rank per
dispatch and M bf16 rows per combine, M = the tokens per rank, whatever the routing. DeepEP's
low-latency kernels: one put per (token, expert), 7168 + 224 + 16 bytes in FP8, 14336 back.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from epkern.internode.low_latency_blocks import DispatchRows

HIDDEN, EXPERTS, TOPK, GPUS_PER_NODE = 7168, 256, 8, 8
GROUPS, TOPK_GROUPS = 8, 4
FP8_TOKEN = HIDDEN + HIDDEN // 128 * 4 + TOPK * 12
BF16_TOKEN = HIDDEN * 2
DEEPEP_LL_FP8 = HIDDEN + HIDDEN // 128 * 4 + 16   # DeepEP's low-latency message: row, scales, an int4 header
NETWORK_GBPS = 50.0     # per rank: one 400 Gb/s NIC per GPU
NVLINK_GBPS = 393.0     # one H200 to another, copy engine, one way (shared/REFERENCE.md)
# DeepEP's published internode figures (H800 + CX7 400 Gb/s), for the table's last columns
DEEPEP = {"normal_rdma_gbps": "43-58", "ll_ep8_dispatch_us": 77, "ll_ep8_combine_us": 114,
          "ll_first_release_dispatch_us": "163-194", "ll_first_release_combine_us": "318-369"}


def sample_experts(tokens: int, limited: bool, gen: torch.Generator) -> torch.Tensor:
    if not limited:
        return torch.rand(tokens, EXPERTS, generator=gen).topk(TOPK, dim=1).indices
    per_group = EXPERTS // GROUPS
    groups = torch.rand(tokens, GROUPS, generator=gen).topk(TOPK_GROUPS, dim=1).indices
    allowed = torch.zeros(tokens, EXPERTS, dtype=torch.bool)
    for g in range(TOPK_GROUPS):
        cols = groups[:, g:g + 1] * per_group + torch.arange(per_group)
        allowed.scatter_(1, cols, True)
    scores = torch.rand(tokens, EXPERTS, generator=gen).masked_fill(~allowed, -1.0)
    return scores.topk(TOPK, dim=1).indices


def model(ep: int, tokens: int, limited: bool, gen: torch.Generator) -> dict:
    nodes = ep // GPUS_PER_NODE
    experts = sample_experts(tokens, limited, gen)      # tokens of one source rank, on node 0, local rank 0
    rank = experts // (EXPERTS // ep)
    hit_rank = torch.zeros(tokens, ep, dtype=torch.bool).scatter_(1, rank, True)
    hit_node = hit_rank.view(tokens, nodes, GPUS_PER_NODE).any(2)
    remote_nodes = hit_node[:, 1:].sum(1).double()
    remote_ranks = hit_rank[:, GPUS_PER_NODE:].sum(1).double()
    # NVLink at the destination: the forwarder (local rank 0 of the node) sends to the other ranks hit
    fanout = hit_rank.view(tokens, nodes, GPUS_PER_NODE)[:, :, 1:].sum(2).double().sum(1)
    net_dispatch = float(remote_nodes.sum()) * FP8_TOKEN
    net_combine = float(remote_nodes.sum()) * BF16_TOKEN
    nvl_dispatch = float(fanout.sum()) * FP8_TOKEN
    # fixed blocks (the collective engine): every remote rank gets M + 1 rows, M = tokens per rank
    remote_peers = ep - GPUS_PER_NODE
    blocks_fp8 = remote_peers * DispatchRows("fp8", HIDDEN, TOPK).block_bytes(tokens)
    blocks_bf16 = remote_peers * DispatchRows("bf16", HIDDEN, TOPK).block_bytes(tokens)
    blocks_combine = remote_peers * tokens * BF16_TOKEN
    remote_experts = float((rank >= GPUS_PER_NODE).sum())          # DeepEP: one put per (token, expert)
    return {
        "ep": ep, "nodes": nodes, "tokens_per_rank": tokens, "routing": "group-limited" if limited else "uniform",
        "remote_nodes_per_token": round(float(remote_nodes.mean()), 3),
        "remote_ranks_per_token": round(float(remote_ranks.mean()), 3),
        "normal_network_mb_dispatch": round(net_dispatch / 1e6, 2),
        "normal_network_mb_combine": round(net_combine / 1e6, 2),
        "normal_nvlink_mb_dispatch": round(nvl_dispatch / 1e6, 2),
        "normal_dispatch_us_at_network": round(net_dispatch / NETWORK_GBPS / 1e3, 1),
        "normal_combine_us_at_network": round(net_combine / NETWORK_GBPS / 1e3, 1),
        "normal_dispatch_us_at_nvlink": round(nvl_dispatch / NVLINK_GBPS / 1e3, 1),
        "ll_network_mb_dispatch": round(float(remote_ranks.sum()) * FP8_TOKEN / 1e6, 3),
        "ll_dispatch_us_at_network": round(float(remote_ranks.sum()) * FP8_TOKEN / NETWORK_GBPS / 1e3, 1),
        "ll_combine_us_at_network": round(float(remote_ranks.sum()) * BF16_TOKEN / NETWORK_GBPS / 1e3, 1),
        "ll_blocks_network_mb_dispatch_fp8": round(blocks_fp8 / 1e6, 2),
        "ll_blocks_network_mb_dispatch_bf16": round(blocks_bf16 / 1e6, 2),
        "ll_blocks_network_mb_combine": round(blocks_combine / 1e6, 2),
        "ll_blocks_dispatch_us_at_network": round(blocks_fp8 / NETWORK_GBPS / 1e3, 1),
        "ll_blocks_combine_us_at_network": round(blocks_combine / NETWORK_GBPS / 1e3, 1),
        "deepep_ll_network_mb_dispatch": round(remote_experts * DEEPEP_LL_FP8 / 1e6, 2),
        "deepep_ll_network_mb_combine": round(remote_experts * BF16_TOKEN / 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "internode_model.json")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = [model(ep, tokens, limited, gen) for limited in (False, True) for ep in (16, 32, 64)
            for tokens in (4096, 128)]
    header = ("EP", "routing", "tokens", "nodes/tok", "ranks/tok", "net MB disp", "net us disp", "net us comb",
              "NVL us disp", "LL us disp", "LL us comb", "blocks MB disp", "blocks us disp", "blocks us comb",
              "DeepEP LL MB disp")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(v) for v in (r["ep"], r["routing"], r["tokens_per_rank"], r["remote_nodes_per_token"],
                                          r["remote_ranks_per_token"], r["normal_network_mb_dispatch"],
                                          r["normal_dispatch_us_at_network"], r["normal_combine_us_at_network"],
                                          r["normal_dispatch_us_at_nvlink"], r["ll_dispatch_us_at_network"],
                                          r["ll_combine_us_at_network"], r["ll_blocks_network_mb_dispatch_fp8"],
                                          r["ll_blocks_dispatch_us_at_network"], r["ll_blocks_combine_us_at_network"],
                                          r["deepep_ll_network_mb_dispatch"])))
    result = {"kind": "model (no device)", "date": datetime.date.today().isoformat(),
              "assumptions": {"network_gbps_per_rank": NETWORK_GBPS, "nvlink_gbps": NVLINK_GBPS,
                              "gpus_per_node": GPUS_PER_NODE, "fp8_token_bytes": FP8_TOKEN,
                              "bf16_token_bytes": BF16_TOKEN, "deepep_ll_fp8_message_bytes": DEEPEP_LL_FP8,
                              "ll_blocks_row_bytes": {k: DispatchRows(k, HIDDEN, TOPK).row_bytes
                                                      for k in ("bf16", "fp8", "fp8_ue8m0")},
                              "samples": "4096 / 128 tokens of one rank, seed 0"},
              "deepep_published": DEEPEP, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
