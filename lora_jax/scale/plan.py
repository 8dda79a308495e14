"""Per-device memory of full fine-tuning vs LoRA vs QLoRA, from abstract shapes only.

Nothing is allocated: parameters, LoRA factors and quantized codes are built with
``jax.eval_shape``; the training step of :func:`make_train_step` is lowered on
``jax.ShapeDtypeStruct`` arguments carrying their shardings and compiled, and XLA's
``memory_analysis()`` gives the temporaries (activations saved for the backward pass,
gradients, optimizer-update intermediates, logits).

Parameter / gradient / optimizer-state bytes are exact (shard shapes x itemsize of every
leaf on the most loaded device). The temporaries come from the XLA backend that compiles
the step (XLA:CPU here), which fuses and schedules differently from XLA:GPU -- see the
notes in experiments/memory_plan.py.

The model comes from a factory, so any Flax causal LM plans the same way:
``model(layers, dtype=, param_dtype=, remat=)`` returns a linen module whose
``apply({"params": p}, input_ids)`` gives logits ``[B, T, V]``. For the reference
Llama: ``lambda layers, **kw: LlamaForCausalLM(llama_config(name,
num_hidden_layers=layers, **kw))``.

Example:
    >>> import flax.linen as nn, jax.numpy as jnp
    >>> class TinyLM(nn.Module):
    ...     layers: int
    ...     dtype: object = jnp.float32
    ...     param_dtype: object = jnp.float32
    ...     remat: bool = False
    ...     @nn.compact
    ...     def __call__(self, ids):
    ...         dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name,
    ...                                          param_dtype=self.param_dtype)
    ...         h = nn.Embed(64, 32, param_dtype=self.param_dtype)(ids)
    ...         for i in range(self.layers):
    ...             h = h + dense(32, f"layer{i}")(h)
    ...         return dense(64, "head")(h)
    >>> r = plan_memory(TinyLM, "lora", layers=2, batch=2, seq=8, rank=4, compile=False)
    >>> r["trainable_params"]            # A and B of 2 x (32, 32) and (32, 64) at rank 4
    896
    >>> r["opt_bytes"]                   # AdamW: two float32 moments each, and a step count
    7172
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lora_jax.core import Targets
from lora_jax.lora import count_params, lora, lorafy
from lora_jax.quant import quantize
from lora_jax.scale.fsdp import fsdp_specs
from lora_jax.scale.placement import per_device_bytes
from lora_jax.scale.specs import lora_specs
from lora_jax.scale.step import cross_entropy_loss, make_train_step

GiB = 1024 ** 3
MODES = ("full", "lora", "qlora")


def _abstract_tree(mode, model, opts):
    def build(key):
        params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
        if mode == "full":
            return params
        if mode == "qlora":
            params = quantize(params, opts["quant_kind"], targets=opts["targets"])
        return lorafy(params, rank=opts["rank"], alpha=opts["alpha"], targets=opts["targets"],
                      dtype=opts["adapter_dtype"])

    return jax.eval_shape(build, jax.random.key(0))


def _setup(model_fn, mode, n_layers, mesh, batch, seq, opts):
    """(step, params, abstract step arguments) for a model of ``n_layers`` layers."""
    model = model_fn(n_layers, dtype=opts["compute_dtype"], param_dtype=opts["param_dtype"],
                     remat=opts["remat"])
    params = _abstract_tree(mode, model, opts)
    specs = lora_specs(params, fsdp_specs(params, mesh), mesh)
    apply = model.apply if mode == "full" else lora(model.apply)
    step = make_train_step(cross_entropy_loss(apply), optax.adamw(1e-4), mesh, specs,
                           P(("data", "fsdp")), trainable="all" if mode == "full" else "lora")
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return step, params, step.abstract(params, {"input_ids": ids, "labels": ids})


def _exact_bytes(mode, params, args) -> dict:
    tr, fr, opt, b = args
    if mode == "full":
        trainable = total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    else:
        counts = count_params(params)
        trainable, total = counts["trainable"], counts["total"]
    return {"trainable_params": trainable, "total_params": total,
            "param_bytes": per_device_bytes(tr) + per_device_bytes(fr),
            "trainable_bytes": per_device_bytes(tr), "frozen_bytes": per_device_bytes(fr),
            "grad_bytes": per_device_bytes(tr),   # gradients have the trainable leaves' shapes
            "opt_bytes": per_device_bytes(opt), "batch_bytes": per_device_bytes(b)}


def _temp_bytes(step, args, layers, compile_layers, build) -> dict:
    """XLA's temporaries of the compiled step; from two smaller compiles when asked."""
    t0 = time.perf_counter()
    if compile_layers is None or compile_layers >= layers:
        ma = step.lower(*args).compile().memory_analysis()
        out = {"temp_bytes": int(ma.temp_size_in_bytes), "temp_method": "compiled full model",
               "compiled_argument_bytes": int(ma.argument_size_in_bytes),
               "compiled_output_bytes": int(ma.output_size_in_bytes),
               "compiled_alias_bytes": int(ma.alias_size_in_bytes)}
    else:
        temps = []
        for n in (compile_layers, 2 * compile_layers):
            s2, _, args2 = build(n)
            temps.append(int(s2.lower(*args2).compile().memory_analysis().temp_size_in_bytes))
        per_layer = (temps[1] - temps[0]) / compile_layers
        out = {"temp_bytes": int(temps[0] + per_layer * (layers - compile_layers)),
               "temp_method": f"compiled {compile_layers} and {2 * compile_layers} layers, "
                              f"scaled linearly ({per_layer / GiB:.3f} GiB/layer)"}
    out["compile_s"] = round(time.perf_counter() - t0, 1)
    return out


