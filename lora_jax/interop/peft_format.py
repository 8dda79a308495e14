"""The Hugging Face PEFT LoRA adapter format: key names, config options, files.

An adapter directory holds ``adapter_model.safetensors`` and ``adapter_config.json``.
Keys are ``base_model.model.<HF module>.lora_A.weight`` [r, in] and ``.lora_B.weight``
[out, r] (embeddings: ``lora_embedding_A`` [r, V], ``lora_embedding_B`` [D, r]); with
``use_dora`` also ``.lora_magnitude_vector`` [out] (embeddings: [D]), DoRA's ``m``;
a ConvNd module's are ``lora_A`` [r, in, *K] (a conv with the kernel's window),
``lora_B`` [out, r, 1, ...] (a 1x1 conv) and the magnitude [1, out, 1, ...];
PEFT computes ``W + scaling * B @ A`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)``
with ``use_rslora``), per module ``rank_pattern`` / ``alpha_pattern`` overriding
``r`` / ``lora_alpha``. Ours is ``w0 + scale * a @ b`` with ``a = A.T`` and ``b = B.T``.

Example:
    >>> parse_key("base_model.model.model.layers.3.mlp.up_proj.lora_B.weight")
    ('model.layers.3.mlp.up_proj', 'B')
    >>> cfg = PeftConfig(r=8, alpha=16.0, rank_pattern={"down_proj": 4})
    >>> cfg.rank("model.layers.0.mlp.down_proj"), cfg.scale("model.layers.0.mlp.down_proj", 4)
    (4, 4.0)
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lora_jax.checkpoint import read_json, read_safetensors, replace_dir, write_safetensors
from lora_jax.lora import lora_scale

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "PREFIX", "PeftConfig", "alpha_for_scale", "conv_view",
           "factor_keys", "has_tied_embeddings", "is_adapter_dir", "is_embedding", "linear_view",
           "magnitude_key", "parse_key", "read_adapter", "strip_params", "write_adapter",
           "write_adapter_files"]

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
#: what a PEFT adapter directory holds (PEFT's save_pretrained also writes a README.md)
ADAPTER_DIR_FILES = frozenset({ADAPTER_FILE, CONFIG_FILE, "README.md"})
PREFIX = "base_model.model."
_KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?|base_layer\.weight)$"
)


def strip_params(path: str) -> str:
    """A leaf path as ``module_map`` keys it: without a variables dict's leading ``params/``
    (linen) or a Variable's trailing ``/value`` (an NNX State), so one key fits both."""
    path = path[len("params/"):] if path.startswith("params/") else path
    return path[:-len("/value")] if path.endswith("/value") else path


