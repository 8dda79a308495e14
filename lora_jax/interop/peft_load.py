"""``from_peft``: a PEFT LoRA adapter (made by PEFT or by ``to_peft``) onto our tree.

Each adapter module is matched to one of our leaves through ``module_map`` (``{i}``:
the index along the stacked layer axis); its factors become ``a = A.T`` [in, r] and
``b = B.T`` [r, out], in a :class:`~lora_jax.LoraWeight` over the leaf. Layers whose
ranks or alphas differ are zero-padded to the largest rank with each layer's scale
folded into its ``b`` (exact). With ``use_dora`` the leaf becomes a
:class:`~lora_jax.variants.DoraWeight` whose ``m`` is PEFT's ``lora_magnitude_vector``
(one per output feature; an untouched layer of a stacked leaf gets its norm, i.e. the
base). Everything is checked: unknown keys, modules the config targets without
tensors, an A without its B, a DoRA adapter without its magnitude, shapes.

Example:
    >>> params = from_peft("adapters/sst2", base_params)   # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core import path_str
from lora_jax.interop.hf_names import LLAMA_MODULE_MAP
from lora_jax.interop.peft_format import (
    PeftConfig,
    alpha_for_scale,
    conv_view,
    has_tied_embeddings,
    is_embedding,
    linear_view,
    parse_key,
    read_adapter,
    strip_params,
)
from lora_jax.interop.peft_saved import apply_saved, split_saved, unmark
from lora_jax.lora import LoraWeight
from lora_jax.variants import DoraWeight, to_dora

__all__ = ["from_peft"]

class _Factors(NamedTuple):
    """One layer's adapter: ``a`` [in, r], ``b`` [r, out] and its scale, rank and alpha."""

    a: np.ndarray
    b: np.ndarray
    scale: float
    rank: int
    alpha: float
    m: np.ndarray | None = None


def _group(raw: Mapping[str, np.ndarray]) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """``{module: {"A"|"B"|"base": array}}`` and ``{module or None: [its keys]}`` (None:
    keys that are no adapter tensor), for messages that name the file's own keys."""
    found, keys = {}, {}
    for key, arr in raw.items():
        hit = parse_key(key)
        keys.setdefault(None if hit is None else hit[0], []).append(key)
        if hit is not None:
            found.setdefault(hit[0], {})[hit[1]] = np.array(arr)
    return found, keys


def _modules_of(template: str, found) -> list[tuple[int | None, str]]:
    """``[(layer index or None, module)]`` of the adapter modules one leaf's template names."""
    if "{i}" not in template:
        return [(None, template)] if template in found else []
    rx = re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")
    return sorted((int(m.group(1)), mod) for mod in found if (m := rx.match(mod)))


def _plan(module_map, leaves: dict, found, keys: dict, cfg: PeftConfig) -> dict:
    """``{our path: [(layer, module)]}``; raises listing unknown and missing tensors."""
    plan, claimed, missing = {}, set(), []
    for path, template in module_map.items():
        if path not in leaves:
            continue
        mods = _modules_of(template, found)
        claimed.update(m for _, m in mods)
        expected = [template.format(i=i) for i in range(leaves[path].shape[0])
                    if cfg.transforms_layer(i)] if "{i}" in template else [template]
        missing += [m for m in expected if cfg.targets(m) and m not in found]
        if mods:
            plan[path] = mods
    unknown = [k for m in [None, *sorted(set(found) - claimed)] for k in keys.get(m, [])]
    missing += [f"{m}.lora_{'B' if 'A' in parts else 'A'}" for m, parts in found.items()
                if m in claimed and ("A" in parts) != ("B" in parts)]
    # DoRA: every adapted module has a magnitude exactly when the config says use_dora
    missing += [f"{m}.lora_magnitude_vector" for m, parts in found.items()
                if m in claimed and cfg.use_dora and "A" in parts and "M" not in parts]
    unknown += [k for m, parts in found.items() if m in claimed and not cfg.use_dora
                and "M" in parts for k in keys.get(m, []) if "lora_magnitude_vector" in k]
    if unknown or missing:
        raise ValueError(f"from_peft: adapter does not match the params: "
                         f"unknown keys={sorted(unknown)} missing={sorted(missing)}")
    return plan


def _is_node(x) -> bool:
    return isinstance(x, (LoraWeight, DoraWeight))


def _in_axes(path: str, leaf, per: tuple) -> tuple[int, ...]:
    """A lorafied leaf's own layout; a plain leaf must be a matrix, (in, out)."""
    if _is_node(leaf):
        return leaf.in_axes
    if len(per) != 2:
        raise ValueError(f"from_peft: leaf {path!r} has per-layer shape {per}; a plain leaf "
                         "must be an (in, out) matrix. Load onto lorafied params (lorafy(..., "
                         "fn=, args=) or layout=) so its input and output axes are known.")
    return (0,)


