"""Tuned configs: the fastest normal-mode Config per (kernel, shape) that `epkern tune` measured.

    epkern tune --config deploy.json --out tuned.json        # on the GPUs that will run it
    EPKERN_TUNED_CONFIG=tuned.json python serve.py           # Buffer.get_dispatch_config reads it
    epkern precompile --config deploy.json --tuned tuned.json  # builds the num_sms it chose

The file (JSON) records the device it was tuned on and the epkern version, and one entry per
(kernel, num_ranks, hidden, num_topk):

    {"schema": 1, "device": "NVIDIA H200", "epkern_version": "0.1.0", "date": ..., "commit": ...,
     "entries": [{"kernel": "dispatch", "num_ranks": 8, "hidden": 7168, "num_topk": 8, "tokens": [4096],
                  "config": {"num_sms": 24, ...}, "median_us": 310.2, "candidates": {"20": 330.1, ...}}]}

A file tuned on another GPU is refused (TunedConfigError): SM counts and NVLink speeds differ, so
its choices do not carry over. Another epkern version only warns. Shapes the file lacks fall back
to the built-in defaults. `Buffer.get_dispatch_config(num_ranks)` knows the rank count only: when
the file holds several shapes for one rank count, the first in the file wins (pass hidden= to
`lookup` to choose).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

SCHEMA = 1
KERNELS = ("dispatch", "combine")
CONFIG_FIELDS = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                 "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens")


class TunedConfigError(ValueError):
    """A tuned-config file that cannot be used here (malformed, or tuned on another GPU)."""


def current_device_name() -> str:
    """The name configs are tuned for: the current CUDA device's, or 'cpu' without one."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def _epkern_version() -> str:
    from epkern.codegen import cache

    return cache.epkern_version()


class TunedConfig:
    """A loaded tuned-config file: `lookup` returns the entry for a (kernel, shape), or None."""

    def __init__(self, path: Path, device: str, epkern_version: str, entries: list[dict]):
        self.path = path
        self.device = device
        self.epkern_version = epkern_version
        self.entries = entries

    def lookup(self, kernel: str, num_ranks: int, hidden: int | None = None, num_topk: int | None = None):
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: allowed values are {list(KERNELS)}")
        for e in self.entries:
            if e["kernel"] == kernel and e["num_ranks"] == num_ranks and hidden in (None, e["hidden"]) \
                    and num_topk in (None, e["num_topk"]):
                return e
        return None

    def config(self, kernel: str, num_ranks: int, hidden: int | None = None):
        """The entry as an epkern.Config, or None when the file lacks the shape."""
        from epkern.buffer import Config

        entry = self.lookup(kernel, num_ranks, hidden)
        return None if entry is None else Config(**entry["config"])


def _fail(path, message: str):
    raise TunedConfigError(f"tuned config {path}: {message}")


def _check_entry(path, i: int, e) -> dict:
    if not isinstance(e, dict):
        _fail(path, f"entries[{i}] is not an object")
    for key in ("kernel", "num_ranks", "hidden", "num_topk", "config"):
        if key not in e:
            _fail(path, f"entries[{i}] lacks {key!r}")
    if e["kernel"] not in KERNELS:
        _fail(path, f"entries[{i}].kernel={e['kernel']!r}: allowed values are {list(KERNELS)}")
    for key in ("num_ranks", "hidden", "num_topk"):
        if isinstance(e[key], bool) or not isinstance(e[key], int) or e[key] < 0:
            _fail(path, f"entries[{i}].{key}={e[key]!r}: expected a non-negative int")
    config = e["config"]
    if not isinstance(config, dict) or "num_sms" not in config or set(config) - set(CONFIG_FIELDS):
        _fail(path, f"entries[{i}].config={config!r}: expected num_sms and only the fields {list(CONFIG_FIELDS)}")
    try:
        from epkern.buffer import Config

        Config(**config)
    except (TypeError, ValueError) as exc:
        _fail(path, f"entries[{i}].config: {exc}")
    return e


