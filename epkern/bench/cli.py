"""The `epkern bench` and `epkern tune` subcommands (registered by epkern/cli.py: add_parsers(sub)).

Bad arguments end with argparse's one-line error and exit status 2, before anything runs.
"""
from __future__ import annotations

import argparse
import functools

from .sweep import (COMM_WHATS, MAX_NUM_SMS, MAX_RANKS, MAX_TOPK, MOE_INTERMEDIATE, WHATS, build_plan, parse_list,
                    parse_whats)


def _list_type(name: str, lo: int = 1, hi: int | None = None, multiple_of: int = 1):
    def parse(text):
        try:
            return parse_list(text, name, lo, hi, multiple_of)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None
    parse.__name__ = name  # argparse names the type in "invalid <name> value" messages
    return parse


def _whats(text):
    try:
        return parse_whats(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


def _count(name: str, lo: int):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be >= {lo}")
        return v
    parse.__name__ = name
    return parse


def _intermediate(text):
    try:
        (v,) = parse_list(text, "intermediate", 8, 1 << 16, 8)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None
    return v


def _shape_args(p: argparse.ArgumentParser, tokens_help: str) -> None:
    p.add_argument("--tokens", type=_list_type("tokens", 1, 1 << 20), help=tokens_help)
    p.add_argument("--hidden", type=_list_type("hidden", 8, 1 << 16, 8), help="hidden sizes (default 7168)")
    p.add_argument("--experts", type=_list_type("experts", 1, 8192), help="routed experts (default 256)")
    p.add_argument("--topk", type=_list_type("topk", 1, MAX_TOPK), help="experts per token (default 8)")
    p.add_argument("--num-sms", type=_list_type("num-sms", 1, MAX_NUM_SMS),
                   help="SM counts for dispatch / combine / low_latency (default: each one's default)")
    p.add_argument("--ranks", type=_list_type("ranks", 1, MAX_RANKS),
                   help="EP sizes to start (default: the config's, else the GPU count, at least 2)")
    p.add_argument("--config", help="deployment JSON (as for epkern precompile): its shapes and EP sizes")
    p.add_argument("--warmup", type=_count("warmup", 0), help="untimed calls first (default 10; CPU 2)")
    p.add_argument("--repeats", type=_count("repeats", 1), help="timed calls (default 50; CPU 5)")


def add_parsers(sub) -> None:
    """Add `bench` and `tune` to epkern's subparsers; each sets func=<its command>."""
    b = sub.add_parser("bench", help="benchmark epkern (and DeepEP, NCCL EP, the torch backend) on your shapes",
                       description="Time each kernel family on the given shapes and write DIR/results.json, "
                                   "results.csv and PNG plots. Without a GPU: what runs on CPU.")
    b.add_argument("--what", type=_whats, default=WHATS, help=f"comma-separated, from {','.join(WHATS)} (default: all)")
    _shape_args(b, "token counts per rank (default: per family, e.g. 128,512,4096 for dispatch)")
    b.add_argument("--intermediate", type=_intermediate,
                   help=f"the MoE layer's expert size, for --what moe (default {MOE_INTERMEDIATE})")
    b.add_argument("--out", default="epkern-bench", help="output folder (default ./epkern-bench)")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.set_defaults(func=functools.partial(cmd_bench, b))
    t = sub.add_parser("tune", help="sweep num_sms per shape and write a tuned-config file",
                       description="For each shape, time the NVLink dispatch and combine at each SM count and keep "
                                   "the fastest; Buffer.get_dispatch_config/get_combine_config read the file "
                                   "when EPKERN_TUNED_CONFIG names it.")
    _shape_args(t, "token counts per rank (default 4096)")
    t.add_argument("--out", default="tuned.json", help="tuned-config file to write (default ./tuned.json)")
    t.set_defaults(func=functools.partial(cmd_tune, t))


def _device() -> tuple[str, int]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ("cuda" if n else "cpu"), n


def _plan(parser, args, whats, tokens, out, plots=True):
    device, num_gpus = _device()
    try:
        return build_plan(whats, tokens, args.hidden, args.experts, args.topk, args.num_sms, args.ranks, args.config,
                          out, device, num_gpus, args.warmup, args.repeats, plots, getattr(args, "intermediate", None))
    except (ValueError, OSError) as exc:
        parser.error(str(exc).splitlines()[0])


def cmd_bench(parser, args) -> int:
    from .run import run

    plan = _plan(parser, args, args.what, args.tokens, args.out, not args.no_plots)
    result = run(plan)
    wrong = [r for r in result["rows"] if r.get("check") in ("MISMATCH", "BAD IDS")]
    return 1 if wrong or any(s.get("failed") for s in result["skipped"]) else 0


def cmd_tune(parser, args) -> int:
    from .tune import TuneError, run_tune

    plan = _plan(parser, args, COMM_WHATS[:2], args.tokens or (4096,), ".")
    try:
        run_tune(plan, args.out)
    except (TuneError, ValueError) as exc:
        print(f"epkern tune: {exc}")
        return 1
    return 0
