"""Other people's model code, default path: ``lorafy(params, rank, fn=, args=)`` then ``lora(fn)``.

Every case is a framework's own layers used the way its documentation does (Flax
linen and NNX, dm-haiku, Equinox, Gemma-style einsum kernels). For each one, with
``lora(fn, strict=True)`` (any dense LoRA weight would raise):

* B = 0 gives the base model's output,
* with random B the output equals the merged model's, and the gradients of A and B
  equal those through the merged weights,
* A sits on the input side of every weight and B (zero at init) on the output side,
* one ``lora_optimizer`` step moves A/B and leaves every frozen leaf bit-identical,
* on an NF4 base (``quantize(..., fn=, args=)``), lora equals the dequantized merge.
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import lora_jax as lj
from helpers import close, randomize_b, randomize_zero_factors, tx_update

B, T, D = 2, 3, 9


def _linen(module, x, **init_kw):
    params = module.init(jax.random.key(1), x, **init_kw)["params"]
    return (lambda p, x: module.apply({"params": p}, x)), params


def _haiku(forward, x):
    model = hk.without_apply_rng(hk.transform(forward))
    return model.apply, model.init(jax.random.key(1), x)


def _nnx(model):
    graphdef, state = nnx.split(model)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


# ----------------------------------------------------------------------------- linen

class ScanDecoder(nn.Module):
    """nn.scan of blocks with multi-axis DenseGeneral kernels: q (L, d, h, hd), o (L, h, hd, d)."""

    @nn.compact
    def __call__(self, x):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                q = nn.DenseGeneral((3, 5), name="q")(x)
                k = nn.DenseGeneral((3, 5), name="k")(x)
                att = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k), axis=-1)
                h = jnp.einsum("bnts,bsnh->btnh", att, q)
                y = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="o")(h)
                return x + jnp.tanh(y), None

        stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                        split_rngs={"params": True}, length=2)
        return stack(name="layers")(x, None)[0]


class HeadEinsums(nn.Module):
    """nn.Einsum kernels contracted on a middle axis (NDH) and on two head-first axes (NHD)."""

    @nn.compact
    def __call__(self, x):
        q = nn.Einsum((3, D, 5), "btd,ndh->btnh", name="q")(x)
        kv = nn.Einsum((2, 3, D, 5), "bsd,cndh->cbsnh", name="kv")(x)
        att = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, kv[0]), axis=-1)
        h = jnp.einsum("bnts,bsnh->btnh", att, kv[1])
        return nn.Einsum((3, 5, 7), "btnh,nhd->btd", name="o")(h)


class VmapHeads(nn.Module):
    """nn.vmap'd Dense heads sharing one input: kernel (heads, d, f), heads a free axis."""

    @nn.compact
    def __call__(self, x):
        heads = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=None, out_axes=0, axis_size=3)(7, name="heads")
        return heads(x).sum(0)


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(11, 7, name="embed")
        h = jnp.tanh(nn.Dense(7, name="mix")(emb(ids)))
        return emb.attend(h)


class GemmaBlock(nn.Module):
    """Gemma-style attention and gated FFN: ``self.param`` einsum kernels named ``w``,
    ``gating_einsum`` (2, F, D) indexed per branch, ``linear`` (F, D)."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.3)

        class Einsum(nn.Module):
            shape: tuple

            @nn.compact
            def __call__(self, eqn, x):
                return jnp.einsum(eqn, x, self.param("w", init, self.shape))

        q = Einsum((3, D, 5), name="q_einsum")("BTD,NDH->BTNH", x)
        kv = Einsum((2, 3, D, 5), name="kv_einsum")("BSD,CKDH->CBSKH", x)
        att = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, kv[0]), axis=-1)
        h = jnp.einsum("BNTS,BSNH->BTNH", att, kv[1])
        x = x + Einsum((3, 5, D), name="attn_vec_einsum")("BTNH,NHD->BTD", h)
        w_gating = self.param("gating_einsum", init, (2, D, 11))
        gate = jax.nn.gelu(jnp.dot(x, w_gating[0])) * jnp.dot(x, w_gating[1])
        return x + jnp.dot(gate, self.param("linear", init, (11, D)))


# ----------------------------------------------------------------------------- NNX

class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, 11, rngs=rngs)
        self.down = nnx.Linear(11, 7, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class NnxConvAttn(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 6, kernel_size=(3, 3), rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=3, in_features=6, qkv_features=9,
                                           out_features=5, decode=False, rngs=rngs)

    def __call__(self, x):                        # x: [B, H, W, 3]
        h = jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1, 6)
        return self.attn(h)


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


class NnxStack(nnx.Module):
    """Layers created with nnx.vmap, run with nnx.scan over nnx.remat."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NnxBlock(rngs)
        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        @nnx.remat
        def step(block, x):
            return block(x)
        return step(self.blocks, x)


