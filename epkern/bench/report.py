"""Result rows and what is written from them: results.json, results.csv, PNG plots, the summary.

A row is a flat dict (CSV_FIELDS, plus anything a runner adds): which kernel (`what`, `op`),
which implementation and version, how it was timed (`mode`: graph replays, eager calls with
CUDA events, or the host clock on CPU), the shape, the time distribution, bytes and the fraction
of the floor where one is known (bytes at a rate; the MoE layer: or its FLOPs at the BF16 peak,
`floor_bound` says which), and `check` (the result compared with a reference).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .timing import floor_fields

CSV_FIELDS = ("what", "op", "impl", "version", "mode", "tokens", "hidden", "experts", "topk", "ranks", "num_sms",
              "intermediate", "median_us", "p10_us", "p90_us", "mean_us", "min_us", "repeats", "bytes_moved",
              "bandwidth_gbs", "tflops", "floor_us", "fraction_of_floor", "slowest_rank_median_us", "check", "note")
MODES = ("graph", "eager", "host")


def make_row(what: str, op: str, impl: str, version: str, mode: str, timing: dict, *, bytes_moved=None,
             floor_bw=None, check: str = "", note: str = "", **shape) -> dict:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed values are {list(MODES)}")
    row = {"what": what, "op": op, "impl": impl, "version": version, "mode": mode}
    row.update({k: shape.get(k) for k in ("tokens", "hidden", "experts", "topk", "ranks", "num_sms")})
    row.update({k: timing.get(k) for k in ("median_us", "p10_us", "p90_us", "mean_us", "min_us", "repeats")})
    row.update(floor_fields(timing["median_us"], bytes_moved, floor_bw))
    row.update(check=check, note=note)
    for k, v in shape.items():
        row.setdefault(k, v)
    return row


# -- files ------------------------------------------------------------------------------------------
def write_json(path: Path, header: dict, rows: list[dict], skipped: list[dict]) -> Path:
    doc = dict(header, rows=rows, skipped=skipped)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})
    return path


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def shape_label(r: dict, sms: bool = True) -> str:
    """'h7168 e256 k8 R2 s24': the shape fields a row has (the SM count unless sms=False)."""
    fields = (("h", "hidden"), ("e", "experts"), ("k", "topk"), ("R", "ranks")) + ((("s", "num_sms"),) if sms else ())
    return " ".join(f"{p}{r[k]}" for p, k in fields if r.get(k) is not None)


def _series(rows: list[dict]) -> dict:
    """(what, op, shape label) -> {line label: [(tokens, us, GB/s)]}, for rows that have a token count;
    one plot holds every implementation and SM count of a shape."""
    groups: dict = {}
    for r in rows:
        if r.get("tokens") is None or r.get("median_us") is None:
            continue
        shape = shape_label(r, sms=False)
        sms = f", {r['num_sms']} SMs" if r.get("num_sms") is not None else ""
        line = f"{r['impl']} {r['version']} ({r['mode']}{sms})"
        lines = groups.setdefault((r["what"], r["op"], shape), {})
        lines.setdefault(line, []).append((r["tokens"], r["median_us"], r.get("bandwidth_gbs")))
        if r.get("floor_us"):   # the floor: the same for every implementation of a shape
            floor = lines.setdefault(FLOOR_LINE, [])
            if all(p[0] != r["tokens"] for p in floor):
                floor.append((r["tokens"], r["floor_us"], None))
    return groups


FLOOR_LINE = "floor"


def write_plots(out: Path, rows: list[dict], title: str) -> list[Path]:
    """One PNG per (kernel, op, shape): time and bandwidth against tokens, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (what, op, shape), lines in sorted(_series(rows).items()):
        fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for label, points in sorted(lines.items()):
            points.sort()
            xs = [p[0] for p in points]
            style = dict(color="gray", linestyle="--") if label == FLOOR_LINE else dict(marker="o")
            ax_t.plot(xs, [p[1] for p in points], label=label, **style)
            bw = [(p[0], p[2]) for p in points if p[2] is not None]
            if bw:
                ax_b.plot([p[0] for p in bw], [p[1] for p in bw], marker="o", label=label)
        for ax, ylabel in ((ax_t, "median time (us)"), (ax_b, "bandwidth (GB/s)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_yscale("log")
        ax_t.legend(fontsize=7)
        kernel = what if what == op else f"{what} {op}"
        fig.suptitle(f"{kernel}, {shape} (h hidden, e experts, k top-k, R ranks) - {title}", fontsize=9)
        fig.tight_layout()
        name = f"{kernel}_{shape}".replace(" ", "_").replace("/", "-")
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- the summary ------------------------------------------------------------------------------------
def _fmt(v, spec: str, empty: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return empty
    return format(v, spec)


def _standing(impl: dict, rows: list[dict], skipped: list[dict]) -> str:
    """How another implementation fared: side by side, or why it did not run."""
    if not impl["available"]:
        return impl["reason"]
    if any(r["impl"] == impl["name"] for r in rows):
        return "side by side"
    why = next((s["reason"] for s in skipped if s.get("impl") == impl["name"]), None)
    return f"not run: {why}" if why else "importable; none of the families it runs was measured"


def summary(header: dict, rows: list[dict], skipped: list[dict], files: list[Path]) -> str:
    """The one-screen table printed at the end of a run."""
    dev = header["device"]
    lines = [f"epkern bench: {dev['name']}" + (f" x{dev.get('count')}" if dev.get("count") else "")
             + f", driver {dev.get('driver')}, torch {dev.get('torch')}, epkern {header['epkern_version']} "
               f"({header['commit']})"]
    for note in header.get("notes", []):
        lines.append(f"  note: {note}")
    others = [i for i in header["implementations"] if i["name"] not in ("epkern", "epkern-torch")]
    if not any(i["importable"] for i in others):
        lines.append("  no other implementation importable (" + "; ".join(
            f"{i['name']}: {i['reason']}" for i in others) + "): epkern's torch backend is the baseline")
    else:
        for i in others:
            lines.append(f"  {i['name']} {i['version']}: " + _standing(i, rows, skipped))
    head = f"{'what':<12}{'op':<10}{'impl':<14}{'mode':<6}{'shape':<22}{'tokens':>7}{'median us':>11}" \
           f"{'p10-p90 us':>18}{'GB/s':>8}{'floor':>7}  check"
    lines += ["", head, "-" * len(head)]
    for r in rows:
        shape = shape_label(r)
        spread = f"{_fmt(r.get('p10_us'), '.1f')}-{_fmt(r.get('p90_us'), '.1f')}"
        frac = r.get("fraction_of_floor")
        lines.append(f"{r['what']:<12}{r['op']:<10}{r['impl']:<14}{r['mode']:<6}{shape:<22}"
                     f"{_fmt(r.get('tokens'), 'd'):>7}{_fmt(r.get('median_us'), '.2f'):>11}{spread:>18}"
                     f"{_fmt(r.get('bandwidth_gbs'), '.1f'):>8}{(_fmt(100 * frac, '.0f') + '%') if frac else '-':>7}"
                     f"  {r.get('check') or '-'}")
    for title, items in (("skipped:", [s for s in skipped if not s.get("failed")]),
                         ("FAILED:", [s for s in skipped if s.get("failed")])):
        if items:
            lines += ["", title]
            lines += [f"  {s['what']}" + (f" [{s['impl']}]" if s.get("impl") else "") + f": {s['reason']}"
                      for s in items]
    pngs = [p for p in files if p.suffix == ".png"]
    names = ", ".join(p.name for p in files if p.suffix != ".png")
    where = files[0].parent if files else "-"
    lines += ["", f"wrote {names} and {len(pngs)} plot{'' if len(pngs) == 1 else 's'} in {where}"]
    return "\n".join(lines)
