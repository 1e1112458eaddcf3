"""`epkern tune`: sweep num_sms for each shape of a deployment and keep the fastest Config.

Per (kernel, num_ranks, hidden, num_topk) the NVLink dispatch (layout given) and combine are
timed at every candidate SM count on the ranks `epkern bench` would start; the fastest whose round
trip checked out is written to the tuned-config file (epkern/tuning.py) with every candidate's
median. The chunk sizes of DeepEP's Config are not swept: the one-copy kernels have no ring buffer
to chunk (Config keeps the fields for compatibility), so they are written as the defaults.
"""
from __future__ import annotations

import contextlib
import os

from epkern import tuning

DEFAULT_SMS = (8, 16, 20, 24, 32, 48, 64, 96, 128)
NOT_SWEPT = ("chunk sizes: not swept, the one-copy NVLink kernels have no ring buffer to chunk "
             "(Config keeps them for DeepEP compatibility)")


class TuneError(RuntimeError):
    pass


def candidates(requested, device_sms: int) -> tuple[int, ...]:
    """The SM counts to try: requested (or DEFAULT_SMS), at most the device's SMs and MAX_BLOCKS."""
    from epkern.normal.kernels import MAX_BLOCKS

    limit = min(device_sms, MAX_BLOCKS)
    out = tuple(s for s in (requested or DEFAULT_SMS) if s <= limit)
    if not out:
        raise ValueError(f"--num-sms: no candidate fits this GPU ({limit} SMs at most)")
    return out


@contextlib.contextmanager
def _builtin_defaults():
    """Buffer's built-in configs, whatever EPKERN_TUNED_CONFIG says (tune writes the next file)."""
    saved = os.environ.pop("EPKERN_TUNED_CONFIG", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["EPKERN_TUNED_CONFIG"] = saved


def choose(rows: list[dict]) -> list[dict]:
    """Per (kernel, ranks, hidden, topk) of epkern's checked eager rows, the num_sms with the least
    total median over the token counts measured -> tuned-file entries."""
    from epkern import Buffer

    totals: dict = {}
    for r in rows:
        if r["impl"] != "epkern" or r["what"] not in tuning.KERNELS or r["mode"] != "eager" or r["check"] != "ok":
            continue
        per_sms = totals.setdefault((r["what"], r["ranks"], r["hidden"], r["topk"]), {})
        per_sms.setdefault(r["num_sms"], {})[r["tokens"]] = r["median_us"]
    entries = []
    with _builtin_defaults():
        for (kernel, ranks, hidden, topk), per_sms in totals.items():
            tokens = sorted(set().union(*(set(t) for t in per_sms.values())))
            complete = {sms: sum(t.values()) for sms, t in per_sms.items() if sorted(t) == tokens}
            if not complete:
                continue
            sms = min(complete, key=lambda k: (complete[k], k))
            base = (Buffer.get_dispatch_config if kernel == "dispatch" else Buffer.get_combine_config)(ranks)
            config = {f: getattr(base, f) for f in tuning.CONFIG_FIELDS}
            config["num_sms"] = sms
            entries.append({"kernel": kernel, "num_ranks": ranks, "hidden": hidden, "num_topk": topk,
                            "tokens": tokens, "config": config, "median_us": complete[sms],
                            "default_num_sms": base.num_sms,
                            "candidates": {str(k): v for k, v in sorted(complete.items())}})
    return entries


def run_tune(plan, out, echo=print):
    """Measure, choose, write the tuned file; returns its path. Per-(kernel, shape) rows come from
    the ranks' round trips, so a config whose check failed is never chosen."""
    import dataclasses

    import torch

    from . import impls as _impls
    from .ranks import launch
    from .run import prebuild

    if plan.device != "cuda":
        raise TuneError("epkern tune needs a CUDA GPU: num_sms chooses how many SMs the NVLink kernels use "
                        "(the torch backend on CPU has nothing to tune)")
    sms = candidates(plan.num_sms, torch.cuda.get_device_properties(0).multi_processor_count)
    plan = dataclasses.replace(plan, whats=("dispatch", "combine"), num_sms=sms)
    impls = _impls.discover()
    rows, skipped, notes = [], [], []
    for world in plan.ep_sizes:
        with _builtin_defaults():
            prebuild(plan, world)
            r, s, note = launch(plan, impls, world, only_epkern=True)
        rows += r
        skipped += s
        if note:
            notes.append(note)
    entries = choose(rows)
    if not entries:
        raise TuneError("no configuration checked out: " + "; ".join(s["reason"] for s in skipped)[:500])
    path = tuning.save(out, entries, meta={"notes": notes + [NOT_SWEPT], "tokens": list(plan.tokens["dispatch"])})
    echo(f"{'kernel':<10}{'ranks':>6}{'hidden':>8}{'topk':>6}  {'tokens':<12}{'num_sms':>7} (default){'us':>10}"
         "   candidates (num_sms: us, summed over the token counts)")
    for e in entries:
        cands = ", ".join(f"{k}: {v:.1f}" for k, v in e["candidates"].items())
        toks = ",".join(map(str, e["tokens"]))
        echo(f"{e['kernel']:<10}{e['num_ranks']:>6}{e['hidden']:>8}{e['num_topk']:>6}  {toks:<12}"
             f"{e['config']['num_sms']:>7} ({e['default_num_sms']:>3})  {e['median_us']:>9.1f}   {cands}")
    for note in notes:
        echo(f"note: {note}")
    echo(f"wrote {path}; use it with EPKERN_TUNED_CONFIG={path} (and epkern precompile --tuned {path})")
    return path