class DepthwiseSeparable(nn.Module):
    """MobileNet / ConvNeXt block: a depthwise conv (one group per channel, kernel
    [3, 3, 1, 6]), a grouped conv (3 groups, [3, 3, 2, 9]), a pointwise conv."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), feature_group_count=6, name="depthwise")(x)
        x = nn.Conv(9, (3, 3), strides=2, feature_group_count=3, name="grouped")(jax.nn.gelu(x))
        return nn.Conv(7, (1, 1), name="pointwise")(x)


# ----------------------------------------------------------------------------- haiku

def _hk_conv_mlp(x):                              # x: [B, H, W, 3]
    h = jax.nn.relu(hk.Conv2D(6, kernel_shape=3)(x)).reshape(x.shape[0], -1)
    return hk.Linear(7)(jax.nn.relu(hk.Linear(11)(h)))


def _hk_attention(x):
    attn = hk.MultiHeadAttention(num_heads=3, key_size=4, w_init=hk.initializers.VarianceScaling())
    return attn(x, x, x)


def _hk_layer_stack(x):
    def layer(x):
        return jnp.tanh(hk.Linear(D)(x))
    return hk.layer_stack(3)(layer)(x)


# ----------------------------------------------------------------------------- Equinox

def _eqx(model, call):
    """Equinox's functional split: arrays are the parameters, the rest is static."""
    params, static = eqx.partition(model, eqx.is_array)
    return (lambda p, x: call(eqx.combine(p, static), x)), params


def _eqx_mlp():
    keys = jax.random.split(jax.random.key(1), 2)
    model = eqx.nn.Sequential([eqx.nn.Linear(D, 11, key=keys[0]), eqx.nn.Lambda(jax.nn.gelu),
                               eqx.nn.Linear(11, 7, key=keys[1])])
    return _eqx(model, lambda m, x: jax.vmap(jax.vmap(m))(x))


def _eqx_conv():
    model = eqx.nn.Conv2d(3, 6, kernel_size=3, key=jax.random.key(1))   # weight OIHW
    return _eqx(model, lambda m, x: jax.vmap(m)(x))


def _eqx_grouped_conv():
    model = eqx.nn.Conv2d(6, 9, kernel_size=3, groups=3, key=jax.random.key(1))  # [9, 2, 3, 3]
    return _eqx(model, lambda m, x: jax.vmap(m)(x))


def _eqx_attention():
    model = eqx.nn.MultiheadAttention(num_heads=3, query_size=D, key_size=D, value_size=D,
                                      output_size=7, qk_size=4, vo_size=4, key=jax.random.key(1))
    return _eqx(model, lambda m, x: jax.vmap(lambda s: m(s, s, s))(x))


def _eqx_lstm():
    """eqx.nn.LSTMCell (weight_ih [4h, in], weight_hh [4h, h]) run over time by lax.scan."""
    params, static = eqx.partition(eqx.nn.LSTMCell(D, 7, key=jax.random.key(1)), eqx.is_array)

    def fn(p, xs):                                             # xs: [T, B, D]
        cell = jax.vmap(eqx.combine(p, static))

        def step(carry, x):
            h, c = cell(x, carry)
            return (h, c), h
        zeros = jnp.zeros((xs.shape[1], 7))
        return jax.lax.scan(step, (zeros, zeros), xs)[1]
    return fn, params


class _EqxTagger(eqx.Module):
    """eqx.nn.Embedding (``weight[i]``, vmapped: a gather keeping the row axis) + a head."""

    embed: eqx.nn.Embedding
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Embedding(11, D, key=k1)
        self.head = eqx.nn.Linear(D, 7, key=k2)

    def __call__(self, ids):
        return jax.vmap(jax.vmap(lambda i: self.head(self.embed(i))))(ids)


class _EqxBlock(eqx.Module):
    norm: eqx.nn.LayerNorm
    lin: eqx.nn.Linear

    def __init__(self, key):
        self.norm = eqx.nn.LayerNorm(D)
        self.lin = eqx.nn.Linear(D, D, key=key)

    def __call__(self, x):
        return x + jnp.tanh(self.lin(self.norm(x)))


def _eqx_layer_scan():
    """Equinox's scan-over-layers idiom: filter_vmap-built stacked blocks, lax.scan."""
    stack = eqx.filter_vmap(_EqxBlock)(jax.random.split(jax.random.key(1), 3))
    params, static = eqx.partition(stack, eqx.is_array)

    def fn(p, x):
        return jax.lax.scan(lambda h, layer: (jax.vmap(eqx.combine(layer, static))(h), None),
                            x, p)[0]
    return fn, params


# ----------------------------------------------------------------------------- plain JAX

def _hk_gru(xs):                        # xs: [T, B, D]; hk.GRU jnp.splits w_h into its gates
    core = hk.GRU(7)
    return hk.dynamic_unroll(core, xs, core.initial_state(xs.shape[1]))[0]


def _fori_layers():
    """Stacked layers run by fori_loop, each picked by ``w[i]`` (a dynamic_slice)."""
    p = {"layers": {"w": jax.random.normal(jax.random.key(4), (4, D, D)) * 0.3}}
    return (lambda p, x: jax.lax.fori_loop(
        0, 4, lambda i, h: jnp.tanh(h @ p["layers"]["w"][i]), x)), p


