"""The training loop: batches as a function of the step, checkpoints, signals, divergence.

Batch ``k`` depends only on ``(seed, k)`` (:class:`DataOrder`), and a checkpoint holds
the adapter, the optimizer state and the losses so far, so a resumed run computes
exactly the steps an uninterrupted one would. SIGINT / SIGTERM are turned into a flag
read between steps: the loop saves a checkpoint and raises :class:`Interrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from typing import Callable

import numpy as np

__all__ = ["DataOrder", "Interrupted", "Progress", "run_steps", "stop_requests"]


def _epoch_order(rng, labels: list) -> np.ndarray:
    """A shuffled epoch, interleaved by class when the task is a classification
    (balanced batches)."""
    classes = sorted(set(labels))
    if not (2 <= len(classes) <= 16):
        return rng.permutation(len(labels))
    by = [rng.permutation([i for i, y in enumerate(labels) if y == c]) for c in classes]
    n = min(len(b) for b in by)
    return np.stack([b[:n] for b in by], 1).reshape(-1)   # c0, c1, c0, c1, ...


class DataOrder:
    """Row indices of batch ``k``: epochs drawn one after another from one generator seeded
    with ``seed``, concatenated and cut into batches of ``batch``."""

    def __init__(self, labels: list, batch: int, seed: int):
        self.labels, self.batch, self.seed = labels, batch, seed
        self._restart()

    def _restart(self):
        self.rng = np.random.default_rng(self.seed)
        self.buf, self.start = np.zeros(0, np.int64), 0     # buf[0] is stream[start]

    def __call__(self, k: int) -> np.ndarray:
        lo = k * self.batch
        if lo < self.start:
            self._restart()
        while self.start + len(self.buf) < lo + self.batch:
            self.buf = np.concatenate([self.buf, _epoch_order(self.rng, self.labels)])
        self.buf, self.start = self.buf[lo - self.start:], lo
        return self.buf[: self.batch]


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped training; ``checkpoint`` is the saved step (or None)."""

    def __init__(self, signum: int, step: int, checkpoint: int | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}" + (
            f": checkpoint {checkpoint} saved" if checkpoint is not None else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_requests():
    """Yields a dict whose ``"signum"`` becomes the number of the first SIGINT / SIGTERM.
    A second signal gets the previous handler (a second Ctrl-C stops at once)."""
    box = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield box
        return
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in sigs}

    def handler(signum, frame):
        box["signum"] = signum
        for s in sigs:
            signal.signal(s, old[s])

    for s in sigs:
        signal.signal(s, handler)
    try:
        yield box
    finally:
        for s in sigs:
            signal.signal(s, old[s])


@dataclasses.dataclass
class Progress:
    """What a checkpoint records besides arrays (JSON: the adapter's metadata)."""

    step: int = 0
    losses: list = dataclasses.field(default_factory=list)
    evals: list = dataclasses.field(default_factory=list)     # [{"step", "accuracy", ...}]

    def state(self, batch: int, seed: int) -> dict:
        return {"step": self.step, "position": self.step * batch, "data_seed": seed,
                "losses": self.losses, "evals": self.evals}


def _bar(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm  # an optional extra
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc="finetune", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


def run_steps(cfg, step: Callable, state: tuple, get_batch: Callable, prog: Progress, *,
              tokens: Callable, evaluate: Callable, checkpoint: Callable, log=print):
    """Steps ``prog.step + 1 .. cfg.steps``; returns ``(state, timing)``.

    ``step(*state, batch) -> (trainable, opt_state, loss)``; ``get_batch(k)`` the sharded
    batch ``k`` (0-based); ``tokens(k)`` its real tokens; ``evaluate(state)`` a result
    dict; ``checkpoint(state, prog) -> saved step or None``.
    """
    bar = _bar(cfg.steps, prog.step, cfg.progress)
    say = bar.write if bar is not None and cfg.progress else log
    seen, t0, t_first, t_steady = 0, time.perf_counter(), None, None
    with stop_requests() as stop:
        say(f"training: steps {prog.step + 1}..{cfg.steps} (Ctrl-C saves a checkpoint)")
        while prog.step < cfg.steps:
            k = prog.step
            tr, opt, loss = step(*state, get_batch(k))
            loss = float(loss)
            if not math.isfinite(loss):
                raise ValueError(
                    f"the loss is {loss} at step {k + 1}: training diverged; lower --lr "
                    f"(now {cfg.lr:g}). The last checkpoint, if any, is kept.")
            state = (tr, state[1], opt)
            prog.step, prog.losses = k + 1, prog.losses + [loss]
            if t_first is None:
                t_first, t_steady = time.perf_counter() - t0, time.perf_counter()
            else:
                seen += tokens(k)
            if bar is not None:
                el = time.perf_counter() - t_steady
                bar.set_postfix(loss=f"{loss:.3f}",
                                tok_s=f"{seen / el:.0f}" if seen and el > 0 else "-",
                                refresh=False)
                bar.update(1)
            if stop["signum"] is not None:
                if bar is not None:
                    bar.close()
                raise Interrupted(stop["signum"], prog.step, checkpoint(state, prog))
            if cfg.eval_every and prog.step % cfg.eval_every == 0 and prog.step < cfg.steps:
                res = evaluate(state)
                if res is not None:
                    prog.evals = prog.evals + [{"step": prog.step, **res}]
                    say(f"step {prog.step}: held-out accuracy {res['accuracy']:.3f}")
            if cfg.save_every and prog.step % cfg.save_every == 0 and prog.step < cfg.steps:
                if checkpoint(state, prog) is not None:
                    say(f"step {prog.step}: checkpoint saved")
    if bar is not None:
        bar.close()
    steady = time.perf_counter() - t_steady if t_steady is not None else float("nan")
    return state, {"train_s": time.perf_counter() - t0, "first_s": t_first,
                   "seen_tokens": seen, "steady": steady}
