"""Writing LoRA params as Hugging Face PEFT adapters (one, or one per stacked adapter).

:func:`to_peft` writes ``adapter_model.safetensors`` + ``adapter_config.json`` that
``peft.PeftModel.from_pretrained`` loads onto the matching ``transformers`` model
(the format: :mod:`lora_jax.interop.peft_format`; loading one back:
:func:`lora_jax.interop.from_peft`). Our leaf paths become HF module names through
``module_map`` (default :data:`~lora_jax.interop.LLAMA_MODULE_MAP`); a scanned
leading layer axis [L] is unstacked into ``model.layers.{i}`` modules. DoRA trees
(:class:`~lora_jax.variants.DoraWeight` on every adapted leaf) are written with
``use_dora: true`` and each module's ``lora_magnitude_vector``, as PEFT saves them.

Example:
    >>> import json, pathlib, tempfile, jax.numpy as jnp
    >>> from lora_jax.lora import lorafy
    >>> p = lorafy({"foo": {"kernel": jnp.ones((5, 7))}}, rank=2, alpha=6.0, targets="foo")
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> out = to_peft(p, root / "ad", module_map={"foo/kernel": "model.foo"})
    >>> cfg = json.loads((out / "adapter_config.json").read_text())
    >>> cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
    (2, 6, ['foo'])
    >>> import shutil; shutil.rmtree(root)
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Mapping, NamedTuple

import jax
import numpy as np

from lora_jax.checkpoint import replace_dir
from lora_jax.core import Targets, path_str, select_leaves
from lora_jax.interop.hf_names import LLAMA_MODULE_MAP
from lora_jax.interop.peft_format import (
    alpha_for_scale,
    conv_view,
    factor_keys,
    has_tied_embeddings,
    is_adapter_dir,
    is_embedding,
    linear_view,
    magnitude_key,
    strip_params,
    write_adapter,
    write_adapter_files,
)
from lora_jax.interop.peft_saved import saved_tensors
from lora_jax.lora import LoraWeight, lora_scale
from lora_jax.variants import DoraWeight, adapter_names, unstack_adapter

__all__ = ["to_peft", "to_peft_adapters"]

PathLike = str | os.PathLike


class _Module(NamedTuple):
    name: str
    rank: int
    alpha: float
    rslora: bool


def _is_node(x) -> bool:
    return isinstance(x, (LoraWeight, DoraWeight))


def _lora_leaves(params, module_map: Mapping[str, str]) -> list[tuple[str, LoraWeight]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)
    leaves = [(strip_params(path_str(p)), x) for p, x in flat if _is_node(x)]
    if not leaves:
        raise ValueError("to_peft: params contain no LoraWeight (lorafy them first)")
    unknown = [p for p, _ in leaves if p not in module_map]
    if unknown:
        stacked = next((p for p, x in leaves if p in unknown and x.stack_ndim), None)
        example = (f"{{{stacked!r}: 'model.layers.{{i}}.<module>'}} ({{i}}: the index along "
                   "its stacked layer axis)" if stacked else f"{{{unknown[0]!r}: '<module>'}}")
        raise ValueError(f"to_peft: no HF module name for LoRA leaves {unknown[:6]}; pass "
                         f"module_map={{our path: the torch model's module name}}, e.g. "
                         f"{example}. The paths it knows now: {sorted(module_map)[:6]}"
                         f"{f' and {len(module_map) - 6} more' if len(module_map) > 6 else ''}.")
    if has_tied_embeddings(params) and any(is_embedding(p) for p, _ in leaves):
        raise ValueError(
            "to_peft: LoRA on embed_tokens of a model with tied embeddings also changes the "
            "output head here, which a PEFT adapter cannot express (PEFT's embedding LoRA "
            "only affects the input lookup); exclude embed_tokens from the LoRA targets")
    doras = sorted(p for p, x in leaves if isinstance(x, DoraWeight))
    if doras and len(doras) != len(leaves):
        raise ValueError(
            f"to_peft: params mix DoRA leaves {doras[:3]} with plain LoRA leaves; PEFT's "
            "use_dora applies to every module of an adapter. Make them all DoRA (to_dora) or "
            "all LoRA (merge() the DoRA ones, or export them as a separate adapter).")
    return leaves


def _peft_factors(w, conv: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """PEFT's ``lora_A`` [*S, r, in], ``lora_B`` [*S, out, r] and magnitude [*S, out] (or
    None): each side of the weight flattened in its own axis order (:func:`linear_view`).
    A conv kernel's are ConvNd's: [*S, r, in, *K], [*S, out, r, 1, ...], [*S, 1, out, 1, ...]."""
    s = w.stack_ndim
    a, b = np.asarray(jax.device_get(w.a)), np.asarray(jax.device_get(w.b))
    m = np.asarray(jax.device_get(w.m)) if isinstance(w, DoraWeight) else None
    lead = w.shape[:s]
    if conv:
        order = conv_view(w.shape[s:], w.in_axes)
        ones = (1,) * (len(order) - 1)
        a = np.transpose(a, (*range(s), a.ndim - 1, *(s + w.in_axes.index(j) for j in order)))
        b = np.swapaxes(b, -1, -2).reshape(*lead, -1, w.rank, *ones)
        return a, b, None if m is None else m.reshape(*lead, 1, -1, *ones)
    ins, outs, _ = linear_view(w.shape[s:], w.in_axes)
    a = np.transpose(a, (*range(s), *(s + i for i in np.argsort(w.in_axes)), a.ndim - 1))
    a = np.swapaxes(a.reshape(*lead, math.prod(ins), w.rank), -1, -2)
    b = np.swapaxes(b.reshape(*lead, w.rank, math.prod(outs)), -1, -2)
    return a, b, None if m is None else m.reshape(*lead, -1)


def _per_layer(path: str, w, template: str, conv: bool) -> list[tuple]:
    """``[(module name, A, B, magnitude or None)]`` in PEFT's shapes: one per layer of a
    stacked leaf."""
    if w.a is None or w.b is None:
        raise ValueError(f"to_peft: LoRA leaf {path!r} has no a/b (a frozen half of split?)")
    s = w.stack_ndim
    if s > 1:
        raise ValueError(f"to_peft: leaf {path!r} has {s} stacked axes; only 0 or 1 supported")
    if (s == 1) != ("{i}" in template):
        need = "needs {i}" if s else "must not have {i}"
        raise ValueError(f"to_peft: leaf {path!r} has {s} stacked axes; its module name "
                         f"{template!r} {need}")
    try:
        a, b, m = _peft_factors(w, conv)
    except ValueError as e:
        raise ValueError(f"to_peft: leaf {path!r} is named by conv=, but {e}.") from None
    if s == 0:
        return [(template, a, b, m)]
    return [(template.format(i=i), a[i], b[i], None if m is None else m[i])
            for i in range(a.shape[0])]


def _tensors(leaves, module_map, convs) -> tuple[dict[str, np.ndarray], list[_Module]]:
    tensors, modules = {}, []
    for path, w in leaves:
        for name, a, b, m in _per_layer(path, w, module_map[path], path in convs):
            key_a, key_b = factor_keys(name, is_embedding(path))
            tensors[key_a], tensors[key_b] = a, b
            if m is not None:
                tensors[magnitude_key(name)] = m
            modules.append(_Module(name, int(w.rank), float(w.alpha), bool(w.rslora)))
    return tensors, modules


def _common_rslora(modules: list[_Module]) -> tuple[bool, list[_Module]]:
    """One ``use_rslora`` for the adapter; nodes with the other flag get the alpha that
    gives them the same scale under it."""
    use = Counter(m.rslora for m in modules).most_common(1)[0][0]
    return use, [m if m.rslora == use else m._replace(
        alpha=alpha_for_scale(lora_scale(m.alpha, m.rank, m.rslora), m.rank, use), rslora=use)
        for m in modules]


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _patterns(modules: list[_Module], r0: int, alpha0: float) -> tuple[dict, dict, list[str]]:
    """``rank_pattern``, ``alpha_pattern`` (by short name where all layers agree, else by
    full module name) and ``target_modules``."""
    by_short: dict[str, list[_Module]] = {}
    for m in modules:
        by_short.setdefault(m.name.rsplit(".", 1)[-1], []).append(m)
    rank_pattern, alpha_pattern = {}, {}
    for short, ms in sorted(by_short.items()):
        uniform = len({(m.rank, m.alpha) for m in ms}) == 1
        for m in ms[:1] if uniform else ms:
            key = short if uniform else m.name
            if m.rank != r0:
                rank_pattern[key] = m.rank
            if m.alpha != alpha0:
                alpha_pattern[key] = _num(m.alpha)
    return rank_pattern, alpha_pattern, sorted(by_short)


def _config(modules: list[_Module], base_model_name_or_path: str | None,
            task_type: str | None) -> dict:
    use_rslora, modules = _common_rslora(modules)
    r0 = Counter(m.rank for m in modules).most_common(1)[0][0]
    alpha0 = Counter(m.alpha for m in modules).most_common(1)[0][0]
    rank_pattern, alpha_pattern, targets = _patterns(modules, r0, alpha0)
    return {
        "peft_type": "LORA", "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0, "lora_alpha": _num(alpha0), "target_modules": targets,
        "use_rslora": use_rslora, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


def _convs(params, conv) -> set[str]:
    """Paths (``params/`` stripped) of the leaves ``conv`` names as ConvNd kernels."""
    if conv is None:
        return set()
    return {strip_params(p) for p, _, _ in select_leaves(params, conv, what="to_peft conv")}


def _adapter(params, base_model_name_or_path, module_map, task_type,
             conv) -> tuple[dict, dict]:
    """``(tensors, adapter_config)`` of one adapter."""
    if task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"to_peft: task_type must be a string such as 'CAUSAL_LM', or None; "
                        f"got {task_type!r}.")
    # keys as lorafy / infer_layout print them, with or without a variables dict's params/
    module_map = {strip_params(k): v for k, v in
                  (LLAMA_MODULE_MAP if module_map is None else module_map).items()}
    leaves = _lora_leaves(params, module_map)
    tensors, modules = _tensors(leaves, module_map, _convs(params, conv))
    config = _config(modules, base_model_name_or_path, task_type)
    config["use_dora"] = isinstance(leaves[0][1], DoraWeight)
    saved, to_save = saved_tensors(params, module_map)        # Trainable leaves
    tensors.update(saved)
    config["modules_to_save"] = to_save or None
    return tensors, config


def to_peft(params, out_dir: PathLike, *, base_model_name_or_path: str | None = None,
            module_map: Mapping[str, str] | None = None, task_type: str | None = "CAUSAL_LM",
            conv: Targets = None, overwrite: bool = False) -> Path:
    """Write the LoRA factors of ``params`` as a PEFT LoRA adapter directory.

    Args:
      params: our param tree (or ``{"params": tree}``) with LoraWeight nodes (e.g. from
        :func:`lora_jax.lorafy` after training; the base weights are not written).
      out_dir: adapter directory, written atomically (temp dir + rename). A previous
        adapter directory there (only ``adapter_config.json``,
        ``adapter_model.safetensors``, ``README.md``) is replaced; any other non-empty
        directory is refused (``FileExistsError``) unless ``overwrite=True``, which
        replaces the whole directory; a file there is always refused
        (``NotADirectoryError``). Nothing is written when it is refused.
      base_model_name_or_path: recorded in ``adapter_config.json``.
      module_map: our leaf path -> HF module name; default ``LLAMA_MODULE_MAP``.
      task_type: PEFT's ``task_type`` (``PeftModel.from_pretrained`` picks its model class by
        it); None for a model that is no transformers task model (PEFT's custom models).
      conv: the leaves that are convolution kernels (a regex, a list of them or a predicate,
        as lorafy's ``targets``), written as PEFT's ConvNd LoRA: ``lora_A`` a conv with the
        kernel's window [r, in, *K], ``lora_B`` a 1x1 conv. Any kernel layout (HWIO, OIHW,
        ...); its in-feature axis is the input axis beside the output axis. PEFT's LoRA of a
        grouped conv means something else (A over every input channel), so only ungrouped
        kernels load there (a grouped one fails PEFT's shape check).

    A weight with several input or output axes (DenseGeneral's ``[H, Dh, D]`` o_proj) is
    written as the ``nn.Linear`` that flattens each side in the weight's own axis order,
    ``[H*Dh, D]``; :func:`~lora_jax.interop.from_peft` onto lorafied params reverses it.

    :class:`~lora_jax.Trainable` leaves (``lorafy(..., trainable=)``) are written as
    PEFT's ``modules_to_save`` (:mod:`lora_jax.interop.peft_saved`).
    Returns the adapter directory path.
    """
    tensors, config = _adapter(params, base_model_name_or_path, module_map, task_type, conv)
    return write_adapter(Path(out_dir), tensors, config, overwrite=overwrite)


def to_peft_adapters(params, out_dir: PathLike, *, base_model_name_or_path: str | None = None,
                     module_map: Mapping[str, str] | None = None,
                     task_type: str | None = "CAUSAL_LM", conv: Targets = None,
                     overwrite: bool = False) -> dict[str, Path]:
    """Export every adapter of a stacked tree as PEFT's ``save_pretrained`` lays out
    several: ``out_dir/<name>/`` per adapter, except one named ``"default"`` which goes
    in ``out_dir`` itself. Returns ``{name: path}``; load with
    ``PeftModel.from_pretrained(model, out_dir/<first>, adapter_name=<first>)`` then
    ``load_adapter(out_dir/<name>, adapter_name=<name>)``.

    ``out_dir`` is written as one atomic directory, under the rules of :func:`to_peft`
    (a previous export of adapters is replaced, other contents need ``overwrite=True``)."""
    root = Path(os.fspath(out_dir)).absolute()
    names = list(adapter_names(params))
    files = {n: _adapter(unstack_adapter(params, n), base_model_name_or_path, module_map,
                         task_type, conv)
             for n in names}

    def write(d: Path):
        for n, (tensors, config) in files.items():
            sub = d if n == "default" else d / n
            sub.mkdir(exist_ok=True)
            write_adapter_files(sub, tensors, config)

    replace_dir(root, write, overwrite=overwrite, what="to_peft_adapters",
                ours=lambda d: is_adapter_dir(d, nested=True), kind="PEFT adapter directory")
    return {n: root if n == "default" else root / n for n in names}