def _fused_qkv():
    """q, k, v as column slices of one kernel, the output kernel read by its first rows,
    a kernel reshaped to heads before its einsum."""
    ks = jax.random.split(jax.random.key(4), 3)
    p = {"qkv": {"kernel": jax.random.normal(ks[0], (D, 15)) * 0.3},
         "out": {"kernel": jax.random.normal(ks[1], (7, D)) * 0.3},
         "heads": {"kernel": jax.random.normal(ks[2], (D, 15)) * 0.3}}   # reshaped [D, 3, 5]

    def fn(p, x):                                                    # x: [B, T, D]
        w = p["qkv"]["kernel"]
        q, k, v = (x @ w[:, i * 5:(i + 1) * 5] for i in range(3))
        att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k), axis=-1)
        h = jnp.einsum("btd,dhk->bthk", x, p["heads"]["kernel"].reshape(D, 3, 5))
        return jnp.concatenate([jnp.einsum("bts,bsd->btd", att, v) @ p["out"]["kernel"][:5],
                                h.reshape(B, T, 15)], axis=-1)
    return fn, p


def _moe():
    """Top-1 mixture of experts: each token's expert matrix gathered, ``w[ids]``."""
    ks = jax.random.split(jax.random.key(4), 2)
    p = {"router": {"kernel": jax.random.normal(ks[0], (D, 3))},
         "experts": {"w": jax.random.normal(ks[1], (3, D, 7)) * 0.3}}

    def fn(p, x):                                                    # x: [tokens, D]
        logits = x @ p["router"]["kernel"]
        eid = jnp.argmax(logits, -1)
        gate = jnp.take_along_axis(jax.nn.softmax(logits, -1), eid[:, None], -1)
        return gate * jnp.einsum("td,tdf->tf", x, p["experts"]["w"][eid])
    return fn, p


def _mup_named():
    """muP-style scaled weights (``W * c``, ``c * W``, ``W / c``: haliax's Linear reparam, and
    ``-W``) and a weight named for a remat policy (``checkpoint_name``, haliax's Stacked)."""
    ks = jax.random.split(jax.random.key(4), 3)
    p = {"up": {"kernel": jax.random.normal(ks[0], (D, 11))},
         "mid": {"kernel": jax.random.normal(ks[1], (11, 11))},
         "down": {"kernel": jax.random.normal(ks[2], (11, 7))}}
    policy = jax.checkpoint_policies.save_only_these_names("mid_w")

    @functools.partial(jax.checkpoint, policy=policy)
    def fn(p, x):
        h = jnp.tanh(x @ (p["up"]["kernel"] * (1.0 / math.sqrt(D))))
        mid = checkpoint_name(p["mid"]["kernel"], "mid_w")
        h = jnp.tanh(h @ -(0.3 * mid))
        return h @ (p["down"]["kernel"] / 11.0)
    return fn, p


def _keras_depthwise():
    """Keras' DepthwiseConv2D on JAX: the kernel [kh, kw, C, M] is reshaped to
    [kh, kw, 1, C*M] and run as a conv with C groups; depth multiplier 2, then 1."""
    ks = jax.random.split(jax.random.key(4), 2)
    p = {"dw2": {"kernel": jax.random.normal(ks[0], (3, 3, 5, 2))},
         "dw1": {"kernel": jax.random.normal(ks[1], (3, 2, 10, 1))}}

    def depthwise(x, k):
        kh, kw, c, m = k.shape
        return jax.lax.conv_general_dilated(x, k.reshape(kh, kw, 1, c * m), (1, 1), "SAME",
                                            feature_group_count=c,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (lambda p, x: depthwise(jax.nn.gelu(depthwise(x, p["dw2"]["kernel"])),
                                   p["dw1"]["kernel"])), p


def _assembled():
    """Weights assembled at call time: q, k, v kernels concatenated into one matmul (with a
    constant block), an RNN cell's ``concat([x, h]) @ concat([W_x, W_h])``, heads padded to a
    multiple with ``jnp.pad``, two layer stacks concatenated and scanned, and a weight held
    by ``optimization_barrier``."""
    ks = jax.random.split(jax.random.key(4), 8)
    p = {"q": {"kernel": jax.random.normal(ks[0], (D, 7)) * 0.3},
         "k": {"kernel": jax.random.normal(ks[1], (D, 3)) * 0.3},
         "v": {"kernel": jax.random.normal(ks[2], (D, 5)) * 0.3},
         "cell": {"w_x": jax.random.normal(ks[3], (7, 11)) * 0.3,
                  "w_h": jax.random.normal(ks[4], (11, 11)) * 0.3},
         "heads": {"kernel": jax.random.normal(ks[5], (11, 3, 5)) * 0.3},   # 3 heads -> 4
         "early": {"w": jax.random.normal(ks[6], (2, 5, 5)) * 0.3},
         "late": {"w": jax.random.normal(ks[7], (1, 5, 5)) * 0.3}}

    def fn(p, x):                                                    # x: [B, D]
        w = jnp.concatenate([p["q"]["kernel"], jnp.zeros((D, 2)), p["k"]["kernel"],
                             p["v"]["kernel"]], axis=1)
        q, _, k, v = jnp.split(x @ w, [7, 9, 12], axis=-1)
        h = jnp.tanh(jnp.concatenate([q * k.sum(-1, keepdims=True), jnp.ones((B, 11))], -1)
                     @ jnp.concatenate([p["cell"]["w_x"], p["cell"]["w_h"]], axis=0))
        heads = jnp.pad(p["heads"]["kernel"], ((0, 0), (0, 1), (0, 0)), constant_values=0.1)
        o = jnp.einsum("bd,dhk->bhk", h, jax.lax.optimization_barrier(heads)).sum(1) + v
        stack = jnp.concatenate([p["early"]["w"], p["late"]["w"]], axis=0)
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), o, stack)[0]
    return fn, p


