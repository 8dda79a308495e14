"""The one module of shared test utilities: random adapters, small Llama configs, tolerance
checks and the merged-vs-lora comparison. Test files import it as ``helpers`` (tests/ is on
sys.path under pytest)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj


# Small odd Llama sizes (HF ``LlamaConfig`` and ours take the same names); head_dim must be
# even for RoPE, and 5 * 6 != 35 on purpose. Callers add num_key_value_heads / tying.
def bpe_tokenizer(corpus, special, vocab_size):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus`` (strings), with the
    ``special`` tokens first (ids 0, 1, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    return tk


def masked_runs(ids, mask):
    """The runs of consecutive ``ids`` where ``mask`` is 1 (a row's answers), in order."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    return runs + [cur] if cur else runs


#: Llama 3 Instruct's chat template (its own text), for tokenizers the tests build
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] "
    "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content "
    "%}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

SMALL_LLAMA = dict(
    vocab_size=97,
    hidden_size=35,
    intermediate_size=33,
    num_hidden_layers=3,
    num_attention_heads=5,
    head_dim=6,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=500.0,
)


def randomize(params, key, fields=("b",), scale=0.3, node_type=None):
    """Draw ``fields`` of every ``node_type`` node (default LoraWeight) from N(0, scale^2),
    one key per node (split further per field when there are several)."""
    node_type = lj.LoraWeight if node_type is None else node_type
    flat, treedef = jax.tree.flatten(params, is_leaf=lambda x: isinstance(x, node_type))
    out = []
    for k, leaf in zip(jax.random.split(key, len(flat)), flat):
        if isinstance(leaf, node_type):
            keys = jax.random.split(k, len(fields)) if len(fields) > 1 else [k]
            new = {}
            for f, kf in zip(fields, keys):
                x = getattr(leaf, f)
                new[f] = (jax.random.normal(kf, x.shape, jnp.float32) * scale).astype(x.dtype)
            leaf = dataclasses.replace(leaf, **new)
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def randomize_zero_factors(params, key, scale=0.3):
    """Draw every all-zero factor: B after a default lorafy, and also A of an embedding
    (PEFT's init zeroes the vocabulary-side factor), so that every adapter changes the output."""
    flat, treedef = jax.tree.flatten(params, is_leaf=lambda x: isinstance(x, lj.LoraWeight))
    out = []
    for k, leaf in zip(jax.random.split(key, len(flat)), flat):
        if isinstance(leaf, lj.LoraWeight):
            zero = tuple(f for f in ("a", "b") if not np.any(np.asarray(getattr(leaf, f))))
            leaf = randomize(leaf, k, zero, scale) if zero else leaf
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def randomize_b(params, key, scale=0.3):
    """Give every LoraWeight a random B so the adapter changes the output."""
    return randomize(params, key, ("b",), scale)


def randomize_ab(params, key, scale=1.0):
    """Random A and B on every LoraWeight (a fresh lorafy has B = 0, which a checkpoint
    compresses to nothing and which hides A from every output)."""
    return randomize(params, key, ("a", "b"), scale)


def tx_update(tx, grads, state, params=None):
    """optax's own code (Adam's ``decay ** count``) relies on standard promotion;
    only the optimizer runs outside the strict mode the rest of the test keeps."""
    with jax.numpy_dtype_promotion("standard"):
        return tx.update(grads, state, params)


def close(a, b, tol):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    ref = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    assert err <= tol * ref, f"max abs diff {err} > {tol} * {ref}"


def check_lora_matches_merged(fn, params, args, *, key, targets=None, rank=2, layout=None,
                              tol=1e-5, grad_tol=1e-4, jit=True, mode="rev"):
    """The core contract, for any fn(params, *args) -> array.

    1. B = 0: lora(fn) is bit-equal to fn on the base.
    2. random B (and A where the init zeroes it): lora(fn)(p) == fn(merge(p)), eager
       and jitted.
    3. gradients w.r.t. A and B equal those through the merged form.
    """
    k1, k2 = jax.random.split(key)
    lp = lj.lorafy(params, rank=rank, targets=targets, key=k1, layout=layout)
    f = lj.lora(fn)
    base = fn(params, *args)
    zero = f(lp, *args)
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(base))

    lp = randomize_zero_factors(lp, k2)
    ref = fn(lj.merge(lp), *args)
    close(f(lp, *args), ref, tol)
    if jit:
        close(jax.jit(f)(lp, *args), ref, tol)

    trainable, frozen = lj.split(lp)

    def loss_lora(tr):
        return jnp.sum(jnp.sin(f(lj.combine(tr, frozen), *args).astype(jnp.float32)))

    def loss_merged(tr):
        return jnp.sum(jnp.sin(fn(lj.merge(lj.combine(tr, frozen)), *args).astype(jnp.float32)))

    if mode == "fwd":   # while_loop: forward-mode only
        tangent = jax.tree.map(jnp.ones_like, trainable)
        _, t1 = jax.jvp(loss_lora, (trainable,), (tangent,))
        _, t2 = jax.jvp(loss_merged, (trainable,), (tangent,))
        close(t1, t2, grad_tol)
        return lp
    g = jax.grad(loss_lora)(trainable)
    g_ref = jax.grad(loss_merged)(trainable)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        close(x, y, grad_tol)
    if jit:
        g_jit = jax.jit(jax.grad(loss_lora))(trainable)
        for x, y in zip(jax.tree.leaves(g_jit), jax.tree.leaves(g_ref)):
            close(x, y, grad_tol)
    return lp


def random_hf_llama(torch, transformers, *, seed=0, arch="Llama", **config):
    """A transformers Llama (or ``arch``: "Mistral", "Qwen2", "Qwen3") in eval mode with
    N(0, 0.3) weights from torch seed ``seed`` (larger than the 0.02 init so that errors show).
    Sizes are SMALL_LLAMA's with 2 layers, 64 positions, one KV head (GQA) and untied
    embeddings, each overridable by ``config``."""
    cfg = {**SMALL_LLAMA, "num_hidden_layers": 2, "max_position_embeddings": 64,
           "num_key_value_heads": 1, "tie_word_embeddings": False, **config}
    if cfg.get("rope_scaling") is not None:
        cfg["rope_scaling"] = dict(cfg["rope_scaling"])  # transformers mutates it
    torch.manual_seed(seed)
    config_cls = getattr(transformers, f"{arch}Config")
    hf = getattr(transformers, f"{arch}ForCausalLM")(config_cls(**cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    return hf


class Block(nn.Module):
    """A pre-norm residual MLP block (5 -> 9 -> 5), the body of :class:`Stack`."""

    @nn.compact
    def __call__(self, h, _):
        y = nn.Dense(9, name="up")(nn.LayerNorm()(h))
        return h + nn.Dense(5, name="down")(jax.nn.gelu(y)), None


class Stack(nn.Module):
    """Three :class:`Block` layers under ``nn.scan(nn.remat(...))``: stacked [3, ...] kernels."""

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                         split_rngs={"params": True}, length=3)
        h, _ = layers(name="layers")(x, None)
        return h
