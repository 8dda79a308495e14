"""Hugging Face PEFT interop: save LoRA params as a PEFT adapter and load PEFT adapters.

* :func:`to_peft` writes ``adapter_model.safetensors`` + ``adapter_config.json`` that
  ``peft.PeftModel.from_pretrained`` loads onto the matching ``transformers`` model.
* :func:`from_peft` loads such an adapter (made by PEFT or by :func:`to_peft`) onto our
  parameter tree, returning it with :class:`~lora_jax.LoraWeight` nodes.

Layout conversion (per layer; our kernels are (in, out), torch Linear weights (out, in))::

    lora_A.weight [r, in]  == a.T        (a: [in, r])
    lora_B.weight [out, r] == b.T        (b: [r, out])
    PEFT: W + scaling * B @ A, scaling = lora_alpha / r (or / sqrt(r) with use_rslora)
    ours: w0 + scale * a @ b, scale = alpha / r (or / sqrt(r) with rslora)

Embeddings use ``lora_embedding_A [r, V]`` / ``lora_embedding_B [D, r]`` with the same
transposes. The scanned leading layer axis [L] is unstacked into
``model.layers.{i}`` modules (and stacked back on load).

The mapping from our '/'-joined leaf paths to HF module names is ``module_map``
(default :data:`LLAMA_MODULE_MAP`, for :mod:`lora_jax.models.llama`); ``{i}`` in a
module name stands for the index along the stacked layer axis.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core.tree import path_str
from lora_jax.lora.weight import LoraWeight

__all__ = ["to_peft", "from_peft", "LLAMA_MODULE_MAP"]

PathLike = str | os.PathLike

#: our leaf path -> HF module name ("{i}" = index along the stacked layer axis)
LLAMA_MODULE_MAP: dict[str, str] = {
    "embed_tokens/embedding": "model.embed_tokens",
    "layers/self_attn/q_proj/kernel": "model.layers.{i}.self_attn.q_proj",
    "layers/self_attn/k_proj/kernel": "model.layers.{i}.self_attn.k_proj",
    "layers/self_attn/v_proj/kernel": "model.layers.{i}.self_attn.v_proj",
    "layers/self_attn/o_proj/kernel": "model.layers.{i}.self_attn.o_proj",
    "layers/mlp/gate_proj/kernel": "model.layers.{i}.mlp.gate_proj",
    "layers/mlp/up_proj/kernel": "model.layers.{i}.mlp.up_proj",
    "layers/mlp/down_proj/kernel": "model.layers.{i}.mlp.down_proj",
    "lm_head/kernel": "lm_head",
}

_PREFIX = "base_model.model."
_LINEAR_SUFFIX = {"A": "lora_A.weight", "B": "lora_B.weight"}
_EMBED_SUFFIX = {"A": "lora_embedding_A", "B": "lora_embedding_B"}
_KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|base_layer\.weight)$"
)


def _is_lora(x) -> bool:
    return isinstance(x, LoraWeight)


def _is_embedding(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "embedding"


def _strip(path: str) -> str:
    return path[len("params/") :] if path.startswith("params/") else path


def _short(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _has_tied_embeddings(params) -> bool:
    p = params.get("params", params) if isinstance(params, Mapping) else params
    return isinstance(p, Mapping) and "embed_tokens" in p and "lm_head" not in p


# ---------------------------------------------------------------------------------------
# safetensors writing (numpy + ml_dtypes: keeps bf16 as BF16)
# ---------------------------------------------------------------------------------------

_NP_TO_ST = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
}


def _st_name(dt: np.dtype) -> str:
    if dt in _NP_TO_ST:
        return _NP_TO_ST[dt]
    import ml_dtypes

    if dt == np.dtype(ml_dtypes.bfloat16):
        return "BF16"
    raise ValueError(f"cannot write dtype {dt} to safetensors")


def _write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        data = arr.tobytes()
        header[name] = {
            "dtype": _st_name(arr.dtype),
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------


def _lora_leaves(params) -> list[tuple[str, LoraWeight]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_lora)
    return [(_strip(path_str(p)), leaf) for p, leaf in flat if _is_lora(leaf)]


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def to_peft(
    params,
    out_dir: PathLike,
    *,
    base_model_name_or_path: str | None = None,
    module_map: Mapping[str, str] | None = None,
) -> Path:
    """Writes the LoRA factors of ``params`` as a PEFT LoRA adapter directory.

    Args:
      params: our param tree (or ``{"params": tree}``) with LoraWeight nodes (e.g. from
        :func:`lora_jax.lorafy` after training; the base weights are not written).
      out_dir: adapter directory (written atomically: temp dir + rename; replaced if
        it exists).
      base_model_name_or_path: recorded in ``adapter_config.json``.
      module_map: our leaf path -> HF module name; default :data:`LLAMA_MODULE_MAP`.

    Returns the adapter directory path.
    """
    module_map = dict(LLAMA_MODULE_MAP if module_map is None else module_map)
    leaves = _lora_leaves(params)
    if not leaves:
        raise ValueError("to_peft: params contain no LoraWeight (lorafy them first)")
    unknown = [p for p, _ in leaves if p not in module_map]
    if unknown:
        raise ValueError(
            f"to_peft: no HF module name for LoRA leaves {unknown}; pass module_map= "
            f"(known paths: {sorted(module_map)})"
        )
    if _has_tied_embeddings(params) and any(_is_embedding(p) for p, _ in leaves):
        raise ValueError(
            "to_peft: LoRA on embed_tokens of a model with tied embeddings also changes the "
            "output head here, which a PEFT adapter cannot express (PEFT's embedding LoRA "
            "only affects the input lookup); exclude embed_tokens from the LoRA targets"
        )

    tensors: dict[str, np.ndarray] = {}
    modules: list[tuple[str, int, float, bool]] = []  # (module name, r, alpha, rslora)
    for path, w in leaves:
        if w.a is None or w.b is None:
            raise ValueError(f"to_peft: LoRA leaf {path!r} has no a/b (a frozen half of split?)")
        if w.in_ndim != 1:
            raise ValueError(f"to_peft: leaf {path!r} has in_ndim={w.in_ndim}; only 2-D kernels map to PEFT")
        a, b = _np(w.a), _np(w.b)
        s = w.stack_ndim
        template = module_map[path]
        if s == 0:
            if "{i}" in template:
                raise ValueError(f"to_peft: leaf {path!r} is not stacked but its module name has {{i}}")
            per_layer = [(template, a, b)]
        elif s == 1:
            if "{i}" not in template:
                raise ValueError(f"to_peft: leaf {path!r} is stacked; its module name needs {{i}}")
            per_layer = [(template.format(i=i), a[i], b[i]) for i in range(a.shape[0])]
        else:
            raise ValueError(f"to_peft: leaf {path!r} has {s} stacked axes; only 0 or 1 supported")
        suffix = _EMBED_SUFFIX if _is_embedding(path) else _LINEAR_SUFFIX
        for name, ai, bi in per_layer:
            tensors[f"{_PREFIX}{name}.{suffix['A']}"] = np.ascontiguousarray(ai.T)  # [r, in]
            tensors[f"{_PREFIX}{name}.{suffix['B']}"] = np.ascontiguousarray(bi.T)  # [out, r]
            modules.append((name, int(w.rank), float(w.alpha), bool(w.rslora)))

    # One use_rslora for the adapter: if nodes disagree, re-express every alpha for the
    # common flag (scale is what matters: alpha / r or alpha / sqrt(r)).
    use_rslora = Counter(m[3] for m in modules).most_common(1)[0][0]

    def alpha_for(r, alpha, rs):
        if rs == use_rslora:
            return alpha
        scale = alpha / (math.sqrt(r) if rs else r)
        return scale * (math.sqrt(r) if use_rslora else r)

    modules = [(n, r, alpha_for(r, al, rs)) for n, r, al, rs in modules]
    r0 = Counter(m[1] for m in modules).most_common(1)[0][0]
    alpha0 = Counter(m[2] for m in modules).most_common(1)[0][0]
    by_short: dict[str, list[tuple[str, int, float]]] = {}
    for m in modules:
        by_short.setdefault(_short(m[0]), []).append(m)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for short, ms in sorted(by_short.items()):
        uniform = len({(r, al) for _, r, al in ms}) == 1
        keys = [(short, ms[0])] if uniform else [(n, (n, r, al)) for n, r, al in ms]
        for key, (_, r, al) in keys:
            if r != r0:
                rank_pattern[key] = r
            if al != alpha0:
                alpha_pattern[key] = al

    def num(x: float):
        return int(x) if float(x).is_integer() else float(x)

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": num(alpha0),
        "target_modules": sorted(by_short),
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: num(v) for k, v in alpha_pattern.items()},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_safetensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------


def _pattern_value(pattern: Mapping[str, Any] | None, module: str, default):
    """PEFT's ``get_pattern_key``: first key with ``re.match(rf"(.*\\.)?({key})$", module)``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targeted(target_modules, module: str) -> bool | None:
    """Whether PEFT's ``target_modules`` selects ``module`` (None: cannot tell)."""
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return not (module.endswith("embed_tokens") or module == "lm_head")
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _layer_index(module: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", module)
    return int(m.group(1)) if m else None


def from_peft(
    adapter_dir: PathLike,
    params,
    *,
    module_map: Mapping[str, str] | None = None,
    dtype=None,
):
    """Loads a PEFT LoRA adapter onto ``params`` (our tree, plain or already lorafied).

    Returns ``params`` with a :class:`LoraWeight` on every adapted leaf (``r``,
    ``lora_alpha``, ``use_rslora``, ``rank_pattern`` and ``alpha_pattern`` honoured).
    Leaves that are LoraWeight already get the adapter's factors (their ``w0`` is kept).

    Raises ``ValueError`` listing unknown adapter keys, missing keys (modules the config
    targets without tensors, a missing A or B, a layer without factors), or
    unsupported options (DoRA, LoRA biases, ``modules_to_save``, ``fan_in_fan_out``).
    """
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"from_peft: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = []
    if cfg.get("use_dora"):
        unsupported.append("use_dora=True")
    if cfg.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out=True")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        unsupported.append(f"bias={cfg.get('bias')!r}/lora_bias={cfg.get('lora_bias')!r}")
    if cfg.get("modules_to_save"):
        unsupported.append(f"modules_to_save={cfg['modules_to_save']!r}")
    if cfg.get("layer_replication"):
        unsupported.append("layer_replication")
    if unsupported:
        raise ValueError(f"from_peft: unsupported adapter options: {', '.join(unsupported)}")
    use_rslora = bool(cfg.get("use_rslora", False))
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", 8))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    layers_to_transform = cfg.get("layers_to_transform")
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]

    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        from lora_jax.models.loading import read_safetensors

        raw = read_safetensors(st)
    elif (adapter_dir / "adapter_model.bin").exists():
        raise ValueError("from_peft: adapter_model.bin (pickle) is not supported; save with safetensors")
    else:
        raise FileNotFoundError(f"no adapter_model.safetensors in {adapter_dir}")

    # module name -> {"A": arr, "B": arr, "base": arr}
    found: dict[str, dict[str, np.ndarray]] = {}
    unknown_keys = []
    for key, arr in raw.items():
        k = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        k = k.replace(".default.", ".")  # adapter-name-qualified keys, if any
        m = _KEY_RE.match(k)
        if not m:
            unknown_keys.append(key)
            continue
        kind = m.group("kind")
        slot = "base" if kind == "base_layer.weight" else kind.replace(".weight", "")[-1]
        found.setdefault(m.group("module"), {})[slot] = np.array(arr)

    module_map = dict(LLAMA_MODULE_MAP if module_map is None else module_map)
    tied = _has_tied_embeddings(params)

    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_lora)
    leaves_by_path = {_strip(path_str(p)): leaf for p, leaf in flat}
    # our path -> list of (layer index or None, module name)
    claimed: set[str] = set()
    plan: dict[str, list[tuple[int | None, str]]] = {}
    missing: list[str] = []
    for path, template in module_map.items():
        if path not in leaves_by_path:
            continue
        leaf = leaves_by_path[path]
        shape = tuple(leaf.shape)
        if "{i}" in template:
            n_layers = shape[0]
            rx = re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")
            mods = []
            for mod in found:
                mm = rx.match(mod)
                if mm:
                    mods.append((int(mm.group(1)), mod))
            expected = [template.format(i=i) for i in range(n_layers)]
        else:
            mods = [(None, template)] if template in found else []
            expected = [template]
        for _, mod in mods:
            claimed.add(mod)
        # modules the config targets must carry tensors
        for i, mod in enumerate(expected):
            if layers_to_transform is not None and "{i}" in template and i not in layers_to_transform:
                continue
            if _targeted(cfg.get("target_modules"), mod) and mod not in found:
                missing.append(mod)
        if mods:
            plan[path] = sorted(mods, key=lambda t: -1 if t[0] is None else t[0])
    unknown_mods = sorted(set(found) - claimed)
    unknown_keys += [
        f"{_PREFIX}{m}.{s}" for m in unknown_mods for s in sorted(found[m])
    ]
    for mod, parts in found.items():
        if mod in claimed and ("A" in parts) != ("B" in parts):
            missing.append(f"{mod}.lora_{'B' if 'A' in parts else 'A'}")
    if unknown_keys or missing:
        raise ValueError(
            "from_peft: adapter does not match the params: "
            f"unknown keys={sorted(unknown_keys)} missing={sorted(missing)}"
        )

    replace: dict[str, Any] = {}
    for path, mods in plan.items():
        leaf = leaves_by_path[path]
        base = leaf.w0 if _is_lora(leaf) else leaf
        is_embed = _is_embedding(path)
        if is_embed and tied:
            raise ValueError(
                "from_peft: an embed_tokens LoRA cannot be applied to a model with tied "
                "embeddings here (it would also change the output head, unlike in PEFT)"
            )
        stacked = "{i}" in module_map[path]
        n_layers = tuple(base.shape)[0] if stacked else 1
        out_dtype = dtype or (base.dtype if jnp.issubdtype(base.dtype, jnp.floating) else jnp.float32)
        # base_layer weights saved by PEFT (save_embedding_layers) replace the base, as PEFT does.
        bases = [found[m].get("base") for _, m in mods]
        if any(b is not None for b in bases):
            if stacked:
                raise ValueError(f"from_peft: base_layer weights for stacked leaf {path!r} are not supported")
            bw = bases[0] if is_embed else bases[0].T
            if tuple(bw.shape) != tuple(base.shape):
                raise ValueError(f"from_peft: base_layer weight for {path!r} has shape {bw.shape}, expected {base.shape}")
            if _is_lora(leaf) and not isinstance(leaf.w0, jax.Array):
                raise ValueError(f"from_peft: cannot replace the non-array base of {path!r}")
            base = jnp.asarray(bw, base.dtype)
        per_layer: dict[int, tuple[np.ndarray, np.ndarray, float, int, float]] = {}
        for idx, mod in mods:
            A, B = found[mod]["A"].astype(np.float32), found[mod]["B"].astype(np.float32)
            r = A.shape[0]
            r_cfg = int(_pattern_value(rank_pattern, mod, r_default))
            if r_cfg != r or B.shape[1] != r:
                raise ValueError(
                    f"from_peft: {mod}: lora_A/B ranks {A.shape[0]}/{B.shape[1]} disagree with the "
                    f"config rank {r_cfg}"
                )
            alpha = float(_pattern_value(alpha_pattern, mod, alpha_default))
            scale = alpha / (math.sqrt(r) if use_rslora else r)
            a, b = A.T, B.T  # [in, r], [r, out]
            per_shape = tuple(base.shape)[1:] if stacked else tuple(base.shape)
            if (a.shape[0], b.shape[1]) != per_shape:
                raise ValueError(
                    f"from_peft: {mod}: factors give a {a.shape[0]}x{b.shape[1]} update, "
                    f"the weight is {per_shape}"
                )
            per_layer[0 if idx is None else idx] = (a, b, scale, r, alpha)
        if stacked:
            absent = [i for i in range(n_layers) if i not in per_layer]
            if absent and layers_to_transform is None:
                raise ValueError(
                    f"from_peft: adapter has {path!r} for layers {sorted(per_layer)} but not {absent} "
                    "(missing keys)"
                )
            bad = [i for i in per_layer if i >= n_layers]
            if bad:
                raise ValueError(f"from_peft: adapter layers {bad} exceed the model's {n_layers} layers")
        entries = [per_layer.get(i) for i in range(n_layers)]
        present = [e for e in entries if e is not None]
        same = len({(e[3], e[4]) for e in present}) == 1 and len(present) == n_layers
        if same:
            r, alpha = present[0][3], present[0][4]
            a_s = [e[0] for e in entries]
            b_s = [e[1] for e in entries]
        else:
            # Per-layer ranks/alphas (or layers without LoRA): zero-pad to the largest rank
            # and fold each layer's scale into b, with a common scale of 1. Exact.
            r = max(e[3] for e in present)
            alpha = math.sqrt(r) if use_rslora else float(r)
            in_dim, out_dim = per_shape
            a_s, b_s = [], []
            for e in entries:
                a_i = np.zeros((in_dim, r), np.float32)
                b_i = np.zeros((r, out_dim), np.float32)
                if e is not None:
                    a_i[:, : e[3]] = e[0]
                    b_i[: e[3], :] = e[1] * np.float32(e[2])
                a_s.append(a_i)
                b_s.append(b_i)
        a_arr = np.stack(a_s) if stacked else a_s[0]
        b_arr = np.stack(b_s) if stacked else b_s[0]
        replace[path] = LoraWeight(
            w0=base,
            a=jnp.asarray(a_arr, out_dtype),
            b=jnp.asarray(b_arr, out_dtype),
            alpha=float(alpha),
            rslora=use_rslora,
            in_ndim=1,
        )

    # LoRA leaves of `params` that the adapter does not cover would silently stay.
    stale = sorted(p for p, l in leaves_by_path.items() if _is_lora(l) and p not in replace)
    if stale:
        raise ValueError(
            f"from_peft: params have LoraWeight leaves the adapter does not cover: {stale}; "
            "pass base params or lora_jax.merge(params)"
        )
    new_leaves = [replace.get(_strip(path_str(p)), leaf) for p, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, new_leaves)