def _x(shape, seed=2):
    return jax.random.normal(jax.random.key(seed), shape)


CASES = {
    "linen_dense": lambda: (*_linen(nn.Sequential([nn.Dense(11), jax.nn.gelu, nn.Dense(7)]),
                                     _x((B, D))), _x((B, D)), None),
    "linen_scan_densegeneral_remat": lambda: (*_linen(ScanDecoder(), _x((B, T, D))),
                                              _x((B, T, D)), None),
    "linen_einsum_middle_and_head_first": lambda: (*_linen(HeadEinsums(), _x((B, T, D))),
                                                   _x((B, T, D)), None),
    "linen_vmap_shared_input": lambda: (*_linen(VmapHeads(), _x((B, D))), _x((B, D)), None),
    "linen_conv": lambda: (*_linen(nn.Conv(7, (3, 3)), _x((B, 7, 7, 3))), _x((B, 7, 7, 3)), None),
    "linen_depthwise_grouped_conv": lambda: (*_linen(DepthwiseSeparable(), _x((B, 7, 7, 6))),
                                             _x((B, 7, 7, 6)), None),
    "linen_conv_transpose_flipped": lambda: (
        *_linen(nn.ConvTranspose(7, (3, 2), strides=(2, 1), transpose_kernel=True),
                _x((B, 5, 5, 3))), _x((B, 5, 5, 3)), None),
    "linen_embed_attend": lambda: (*_linen(TiedLM(), jnp.ones((B, T), jnp.int32)),
                                   jnp.array([[1, 5, 10], [3, 0, 7]]), r"embedding|kernel"),
    "gemma_einsums": lambda: (*_linen(GemmaBlock(), _x((B, T, D))), _x((B, T, D)), None),
    "nnx_mlp": lambda: (*_nnx(NnxMlp(nnx.Rngs(1))), _x((B, D)), None),
    "nnx_conv_attention": lambda: (*_nnx(NnxConvAttn(nnx.Rngs(1))), _x((B, 5, 5, 3)), None),
    "nnx_vmap_scan_remat": lambda: (*_nnx(NnxStack(nnx.Rngs(1))), _x((B, D)), None),
    "haiku_conv_mlp": lambda: (*_haiku(_hk_conv_mlp, _x((B, 5, 5, 3))), _x((B, 5, 5, 3)), None),
    "haiku_attention": lambda: (*_haiku(_hk_attention, _x((B, T, D))), _x((B, T, D)), None),
    "haiku_layer_stack": lambda: (*_haiku(_hk_layer_stack, _x((B, D))), _x((B, D)), None),
    "equinox_mlp_out_in": lambda: (*_eqx_mlp(), _x((B, T, D)), None),
    "equinox_conv": lambda: (*_eqx_conv(), _x((B, 3, 7, 7)), None),
    "equinox_grouped_conv": lambda: (*_eqx_grouped_conv(), _x((B, 6, 7, 7)), None),
    "equinox_lstm_scan": lambda: (*_eqx_lstm(), _x((T, B, D)), None),
    "equinox_attention": lambda: (*_eqx_attention(), _x((B, T, D)), None),
    "equinox_embedding_head": lambda: (*_eqx(_EqxTagger(jax.random.key(1)),
                                             lambda m, ids: m(ids)),
                                       jnp.array([[1, 5, 10], [3, 0, 7]]), r"weight"),
    "equinox_vmapped_layers_scan": lambda: (*_eqx_layer_scan(), _x((B, D)), None),
    "haiku_gru_split_gates": lambda: (*_haiku(_hk_gru, _x((T, B, D))), _x((T, B, D)), None),
    "jax_fori_loop_layer_index": lambda: (*_fori_layers(), _x((B, D)), None),
    "jax_fused_qkv_slices_reshape": lambda: (*_fused_qkv(), _x((B, T, D)), None),
    "jax_top1_moe_gather": lambda: (*_moe(), _x((7, D)), None),
    "jax_mup_scaled_named_weights": lambda: (*_mup_named(), _x((B, D)), None),
    "jax_keras_depthwise_reshaped": lambda: (*_keras_depthwise(), _x((B, 7, 5, 5)), None),
    "jax_weights_assembled_at_call": lambda: (*_assembled(), _x((B, D)), None),
}

