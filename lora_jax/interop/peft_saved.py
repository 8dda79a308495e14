"""PEFT's ``modules_to_save``: our :class:`~lora_jax.Trainable` leaves in a PEFT adapter.

PEFT trains a ``modules_to_save`` module in full and saves its state dict under the
module's own name, ``base_model.model.<module>.weight`` (the
``modules_to_save.<adapter>.`` infix removed), listing the module in
``adapter_config.json``'s ``modules_to_save`` (PEFT matches a module when its name ends
with an entry). A Trainable leaf is written under the HF tensor name of its path: its
``module_map`` module + ``.weight``, else :data:`~lora_jax.interop.HF_LLAMA_NAMES`
(``{i}``: one tensor per stacked layer; ``kernel`` leaves stored transposed, as
torch's ``(out, in)``).

Example:
    >>> tensor_name("norm/scale", {}), tensor_name("lm_head/kernel", {"lm_head/kernel": "lm_head"})
    ('model.norm.weight', 'lm_head.weight')
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from lora_jax.core import is_implicit, path_str
from lora_jax.interop.hf_names import HF_LLAMA_NAMES
from lora_jax.interop.peft_format import PREFIX, PeftConfig, has_tied_embeddings, strip_params
from lora_jax.lora import Trainable

__all__ = ["apply_saved", "saved_tensors", "split_saved", "tensor_name", "unmark"]

_INFIX = ".modules_to_save.default."


def tensor_name(path: str, module_map: Mapping[str, str]) -> str | None:
    """The HF tensor name (``{i}`` for stacked layers) of our leaf ``path``, or None."""
    if path in module_map:
        return module_map[path] + ".weight"
    return HF_LLAMA_NAMES.get(path)


def _torch_layout(path: str, x: np.ndarray) -> np.ndarray:
    return x.T if path.rsplit("/", 1)[-1] == "kernel" and x.ndim == 2 else x


def _trainables(params) -> list[tuple[str, Trainable]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_implicit)
    return [(strip_params(path_str(p)), x) for p, x in flat if isinstance(x, Trainable)]


def _named(path: str, module_map, what: str) -> str:
    name = tensor_name(path, module_map)
    if name is None:
        raise ValueError(f"{what}: no HF tensor name for trainable leaf {path!r}; add it to "
                         "module_map (our path -> HF module name).")
    return name


def saved_tensors(params, module_map: Mapping[str, str]) -> tuple[dict, list[str]]:
    """``({key: tensor}, modules_to_save)`` of the Trainable leaves of ``params``."""
    tensors, modules = {}, []
    for path, x in _trainables(params):
        if path.endswith("embedding") and has_tied_embeddings(params):
            raise ValueError(f"to_peft: trainable leaf {path!r} is a tied embedding, which is "
                             "also the output head here; PEFT's modules_to_save copy would "
                             "only change the input lookup. Untie it or do not train it.")
        name = _named(path, module_map, "to_peft")
        value = np.asarray(jax.device_get(x.value))
        layers = [(name.format(i=i), value[i]) for i in range(value.shape[0])] \
            if "{i}" in name else [(name, value)]
        for n, v in layers:
            tensors[PREFIX + n] = np.ascontiguousarray(_torch_layout(path, v))
            modules.append(n.rsplit(".", 1)[0])
    return tensors, sorted(modules)


def split_saved(raw: Mapping[str, np.ndarray], cfg: PeftConfig) -> tuple[dict, dict]:
    """``({HF tensor name: array} of modules_to_save, the other tensors)``."""
    saved, rest = {}, {}
    for key, arr in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(_INFIX, ".")
        module = name.rsplit(".", 1)[0]
        if "lora_" not in name and any(module.endswith(m) for m in cfg.modules_to_save):
            saved[name] = arr
        else:
            rest[key] = arr
    return saved, rest


def unmark(params) -> tuple[object, list[str]]:
    """``params`` with Trainable leaves unwrapped, and their paths."""
    paths = [p for p, _ in _trainables(params)]
    plain = jax.tree.map(lambda x: x.value if isinstance(x, Trainable) else x, params,
                         is_leaf=is_implicit)
    return plain, paths


def _value(path: str, leaf, name: str, saved: dict):
    names = [name.format(i=i) for i in range(leaf.shape[0])] if "{i}" in name else [name]
    missing = [n for n in names if n not in saved]
    if missing:
        raise ValueError(f"from_peft: modules_to_save tensors for {path!r} are missing: "
                         f"{missing[:4]}")
    parts = [_torch_layout(path, np.asarray(saved.pop(n))) for n in names]
    value = np.stack(parts) if "{i}" in name else parts[0]
    if tuple(value.shape) != tuple(leaf.shape):
        raise ValueError(f"from_peft: modules_to_save tensor {names[0]!r} gives {path!r} shape "
                         f"{value.shape}, the leaf is {tuple(leaf.shape)}")
    return Trainable(jax.numpy.asarray(value, leaf.dtype))


def apply_saved(params, saved: dict, marked: list[str], module_map: Mapping[str, str]):
    """``params`` with every leaf that a saved tensor names as a Trainable of its value.

    Raises ``ValueError`` for saved tensors no leaf takes, and for leaves that were
    Trainable in the template but get no tensor."""
    saved = dict(saved)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_implicit)
    out, taken = [], set()
    for kp, leaf in flat:
        path = strip_params(path_str(kp))
        name = tensor_name(path, module_map)
        hit = name is not None and (name in saved or name.format(i=0) in saved)
        if hit and is_implicit(leaf):
            raise ValueError(f"from_peft: {path!r} is both a LoRA module and in modules_to_save")
        out.append(_value(path, leaf, name, saved) if hit else leaf)
        if hit:
            taken.add(path)
    if saved:
        raise ValueError(f"from_peft: modules_to_save tensors {sorted(saved)[:6]} match no "
                         "leaf of the params; pass module_map= for them.")
    stale = [p for p in marked if p not in taken]
    if stale:
        raise ValueError(f"from_peft: params have Trainable leaves the adapter does not save: "
                         f"{stale}; unwrap them (lora_jax.merge) or save them with the adapter.")
    return jax.tree_util.tree_unflatten(treedef, out)
