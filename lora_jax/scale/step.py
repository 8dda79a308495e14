"""A sharded training step: jit with in/out shardings, donation, trainable half only.

``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux=True``)
receives the whole combined tree; wrap the model with ``lj.lora`` inside it. The
mesh may have auto or explicit axes (``jax.make_mesh``'s default).

Example (8 devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on CPU):
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> from jax.sharding import PartitionSpec as P
    >>> import lora_jax as lj
    >>> model = nn.Sequential([nn.Dense(64), jax.nn.gelu, nn.Dense(5)])
    >>> x, y = jnp.ones((8, 12)), jnp.arange(8) % 5
    >>> params = lj.lorafy(model.init(jax.random.key(0), x)["params"], rank=4)
    >>> def loss_fn(params, batch):
    ...     logits = lj.lora(model.apply)({"params": params}, batch["x"])
    ...     return optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["y"], 5)).mean()
    >>> mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    >>> specs = lj.lora_specs(params, lj.fsdp_specs(params, mesh, min_size=256), mesh)
    >>> step = lj.make_train_step(loss_fn, optax.adamw(1e-2), mesh, specs,
    ...                           P(("data", "fsdp")))
    >>> trainable, frozen, opt_state = step.init(params)      # placed on the mesh
    >>> losses = []
    >>> for batch in [{"x": x, "y": y}] * 5:
    ...     trainable, opt_state, loss = step(trainable, frozen, opt_state,
    ...                                       step.shard_batch(batch))
    ...     losses.append(float(loss))
    >>> losses[-1] < losses[0]
    True
    >>> trainable["layers_0"]["kernel"].a.sharding.spec      # like W's input axis
    P(('fsdp', 'tensor'), None)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.lora import combine, split
from lora_jax.scale.fsdp import is_explicit
from lora_jax.scale.placement import named_shardings, place, place_tree

__all__ = ["make_train_step", "TrainStep", "opt_state_specs"]


def _none_tree(tree):
    return jax.tree.map(lambda _: None, tree)


def _split_all(params):
    return params, _none_tree(params)


def opt_state_specs(opt_state, trainable, trainable_specs):
    """Specs for an optimizer state: a leaf whose key path ends with a trainable leaf's
    key path and has its shape gets that leaf's spec (Adam's mu/nu, masked states, chains);
    everything else (step counts, scalars) is replicated."""
    tr_flat, _ = jax.tree_util.tree_flatten_with_path(trainable)
    sp_flat = jax.tree.leaves(trainable_specs, is_leaf=lambda x: isinstance(x, P))
    if len(tr_flat) != len(sp_flat):
        raise ValueError("trainable and trainable_specs do not have the same leaves")
    table = {tuple(p): (tuple(x.shape), s) for (p, x), s in zip(tr_flat, sp_flat)}
    longest = max((len(p) for p in table), default=0)

    def one(path, x):
        shape = tuple(getattr(x, "shape", ()))
        path = tuple(path)
        for n in range(min(longest, len(path)), 0, -1):
            hit = table.get(path[len(path) - n:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return P()

    return jax.tree_util.tree_map_with_path(one, opt_state)


@dataclasses.dataclass
class TrainStep:
    """Holds the jitted step and its shardings; see :func:`make_train_step`."""

    loss_fn: Callable
    tx: optax.GradientTransformation
    mesh: Mesh
    param_specs: Any
    batch_spec: Any
    has_aux: bool = False
    trainable: str = "lora"
    donate: bool = True
    trainable_specs: Any = None
    frozen_specs: Any = None
    opt_specs: Any = None
    _jitted: Any = None

    # ------------------------------------------------------------------ helpers
    def split(self, tree):
        return split(tree) if self.trainable == "lora" else _split_all(tree)

    def _build(self, trainable):
        self.trainable_specs, self.frozen_specs = self.split(self.param_specs)
        opt_abs = jax.eval_shape(self.tx.init, trainable)
        self.opt_specs = opt_state_specs(opt_abs, trainable, self.trainable_specs)
        m = self.mesh
        tr_sh = named_shardings(self.trainable_specs, m)
        fr_sh = named_shardings(self.frozen_specs, m)
        op_sh = named_shardings(self.opt_specs, m)
        b_sh = named_shardings(self.batch_spec, m)
        rep = NamedSharding(m, P())
        loss_fn, tx, has_aux = self.loss_fn, self.tx, self.has_aux
        explicit = is_explicit(m)

        def step(tr, fr, opt_state, batch):
            def f(t):
                return loss_fn(combine(t, fr), batch)
            if has_aux:
                (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(tr)
            else:
                loss, grads = jax.value_and_grad(f)(tr)
                aux = None
            # Reduce-scatter the gradients into the parameters' layout.
            grads = (jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint)(
                grads, tr_sh)
            # optax mixes Python floats and int32 counts; it is not clean under
            # jax_numpy_dtype_promotion="strict", so the update runs with standard rules.
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = tx.update(grads, opt_state, tr)
                tr = optax.apply_updates(tr, updates)
            if has_aux:
                return tr, opt_state, loss, aux
            return tr, opt_state, loss

        out_sh = (tr_sh, op_sh, rep) + ((None,) if has_aux else ())
        self._jitted = jax.jit(step, in_shardings=(tr_sh, fr_sh, op_sh, b_sh),
                               out_shardings=out_sh,
                               donate_argnums=(0, 2) if self.donate else ())
        def init(tr):
            with jax.numpy_dtype_promotion("standard"):
                return tx.init(tr)

        self._init = jax.jit(init, in_shardings=(tr_sh,), out_shardings=op_sh)

    def _ensure(self, trainable):
        if self._jitted is None:
            self._build(trainable)

    # ------------------------------------------------------------------ public
    def place(self, params):
        """Place a full (combined) params tree on the mesh and split it: (trainable, frozen)."""
        return self.split(place_tree(params, named_shardings(self.param_specs, self.mesh)))

    def init(self, params):
        """``(trainable, frozen, opt_state)`` placed on the mesh, from a full params tree."""
        trainable, frozen = self.place(params)
        if self.donate:
            # device_put may hand back (a shard of) the caller's own buffer; the step
            # donates the trainable leaves, so give it private copies.
            trainable = jax.tree.map(lambda x: jnp.array(x, copy=True), trainable)
        self._ensure(trainable)
        return trainable, frozen, self._init(trainable)

    def shard_batch(self, batch):
        """Place a host batch (the same full global batch on every process)."""
        sh = named_shardings(self.batch_spec, self.mesh)
        if isinstance(sh, NamedSharding):
            return jax.tree.map(lambda x: place(x, sh), batch)
        return place_tree(batch, sh)

    def abstract(self, params, batch):
        """Abstract ``(trainable, frozen, opt_state, batch)`` with shardings, for ``lower``.

        ``params``/``batch`` may be arrays or ``jax.ShapeDtypeStruct`` trees.
        """
        to_abs = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
        params = jax.tree.map(to_abs, params)
        batch = jax.tree.map(to_abs, batch)
        trainable, frozen = self.place(params)
        self._ensure(trainable)
        opt = jax.eval_shape(self.tx.init, trainable)
        opt = place_tree(opt, named_shardings(self.opt_specs, self.mesh))
        return trainable, frozen, opt, self.shard_batch(batch)

    def lower(self, trainable, frozen, opt_state, batch):
        self._ensure(trainable)
        return self._jitted.lower(trainable, frozen, opt_state, batch)

    def __call__(self, trainable, frozen, opt_state, batch):
        self._ensure(trainable)
        return self._jitted(trainable, frozen, opt_state, batch)


BATCH_SPEC = P(("data", "fsdp"))      # the batch axis split over data and fsdp


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh,
                    param_specs, batch_spec=BATCH_SPEC, *, has_aux: bool = False,
                    trainable: str = "lora", donate: bool = True) -> TrainStep:
    """Build a sharded training step over ``mesh`` (axes e.g. ``("data", "fsdp", "tensor")``).

    Args:
      loss_fn: ``loss_fn(params, batch)`` on the full (combined) params tree; returns a
        scalar, or ``(scalar, aux)`` with ``has_aux``. Apply ``lj.lora`` inside it.
      tx: an optax transformation; its state is sharded like the trainable leaves
        (see :func:`opt_state_specs`).
      mesh: the device mesh.
      param_specs: specs for the full params tree (``lora_specs(...)``, nodes included).
      batch_spec: a PartitionSpec for every batch leaf (or a tree of them); the default
        splits the leading batch axis over ``data`` and ``fsdp``.
      trainable: ``"lora"`` (differentiate only LoRA A/B: ``split``/``combine``, no
        full-size weight gradient is formed) or ``"all"`` (full fine-tuning of a plain tree).
      donate: donate the trainable params and optimizer state buffers (updated in place).

    Returns:
      A :class:`TrainStep`: ``init(params) -> (trainable, frozen, opt_state)``,
      ``shard_batch(batch)``, ``step(trainable, frozen, opt_state, batch) ->
      (trainable, opt_state, loss[, aux])``, ``abstract(...)`` and ``lower(...)``
      for memory analysis without allocating.
    """
    if trainable not in ("lora", "all"):
        raise ValueError(f"trainable must be 'lora' or 'all', got {trainable!r}")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    return TrainStep(loss_fn=loss_fn, tx=tx, mesh=mesh, param_specs=param_specs,
                     batch_spec=batch_spec, has_aux=has_aux, trainable=trainable, donate=donate)


def cross_entropy_loss(apply_fn: Callable):
    """``loss_fn(params, batch)`` for a causal LM: mean next-token cross entropy.

    ``batch = {"input_ids": int [B, T], "labels": int [B, T]}`` (labels < 0 are ignored);
    ``apply_fn(variables, input_ids) -> logits [B, T, V]`` (e.g. ``lj.lora(model.apply)``).
    """
    def loss_fn(params, batch):
        logits = apply_fn({"params": params}, batch["input_ids"]).astype(jnp.float32)
        labels = batch["labels"]
        logp = jax.nn.log_softmax(logits, axis=-1)
        # A compare-and-select picks logp[label] exactly; unlike take_along_axis its
        # gradient is no scatter, which explicit-axes sharding cannot place.
        hit = jax.lax.broadcasted_iota(labels.dtype, logp.shape, logp.ndim - 1) == labels[..., None]
        nll = -jnp.sum(jnp.where(hit, logp, jnp.float32(0)), axis=-1)
        w = (labels >= 0).astype(jnp.float32)
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), jnp.float32(1))
    return loss_fn