# What fn shows of each weight there: indexing, splitting, slicing, reshaping or gathering
# a weight before it meets the input must not hide (or mistake) its layout.
LAYOUTS = {
    "equinox_embedding_head": {"embed/weight": (0, (0,)), "head/weight": (0, (1,))},
    "equinox_vmapped_layers_scan": {"lin/weight": (1, (1,))},
    "haiku_gru_split_gates": {"gru/w_i": (0, (0,)), "gru/w_h": (0, (0,))},
    "jax_fori_loop_layer_index": {"layers/w": (1, (0,))},
    "jax_fused_qkv_slices_reshape": {"qkv/kernel": (0, (0,)), "out/kernel": (0, (0,)),
                                     "heads/kernel": (0, (0,))},
    "jax_top1_moe_gather": {"router/kernel": (0, (0,)), "experts/w": (1, (0,))},
    "jax_mup_scaled_named_weights": {"up/kernel": (0, (0,)), "mid/kernel": (0, (0,)),
                                     "down/kernel": (0, (0,))},
    "jax_keras_depthwise_reshaped": {"dw2/kernel": (0, (0, 1)), "dw1/kernel": (0, (0, 1))},
    "jax_weights_assembled_at_call": {"q/kernel": (0, (0,)), "k/kernel": (0, (0,)),
                                      "v/kernel": (0, (0,)), "cell/w_x": (0, (0,)),
                                      "cell/w_h": (0, (0,)), "heads/kernel": (0, (0,)),
                                      "early/w": (1, (0,)), "late/w": (1, (0,))},
}


def _nodes(tree):
    return [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda v: isinstance(v, lj.LoraWeight))[0] if isinstance(x, lj.LoraWeight)]


def _check_factors(lp):
    """A on the input side (fan-in sized, PEFT's Kaiming bound), B zero on the output side;
    an embedding table (gathered by rows) has PEFT's embedding init instead: the
    vocabulary-side factor (A, on the row axis) zero, B ~ N(0, 1)."""
    nodes = _nodes(lp)
    assert nodes, "lorafy targeted nothing"
    for path, w in nodes:
        s = w.stack_ndim
        rest = w.shape[s:]
        fan_in = math.prod(rest[j] for j in w.in_axes)
        assert w.a.shape == (*w.shape[:s], *(rest[j] for j in w.in_axes), w.rank), path
        assert w.b.shape == (*w.shape[:s], w.rank, *(rest[j] for j in w.out_axes)), path
        if any("embed" in str(k) for k in path):
            assert w.in_axes == (0,) and not np.asarray(w.a).any(), path
            assert float(jnp.max(jnp.abs(w.b))) > 1.0, path       # N(0, 1), not a small bound
            continue
        assert float(jnp.max(jnp.abs(w.a))) <= 1.0 / math.sqrt(fan_in) + 1e-7, path
        assert not np.asarray(w.b).any(), path


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_path(case):
    fn, params, x, targets = CASES[case]()
    k1, k2 = jax.random.split(jax.random.key(0))
    lp = lj.lorafy(params, rank=3, key=k1, fn=fn, args=(x,), targets=targets)
    _check_factors(lp)
    f = jax.jit(lj.lora(fn, strict=True))
    base = jax.jit(fn)(params, x)
    close(f(lp, x), base, 1e-6)                                  # B = 0 is the base model

    lp = randomize_zero_factors(lp, k2)                         # every adapter visible
    close(f(lp, x), jax.jit(fn)(lj.merge(lp), x), 2e-5)          # lora == merged
    trainable, frozen = lj.split(lp)

    def loss(tr, apply):
        return jnp.sum(jnp.sin(apply(lj.combine(tr, frozen))))

    g = jax.jit(jax.grad(loss, argnums=0), static_argnums=1)(
        trainable, lambda p: lj.lora(fn, strict=True)(p, x))
    g_ref = jax.grad(loss)(trainable, lambda p: fn(lj.merge(p), x))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        close(a, b, 1e-4)

    tx = lj.lora_optimizer(optax.adam(1e-2), lp)                # one step on the full tree
    state = tx.init(lp)
    grads_full = lj.combine(g, jax.tree.map(jnp.zeros_like, frozen))
    updates, _ = tx_update(tx, grads_full, state, lp)
    with jax.numpy_dtype_promotion("standard"):
        new = optax.apply_updates(lp, updates)
    new_tr, new_fr = lj.split(new)
    for a, b in zip(jax.tree.leaves(new_fr), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(new_tr), jax.tree.leaves(trainable)))


@pytest.mark.parametrize("case", ["linen_scan_densegeneral_remat", "gemma_einsums",
                                  "equinox_mlp_out_in", "haiku_layer_stack", "nnx_mlp",
                                  "haiku_gru_split_gates", "jax_top1_moe_gather",
                                  "jax_fori_loop_layer_index", "jax_fused_qkv_slices_reshape",
                                  "linen_depthwise_grouped_conv",
                                  "jax_mup_scaled_named_weights",
                                  "jax_weights_assembled_at_call"])
def test_nf4_base(case):
    fn, params, x, targets = CASES[case]()
    qp = lj.quantize(params, "nf4", fn=fn, args=(x,))
    lp = randomize_b(lj.lorafy(qp, rank=3, fn=fn, args=(x,), targets=targets), jax.random.key(3))
    assert any(lj.is_quantized(w.w0) for _, w in _nodes(lp))
    got = jax.jit(lj.lora(fn, strict=True))(lp, x)
    close(got, jax.jit(fn)(lj.merge(lp), x), 2e-5)
    if case == "jax_top1_moe_gather":
        return                  # a 4-bit router may send a token to another expert: not close
    fp32 = randomize_b(lj.lorafy(params, rank=3, fn=fn, args=(x,), targets=targets),
                       jax.random.key(3))                          # the same A and B
    close(got, jax.jit(fn)(lj.merge(fp32), x), 0.5)               # NF4 base is close


