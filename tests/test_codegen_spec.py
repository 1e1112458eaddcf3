"""KernelSpec: validation messages, immutability, stable hashes and names, strict rendering."""
import dataclasses
import os
import re
import subprocess
import sys

import jinja2
import pytest

from epkern.codegen import KernelSpec, check_choice, check_int
from epkern.codegen import render as render_mod
from epkern.layout import MAX_RANKS, LayoutSpec


# -- validation: the error names the field and what is allowed ------------------------------------
@pytest.mark.parametrize("fields, field, allowed", [
    (dict(num_experts=256, num_ranks=0, num_topk=8), "num_ranks", ">= 1"),
    (dict(num_experts=256, num_ranks=MAX_RANKS + 1, num_topk=8), "num_ranks", f"<= {MAX_RANKS}"),
    (dict(num_experts=100, num_ranks=8, num_topk=8), "num_experts", "multiple of 8"),
    (dict(num_experts=0, num_ranks=1, num_topk=8), "num_experts", ">= 1"),
    (dict(num_experts=256, num_ranks=8, num_topk=0), "num_topk", ">= 1"),
    (dict(num_experts=256, num_ranks=8, num_topk=65), "num_topk", "<= 64"),
    (dict(num_experts=256, num_ranks=8, num_topk=8, threads=100), "threads", "multiple of 32"),
    (dict(num_experts=256, num_ranks=8, num_topk=8, threads=2048), "threads", "<= 1024"),
    (dict(num_experts=256.0, num_ranks=8, num_topk=8), "num_experts", "expected an int"),
    (dict(num_experts=256, num_ranks=True, num_topk=8), "num_ranks", "expected an int"),
    (dict(num_experts=256, num_ranks=8, num_topk="8"), "num_topk", "expected an int"),
])
def test_layout_spec_rejects_bad_fields(fields, field, allowed):
    with pytest.raises(ValueError) as info:
        LayoutSpec(**fields)
    message = str(info.value)
    assert f"LayoutSpec.{field}=" in message
    assert allowed in message


def test_check_choice_lists_allowed_values():
    with pytest.raises(ValueError, match=r"Spec\.dtype='fp16': allowed values are \['bf16', 'fp8'\]"):
        check_choice("Spec", "dtype", "fp16", ("bf16", "fp8"))
    check_choice("Spec", "dtype", "fp8", ("bf16", "fp8"))  # accepted: no exception


def test_check_int_bounds_are_inclusive():
    check_int("S", "n", 1, lo=1, hi=8, multiple_of=1)
    check_int("S", "n", 8, lo=1, hi=8)
    with pytest.raises(ValueError, match=r"S\.n=9: must be <= 8"):
        check_int("S", "n", 9, lo=1, hi=8)


def test_spec_is_frozen_and_hashable():
    spec = LayoutSpec(num_experts=256, num_ranks=8, num_topk=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_ranks = 4
    assert {spec: 1}[LayoutSpec(num_experts=256, num_ranks=8, num_topk=8)] == 1


# -- hashes and names ----------------------------------------------------------------------------
def test_name_is_readable_and_hash_tracks_every_field():
    base = LayoutSpec(num_experts=256, num_ranks=8, num_topk=8)
    assert re.fullmatch(r"layout_e256_r8_k8-[0-9a-f]{16}", base.name)
    assert base.symbol == "layout_e256_r8_k8"
    assert base.content_hash == LayoutSpec(num_experts=256, num_ranks=8, num_topk=8).content_hash
    variants = [LayoutSpec(num_experts=128, num_ranks=8, num_topk=8), LayoutSpec(num_experts=256, num_ranks=4, num_topk=8),
                LayoutSpec(num_experts=256, num_ranks=8, num_topk=6),
                LayoutSpec(num_experts=256, num_ranks=8, num_topk=8, threads=128)]
    hashes = {base.content_hash} | {v.content_hash for v in variants}
    assert len(hashes) == 1 + len(variants)
    # threads is not in the readable part, but the hash suffix still tells the names apart
    assert variants[-1].symbol == base.symbol and variants[-1].name != base.name


def test_hash_is_stable_across_processes():
    spec = LayoutSpec(num_experts=64, num_ranks=4, num_topk=6)
    code = ("from epkern.layout import LayoutSpec; "
            "print(LayoutSpec(num_experts=64, num_ranks=4, num_topk=6).name)")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == spec.name


# -- rendering ------------------------------------------------------------------------------------
def test_render_is_deterministic_and_substitutes_constants():
    spec = LayoutSpec(num_experts=96, num_ranks=12, num_topk=6, threads=128)
    source = spec.render()
    assert source == LayoutSpec(num_experts=96, num_ranks=12, num_topk=6, threads=128).render()
    for line in ("constexpr int NUM_EXPERTS = 96;", "constexpr int NUM_RANKS = 12;",
                 "constexpr int NUM_TOPK = 6;", "constexpr int THREADS = 128;"):
        assert line in source
    assert f"{spec.symbol}(" in source
    assert "{{" not in source and "{%" not in source
    assert "#include <cuda/std/cstdint>" in source  # the shared include was inlined


def test_render_switches_feature_on_rank_count():
    packed = LayoutSpec(num_experts=64, num_ranks=8, num_topk=4).render()
    scalar = LayoutSpec(num_experts=60, num_ranks=6, num_topk=4).render()
    assert "8 ranks per 8-byte store" in packed and "8 ranks per 8-byte store" not in scalar


@dataclasses.dataclass(frozen=True)
class _MissingVariableSpec(LayoutSpec):
    """The layout template with one variable left out: StrictUndefined must refuse to render."""

    def template_vars(self):
        variables = dict(super().template_vars())
        del variables["num_topk"]
        return variables


def test_strict_undefined_catches_a_missing_variable():
    assert render_mod.environment().undefined is jinja2.StrictUndefined
    spec = _MissingVariableSpec(num_experts=64, num_ranks=8, num_topk=4)
    with pytest.raises(jinja2.UndefinedError, match="num_topk"):
        spec.render()


def test_base_spec_must_be_subclassed():
    with pytest.raises(NotImplementedError):
        KernelSpec()


def test_every_template_is_listed():
    templates = render_mod.list_templates()
    assert "layout.cu.j2" in templates
    assert all(not t.startswith("include") for t in templates)
