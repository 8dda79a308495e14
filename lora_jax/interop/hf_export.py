"""``export_merged``: a LoRA'd tree as one plain ``model.safetensors`` for serving.

Every adapter node is merged (``W0 + s*A@B``) and every quantized leaf that is not
LoRA'd is dequantized, so the file holds plain weights, optionally requantized.
The reference Llama tree is written with HF ``LlamaForCausalLM`` names and torch's
(out, in) orientation (:mod:`lora_jax.interop.hf_names`), any other tree with its
'/'-joined paths in our (in, out) layout.

Example:
    >>> import pathlib, tempfile, jax.numpy as jnp
    >>> from safetensors.numpy import load_file
    >>> from lora_jax.lora import lorafy
    >>> p = lorafy({"d": {"kernel": jnp.ones((5, 7))}}, rank=2, targets="d/kernel")
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> f = export_merged(p, root / "out")
    >>> {k: v.shape for k, v in load_file(f).items()}
    {'d/kernel': (5, 7)}
    >>> import shutil; shutil.rmtree(root)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.checkpoint import check_destination, node_config, replace_dir, write_safetensors
from lora_jax.core import ImplicitArray, is_implicit, path_str
from lora_jax.interop.hf_names import is_llama_tree, llama_to_hf
from lora_jax.lora import merge
from lora_jax.quant import quantize_array

__all__ = ["export_merged"]


def _host(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def _merged_flat(params) -> dict[str, np.ndarray]:
    """``{path: plain array}`` of ``merge(params)``, a leading ``params/`` dropped."""
    merged = jax.tree.map(lambda x: x.materialize() if isinstance(x, ImplicitArray) else x,
                          merge(params), is_leaf=is_implicit)
    leaves, _ = jax.tree_util.tree_flatten_with_path(merged)
    flat = {path_str(p): _host(x) for p, x in leaves}
    if flat and all(p.startswith("params/") for p in flat):
        return {p[len("params/"):]: x for p, x in flat.items()}
    return flat


def _named(flat: dict, name_map) -> dict:
    if name_map is None:
        name_map = "hf_llama" if is_llama_tree(flat) else "path"
    if name_map == "hf_llama":
        try:
            return llama_to_hf(flat)
        except ValueError as e:
            raise ValueError(f"export_merged: {e} Pass name_map='path' or a callable.") from None
    if name_map == "path":
        return dict(flat)
    if callable(name_map):
        return dict(name_map(flat))
    raise ValueError(f"name_map must be None, 'hf_llama', 'path' or a callable; got {name_map!r}.")


def _requantizer(requantize):
    if requantize is None or callable(requantize):
        return requantize
    if not isinstance(requantize, str):
        raise ValueError(
            f"requantize must be None, a kind string or a callable; got {requantize!r}.")

    def rq(name, x):
        leaf = name.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
        if (x.ndim == 2 and jnp.issubdtype(x.dtype, jnp.floating)
                and leaf in ("weight", "kernel") and "embed" not in name):
            return quantize_array(x, requantize, path=name)   # in the exported orientation
        return x
    return rq


def _tensors(named: dict, requantize) -> tuple[dict, dict]:
    """``({tensor name: array}, {quantized name: node config})`` after requantizing."""
    rq = _requantizer(requantize)
    tensors, quant_info = {}, {}
    for name, x in named.items():
        y = rq(name, x) if rq is not None else x
        if not isinstance(y, ImplicitArray):
            tensors[name] = _host(y)
            continue
        for f in dataclasses.fields(y):
            v = getattr(y, f.name)
            if not f.metadata.get("static") and v is not None:
                tensors[f"{name}.{f.name}"] = _host(v)
        quant_info[name] = node_config(y)
    return tensors, quant_info


def export_merged(params, out_dir, *, requantize: str | Callable | None = None,
                  name_map: str | Callable | None = None, overwrite: bool = False) -> str:
    """Write ``merge(params)`` as ``out_dir/model.safetensors``; returns the file's path.

    * ``name_map=None`` (auto): HF Llama names for the reference Llama tree, paths
      otherwise; ``"hf_llama"`` / ``"path"`` force one; a callable
      ``(flat: {path: np.ndarray}) -> {name: array}`` does its own naming.
    * ``requantize``: a callable ``(name, array) -> array or QuantizedWeight`` applied to
      every exported tensor, or a kind string (``"nf4"``, ...) for each 2-D floating
      ``*.weight``/``*kernel`` tensor except embeddings. A quantized tensor is written
      as ``{name}.{field}`` per array field, its config (type, shape, dtype, static
      fields) in the safetensors metadata key ``lora_jax.quantized``.
    * ``overwrite=False`` refuses a non-empty ``out_dir`` (``FileExistsError``), a
      previous export included; ``overwrite=True`` replaces the whole directory. A file
      at ``out_dir`` is always refused (``NotADirectoryError``). Refusals happen before
      anything is computed or written; the directory is written atomically (a temporary
      sibling renamed into place), so a crash leaves the old one or the new one.
    """
    out = check_destination(out_dir, what="export_merged", overwrite=overwrite,
                            kind="merged export")   # before the merge: refusals cost nothing
    tensors, quant_info = _tensors(_named(_merged_flat(params), name_map), requantize)
    st_meta = {}
    if quant_info:
        st_meta["lora_jax.quantized"] = json.dumps(quant_info, sort_keys=True)
    replace_dir(out, lambda d: write_safetensors(d / "model.safetensors", tensors, st_meta),
                overwrite=overwrite, what="export_merged", kind="merged export")
    return str(out / "model.safetensors")