def test_warning_names_parameter_and_fix():
    """Without fn the Equinox (out, in) weight of a conv gets a guessed layout; lora says
    which parameter, why, and the fix, once, at the caller's line."""
    fn, model, x, _ = CASES["equinox_conv"]()
    lp = lj.lorafy(model, rank=2, layout={"weight": (0, (0,))})       # a wrong layout
    with pytest.warns(lj.MaterializationWarning) as rec:
        lj.lora(fn)(lp, x)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "'weight'" in msg and "fn=" in msg and "layout" in msg
    assert rec[0].filename == __file__
    with pytest.raises(lj.MaterializationError, match="'weight'"):
        lj.lora(fn, strict=True)(lp, x)


def test_default_targets_of_every_framework():
    """Without fn, the names find what fn finds, with the layouts fn reads."""
    for case in ("haiku_conv_mlp", "nnx_mlp", "equinox_mlp_out_in", "gemma_einsums",
                 "haiku_gru_split_gates", "equinox_lstm_scan"):
        fn, params, x, _ = CASES[case]()
        with_fn = {p: w.in_axes for p, w in _nodes(lj.lorafy(params, rank=2, fn=fn, args=(x,)))}
        assert with_fn, case
        if case != "gemma_einsums":                  # gating_einsum/linear need fn to be found
            names = {p: w.in_axes for p, w in _nodes(lj.lorafy(params, rank=2))}
            assert names == with_fn, case
    with pytest.raises(ValueError, match=r"'norm/scale' \(5,\).*targets="):
        lj.lorafy({"norm": {"scale": jnp.ones(5)}}, rank=2)


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_layout_read_through_indexing_splitting_slicing_reshaping(case):
    fn, params, x, _ = CASES[case]()
    assert lj.infer_layout(fn, params, x) == LAYOUTS[case]


@pytest.mark.parametrize("shape, layout", [((1, 5, 7), (1, (0,))), ((5, 1, 7), (0, (0,))),
                                           ((5, 7, 1), (0, (0,))), ((1, 1, 5, 7), (2, (0,)))])
def test_size_one_axes_reshaped_away(shape, layout):
    """A size-1 axis a reshape removes: a one-layer stack in front, an output axis
    elsewhere. The node reshapes with it (an NF4 base too), never formed."""
    params = {"w": _x(shape, seed=4)}
    x = _x((B, 5))

    def fn(p, x):
        return x @ p["w"].reshape(5, 7)
    assert lj.infer_layout(fn, params, x) == {"w": layout}
    for base in (params, lj.quantize(params, "nf4", fn=fn, args=(x,))):
        lp = randomize_b(lj.lorafy(base, rank=2, fn=fn, args=(x,)), jax.random.key(3))
        close(lj.lora(fn, strict=True)(lp, x), fn(lj.merge(lp), x), 1e-5)


def test_stop_gradient_on_a_weight_stops_its_adapter():
    """``stop_gradient(W)`` in fn: the weight stays factored, and no gradient reaches its A
    or B (the other weight's adapter still trains), as through the merged weights."""
    params = {"frozen": {"kernel": _x((D, 7), seed=4)}, "free": {"kernel": _x((7, 5), seed=5)}}

    def fn(p, x):
        return jnp.tanh(x @ jax.lax.stop_gradient(p["frozen"]["kernel"])) @ p["free"]["kernel"]
    x = _x((B, D))
    lp = randomize_zero_factors(lj.lorafy(params, rank=2, fn=fn, args=(x,)), jax.random.key(3))
    assert set(lj.infer_layout(fn, params, x)) == {"frozen/kernel", "free/kernel"}
    tr, fr = lj.split(lp)
    g = jax.grad(lambda t: jnp.sum(lj.lora(fn, strict=True)(lj.combine(t, fr), x) ** 2))(tr)
    assert not np.any(g["frozen"]["kernel"].a) and not np.any(g["frozen"]["kernel"].b)
    assert np.any(g["free"]["kernel"].a) and np.any(g["free"]["kernel"].b)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_concatenated_adapters_of_other_ranks_and_scales_are_exact(axis):
    """Blocks of different rank, alpha and rsLoRA concatenated along a stacked (0), input (1)
    or output (2) axis: one node of their summed (or, stacked, largest) rank whose scale is
    folded into B, equal to the merged weights in value and in every A and B gradient."""
    shapes = {"u": (2, 5, 7), "v": (2, 3, 7)} if axis == 1 else {"u": (2, 5, 7), "v": (2, 5, 3)}
    if axis == 0:
        shapes["v"] = (3, 5, 7)
    params = {n: {"w": _x(s, seed=i)} for i, (n, s) in enumerate(shapes.items())}
    lp = lj.lorafy(params, rank=2, layout={"w": (1, (0,))}, rank_pattern={"v": 3},
                   alpha_pattern={"u": 5.0}, rslora=True, key=jax.random.key(1))
    lp = randomize_b(lp, jax.random.key(2))

    def fn(p, x):                   # x: [L, B, in]
        w = jnp.concatenate([p["u"]["w"], p["v"]["w"]], axis=axis)
        return jnp.einsum("lbi,lio->lbo", x, w)
    x = _x((5 if axis == 0 else 2, B, 8 if axis == 1 else 5))
    tr, fr = lj.split(lp)

    def loss(t, apply):
        return jnp.sum(jnp.sin(apply(lj.combine(t, fr))))
    got = jax.value_and_grad(loss)(tr, lambda p: lj.lora(fn, strict=True)(p, x))
    want = jax.value_and_grad(loss)(tr, lambda p: fn(lj.merge(p), x))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        close(a, b, 1e-5)
    assert set(lj.infer_layout(fn, params, x)) == {"u/w", "v/w"}


