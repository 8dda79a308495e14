"""A finished ``lora-jax finetune`` run, rebuilt from its output directory (:func:`load_run`).

``run.json`` names the base model and the recipe; the base is loaded and adapted exactly as
in training (:func:`~lora_jax.recipes.finetune.setup.adapt`: quantized and lorafied with
the same targets, rank, alpha and seed), then the latest complete step of ``adapter/`` is
restored into it. A full fine-tuning run (rank 0) instead reads its trained weights from
``model/`` (safetensors with HF names). With ``adapter=False`` the same tree comes back
without the training: a LoRA run keeps its freshly lorafied B = 0 factors (exactly the
(quantized) base), a full fine-tuning run the base weights.

``generate``, ``export`` and ``eval`` all start here.

Example::

    run = load_run("runs/finetune")
    logits = run.apply_fn({"params": run.params}, ids)
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lora_jax.checkpoint import restore_adapter
from lora_jax.core import is_implicit
from lora_jax.lora import lora
from lora_jax.models import hf_state_dict_to_params, load_hf_state_dict
from lora_jax.recipes.finetune.config import FinetuneConfig, read_run_config
from lora_jax.recipes.finetune.setup import adapt, load_base

__all__ = ["ADAPTER_DIR", "MODEL_DIR", "Run", "check_run_dir", "load_run"]

#: the orbax adapter checkpoint of a LoRA run (rank > 0)
ADAPTER_DIR = "adapter"
#: the trained weights of a full fine-tuning run (rank 0)
MODEL_DIR = "model"


@dataclasses.dataclass
class Run:
    """A run's model, ready to use: ``apply_fn({"params": params}, ids, cache=...)``."""

    directory: Path
    config: FinetuneConfig
    model: Any            # LlamaForCausalLM
    params: Any           # the trained tree (or the base with ``adapter=False``)
    tokenizer: Any
    base_path: Path       # where the base weights were read from
    base_name: str        # the HF name recorded in exports
    adapter: bool         # whether the training is applied

    @property
    def implicit(self) -> bool:
        """Whether the tree holds adapter or quantized nodes (then functions of the params
        go through :func:`lora_jax.lora`)."""
        return any(is_implicit(x) for x in jax.tree.leaves(self.params, is_leaf=is_implicit))

    @property
    def apply_fn(self) -> Callable:
        """``model.apply``, through :func:`lora_jax.lora` when :attr:`implicit`."""
        return _lora_apply(self.model) if self.implicit else self.model.apply


@functools.lru_cache(maxsize=8)
def _lora_apply(model) -> Callable:
    # One function per model config: jitted decoding keys its cache on the function, so
    # runs of the same model (or the same run loaded twice) compile once per process.
    return lora(model.apply)


def _check_run(run_dir: Path, cfg: FinetuneConfig, adapter: bool) -> None:
    """The files ``load_run`` needs, named before the (slow) base model loads."""
    if cfg.model is not None and not Path(cfg.model).exists():
        raise ValueError(f"{run_dir}: its base model {cfg.model} (run.json 'model') does not "
                         f"exist; run from the directory the run was started in, or restore "
                         f"the base at that path")
    if not adapter:
        return
    if cfg.rank > 0 and not (run_dir / ADAPTER_DIR).is_dir():
        raise ValueError(f"{run_dir} has no {ADAPTER_DIR}/ checkpoint (the run did not finish, "
                         f"or it ran without saving); pass --no-adapter for the base model")
    if cfg.rank == 0 and not (run_dir / MODEL_DIR / "model.safetensors").is_file():
        raise ValueError(f"{run_dir} is a full fine-tuning run (rank 0) without "
                         f"{MODEL_DIR}/model.safetensors (the run did not finish, or it ran "
                         f"without saving); pass --no-adapter for the base model")


def _restore(run_dir: Path, params):
    try:
        return restore_adapter(run_dir / ADAPTER_DIR, params)
    except FileNotFoundError as e:    # only interrupted saves
        raise ValueError(f"{run_dir}/{ADAPTER_DIR}: {e}") from None


def check_run_dir(run_dir) -> FinetuneConfig:
    """The config of the run in ``run_dir``; ``ValueError`` if it is not a finetune run."""
    if not Path(run_dir).is_dir():
        raise ValueError(f"{run_dir}: no such directory; pass the --out directory of a "
                         f"lora-jax finetune run")
    return read_run_config(run_dir)


def load_run(run_dir, *, adapter: bool = True) -> Run:
    """The model of the finetune run in ``run_dir`` (its ``--out``), trained or not.

    Raises ``ValueError`` when ``run_dir`` is not a finetune run (no ``run.json``), its
    base model is gone, or its adapter (``adapter/``) / trained model (``model/``) is
    missing or does not match the base.
    """
    run_dir = Path(run_dir)
    cfg = check_run_dir(run_dir)
    _check_run(run_dir, cfg, adapter)
    base = load_base(cfg)
    if cfg.rank == 0:
        params = base.params
        if adapter:
            params = hf_state_dict_to_params(load_hf_state_dict(run_dir / MODEL_DIR),
                                             base.model.config, dtype=jnp.float32)
    else:
        params = adapt(cfg, base.params)
        if adapter:
            params = _restore(run_dir, params)
    return Run(run_dir, cfg, base.model, params, base.tokenizer, base.path, base.name, adapter)