def _from_io(x: np.ndarray, lead: int, per: tuple, in_axes) -> np.ndarray:
    """``x`` [*lead, in, out] (PEFT's flattened matrix) as an array of the weight's shape."""
    ins, outs, perm = linear_view(per, in_axes)
    x = x.reshape(*x.shape[:lead], *ins, *outs)
    return np.transpose(x, (*range(lead), *(lead + perm.index(j) for j in range(len(per)))))


def _base(path: str, leaf, parts: list[dict], stacked: bool, in_axes):
    """The leaf's base weight; PEFT's saved ``base_layer`` weight replaces it, as in PEFT."""
    base = leaf.w0 if _is_node(leaf) else leaf
    saved = [p["base"] for p in parts if "base" in p]
    if not saved:
        return base
    if stacked:
        raise ValueError(f"from_peft: base_layer weights for stacked leaf {path!r} "
                         "are not supported")
    # PEFT saves torch's (out, in) weight; embeddings are [V, D] on both sides
    bw = saved[0]
    if not is_embedding(path) and bw.ndim == 2 and bw.size == math.prod(base.shape):
        bw = _from_io(bw.T, 0, tuple(base.shape), in_axes)
    if tuple(bw.shape) != tuple(base.shape):
        raise ValueError(f"from_peft: base_layer weight for {path!r} has shape {bw.shape}, "
                         f"expected {base.shape}")
    if _is_node(leaf) and not isinstance(leaf.w0, jax.Array):
        raise ValueError(f"from_peft: cannot replace the non-array base of {path!r}")
    return jnp.asarray(bw, base.dtype)


def _as_linear(mod: str, parts: dict, per: tuple, in_axes) -> dict:
    """A ConvNd module's factors (``lora_A`` [r, in, *K], ``lora_B`` [out, r, 1, ...],
    magnitude [1, out, 1, ...]) as the kernel's flattened Linear ones (:func:`linear_view`)."""
    A = parts["A"]
    if A.ndim <= 2:
        return parts
    try:
        order = conv_view(per, in_axes)
    except ValueError as e:
        raise ValueError(f"from_peft: {mod}: lora_A has shape {A.shape} (a ConvNd adapter), "
                         f"but {e}") from None
    want = tuple(per[j] for j in order)
    if tuple(A.shape[1:]) != want:
        raise ValueError(f"from_peft: {mod}: ConvNd lora_A has shape {A.shape}; the kernel "
                         f"(in, *K) = {want} needs [r, {', '.join(map(str, want))}]. PEFT's "
                         "LoRA of a grouped conv (A over every input channel) has no exact "
                         "form on a grouped kernel.")
    out = dict(parts, B=parts["B"].reshape(parts["B"].shape[0], -1))
    out["A"] = np.transpose(A, (0, *(1 + order.index(j) for j in sorted(in_axes))))
    out["A"] = out["A"].reshape(A.shape[0], -1)
    if "M" in parts:
        out["M"] = parts["M"].reshape(-1)
    return out


def _factors(mod: str, parts: dict, cfg: PeftConfig, io_shape: tuple) -> _Factors:
    A, B = parts["A"].astype(np.float32), parts["B"].astype(np.float32)
    r, r_cfg = A.shape[0], cfg.rank(mod)
    if r_cfg != r or B.shape[1] != r:
        raise ValueError(f"from_peft: {mod}: lora_A/B ranks {A.shape[0]}/{B.shape[1]} disagree "
                         f"with the config rank {r_cfg}")
    a, b = A.T, B.T
    if (a.shape[0], b.shape[1]) != io_shape:
        raise ValueError(f"from_peft: {mod}: factors give a {a.shape[0]}x{b.shape[1]} update, "
                         f"the weight is {io_shape} (in, out)")
    m = parts.get("M")
    if m is not None and tuple(m.shape) != (io_shape[1],):
        raise ValueError(f"from_peft: {mod}: lora_magnitude_vector has shape {m.shape}, the "
                         f"weight has {io_shape[1]} output features")
    return _Factors(a, b, cfg.scale(mod, r), r, cfg.alpha_of(mod),
                    None if m is None else m.astype(np.float32))


def _check_layers(path: str, per_layer: dict, n_layers: int, cfg: PeftConfig) -> None:
    absent = [i for i in range(n_layers) if i not in per_layer]
    if absent and cfg.layers_to_transform is None:
        raise ValueError(f"from_peft: adapter has {path!r} for layers {sorted(per_layer)} but "
                         f"not {absent} (missing keys)")
    bad = [i for i in per_layer if i >= n_layers]
    if bad:
        raise ValueError(f"from_peft: adapter layers {bad} exceed the model's {n_layers} layers")