def test_concatenated_weights_of_other_layouts_are_named():
    """An (in, out) kernel concatenated with an (out, in) one has no factored form: strict
    names the parameter; non-strict forms it, exactly."""
    params = {"a": {"w": _x((5, 7))}, "b": {"w": _x((5, 7), seed=3)}}
    lp = randomize_b(lj.lorafy(params, rank=2, layout={"a/w": (0, (0,)), "b/w": (0, (1,))}),
                     jax.random.key(2))

    def fn(p, x):
        return x @ jnp.concatenate([p["a"]["w"], p["b"]["w"]], axis=1)
    x = _x((B, 5))
    with pytest.raises(lj.MaterializationError, match=r"'a/w'.*another layout"):
        lj.lora(fn, strict=True)(lp, x)
    with pytest.warns(lj.MaterializationWarning):
        close(lj.lora(fn)(lp, x), fn(lj.merge(lp), x), 1e-5)


def test_scanned_weight_guessed_without_stacked_axis_is_named():
    """Without fn, a stacked LayerNorm scale [L, D] named ``weight`` is guessed to be an
    (out, in) matrix; scanning over it forms it and names it (not JAX's length error)."""
    fn, params = _eqx_layer_scan()
    x = _x((B, D))
    lp = randomize_b(lj.lorafy(params, rank=2), jax.random.key(3))
    assert lp.norm.weight.stack_ndim == 0 and lp.lin.weight.stack_ndim == 1
    with pytest.warns(lj.MaterializationWarning, match=r"'norm/weight'.*no stacked axis"):
        got = lj.lora(fn)(lp, x)
    close(got, fn(lj.merge(lp), x), 1e-5)
    with pytest.raises(lj.MaterializationError, match=r"'norm/weight'"):
        lj.lora(fn, strict=True)(lp, x)


def test_grouped_conv_adapter_is_a_delta_of_the_kernel():
    """A grouped kernel [*K, I/G, O] is one matrix every group's input meets, so its adapter
    is ``ΔW = s·A@B`` of that shape (A [*K, I/G, r], B [r, O]): merge() folds it in, and lora
    runs A once per group and B as a grouped 1x1 conv, never forming ΔW."""
    fn, params, x, _ = CASES["linen_depthwise_grouped_conv"]()
    lp = lj.lorafy(params, rank=2, fn=fn, args=(x,))
    assert {jax.tree_util.keystr(p[:1]) for p, _ in _nodes(lp)} == {
        "['depthwise']", "['grouped']", "['pointwise']"}
    assert lp["depthwise"]["kernel"].a.shape == (3, 3, 1, 2)
    assert lp["grouped"]["kernel"].b.shape == (2, 9)
    lp = randomize_b(lp, jax.random.key(3))
    w = lp["grouped"]["kernel"]
    delta = lj.merge({"k": w})["k"] - w.w0
    np.testing.assert_allclose(delta, w.scale * jnp.einsum("hwir,ro->hwio", w.a, w.b),
                               rtol=1e-5, atol=1e-6)
    hlo = jax.jit(lj.lora(fn, strict=True)).lower(lp, x).as_text()
    assert "feature_group_count = 3" in hlo and "feature_group_count = 6" in hlo


def test_transposed_use_of_a_guessed_layout_is_reported():
    """An (out, in) kernel under an (in, out) name, used as ``x @ W.T`` (transformers' Flax
    GPT-2 Conv1D): without fn the guess puts A on the output side, which only a tied
    embedding's attend does on purpose; lora says so (the result is exact) and strict raises.
    With fn, silent."""
    params = {"proj": {"kernel": _x((7, D), seed=4)}}

    def fn(p, x):
        return x @ p["proj"]["kernel"].T
    x = _x((B, D))
    lp = randomize_b(lj.lorafy(params, rank=2), jax.random.key(3))
    with pytest.warns(lj.MaterializationWarning, match=r"'proj/kernel'.*x @ W\.T.*fn="):
        got = lj.lora(fn)(lp, x)
    close(got, fn(lj.merge(lp), x), 1e-5)
    with pytest.raises(lj.MaterializationError, match=r"'proj/kernel'.*x @ W\.T.*strict=True"):
        lj.lora(fn, strict=True)(lp, x)
    lp = randomize_b(lj.lorafy(params, rank=2, fn=fn, args=(x,)), jax.random.key(3))
    assert lp["proj"]["kernel"].in_axes == (1,)
    close(jax.jit(lj.lora(fn, strict=True))(lp, x), fn(lj.merge(lp), x), 1e-5)


