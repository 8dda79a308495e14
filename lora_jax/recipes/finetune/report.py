"""What a fine-tuning run reports: ``summary.json``'s dict, the printed table, ``loss.png``.

Example:
    >>> fmt_bytes(999), fmt_bytes(1234), fmt_bytes(98_362_432)
    ('999 B', '1.2 KB', '98.4 MB')
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["dir_bytes", "fmt_acc", "fmt_bytes", "format_table", "plot_losses", "summarize",
           "tree_bytes"]


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of ``tree``."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def fmt_bytes(n: float) -> str:
    """Decimal units: ``1.2 KB`` is 1200 bytes."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return str(n)


def fmt_acc(a) -> str:
    return "n/a" if a is None else f"{a:.3f}"


def plot_losses(losses, path, title):
    """The batch loss per step and its running mean, as a PNG at ``path``."""
    import matplotlib  # an optional extra: imported only when a plot is asked for
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    x = np.arange(1, len(losses) + 1)
    ax.plot(x, losses, lw=0.8, alpha=0.45, label="batch loss")
    if len(losses) >= 5:
        w = max(2, len(losses) // 20)
        sm = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(x[w - 1:], sm, lw=1.8, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token cross entropy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def portable_path(path) -> str | None:
    """``path`` as a summary records it: relative to the working directory when inside
    it, else with the home directory as ``~``, so no machine's layout is written down."""
    if path is None:
        return None
    p = Path(path).resolve()
    for root, shown in ((Path.cwd().resolve(), None), (Path.home().resolve(), "~")):
        if p.is_relative_to(root):
            rel = p.relative_to(root).as_posix()
            return rel if shown is None else f"{shown}/{rel}"
    return str(path)


def summarize(cfg, *, source: dict, task: dict, before: dict, after: dict, losses: list,
              sizes: dict, timing: dict, outputs: dict, evals: list = (),
              mesh: dict | None = None) -> dict[str, Any]:
    """``summary.json``: the run's settings, accuracy, losses, byte counts and timings.

    ``source``: base_model, model_path. ``task``: data, unique/train/held-out counts,
    truncated held-out rows, shared prefix. ``sizes``: parameter counts (``counts`` as
    :func:`lora_jax.lora.count_params` gives them) and byte counts. ``timing``: seconds
    (``steps_run``: the steps this process ran, fewer than ``cfg.steps`` after a resume).
    ``evals``: ``[{"step", "accuracy", ...}]`` during training (``--eval-every``).
    """
    counts, n_base = sizes["counts"], sizes["n_base"]
    steady, seen = timing["steady"], timing["seen_tokens"]
    return {
        "config": dataclasses.asdict(cfg),
        **{k: portable_path(v) if k == "model_path" else v for k, v in source.items()},
        **task,
        "scoring": after["scoring"],
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "predicted_before": before.get("predicted"),
        "predicted_after": after.get("predicted"),
        "loss_first": losses[0] if losses else None,
        "loss_last10": float(np.mean(losses[-10:])) if losses else None,
        "losses": losses,
        "trainable_params": int(counts["trainable"]),
        "total_params": int(counts["total"]),
        "trainable_percent": 100.0 * counts["trainable"] / counts["total"],
        "optimizer_state_bytes": sizes["opt_bytes"],
        "full_ft_optimizer_state_bytes": 8 * n_base,
        "adapter_param_bytes": 4 * counts["trainable"],
        "adapter_checkpoint_bytes": sizes["ckpt_bytes"],
        "peft_export_bytes": sizes["peft_bytes"],
        "full_model_fp32_bytes": 4 * n_base,
        "base_fp32_bytes": 4 * n_base,
        "base_stored_bytes": sizes["base_stored_bytes"],
        "train_seconds": timing["train_s"],
        "first_step_seconds_incl_compile": timing["first_s"],
        "steady_seconds_per_step": steady / max(1, timing.get("steps_run", cfg.steps) - 1),
        "tokens_per_second": seen / steady if steady and seen else None,
        "eval_seconds": timing["eval_s"],
        "evals": [{k: v for k, v in e.items() if k in ("step", "accuracy")} for e in evals],
        "mesh": mesh,
        "wall_seconds": timing["wall_s"],
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "outputs": {k: portable_path(v) for k, v in outputs.items()},
    }


def _ratio(a, b) -> str:
    return f"{a / b:.4f}x" if a and b else "-"


def format_table(s: dict) -> str:
    """The printed table: parameters, optimizer / checkpoint / base bytes, accuracy, time."""
    checkpoint = "- (not saved)"
    if s["adapter_checkpoint_bytes"]:
        checkpoint = (f"{fmt_bytes(s['adapter_checkpoint_bytes'])} on disk "
                      f"({fmt_bytes(s['adapter_param_bytes'])} of fp32 A/B) vs "
                      f"{fmt_bytes(s['full_model_fp32_bytes'])} full model fp32 = "
                      f"{_ratio(s['adapter_checkpoint_bytes'], s['full_model_fp32_bytes'])}")
    opt, full_opt = s["optimizer_state_bytes"], s["full_ft_optimizer_state_bytes"]
    rows = [
        ("trainable parameters", f"{s['trainable_params']:,} of {s['total_params']:,} "
                                 f"({s['trainable_percent']:.3f}%)"),
        ("optimizer state (Adam)", f"{fmt_bytes(opt)} vs {fmt_bytes(full_opt)} full FT "
                                   f"(2 fp32/param) = {_ratio(opt, full_opt)}"),
        ("adapter checkpoint", checkpoint),
        ("base weights", f"{fmt_bytes(s['base_fp32_bytes'])} fp32 vs "
                         f"{fmt_bytes(s['base_stored_bytes'])} as trained "
                         f"({s['config']['quant']}) = "
                         f"{_ratio(s['base_stored_bytes'], s['base_fp32_bytes'])}"),
        ("held-out accuracy", f"{fmt_acc(s['accuracy_before'])} -> {fmt_acc(s['accuracy_after'])} "
                              f"({s['heldout_examples']} examples)"),
        ("training", f"{s['config']['steps']} steps x batch {s['config']['batch']} in "
                     f"{s['train_seconds']:.0f}s (first step incl. compile "
                     f"{s['first_step_seconds_incl_compile']:.0f}s)"),
        ("wall time", f"{s['wall_seconds']:.0f}s"),
    ]
    w = max(len(r[0]) for r in rows)
    line = "-" * (w + 3 + max(len(r[1]) for r in rows))
    return "\n".join([line] + [f"{a.ljust(w)} | {b}" for a, b in rows] + [line])
