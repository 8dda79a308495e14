"""The bf16-temporaries analysis: its HLO walk on hand-written modules (both print styles),
and facts about the real compiled steps of a small Llama on this backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bf16_temporaries as bt
from lora_jax.models import LlamaConfig

# A [3, 5, 7] stacked bf16 weight: upcast whole in one fusion, one layer upcast in a fusion
# nested in a dot fusion (so not materialized), and a program convert of a [B=2, T=9, 11]
# activation.
HLO = """HloModule m, entry_computation_layout={(bf16[3,5,7]{2,1,0})->f32[3,5,7]{2,1,0}}

%fused_up (param_0: bf16[3,5,7]) -> f32[3,5,7] {
  %param_0 = bf16[3,5,7]{2,1,0} parameter(0)
  ROOT %convert.1 = f32[3,5,7]{2,1,0} convert(%param_0)
}

%nested (q0: bf16[1,5,7]) -> f32[1,5,7] {
  %q0 = bf16[1,5,7]{2,1,0} parameter(0)
  ROOT %convert.2 = f32[1,5,7]{2,1,0} convert(%q0)
}

%fused_dot (p0: f32[18,5], p1: bf16[1,5,7]) -> (f32[18,7], s8[4]) {
  %p0 = f32[18,5]{1,0} parameter(0)
  %p1 = bf16[1,5,7]{2,1,0} parameter(1)
  %n = f32[1,5,7]{2,1,0} fusion(%p1), kind=kLoop, calls=%nested
  %b = f32[5,7]{1,0} bitcast(%n)
  %d = f32[18,7]{1,0} dot(%p0, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %z = s8[4]{0} constant({0, 0, 0, 0})
  ROOT %t = (f32[18,7]{1,0}, s8[4]{0}) tuple(%d, %z)
}

ENTRY %main (w: bf16[3,5,7], x: f32[18,5], a: f32[2,9,11]) -> (f32[3,5,7], bf16[2,9,11]) {
  %w = bf16[3,5,7]{2,1,0} parameter(0)
  %x = f32[18,5]{1,0} parameter(1)
  %a = f32[2,9,11]{2,1,0} parameter(2)
  %up = f32[3,5,7]{2,1,0} fusion(%w), kind=kLoop, calls=%fused_up
  %s = bf16[1,5,7]{2,1,0} slice(%w), slice={[0:1], [0:5], [0:7]}
  %o = (f32[18,7]{1,0}, /*index=1*/s8[4]{0}) fusion(%x, %s), kind=kOutput, calls=%fused_dot
  %y = bf16[2,9,11]{2,1,0} convert(%a), metadata={op_name="jit(f)/convert_element_type"}
  ROOT %r = (f32[3,5,7]{2,1,0}, bf16[2,9,11]{2,1,0}) tuple(%up, %y)
}
"""


def _other_style(text):
    """The same module printed without ``%`` and with operand shapes, as other XLAs do."""
    text = text.replace("%", "")
    for name, ty in (("param_0", "bf16[3,5,7]{2,1,0}"), ("q0", "bf16[1,5,7]{2,1,0}"),
                     ("a", "f32[2,9,11]{2,1,0}")):
        text = text.replace(f"convert({name})", f"convert({ty} {name})")
    return text.replace("dot(p0, b)", "dot(f32[18,5]{1,0} p0, f32[5,7]{1,0} b)")


@pytest.fixture
def classes():
    params = {"layers": {"w": {"kernel": jax.ShapeDtypeStruct((3, 5, 7), jnp.bfloat16)}}}
    cfg = LlamaConfig(vocab_size=97, hidden_size=5, intermediate_size=7, num_hidden_layers=3,
                      num_attention_heads=5, head_dim=2)
    return bt.shape_classes(params, cfg, batch=2, seq=9)


@pytest.mark.parametrize("style", ["percent", "plain"])
def test_walk_lists_every_convert_and_dot_of_a_hand_written_module(classes, style):
    r = bt.analyze_hlo(HLO if style == "percent" else _other_style(HLO), classes)
    assert r["converts"] == [
        {"direction": "bf16->f32", "shape": [1, 5, 7], "class": "weight", "scope": "one layer",
         "materialized": False, "origin": "compiler", "count": 1, "bytes": 35 * 4},
        {"direction": "bf16->f32", "shape": [3, 5, 7], "class": "weight", "scope": "all layers",
         "materialized": True, "origin": "compiler", "count": 1, "bytes": 105 * 4},
        {"direction": "f32->bf16", "shape": [2, 9, 11], "class": "activation", "scope": None,
         "materialized": True, "origin": "program", "count": 1, "bytes": 198 * 2}]
    assert r["bytes"] == {"all": {"bf16->f32": {"weight": 560}, "f32->bf16": {"activation": 396}},
                          "materialized": {"bf16->f32": {"weight": 420},
                                           "f32->bf16": {"activation": 396}}}
    assert r["matmuls"] == [{"class": "weight", "lhs": "f32", "rhs": "f32", "out": "f32",
                             "where": "fusion kOutput", "count": 1}]
    assert r["whole_weight_upcasts"] == {"shapes": [[3, 5, 7]], "bytes": 420}


def test_classes_of_shapes(classes):
    assert not classes["ambiguous"]
    assert bt.classify((7, 5), classes) == ("weight", "one layer")       # swapped axes
    assert bt.classify((2, 5, 9, 9), classes) == ("scores", None)       # B, H, T, S
    assert bt.classify((2, 8, 97), classes) == ("logits", None)         # B, T - 1, V
    assert bt.classify((35,), classes) == ("weight", "one layer")       # NF4 blocks
    assert bt.classify((3, 3), classes) == ("other", None)


def test_a_sequence_length_equal_to_a_weight_axis_is_flagged(classes):
    params = {"w": {"kernel": jax.ShapeDtypeStruct((5, 7), jnp.bfloat16)}}
    cfg = LlamaConfig(vocab_size=97, hidden_size=5, intermediate_size=7, num_hidden_layers=1,
                      num_attention_heads=5, head_dim=2)
    assert bt.shape_classes(params, cfg, batch=1, seq=7)["ambiguous"]
    assert not bt.shape_classes(params, cfg, batch=1, seq=9)["ambiguous"]


SMALL = dict(vocab_size=97, hidden_size=35, intermediate_size=33, num_hidden_layers=3,
             num_attention_heads=5, head_dim=6, num_key_value_heads=5)
KERNELS = sorted([[3, 35, 30]] * 3 + [[3, 30, 35], [3, 35, 33], [3, 35, 33], [3, 33, 35]])


@pytest.fixture(scope="module")
def steps():
    return {b: bt.analyze_step(b, SMALL, batch=2, seq=7, rank=4) for b in ("fp32", "bf16")}


def _sums_match(r):
    for scope, by_dir in r["bytes"].items():
        for direction, by_class in by_dir.items():
            for cls, total in by_class.items():
                assert total == sum(c["bytes"] for c in r["converts"] if c["class"] == cls and
                                    c["direction"] == direction and
                                    (scope == "all" or c["materialized"]))
    for c in r["converts"]:
        assert c["bytes"] == np.prod(c["shape"]) * {"bf16->f32": 4, "f32->bf16": 2}[
            c["direction"]] * c["count"]


def test_fp32_step_has_no_bf16_and_only_f32_matmuls(steps):
    r = steps["fp32"]
    assert r["converts"] == [] and r["bytes"] == {}
    assert {(m["lhs"], m["rhs"], m["out"]) for m in r["matmuls"]} == {("f32", "f32", "f32")}
    assert r["frozen_bytes"] == {"float32": 4 * (97 * 35 * 2 + 3 * (4 * 35 * 30 + 3 * 35 * 33)
                                                 + 3 * 35 * 2 + 35)}


def test_bf16_step_upcasts_whole_weights_exactly_when_its_weight_matmuls_are_f32(steps):
    r = steps["bf16"]
    _sums_match(r)
    weight_dots = {(m["lhs"], m["rhs"]) for m in r["matmuls"] if m["class"] == "weight"}
    assert weight_dots in ({("f32", "f32")}, {("bf16", "bf16")})
    whole = r["whole_weight_upcasts"]
    if weight_dots == {("f32", "f32")}:
        # every stacked kernel copied to f32 once, all layers at a time, and the LM head
        assert sorted(whole["shapes"]) == sorted(KERNELS + [[35, 97]])
        assert whole["bytes"] == 4 * sum(np.prod(s) for s in whole["shapes"])
        assert r["temp_bytes"] >= whole["bytes"]
    else:
        assert whole == {"shapes": [], "bytes": 0}
        assert "weight" not in r["bytes"].get("materialized", {}).get("bf16->f32", {})
    # the model's own logits.astype(float32)
    assert any(c["direction"] == "bf16->f32" and c["class"] == "logits" for c in r["converts"])


def test_unknown_base_is_named():
    with pytest.raises(ValueError, match="^base must be one of .*'fp16'"):
        bt.analyze_step("fp16")
