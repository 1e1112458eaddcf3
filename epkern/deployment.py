"""A deployment: the model shapes a service runs, and every kernel spec it needs.

`epkern precompile` builds all of them into the cache so that machines without
a compiler (EPKERN_JIT=0) only load. Each kernel family module exposes
`deployment_specs(deployment) -> list[KernelSpec]`; FAMILY_MODULES lists them.
A family may also expose `deployment_skips(deployment) -> list[str]`: why it builds
less than usual for a deployment (e.g. "EP 16: at most 8 ranks"); for a family
without it, an EP size that yields no kernel is reported as skipped.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

FAMILY_MODULES = (
    "epkern.layout",
    "epkern.fp8",
    "epkern.solver.ipm_kernel",
    "epkern.solver.map_kernel",
    "epkern.solver.run_kernel",
    "epkern.normal.kernels",
    "epkern.low_latency",
)
FAMILY_LABELS = {"epkern.layout": "layout", "epkern.fp8": "fp8_cast", "epkern.solver.ipm_kernel": "lplb_ipm",
                 "epkern.solver.map_kernel": "lplb_map", "epkern.normal.kernels": "intranode",
                 "epkern.low_latency": "low_latency"}


class DeploymentError(ValueError):
    """A deployment config that cannot be used; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Deployment:
    """Defaults: DeepSeek-V3 (hidden 7168, 256 routed experts, top-8) at EP 2, 4 and 8."""

    hidden: int = 7168
    num_experts: int = 256
    num_topk: int = 8
    ep_sizes: tuple[int, ...] = (2, 4, 8)

    def __post_init__(self):
        if isinstance(self.ep_sizes, (str, bytes)) or not isinstance(self.ep_sizes, (list, tuple)):
            raise ValueError(f"ep_sizes={self.ep_sizes!r}: expected a list of positive ints, e.g. [2, 4, 8]")
        for name in ("hidden", "num_experts", "num_topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"deployment {name}={value!r}: expected a positive int")
        object.__setattr__(self, "ep_sizes", tuple(self.ep_sizes))
        for r in self.ep_sizes:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1 or self.num_experts % r:
                raise ValueError(f"deployment ep_sizes: {r!r} must be a positive int dividing num_experts={self.num_experts}")


_EXAMPLE = '{"hidden": 7168, "num_experts": 256, "num_topk": 8, "ep_sizes": [2, 4, 8]}'


def load_deployments(path: str | Path | None) -> list[Deployment]:
    """A JSON file holding one deployment object or a list of them (fields as in Deployment).
    Any problem raises DeploymentError naming the file (and the item and field)."""
    if path is None:
        return [Deployment()]
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DeploymentError(f"{path}: cannot read the deployment config ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        where = f"line {exc.lineno} column {exc.colno}: " if hasattr(exc, "lineno") else ""
        raise DeploymentError(f"{path}: {where}invalid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(data, (dict, list)):
        raise DeploymentError(f"{path}: expected a deployment object such as {_EXAMPLE} or a list of them, "
                              f"got {json.dumps(data)[:60]}")
    items = data if isinstance(data, list) else [data]
    if not items:
        raise DeploymentError(f"{path}: the list holds no deployment")
    known = {f.name for f in dataclasses.fields(Deployment)}
    out = []
    for i, item in enumerate(items):
        label = f"{path}: item {i}" if isinstance(data, list) else f"{path}"
        if not isinstance(item, dict):
            raise DeploymentError(f"{label}: expected a deployment object such as {_EXAMPLE}, "
                                  f"got {json.dumps(item)[:60]}")
        unknown = set(item) - known
        if unknown:
            raise DeploymentError(f"{label}: unknown deployment fields {sorted(unknown)}; known: {sorted(known)}")
        try:
            out.append(Deployment(**item))
        except (TypeError, ValueError) as exc:
            raise DeploymentError(f"{label}: {exc}") from None
    return out


def plan(deployments: list[Deployment]) -> tuple[list, list[tuple[str, str]]]:
    """(every kernel spec the deployments need, deduplicated in a stable order;
    the (family, reason) of each part a family skips for them)."""
    seen, specs, skips = set(), [], []
    for dep in deployments:
        for module_name in FAMILY_MODULES:
            module = importlib.import_module(module_name)
            family = FAMILY_LABELS.get(module_name, module_name)
            for spec in module.deployment_specs(dep):
                if spec not in seen:
                    seen.add(spec)
                    specs.append(spec)
            if hasattr(module, "deployment_skips"):
                reasons = module.deployment_skips(dep)
            else:
                reasons = [f"EP {r}: no kernel for this EP size" for r in dep.ep_sizes
                           if not module.deployment_specs(dataclasses.replace(dep, ep_sizes=(r,)))]
            shape = f"hidden={dep.hidden} experts={dep.num_experts} top-{dep.num_topk}"
            for reason in reasons:
                if (family, f"{shape}: {reason}") not in skips:
                    skips.append((family, f"{shape}: {reason}"))
    return specs, skips


def specs_for(deployments: list[Deployment]) -> list:
    """Every kernel spec the deployments need, deduplicated, in a stable order."""
    return plan(deployments)[0]
