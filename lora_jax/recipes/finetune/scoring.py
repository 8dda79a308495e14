"""Logits at the answer positions only, and held-out accuracy (:class:`Scorer`).

The loss and the scores need the logits where an answer token is predicted, not at every
position: :func:`make_logits_at` gathers the final hidden states there before the LM head,
so the full-vocabulary logits of the other positions are never formed. A prefix shared by
every row (the chat template's system turn and the instruction) runs once per batch.

Example:
    >>> pos, valid = answer_positions(np.array([[0, 1, 1, 0], [0, 0, 1, 0]], np.float32))
    >>> pos.tolist(), valid.tolist()
    ([[1, 2], [2, 0]], [[1.0, 1.0], [1.0, 0.0]])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import init_cache
from lora_jax.recipes.finetune.data import answer_token_ids, encode_examples, with_answer

__all__ = ["answer_positions", "make_logits_at", "Scorer"]


def _capture(model, params, ids, **kw):
    """(model output, final-norm hidden states [B, T, D]). Only the hidden states are used
    downstream, so jit drops the full-vocabulary logits as dead code."""
    out, state = model.apply({"params": params}, ids, mutable=["intermediates"],
                             capture_intermediates=lambda mdl, _: mdl.name == "norm", **kw)
    return out, state["intermediates"]["norm"]["__call__"][0]


def _head(model, params, h):
    if model.config.tie_word_embeddings:
        emb = params["embed_tokens"]["embedding"]
        return jnp.einsum("bkd,vd->bkv", h, emb.astype(h.dtype)).astype(jnp.float32)
    kernel = params["lm_head"]["kernel"]
    return jnp.einsum("bkd,dv->bkv", h, kernel.astype(h.dtype)).astype(jnp.float32)


def _broadcast_cache(cache, b):
    """A batch-1 KV cache viewed as a batch of ``b`` identical rows."""
    def rows(x):
        return jnp.broadcast_to(x, (x.shape[0], b) + x.shape[2:])
    return {"k": rows(cache["k"]), "v": rows(cache["v"]), "index": cache["index"]}


def make_logits_at(model, prefix=None):
    """``f(params, ids [B,T], pos [B,K]) -> logits [B,K,V]`` at the given positions only.

    With a shared ``prefix`` [P] (tokens every row starts with), the prefix runs once with
    batch 1 to fill a KV cache, which is broadcast to the batch; ``ids`` are the rows
    after it (positions P..P+T-1). Gradients flow through the prefix's keys and values.
    """
    cfg = model.config
    pre = None if prefix is None or len(prefix) == 0 else jnp.asarray(prefix, jnp.int32)[None, :]

    def logits_at(params, ids, pos):
        if pre is None:
            _, h = _capture(model, params, ids)
        else:
            b, t = ids.shape
            cache = init_cache(cfg, 1, pre.shape[1] + t)
            (_, cache), _ = _capture(model, params, pre, cache=cache)
            _, h = _capture(model, params, ids, cache=_broadcast_cache(cache, b))
        hs = jnp.take_along_axis(h, pos[:, :, None], axis=1)
        return _head(model, params, hs)

    return logits_at


def answer_positions(mask):
    """From a next-token loss mask [N, T] -> (pos [N, K], valid [N, K]) with K = max answer len."""
    counts = mask.sum(1).astype(int)
    k = max(1, int(counts.max()))
    pos = np.zeros((mask.shape[0], k), np.int32)
    valid = np.zeros((mask.shape[0], k), np.float32)
    for i in range(mask.shape[0]):
        p = np.nonzero(mask[i])[0]
        pos[i, : len(p)] = p
        valid[i, : len(p)] = 1.0
    return pos, valid


class Scorer:
    """Held-out accuracy.

    Classification tasks (2..16 distinct completions): each candidate answer's total
    log-likelihood (sum over its tokens, end-of-turn excluded) given the prompt; the
    highest wins. Rows are shared: one row per multi-token candidate (a single-token
    candidate is read off the prompt's last position of any row), so the binary
    fresh/rotten task costs one forward per example.
    Otherwise (open-ended answers): greedy exact match under teacher forcing (every answer
    token is the argmax) and the held-out loss (mean negative log-likelihood per answer
    token, end-of-turn included).

    ``logits_fn(params, ids, pos)`` returns log-softmaxed logits at ``pos``.
    """

    def __init__(self, tokenizer, examples, seq_len, logits_fn, eval_batch, prefix_len=0):
        self.n = len(examples)
        self.eval_batch = eval_batch
        self.logits_fn = logits_fn
        classes = sorted({e["completion"] for e in examples})
        self.classify = 2 <= len(classes) <= 16
        if self.classify:
            self.classes = classes
            self.cand = answer_token_ids(tokenizer, classes)
            self.rows_for = [c for c in range(len(classes)) if len(self.cand[c]) > 1] or [0]
            self.labels = np.array([classes.index(e["completion"]) for e in examples])
            self.encs = [
                encode_examples(tokenizer, [with_answer(e, classes[c]) for e in examples],
                                seq_len, prefix_len=prefix_len, add_end=False)
                for c in self.rows_for]
        else:
            self.encs = [encode_examples(tokenizer, examples, seq_len, prefix_len=prefix_len)]
        self.truncated = self.encs[0].truncated
        self.pos = [answer_positions(e.loss_mask) for e in self.encs]

    def _logp(self, params, which):
        enc = self.encs[which]
        pos, _ = self.pos[which]
        outs = []
        for s in range(0, self.n, self.eval_batch):
            ids = enc.ids[s: s + self.eval_batch]
            p = pos[s: s + self.eval_batch]
            pad = self.eval_batch - ids.shape[0]
            if pad:  # a full last batch: one compiled shape
                ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
                p = np.concatenate([p, np.repeat(p[-1:], pad, 0)])
            lp = self.logits_fn(params, ids, p)
            outs.append(np.asarray(jax.device_get(lp))[: self.eval_batch - pad])
        return np.concatenate(outs)  # [N, K, V] log-softmaxed

    def _exact_match(self, params) -> dict:
        enc = self.encs[0]
        pos, valid = self.pos[0]
        lp = self._logp(params, 0)
        tgt = np.take_along_axis(enc.ids, pos + 1, axis=1)
        ok = (lp.argmax(-1) == tgt) | (valid == 0)
        nll = -np.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
        return {"accuracy": float(ok.all(1).mean()),
                "loss": float((nll * valid).sum() / max(valid.sum(), 1)),
                "scoring": "greedy exact match (teacher-forced argmax)"}

    def predict(self, params) -> np.ndarray:
        """The index into ``classes`` of each example's most likely answer (classification)."""
        return self.scores(params).argmax(1)

    def scores(self, params) -> np.ndarray:
        """[N, classes]: each answer's summed token log-likelihood (classification)."""
        scores = np.zeros((self.n, len(self.classes)))
        first = None
        for w, c in enumerate(self.rows_for):
            lp = self._logp(params, w)       # [N, K, V]; K >= len(cand[c])
            if first is None:
                first = lp[:, 0, :]
            toks = self.cand[c]
            scores[:, c] = sum(lp[:, t, toks[t]] for t in range(len(toks)))
        for c, toks in enumerate(self.cand):
            if len(toks) == 1:
                scores[:, c] = first[:, toks[0]]
        return scores

    def __call__(self, params) -> dict:
        if not self.classify:
            return self._exact_match(params)
        pred = self.predict(params)
        acc = float((pred == self.labels).mean())
        counts = {self.classes[c]: int((pred == c).sum()) for c in range(len(self.classes))}
        return {"accuracy": acc, "predicted": counts,
                "scoring": "log-likelihood of each full answer (sum over its tokens)"}
