"""Which implementations a run can put side by side, with their versions.

  epkern        the JIT kernels (NVLink backend for dispatch / combine, low-latency buffer, casts, ...)
  epkern-torch  epkern.Buffer(backend="torch"): all_to_all_single over the process group, the
                portable baseline (what any PyTorch user can run today)
  deepep        DeepEP's deep_ep.Buffer, when the real one is importable (not epkern's alias, which
                epkern.install_as_deep_ep() puts under the name deep_ep)
  nccl-ep       NCCL EP (`pip install nccl-extensions`, module nccl.ep; runner in nccl_ep.py), with one
                GPU per rank (NCCL refuses two ranks on one GPU)
Nothing here imports an implementation other than epkern before discover() asks for it.
"""
from __future__ import annotations

import importlib
import importlib.metadata


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def epkern_version() -> str:
    from epkern.codegen import cache

    return cache.epkern_version()


def deepep_module():
    """(module, None) for the real deep_ep, or (None, why not)."""
    try:
        mod = importlib.import_module("deep_ep")
    except Exception as exc:  # ImportError, or a broken install (missing NVSHMEM, ...)
        return None, f"not importable ({type(exc).__name__}: {str(exc)[:80]})"
    import epkern

    buffer = getattr(mod, "Buffer", None)
    if buffer is None:
        return None, "deep_ep has no Buffer"
    if buffer is epkern.Buffer or getattr(buffer, "__module__", "").startswith("epkern"):
        return None, "deep_ep is epkern's alias (epkern.install_as_deep_ep), not DeepEP"
    return mod, None


def nccl_ep_module():
    """(module, None) for nccl.ep, or (None, why not)."""
    try:
        return importlib.import_module("nccl.ep"), None
    except Exception as exc:
        return None, f"not importable ({type(exc).__name__}: {str(exc)[:80]}; pip install nccl-extensions)"


def nccl_ep_version(mod) -> str:
    """'0.1.0 (libnccl_ep 0.2.0)': the nccl-extensions distribution and the library it loaded."""
    dist = _dist_version("nccl-extensions") or "unknown"
    try:
        return f"{dist} (libnccl_ep {mod.get_lib_version()})"
    except Exception:  # no get_lib_version, or the library does not load here
        return dist


def discover() -> list[dict]:
    """One entry per implementation: name, importable, available (a runner exists), version, reason."""
    import torch

    ours = epkern_version()
    out = [{"name": "epkern", "importable": True, "available": True, "version": ours, "reason": ""},
           {"name": "epkern-torch", "importable": True, "available": True,
            "version": f"{ours}/torch {torch.__version__}", "reason": ""}]
    mod, why = deepep_module()
    out.append({"name": "deepep", "importable": mod is not None, "available": mod is not None, "reason": why or "",
                "version": (getattr(mod, "__version__", None) or _dist_version("deep_ep", "deep-ep") or "unknown")
                if mod else ""})
    mod, why = nccl_ep_module()
    out.append({"name": "nccl-ep", "importable": mod is not None, "available": mod is not None,
                "version": nccl_ep_version(mod) if mod else "", "reason": why or ""})
    return out


def version_of(impls: list[dict], name: str) -> str:
    for i in impls:
        if i["name"] == name:
            return i["version"]
    raise KeyError(name)