def _fsdp_mesh(n_devices: int, batch: int, devices) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())[:n_devices]
    if len(devices) < n_devices:
        raise ValueError(f"need {n_devices} devices, have {len(devices)}; set XLA_FLAGS="
                         "--xla_force_host_platform_device_count before importing jax")
    if batch % n_devices:
        raise ValueError(f"batch {batch} does not split over {n_devices} devices")
    return Mesh(np.array(devices).reshape(1, n_devices, 1), ("data", "fsdp", "tensor"))


def plan_memory(model: Callable[..., Any], mode: str, *, layers: int, n_devices: int = 1,
                batch: int = 1, seq: int = 512, remat: bool = True, rank: int = 16,
                alpha: float = 32.0, compute_dtype=jnp.bfloat16, full_param_dtype=jnp.float32,
                base_dtype=jnp.bfloat16, adapter_dtype=jnp.float32, quant_kind: str = "nf4",
                targets: Targets = None, compile: bool = True,
                compile_layers: int | None = None, devices=None) -> dict:
    """Per-device bytes of one training step of a causal LM in ``mode``.

    Args:
      model: ``model(layers, dtype=, param_dtype=, remat=)`` -> a Flax linen causal LM
        (see the module docstring); ``layers`` is its depth.
      mode: ``"full"`` (all weights train; ``full_param_dtype`` master weights, AdamW
        moments in the same dtype), ``"lora"`` (base in ``base_dtype``, A/B in
        ``adapter_dtype`` on every targeted kernel), ``"qlora"`` (targeted kernels
        ``quant_kind`` with double quant, the rest in ``base_dtype``).
      targets: the kernels that get adapters (and are quantized); default as ``lorafy``'s.
      n_devices: devices of a ``(1, n, 1)`` ("data", "fsdp", "tensor") mesh: FSDP with
        ``fsdp_specs`` (every big leaf sharded on a divisible non-layer axis).
      batch, seq: global batch and sequence length (batch split over the devices).
      remat: passed to the model (e.g. ``nn.remat`` every decoder layer).
      compile: lower + compile the step for ``memory_analysis()``; otherwise only exact
        parameter / gradient / optimizer bytes.
      compile_layers: compile a model with this many layers instead of all of them and
        scale the temporaries linearly per layer from two compiles (``compile_layers``
        and ``2 * compile_layers``) -- for machines where a full compile is too slow.

    Returns a dict of byte counts (per device) and metadata.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not callable(model):
        raise TypeError(f"model must be a factory model(layers, dtype=, param_dtype=, remat=), "
                        f"got {type(model).__name__}")
    mesh = _fsdp_mesh(n_devices, batch, devices)
    opts = dict(rank=rank, alpha=alpha, quant_kind=quant_kind, targets=targets,
                adapter_dtype=adapter_dtype, compute_dtype=compute_dtype, remat=remat,
                param_dtype=full_param_dtype if mode == "full" else base_dtype)

    def build(n_layers):
        return _setup(model, mode, n_layers, mesh, batch, seq, opts)

    step, params, args = build(layers)
    out: dict[str, Any] = {"mode": mode, "n_devices": n_devices, "batch": batch, "seq": seq,
                           "remat": remat, "rank": rank if mode != "full" else None,
                           "layers": layers, **_exact_bytes(mode, params, args)}
    if not compile:
        return {**out, "temp_bytes": None, "total_bytes": None}
    out.update(_temp_bytes(step, args, layers, compile_layers, build))
    out["total_bytes"] = (out["param_bytes"] + out["opt_bytes"] + out["batch_bytes"]
                          + out["temp_bytes"])
    return out
