"""epkern against DeepEP v1.2.1's public API, written down as data (tests/data/deep_ep_v1_2_1_signatures.json,
from DeepEP's sources): every name exists, every DeepEP parameter is there with the same name, order,
kind and default; what epkern adds comes after them with a default; nothing hides behind *args.
CPU only: the alias is installed in a subprocess-free way (the test restores sys.modules)."""
from __future__ import annotations

import inspect
import json
import os
import sys

import pytest
import torch

import epkern

DATA = os.path.join(os.path.dirname(__file__), "data", "deep_ep_v1_2_1_signatures.json")
TABLE = json.load(open(DATA))
REQUIRED = "<required>"


@pytest.fixture
def deep_ep():
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "deep_ep" or k.startswith("deep_ep.")}
    try:
        yield epkern.install_as_deep_ep()
    finally:
        for k in [k for k in sys.modules if k == "deep_ep" or k.startswith("deep_ep.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def signature_problems(qualname: str, obj, expected: list) -> list[str]:
    """Why obj's signature is not a DeepEP-compatible extension of `expected` (empty: it is)."""
    params = list(inspect.signature(obj).parameters.values())
    problems = []
    for i, (name, default) in enumerate(expected):
        if i >= len(params):
            problems.append(f"{qualname}: parameter {i} {name!r} is missing")
            continue
        p = params[i]
        if p.name != name:
            problems.append(f"{qualname}: parameter {i} is {p.name!r}, DeepEP's is {name!r}")
            continue
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            problems.append(f"{qualname}: {name!r} is {p.kind.description}, DeepEP's is positional-or-keyword")
        want = inspect.Parameter.empty if default == REQUIRED else default
        if p.default is not want and p.default != want or type(p.default) is not type(want):
            problems.append(f"{qualname}: {name!r} defaults to {p.default!r}, DeepEP's to {want!r}")
    for p in params[len(expected):]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            problems.append(f"{qualname}: {p} hides parameters (DeepEP's signature is explicit)")
        elif p.default is inspect.Parameter.empty:
            problems.append(f"{qualname}: extra parameter {p.name!r} has no default, so DeepEP's calls would fail")
    return problems


def _resolve(deep_ep, qualname: str):
    owner, _, name = qualname.rpartition(".")
    if not owner:
        return getattr(deep_ep.utils, name)
    cls = getattr(deep_ep.utils if owner == "EventHandle" else deep_ep, owner)
    return getattr(cls, name)


@pytest.mark.parametrize("qualname", sorted(TABLE["signatures"]))
def test_signature_matches_deep_ep(deep_ep, qualname):
    problems = signature_problems(qualname, _resolve(deep_ep, qualname), TABLE["signatures"][qualname])
    assert not problems, "\n".join(problems)


def test_every_module_name_exists(deep_ep):
    import importlib

    for module_name, names in TABLE["modules"].items():
        module = importlib.import_module(module_name)
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, f"{module_name} lacks {missing}"
    assert deep_ep.topk_idx_t is torch.int64
    assert deep_ep.Buffer is epkern.Buffer and deep_ep.utils.EventOverlap is epkern.EventOverlap


def test_staticmethods_and_class_attributes(deep_ep):
    for name in TABLE["staticmethods"]["Buffer"]:
        assert isinstance(inspect.getattr_static(deep_ep.Buffer, name), staticmethod), f"Buffer.{name}"
    for name, value in TABLE["class_attributes"]["Buffer"].items():
        assert getattr(deep_ep.Buffer, name) == value


def test_every_buffer_method_has_an_explicit_signature(deep_ep):
    """Every public Buffer method, DeepEP's or epkern's own, spells out its parameters."""
    for name, member in vars(deep_ep.Buffer).items():
        fn = member.__func__ if isinstance(member, staticmethod) else member
        if name.startswith("_") and name != "__init__" or not callable(fn):
            continue
        kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
        assert not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}, f"Buffer.{name}"


# -- the checker itself fails on each kind of drift ------------------------------------------------
def _deep(a, b=1, c=None):
    pass


@pytest.mark.parametrize("variant, why", [
    (lambda a, b=1: None, "missing"),
    (lambda a, bb=1, c=None: None, "is 'bb'"),
    (lambda a, c=None, b=1: None, "is 'c'"),
    (lambda a, b=2, c=None: None, "defaults to 2"),
    (lambda a, b=True, c=None: None, "defaults to True"),
    (lambda a, *, b=1, c=None: None, "keyword-only"),
    (lambda a, b=1, c=None, d=None, *args: None, "hides"),
    (lambda a, b=1, c=None, d=None, e=...: None, None),
])
def test_checker_catches_drift(variant, why):
    expected = [["a", REQUIRED], ["b", 1], ["c", None]]
    assert not signature_problems("f", _deep, expected)
    problems = signature_problems("f", variant, expected)
    if why is None:
        assert not problems
    else:
        assert any(why in p for p in problems), problems
