"""KernelSpec: the single source of truth for one kernel's specialization.

A spec is a frozen dataclass of compile-time fields only (never tensors).
It validates itself on construction, renders its template, hashes its
content and names itself, e.g. `layout_e256_r8_k8-3f2a9c0d1b2e4f56`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar, Iterable

from . import render as _render


def check_choice(spec_name: str, field: str, value: Any, allowed: Iterable[Any]) -> None:
    """value must be one of allowed, of the same type (128.0 or True is not 128 or 1: they would
    render into the kernel source as 128.0 / true and fail inside NVRTC)."""
    allowed = tuple(allowed)
    if not any(value == a and type(value) is type(a) for a in allowed):
        raise ValueError(f"{spec_name}.{field}={value!r}: allowed values are {list(allowed)}")


def check_int(spec_name: str, field: str, value: Any, lo: int | None = None, hi: int | None = None,
              multiple_of: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{spec_name}.{field}={value!r}: expected an int")
    if lo is not None and value < lo:
        raise ValueError(f"{spec_name}.{field}={value}: must be >= {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{spec_name}.{field}={value}: must be <= {hi}")
    if multiple_of is not None and value % multiple_of != 0:
        raise ValueError(f"{spec_name}.{field}={value}: must be a multiple of {multiple_of}")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Base class. Subclasses are frozen dataclasses that set `family` and `template` (a class
    attribute, or a property where one family has one template per kernel) and implement
    `validate`, `template_vars` and `name_fields`."""

    family: ClassVar[str] = ""
    template: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def _abstract(self, method: str):
        if type(self) is KernelSpec:
            return NotImplementedError("KernelSpec is the abstract base of kernel specs; build a family's spec "
                                       "instead, e.g. epkern.layout.LayoutSpec or epkern.fp8.Fp8CastSpec")
        return NotImplementedError(f"{type(self).__name__} must implement KernelSpec.{method}()")

    # -- to implement --------------------------------------------------------
    def validate(self) -> None:
        raise self._abstract("validate")

    def template_vars(self) -> dict[str, Any]:
        raise self._abstract("template_vars")

    def name_fields(self) -> str:
        """Short readable encoding of the fields, e.g. 'e256_r8_k8'."""
        raise self._abstract("name_fields")

    # -- derived ---------------------------------------------------------------
    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def content_hash(self) -> str:
        payload = json.dumps({"family": self.family, "fields": self.fields()}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def symbol(self) -> str:
        """C identifier prefix of the kernel's entry points (readable in profiler traces)."""
        return f"{self.family}_{self.name_fields()}"

    @property
    def name(self) -> str:
        """Readable, unique name for logs and cache file names."""
        return f"{self.symbol}-{self.content_hash[:16]}"

    def render(self) -> str:
        variables = dict(self.template_vars())
        variables.setdefault("symbol", self.symbol)
        return _render.render(self.template, variables)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.fields().items())
        return f"{type(self).__name__}({args})"
