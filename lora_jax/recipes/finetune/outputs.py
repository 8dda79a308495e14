"""The run's output directory: refusing to clobber, checkpoints, and the final files.

``--out`` holds ``run.json`` (the config), ``adapter/`` (:func:`lora_jax.save_adapter`
steps with the optimizer state and the data position: what ``--resume`` reads),
``peft/`` (the PEFT export), ``model/`` (full fine-tuning: HF safetensors),
``loss.png`` and ``summary.json``. A directory holding anything else, or a previous
run, is refused unless ``--resume`` (continue it) or ``--overwrite`` (replace these
outputs; no other file is touched). Every file is written to a temporary name and
renamed, so a kill never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lora_jax.checkpoint import adapter_steps, read_adapter_metadata, save_adapter
from lora_jax.interop import export_merged, to_peft
from lora_jax.recipes.finetune.config import RUN_FILE, FinetuneConfig

__all__ = ["OUTPUTS", "check_out", "clear_outputs", "latest_checkpoint", "save_checkpoint",
           "save_final", "write_json"]

#: what a run writes into ``--out`` (and all ``--overwrite`` removes)
OUTPUTS = (RUN_FILE, "adapter", "peft", "model", "loss.png", "summary.json")
ADAPTER = "adapter"


def check_out(cfg: FinetuneConfig) -> Path:
    """``cfg.out`` as a Path; ``ValueError`` if it may not be written (nothing is changed)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory; pass a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if cfg.resume:
        if RUN_FILE not in entries:
            raise ValueError(f"--resume: {out} holds no run to resume (no {RUN_FILE}); "
                             f"drop --resume to start a run there")
    elif entries and not cfg.overwrite:
        what = "a previous run" if RUN_FILE in entries else "other files"
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"--out {out} already holds {what} ({shown}); pass --resume to "
                         f"continue it, --overwrite to replace its outputs, or another --out")
    return out


def clear_outputs(out: Path) -> None:
    """Remove a previous run's outputs (only the names in :data:`OUTPUTS`)."""
    for name in OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_checkpoint(out: Path, params, opt_state, *, step: int, state: dict) -> bool:
    """Adapter + optimizer state + ``state`` (data position, losses) as step ``step``;
    False when that step is already saved."""
    root = out / ADAPTER
    if root.is_dir() and step in adapter_steps(root):
        return False
    save_adapter(root, params, step=step, opt_state=opt_state, metadata=state, keep=2)
    return True


def latest_checkpoint(out: Path) -> tuple[int, dict] | None:
    """``(step, state)`` of the newest complete checkpoint in ``out``, or None."""
    root = out / ADAPTER
    steps = adapter_steps(root) if root.is_dir() else []
    if not steps:
        return None
    return steps[-1], read_adapter_metadata(root, steps[-1])["user"]


def save_final(cfg: FinetuneConfig, out: Path, params, base_name: str) -> dict:
    """The exports a user takes away: PEFT adapter (LoRA) or the HF model (full FT)."""
    if cfg.rank == 0:
        _replace(out / "model", lambda d: export_merged(params, d))
        return {"model": out / "model"}
    _replace(out / "peft", lambda d: to_peft(params, d, base_model_name_or_path=base_name))
    return {"adapter": out / ADAPTER, "peft": out / "peft"}


def _replace(dest: Path, write) -> None:
    """Write a directory next to ``dest``, then swap it in (``dest`` is one of ours)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
