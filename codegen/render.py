"""Render kernel templates with one strict Jinja environment.

Templates substitute constants and switch features only; shared device code
lives in `templates/include/*.cuh.j2` and is pulled in with `{% include %}`,
so the rendered source is self-contained and its hash covers every include.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import jinja2


def templates_dir() -> Path:
    return Path(str(resources.files("epkern.templates")))


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["cpp"] = _cpp_literal
    return env


def _cpp_literal(value):
    """Jinja filter: a Python constant as a C++ literal (bools as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render(template: str, variables: dict) -> str:
    return environment().get_template(template).render(**variables)


def list_templates() -> list[str]:
    """Every top-level kernel template (includes excluded)."""
    return sorted(p.name for p in templates_dir().glob("*.cu.j2"))
