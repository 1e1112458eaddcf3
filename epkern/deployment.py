"""A deployment: the model shapes a service runs, and every kernel spec it needs.

`epkern precompile` builds all of them into the cache so that machines without
a compiler (EPKERN_JIT=0) only load. Each kernel family module exposes
`deployment_specs(deployment) -> list[KernelSpec]`; FAMILY_MODULES lists them.
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


@dataclasses.dataclass(frozen=True)
class Deployment:
    """Defaults: DeepSeek-V3 (hidden 7168, 256 routed experts, top-8) at EP 2, 4 and 8."""

    hidden: int = 7168
    num_experts: int = 256
    num_topk: int = 8
    ep_sizes: tuple[int, ...] = (2, 4, 8)

    def __post_init__(self):
        for name in ("hidden", "num_experts", "num_topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"deployment {name}={value!r}: expected a positive int")
        object.__setattr__(self, "ep_sizes", tuple(self.ep_sizes))
        for r in self.ep_sizes:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1 or self.num_experts % r:
                raise ValueError(f"deployment ep_sizes: {r!r} must be a positive int dividing num_experts={self.num_experts}")


def load_deployments(path: str | Path | None) -> list[Deployment]:
    """A JSON file holding one deployment object or a list of them (fields as in Deployment)."""
    if path is None:
        return [Deployment()]
    data = json.loads(Path(path).read_text())
    items = data if isinstance(data, list) else [data]
    known = {f.name for f in dataclasses.fields(Deployment)}
    out = []
    for item in items:
        unknown = set(item) - known
        if unknown:
            raise ValueError(f"{path}: unknown deployment fields {sorted(unknown)}; known: {sorted(known)}")
        out.append(Deployment(**item))
    return out


def specs_for(deployments: list[Deployment]) -> list:
    """Every kernel spec the deployments need, deduplicated, in a stable order."""
    seen, specs = set(), []
    for dep in deployments:
        for module_name in FAMILY_MODULES:
            for spec in importlib.import_module(module_name).deployment_specs(dep):
                if spec not in seen:
                    seen.add(spec)
                    specs.append(spec)
    return specs