def load(path: str | Path, device: str | None = None) -> TunedConfig:
    """Read and check a tuned-config file for `device` (default: this machine's GPU, or 'cpu')."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        _fail(path, "no such file (check EPKERN_TUNED_CONFIG / --tuned)")
    except json.JSONDecodeError as exc:
        _fail(path, f"not JSON ({exc})")
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        _fail(path, f"expected an object with schema {SCHEMA} (a file written by `epkern tune`)")
    if not isinstance(doc.get("device"), str) or not isinstance(doc.get("entries"), list):
        _fail(path, "expected 'device' (a GPU name) and 'entries' (a list)")
    here = current_device_name() if device is None else device
    if doc["device"] != here:
        _fail(path, f"tuned on {doc['device']!r}, but this machine runs on {here!r}; run `epkern tune` here, "
                    "or unset EPKERN_TUNED_CONFIG to use the built-in defaults")
    entries = [_check_entry(path, i, e) for i, e in enumerate(doc["entries"])]
    version = str(doc.get("epkern_version", "unknown"))
    if version != _epkern_version():
        warnings.warn(f"tuned config {path}: tuned with epkern {version}, this is {_epkern_version()}; "
                      "the kernels may have changed since (re-run `epkern tune`)", stacklevel=2)
    return TunedConfig(path, doc["device"], version, entries)


def save(path: str | Path, entries: list[dict], device: str | None = None, meta: dict | None = None) -> Path:
    """Write a tuned-config file atomically (temp file + os.replace); returns its path."""
    from epkern.bench.timing import git_commit, utc_now

    path = Path(path)
    doc = {"schema": SCHEMA, "device": current_device_name() if device is None else device,
           "epkern_version": _epkern_version(), "date": utc_now(), "commit": git_commit(),
           "entries": entries}
    if meta:
        doc.update(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    load(path, device=doc["device"])  # what we write must read back
    return path


# -- the file EPKERN_TUNED_CONFIG names, loaded once per (path, mtime, size) -----------------------
_loaded: dict = {}


def active() -> TunedConfig | None:
    """The tuned config EPKERN_TUNED_CONFIG names, or None when it is unset."""
    from epkern.codegen import knobs

    path = knobs.tuned_config_path()
    if path is None:
        return None
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        key = (str(path), None, None)  # load() names the missing file
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load(path)
    return _loaded[key]


def config_for(kernel: str, num_ranks: int):
    """Buffer.get_dispatch_config/get_combine_config's hook: the tuned Config, or None for the default."""
    tuned = active()
    return None if tuned is None else tuned.config(kernel, num_ranks)


def tuned_specs(deployments, tuned: TunedConfig) -> list:
    """The intranode kernel specs at the num_sms the tuned file chose for each deployment's shapes
    (what Buffer will launch with EPKERN_TUNED_CONFIG set), for `epkern precompile --tuned`."""
    from epkern.normal import kernels as ik

    specs = []
    for dep in deployments:
        for r in dep.ep_sizes:
            if r > ik.MAX_RANKS:
                continue
            for kernel in KERNELS:
                entries = [e for e in (tuned.lookup(kernel, r), tuned.lookup(kernel, r, dep.hidden)) if e]
                for sms in sorted({e["config"]["num_sms"] for e in entries}):
                    for k in (dep.num_topk, 0):
                        if kernel == "combine":
                            specs.append(ik.combine_spec(r, dep.hidden, k, sms))
                            continue
                        specs.append(ik.dispatch_spec(r, dep.hidden, k, False, sms))
                        if dep.hidden % 128 == 0:
                            specs.append(ik.dispatch_spec(r, dep.hidden, k, True, sms))
    return specs


def precompile_specs(deployments, tuned_path: str | Path | None = None, specs: list | None = None) -> list:
    """`epkern precompile`'s kernels: every deployment spec, plus the tuned file's num_sms variants
    (tuned_path, else EPKERN_TUNED_CONFIG). A build machine without a GPU cannot tell which GPU
    it builds for, so the device check runs only where a GPU is present."""
    import torch

    from epkern.codegen import knobs
    from epkern.deployment import specs_for

    specs = specs_for(deployments) if specs is None else specs
    path = tuned_path or knobs.tuned_config_path()
    if path is None:
        return specs
    doc_device = None
    if not torch.cuda.is_available():
        try:
            doc_device = json.loads(Path(path).read_text()).get("device")
        except (OSError, ValueError, AttributeError):
            pass  # load() names the problem
    tuned = load(path, device=doc_device if isinstance(doc_device, str) else None)
    return list(dict.fromkeys(specs + tuned_specs(deployments, tuned)))
