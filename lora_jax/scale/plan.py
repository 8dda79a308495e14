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

Example:
    >>> from lora_jax.models.llama import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...                   num_hidden_layers=2, num_attention_heads=4)
    >>> r = plan_memory(cfg, "lora", n_devices=1, batch=2, seq=8, compile=False)
    >>> r["trainable_params"]
    3584
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from lora_jax.lora.lorafy import lorafy
from lora_jax.scale.sharding import fsdp_specs, lora_specs, per_device_bytes
from lora_jax.scale.step import cross_entropy_loss, make_train_step
from lora_jax.lora.train import count_params
from lora_jax.lora.transform import lora

__all__ = ["plan_memory", "LLAMA_CONFIGS", "llama_config"]

GiB = 1024 ** 3

# Published HF config.json values (vocab, hidden, intermediate, layers, heads, kv heads).
LLAMA_CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-2-7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "Llama-2-13B": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "Llama-2-70B": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "Llama-3-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rope_theta=500000.0),
    "Llama-3-70B": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        rope_theta=500000.0),
}

_LAYER_KERNELS = r"^layers/.*/kernel$"


def llama_config(name: str, **overrides):
    from lora_jax.models.llama import LlamaConfig
    return LlamaConfig(**{**LLAMA_CONFIGS[name], **overrides})


def _abstract_tree(mode, model, rank, alpha, quant_kind, adapter_dtype):
    from lora_jax.quant.quantize import quantize

    def build(key):
        params = model.init_params(key, 1)
        if mode == "full":
            return params
        if mode == "qlora":
            params = quantize(params, quant_kind, targets=_LAYER_KERNELS)
        return lorafy(params, rank=rank, alpha=alpha, targets=_LAYER_KERNELS,
                      dtype=adapter_dtype)

    return jax.eval_shape(build, jax.random.key(0))


def plan_memory(cfg, mode: str, *, n_devices: int = 1, batch: int = 1, seq: int = 512,
                remat: bool = True, rank: int = 16, alpha: float = 32.0,
                compute_dtype=jnp.bfloat16, full_param_dtype=jnp.float32,
                base_dtype=jnp.bfloat16, adapter_dtype=jnp.float32, quant_kind: str = "nf4",
                compile: bool = True, compile_layers: int | None = None,
                devices=None) -> dict:
    """Per-device bytes of one training step of a Llama ``cfg`` in ``mode``.

    Args:
      cfg: a :class:`~lora_jax.models.llama.LlamaConfig` (its dtype/remat are overridden).
      mode: ``"full"`` (all weights train; ``full_param_dtype`` master weights, AdamW
        moments in the same dtype), ``"lora"`` (base in ``base_dtype``, A/B in
        ``adapter_dtype`` on every layer kernel), ``"qlora"`` (layer kernels
        ``quant_kind`` with double quant, embeddings/lm_head in ``base_dtype``).
      n_devices: devices of a ``(1, n, 1)`` ("data", "fsdp", "tensor") mesh: FSDP with
        ``fsdp_specs`` (every big leaf sharded on a divisible non-layer axis).
      batch, seq: global batch and sequence length (batch split over the devices).
      remat: ``nn.remat`` every decoder layer (only layer inputs are saved).
      compile: lower + compile the step for ``memory_analysis()``; otherwise only exact
        parameter / gradient / optimizer bytes.
      compile_layers: compile a model with this many layers instead of all of them and
        scale the temporaries linearly per layer from two compiles (``compile_layers``
        and ``2 * compile_layers``) -- for machines where a full compile is too slow.

    Returns a dict of byte counts (per device) and metadata.
    """
    from lora_jax.models.llama import LlamaForCausalLM

    if mode not in ("full", "lora", "qlora"):
        raise ValueError(f"mode must be 'full', 'lora' or 'qlora', got {mode!r}")
    devices = list(devices if devices is not None else jax.devices())[:n_devices]
    if len(devices) < n_devices:
        raise ValueError(f"need {n_devices} devices, have {len(devices)}; set XLA_FLAGS="
                         "--xla_force_host_platform_device_count before importing jax")
    if batch % n_devices:
        raise ValueError(f"batch {batch} does not split over {n_devices} devices")
    mesh = Mesh(np.array(devices).reshape(1, n_devices, 1), ("data", "fsdp", "tensor"))
    pdt = full_param_dtype if mode == "full" else base_dtype

    def setup(n_layers):
        c = dataclasses.replace(cfg, dtype=compute_dtype, param_dtype=pdt, remat=remat,
                                num_hidden_layers=n_layers)
        model = LlamaForCausalLM(c)
        params = _abstract_tree(mode, model, rank, alpha, quant_kind, adapter_dtype)
        specs = lora_specs(params, fsdp_specs(params, mesh), mesh)
        apply = model.apply if mode == "full" else lora(model.apply)
        step = make_train_step(cross_entropy_loss(apply), optax.adamw(1e-4), mesh, specs,
                               P(("data", "fsdp")), trainable="all" if mode == "full" else "lora")
        ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        tr, fr, opt, b = step.abstract(params, {"input_ids": ids, "labels": ids})
        return step, params, (tr, fr, opt, b)

    step, params, (tr, fr, opt, b) = setup(cfg.num_hidden_layers)
    counts = count_params(params) if mode != "full" else None
    n_total = sum(math.prod(x.shape) for x in jax.tree.leaves(params)) if mode == "full" else None
    out: dict[str, Any] = {
        "mode": mode, "n_devices": n_devices, "batch": batch, "seq": seq, "remat": remat,
        "rank": rank if mode != "full" else None,
        "layers": cfg.num_hidden_layers,
        "trainable_params": (n_total if mode == "full" else counts["trainable"]),
        "total_params": (n_total if mode == "full" else counts["total"]),
        "param_bytes": per_device_bytes(tr) + per_device_bytes(fr),
        "trainable_bytes": per_device_bytes(tr),
        "frozen_bytes": per_device_bytes(fr),
        "grad_bytes": per_device_bytes(tr),      # gradients have the trainable leaves' shapes
        "opt_bytes": per_device_bytes(opt),
        "batch_bytes": per_device_bytes(b),
    }
    if compile:
        t0 = time.perf_counter()
        if compile_layers is None or compile_layers >= cfg.num_hidden_layers:
            ma = step.lower(tr, fr, opt, b).compile().memory_analysis()
            temp = int(ma.temp_size_in_bytes)
            out["temp_method"] = "compiled full model"
            out["compiled_argument_bytes"] = int(ma.argument_size_in_bytes)
            out["compiled_output_bytes"] = int(ma.output_size_in_bytes)
            out["compiled_alias_bytes"] = int(ma.alias_size_in_bytes)
        else:
            temps = []
            for n in (compile_layers, 2 * compile_layers):
                s2, _, args = setup(n)
                temps.append(int(s2.lower(*args).compile().memory_analysis().temp_size_in_bytes))
            per_layer = (temps[1] - temps[0]) / compile_layers
            temp = int(temps[0] + per_layer * (cfg.num_hidden_layers - compile_layers))
            out["temp_method"] = (f"compiled {compile_layers} and {2 * compile_layers} layers, "
                                  f"scaled linearly ({per_layer / GiB:.3f} GiB/layer)")
        out["temp_bytes"] = temp
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        out["total_bytes"] = out["param_bytes"] + out["opt_bytes"] + out["batch_bytes"] + temp
    else:
        out["temp_bytes"] = None
        out["total_bytes"] = None
    return out