def is_embedding(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "embedding"


def has_tied_embeddings(params) -> bool:
    p = params.get("params", params) if isinstance(params, Mapping) else params
    return isinstance(p, Mapping) and "embed_tokens" in p and "lm_head" not in p


def factor_keys(module: str, embedding: bool) -> tuple[str, str]:
    """The (A, B) tensor keys of ``module``."""
    a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else \
        ("lora_A.weight", "lora_B.weight")
    return f"{PREFIX}{module}.{a}", f"{PREFIX}{module}.{b}"


def magnitude_key(module: str) -> str:
    """The key of ``module``'s DoRA magnitude, as PEFT's ``save_pretrained`` writes it."""
    return f"{PREFIX}{module}.lora_magnitude_vector"


def linear_view(per_shape, in_axes) -> tuple[tuple, tuple, tuple]:
    """How a weight of per-layer shape ``per_shape`` is a PEFT ``nn.Linear``: ``(ins, outs,
    perm)``, its input and output axis sizes in its own axis order and the permutation taking
    it to ``[*ins, *outs]``. PEFT's ``[in, out]`` matrix is that array flattened on each side,
    as a torch model reshapes heads: DenseGeneral's o_proj ``[H, Dh, D]`` is ``[H*Dh, D]``,
    q_proj ``[D, H, Dh]`` is ``[D, H*Dh]``."""
    ins = sorted(in_axes)
    outs = [j for j in range(len(per_shape)) if j not in in_axes]
    return (tuple(per_shape[j] for j in ins), tuple(per_shape[j] for j in outs),
            tuple(ins + outs))


def conv_view(per_shape, in_axes) -> tuple[int, ...]:
    """The kernel axes in the order of PEFT's ConvNd ``lora_A`` after its rank axis:
    ``(in-feature, *spatial)`` (torch's ``[out, in, *K]`` weight). The in-feature axis
    is the input axis beside the output axis: after it (OIHW, haiku's transposed HWOI), else
    before it (HWIO)."""
    outs = [j for j in range(len(per_shape)) if j not in in_axes]
    if len(outs) != 1 or len(in_axes) < 2:
        raise ValueError(f"a kernel of shape {tuple(per_shape)} with input axes {tuple(in_axes)} "
                         "is no convolution kernel (one output axis, an input-feature axis and "
                         "spatial axes)")
    o = outs[0]
    i = o + 1 if o + 1 in in_axes else o - 1
    return (i, *(j for j in sorted(in_axes) if j != i))


def parse_key(key: str) -> tuple[str, str] | None:
    """``(module, "A" | "B" | "M" | "base")`` of an adapter tensor key (M: DoRA's
    magnitude), None if not one."""
    k = key[len(PREFIX):] if key.startswith(PREFIX) else key
    m = _KEY_RE.match(k.replace(".default.", "."))  # adapter-name-qualified keys, if any
    if not m:
        return None
    kind = m.group("kind")
    if kind.startswith("lora_magnitude_vector"):
        return m.group("module"), "M"
    return m.group("module"), "base" if kind == "base_layer.weight" else kind.split(".")[0][-1]


def alpha_for_scale(scale: float, rank: int, rslora: bool) -> float:
    """The alpha whose ``lora_scale(alpha, rank, rslora)`` is ``scale`` (it is linear in alpha)."""
    return scale / lora_scale(1.0, rank, rslora)


def _pattern_value(pattern: Mapping[str, Any], module: str, default):
    """PEFT's ``get_pattern_key``: first key with ``re.match(rf"(.*\\.)?({key})$", module)``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """The options of ``adapter_config.json`` that decide what the tensors mean."""

    r: int = 8
    alpha: float = 8.0
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    target_modules: Any = None
    layers_to_transform: tuple[int, ...] | None = None
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()

    def rank(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def alpha_of(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.alpha))

    def scale(self, module: str, rank: int) -> float:
        return lora_scale(self.alpha_of(module), rank, self.use_rslora)

    def targets(self, module: str) -> bool:
        """Whether ``target_modules`` selects ``module`` (False when it is not given)."""
        t = self.target_modules
        if t is None:
            return False
        if isinstance(t, str):
            if t == "all-linear":
                return not (module.endswith("embed_tokens") or module == "lm_head")
            return re.fullmatch(t, module) is not None
        return any(module == x or module.endswith("." + x) for x in t)

    def transforms_layer(self, i: int) -> bool:
        return self.layers_to_transform is None or i in self.layers_to_transform


def _unsupported(cfg: dict) -> list[str]:
    out = []
    if cfg.get("fan_in_fan_out"):
        out.append("fan_in_fan_out=True")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        out.append(f"bias={cfg.get('bias')!r}/lora_bias={cfg.get('lora_bias')!r}")
    if cfg.get("layer_replication"):
        out.append("layer_replication")
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: key: (check, what it must be) for the adapter_config.json keys we read
_KEY_TYPES = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "r": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "lora_alpha": (_is_num, "a number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and _is_int(x) and x > 0 for k, x in v.items()),
        "an object of positive ints"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and _is_num(x) for k, x in v.items()), "an object of numbers"),
    "target_modules": (lambda v: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "a string or a list of strings"),
    "modules_to_save": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                        "a list of strings"),
    "layers_to_transform": (lambda v: (_is_int(v) and v >= 0) or (
        isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)),
        "a non-negative int or a list of them"),
}


def _check_types(cfg, where) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} holds a JSON {type(cfg).__name__}, not an object.")
    for key, (ok, want) in _KEY_TYPES.items():
        v = cfg.get(key)
        if v is not None and not ok(v):
            raise ValueError(f"{where}: key {key!r} is {str(v)[:80]!r} "
                             f"({type(v).__name__}); it must be {want}.")
    return cfg


def _config(cfg: dict, where: Path | str = CONFIG_FILE) -> PeftConfig:
    cfg = _check_types(cfg, where)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"from_peft: peft_type {cfg.get('peft_type')!r} is not LORA ({where})")
    bad = _unsupported(cfg)
    if bad:
        raise ValueError(f"from_peft: unsupported adapter options: {', '.join(bad)} ({where})")
    layers = cfg.get("layers_to_transform")
    return PeftConfig(
        r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)),
        use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
        rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {},
        target_modules=cfg.get("target_modules"),
        modules_to_save=tuple(cfg.get("modules_to_save") or ()),
        layers_to_transform=None if layers is None else tuple(np.atleast_1d(layers).tolist()))


def read_adapter(adapter_dir: Path) -> tuple[PeftConfig, dict[str, np.ndarray]]:
    """The config and tensors of a PEFT adapter directory (safetensors only, never pickle).

    Every file problem is a ``ValueError`` naming the file (and the key or tensor)."""
    if adapter_dir.is_file():
        raise NotADirectoryError(f"from_peft: {adapter_dir} is a file; pass the adapter "
                                 f"directory (holding {CONFIG_FILE} and {ADAPTER_FILE}).")
    if not (adapter_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"from_peft: no {CONFIG_FILE} in {adapter_dir}")
    cfg = _config(read_json(adapter_dir / CONFIG_FILE), adapter_dir / CONFIG_FILE)
    st = adapter_dir / ADAPTER_FILE
    if st.exists():
        return cfg, read_safetensors(st)
    if (adapter_dir / "adapter_model.bin").exists():
        raise ValueError("from_peft: adapter_model.bin (pickle) is not supported; "
                         "save with safetensors")
    raise FileNotFoundError(f"no {ADAPTER_FILE} in {adapter_dir}")


def is_adapter_dir(d: Path, nested: bool = False) -> bool:
    """Whether ``d`` holds only what a PEFT adapter directory holds (``nested``: and
    subdirectories that do, as ``save_pretrained`` lays out several adapters)."""
    for p in d.iterdir():
        if p.is_dir() and not p.is_symlink():
            if not (nested and is_adapter_dir(p)):
                return False
        elif p.name not in ADAPTER_DIR_FILES or not p.is_file():
            return False
    return True


def write_adapter_files(d: Path, tensors: Mapping[str, np.ndarray], config: dict) -> None:
    """The two files of an adapter, into an existing directory ``d``."""
    write_safetensors(d / ADAPTER_FILE, tensors)
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def write_adapter(out_dir: Path, tensors: Mapping[str, np.ndarray], config: dict, *,
                  overwrite: bool = False) -> Path:
    """Write an adapter directory atomically (temp dir, then rename). A previous adapter
    directory there is replaced; any other non-empty directory only with ``overwrite``;
    a file never."""
    return replace_dir(out_dir, lambda d: write_adapter_files(d, tensors, config),
                       overwrite=overwrite, ours=is_adapter_dir, what="to_peft",
                       kind="PEFT adapter directory")
