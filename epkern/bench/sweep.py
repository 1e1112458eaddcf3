"""What one `epkern bench` run measures: the kernel families, the model shapes, token counts, ranks.

Shapes come from a deployment config (the `epkern precompile` JSON: hidden, num_experts,
num_topk, ep_sizes) or from --hidden/--experts/--topk (every combination); token counts from
--tokens or each family's defaults (smaller on CPU, where every call runs on two shared cores).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

WHATS = ("dispatch", "combine", "low_latency", "fp8", "layout", "lplb", "moe")
COMM_WHATS = ("dispatch", "combine", "low_latency")   # multi-rank: run inside the launched ranks
GPU_ONLY = {"low_latency": "needs CUDA GPUs (NVLink peer memory)",
            "moe": "needs CUDA GPUs (the fused MoE layer)"}
MAX_RANKS = 64
MAX_TOPK = 32
MAX_NUM_SMS = 132
MOE_INTERMEDIATE = 2048   # the MoE layer's expert size unless --intermediate: DeepSeek-V3's moe_intermediate_size

DEFAULT_TOKENS = {"dispatch": (128, 512, 4096), "combine": (128, 512, 4096), "low_latency": (1, 32, 128),
                  "fp8": (128, 4096, 8192), "layout": (128, 4096, 16384), "lplb": (4096, 16384), "moe": (128, 4096)}
CPU_TOKENS = {"dispatch": (128, 512), "combine": (128, 512), "low_latency": (), "fp8": (128, 1024),
              "layout": (128, 4096), "lplb": (1024, 4096), "moe": ()}


@dataclasses.dataclass(frozen=True)
class Model:
    """One model shape: hidden size, routed experts, experts per token."""

    hidden: int
    experts: int
    topk: int

    @property
    def label(self) -> str:
        return f"h{self.hidden} e{self.experts} k{self.topk}"


@dataclasses.dataclass
class Plan:
    whats: tuple[str, ...]
    models: list[Model]
    ep_sizes: tuple[int, ...]            # rank counts to launch for dispatch / combine / low_latency
    tokens: dict                         # what -> token counts
    num_sms: tuple[int, ...] | None      # None: each implementation's default (or the tuned file's)
    device: str                          # "cuda" or "cpu"
    warmup: int
    repeats: int
    out: Path
    plots: bool = True
    moe_intermediate: int = MOE_INTERMEDIATE   # the MoE layer's expert (intermediate) size

    @property
    def comm_whats(self) -> tuple[str, ...]:
        return tuple(w for w in self.whats if w in COMM_WHATS)

    @property
    def local_whats(self) -> tuple[str, ...]:
        return tuple(w for w in self.whats if w not in COMM_WHATS)


def parse_list(text: str, name: str, lo: int = 1, hi: int | None = None, multiple_of: int = 1) -> tuple[int, ...]:
    """'128,4096' -> (128, 4096); ValueError naming the option and the bad item otherwise."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise ValueError(f"{name}: expected a comma-separated list of integers, got {text!r}")
    out = []
    for t in items:
        try:
            v = int(t)
        except ValueError:
            raise ValueError(f"{name}: {t!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi) or v % multiple_of:
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            extra = f" and a multiple of {multiple_of}" if multiple_of > 1 else ""
            raise ValueError(f"{name}: {v} must be {bound}{extra}")
        out.append(v)
    return tuple(dict.fromkeys(out))


def parse_whats(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    bad = [w for w in items if w not in WHATS]
    if not items or bad:
        raise ValueError(f"--what: {', '.join(bad) or repr(text)} unknown; choose from {','.join(WHATS)}")
    return items


def build_plan(whats, tokens, hidden, experts, topk, num_sms, ranks, config, out, device: str,
               num_gpus: int, warmup: int | None = None, repeats: int | None = None, plots: bool = True,
               intermediate: int | None = None) -> Plan:
    """Check the options together and make the plan (ValueError naming the option on bad input)."""
    from epkern.deployment import load_deployments

    if config is not None:
        if any(v is not None for v in (hidden, experts, topk)):
            raise ValueError("--config gives the shapes: pass it or --hidden/--experts/--topk, not both")
        deployments = load_deployments(config)
        models = list(dict.fromkeys(Model(d.hidden, d.num_experts, d.num_topk) for d in deployments))
        ep_sizes = ranks or tuple(dict.fromkeys(r for d in deployments for r in d.ep_sizes if r > 1))
    else:
        models = [Model(h, e, k) for h in (hidden or (7168,)) for e in (experts or (256,)) for k in (topk or (8,))]
        ep_sizes = ranks or ((max(2, num_gpus),) if device == "cuda" else (2,))
    for m in models:
        if m.topk > m.experts:
            raise ValueError(f"--topk: {m.topk} exceeds --experts {m.experts}")
        for r in ep_sizes:
            if m.experts % r:
                raise ValueError(f"--experts: {m.experts} experts do not split over {r} ranks (--ranks)")
    per_what = {w: tokens or (DEFAULT_TOKENS if device == "cuda" else CPU_TOKENS)[w] for w in whats}
    cpu = device == "cpu"
    return Plan(whats=tuple(whats), models=models, ep_sizes=tuple(ep_sizes), tokens=per_what,
                num_sms=num_sms, device=device, warmup=warmup if warmup is not None else (2 if cpu else 10),
                repeats=repeats if repeats is not None else (5 if cpu else 50), out=Path(out), plots=plots,
                moe_intermediate=intermediate or MOE_INTERMEDIATE)