class _Patchify(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(7, (2, 3), strides=(2, 3), padding="VALID", name="projection")(x)


class _PatchEmbed(nn.Module):
    """ViT's patchifying conv in a module not named conv (transformers' Flax ViT / CLIP)."""

    embed: str

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="head")(_Patchify(name=self.embed)(x).mean((1, 2)))


@pytest.mark.parametrize("embed", ["patch_embeddings", "PatchEmbed_0"])
def test_patch_embedding_conv_guess_matches_fn(embed):
    x = _x((B, 4, 9, 3))
    fn, params = _linen(_PatchEmbed(embed), x)
    got = lj.infer_layout(fn, params, x)
    assert got == {f"{embed}/projection/kernel": (0, (0, 1, 2)),               # [2, 3, 3, 7]
                   "head/kernel": (0, (0,))}
    shapes = {f"{embed}/projection/kernel": params[embed]["projection"]["kernel"].shape,
              "head/kernel": params["head"]["kernel"].shape}
    assert {p: lj.default_layout(p, shape) for p, shape in shapes.items()} == got
    lp = randomize_b(lj.lorafy(params, rank=2), jax.random.key(3))
    close(jax.jit(lj.lora(fn, strict=True))(lp, x), fn(lj.merge(lp), x), 1e-5)


def test_haiku_transposed_conv_guess_matches_fn():
    x = _x((B, 5, 5, 3))
    fn, params = _haiku(lambda x: hk.Conv2DTranspose(7, kernel_shape=3, stride=2)(x), x)
    (path, read), = lj.infer_layout(fn, params, x).items()
    assert read == (0, (0, 1, 3))                                  # w: [3, 3, out 7, in 3]
    assert lj.default_layout(path, params["conv2_d_transpose"]["w"].shape) == read


# ----------------------------------------------------------------------------- FLOPs

class _HandLoraDG(nn.Module):
    """A hand-written LoRA DenseGeneral: frozen kernel, explicit A/B params."""

    features: tuple
    axis: tuple = (-1,)
    rank: int = 4

    @nn.compact
    def __call__(self, x):
        axis = tuple(a % x.ndim for a in self.axis)
        ins = tuple(x.shape[a] for a in axis)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*ins, *self.features))
        a = self.param("lora_a", nn.initializers.normal(0.1), (*ins, self.rank))
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, *self.features))
        dims = ((axis, tuple(range(len(axis)))), ((), ()))
        t = jax.lax.dot_general(x, a, dims)
        y = jax.lax.dot_general(x, jax.lax.stop_gradient(kernel), dims)
        return y + jax.lax.dot_general(t, b, (((t.ndim - 1,), (0,)), ((), ())))


class _Decoder(nn.Module):
    hand: bool
    d: int = 48
    heads: int = 4
    hd: int = 12

    @nn.compact
    def __call__(self, x):
        def dense(features, axis=(-1,), name=None):
            if self.hand:
                return _HandLoraDG(features, axis, name=name)
            return nn.DenseGeneral(features, axis=axis, name=name)

        parent = self

        class Block(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                q = dense((parent.heads, parent.hd), name="q")(x)
                v = dense((parent.heads, parent.hd), name="v")(x)
                att = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, q), axis=-1)
                y = dense((parent.d,), axis=(-2, -1), name="o")(
                    jnp.einsum("bnts,bsnh->btnh", att, v))
                return x + y, None

        return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)(name="layers")(x, None)[0]


def _flops(jitted, *args):
    ca = jitted.lower(*args).compile().cost_analysis()
    return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])


def test_scanned_densegeneral_grad_flops_match_hand_written():
    """Default path on multi-axis DenseGeneral kernels in nn.scan costs what hand-written
    LoRA costs (a dense ΔW would add the [d, h, hd] products: > 1.05 here)."""
    from flax import traverse_util
    x = _x((4, 16, 48))
    ours_model, hand_model = _Decoder(hand=False), _Decoder(hand=True)
    fn, base = _linen(ours_model, x)
    lp = lj.lorafy(base, rank=4, fn=fn, args=(x,))
    trainable, frozen = lj.split(lp)
    ours = jax.jit(jax.grad(lambda tr, x: jnp.sum(lj.lora(fn, strict=True)(
        lj.combine(tr, frozen), x) ** 2)))

    hand_params = traverse_util.flatten_dict(
        hand_model.init(jax.random.key(1), x)["params"], sep="/")
    hand_tr = {k: v for k, v in hand_params.items() if "lora_" in k}
    hand_fr = {k: v for k, v in hand_params.items() if "lora_" not in k}

    def hand_loss(tr, x):
        p = traverse_util.unflatten_dict({**hand_fr, **tr}, sep="/")
        return jnp.sum(hand_model.apply({"params": p}, x) ** 2)

    ratio = _flops(ours, trainable, x) / _flops(jax.jit(jax.grad(hand_loss)), hand_tr, x)
    assert 0.99 <= ratio <= 1.01, ratio
