"""Adapter checkpoint bytes vs full-model bytes, from abstract shapes (nothing allocated).

    python -m experiments.adapter_size      # writes experiments/results/adapter_size.json

bf16 base and bf16 A/B, r=8; "q,v" is the LoRA paper's choice, "all linear" adds
k, o, gate, up, down. Uses lora_jax.adapter_bytes / model_bytes on jax.eval_shape trees.
"""

import json

import jax
import jax.numpy as jnp

import lora_jax as lj
from experiments import RESULTS
from lora_jax.models import LlamaConfig, LlamaForCausalLM, llama_config

TARGETS = {"q,v": r"layers/self_attn/[qv]_proj/kernel",
           "all linear": r"layers/(self_attn|mlp)/\w+_proj/kernel"}
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def sizes(cfg, rank=8):
    model = LlamaForCausalLM(cfg)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    base = jax.eval_shape(lambda i: model.init(jax.random.key(0), i)["params"], ids)
    out = {}
    for name, targets in TARGETS.items():
        lp = jax.eval_shape(lambda p, t=targets: lj.lorafy(p, rank=rank, targets=t), base)
        a, m = lj.adapter_bytes(lp), lj.model_bytes(base)
        out[name] = {"adapter_bytes": a, "model_bytes": m, "ratio": a / m}
    return out


def main():
    bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    report = {"SmolLM2-135M": sizes(LlamaConfig(**SMOLLM2, **bf16)),
              "Llama-2-7B": sizes(llama_config("Llama-2-7B", **bf16))}
    for model, rows in report.items():
        for t, r in rows.items():
            print(f"{model:13s} r=8 {t:10s} adapter {r['adapter_bytes'] / 1e6:8.2f} MB  "
                  f"model {r['model_bytes'] / 1e9:7.3f} GB  ratio {r['ratio']:.5f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "adapter_size.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