def _stack(entries: list[_Factors | None], io_shape, use_rslora: bool):
    """``(a [L, in, r], b [L, r, out], alpha)``. Layers that differ in rank or alpha, or
    have no factors, are zero-padded to the largest rank with their scale folded into b,
    and the common alpha gives scale 1."""
    present = [e for e in entries if e is not None]
    if len(present) == len(entries) and len({(e.rank, e.alpha) for e in present}) == 1:
        return (np.stack([e.a for e in entries]), np.stack([e.b for e in entries]),
                present[0].alpha)
    r = max(e.rank for e in present)
    a = np.zeros((len(entries), io_shape[0], r), np.float32)
    b = np.zeros((len(entries), r, io_shape[1]), np.float32)
    for i, e in enumerate(entries):
        if e is not None:
            a[i, :, :e.rank] = e.a
            b[i, :e.rank, :] = e.b * np.float32(e.scale)
    return a, b, alpha_for_scale(1.0, r, use_rslora)


def _new_leaf(path: str, leaf, mods, found, cfg: PeftConfig, stacked: bool, dtype):
    shape = tuple((leaf.w0 if _is_node(leaf) else leaf).shape)
    per = shape[1:] if stacked else shape
    in_axes = _in_axes(path, leaf, per)
    base = _base(path, leaf, [found[m] for _, m in mods], stacked, in_axes)
    ins, outs, _ = linear_view(per, in_axes)
    io_shape = (math.prod(ins), math.prod(outs))
    per_layer = {0 if i is None else i: _factors(m, _as_linear(m, found[m], per, in_axes), cfg,
                                                 io_shape) for i, m in mods}
    n_layers = base.shape[0] if stacked else 1
    if stacked:
        _check_layers(path, per_layer, n_layers, cfg)
    a, b, alpha = _stack([per_layer.get(i) for i in range(n_layers)], io_shape, cfg.use_rslora)
    # back from PEFT's flattened sides to the weight's own axes (a: [L, *I, r], in in_axes order)
    a = a.reshape(n_layers, *ins, -1)
    a = np.transpose(a, (0, *(1 + sorted(in_axes).index(j) for j in in_axes), a.ndim - 1))
    b = b.reshape(n_layers, -1, *outs)
    if not stacked:
        a, b = a[0], b[0]
    out_dtype = dtype or (base.dtype if jnp.issubdtype(base.dtype, jnp.floating) else jnp.float32)
    lw = LoraWeight(w0=base, a=jnp.asarray(a, out_dtype), b=jnp.asarray(b, out_dtype),
                    alpha=float(alpha), rslora=cfg.use_rslora, in_axes=in_axes)
    if not cfg.use_dora:
        return lw
    # m = ||V|| (factor 1) first, for layers the adapter leaves alone; then PEFT's magnitudes.
    m = np.array(to_dora({"w": lw})["w"].m, np.float32).reshape(n_layers, -1)
    for i, e in per_layer.items():
        m[i] = e.m
    m = m.reshape(shape[:1] + outs if stacked else outs)
    return DoraWeight(lw.w0, lw.a, lw.b, jnp.asarray(m, out_dtype), alpha=lw.alpha,
                      rslora=lw.rslora, in_axes=in_axes)


def from_peft(adapter_dir: str | os.PathLike, params, *,
              module_map: Mapping[str, str] | None = None, dtype=None):
    """Load a PEFT LoRA adapter onto ``params`` (our tree, plain or already lorafied).

    Returns ``params`` with a :class:`LoraWeight` on every adapted leaf (``r``,
    ``lora_alpha``, ``use_rslora``, ``rank_pattern`` and ``alpha_pattern`` honoured; a
    :class:`~lora_jax.variants.DoraWeight` with ``use_dora``).
    Leaves that are LoraWeight already get the adapter's factors (their ``w0`` and
    layout are kept).

    Raises ``ValueError`` listing unknown adapter keys, missing keys (modules the config
    targets without tensors, a missing A or B, a layer without factors), or
    unsupported options (LoRA biases, ``fan_in_fan_out``). ``modules_to_save`` tensors
    become :class:`~lora_jax.Trainable` leaves (:mod:`lora_jax.interop.peft_saved`).
    """
    cfg, raw = read_adapter(Path(adapter_dir))
    saved, raw = split_saved(raw, cfg)           # modules_to_save: Trainable leaves
    params, marked = unmark(params)
    found, keys = _group(raw)
    module_map = dict(LLAMA_MODULE_MAP if module_map is None else module_map)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)
    leaves = {strip_params(path_str(p)): x for p, x in flat}
    plan = _plan(module_map, leaves, found, keys, cfg)
    if has_tied_embeddings(params) and any(is_embedding(p) for p in plan):
        raise ValueError("from_peft: an embed_tokens LoRA cannot be applied to a model with tied "
                         "embeddings here (it would also change the output head, unlike in PEFT)")
    new = {path: _new_leaf(path, leaves[path], mods, found, cfg, "{i}" in module_map[path], dtype)
           for path, mods in plan.items()}
    stale = sorted(p for p, x in leaves.items() if _is_node(x) and p not in new)
    if stale:
        raise ValueError(f"from_peft: params have LoraWeight leaves the adapter does not cover: "
                         f"{stale}; pass base params or lora_jax.merge(params)")
    out = jax.tree_util.tree_unflatten(
        treedef, [new.get(strip_params(path_str(p)), x) for p, x in flat])
    return apply_saved(out, saved, marked, module_map)
