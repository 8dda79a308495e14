"""Decoding with one adapter per batch row (``generate``/``generate_batch`` ``adapter_ids=``):
every row of a mixed batch decodes as it would alone with its own adapter, greedy and
sampled, left-padded, over a float or an NF4 base; bad ids are refused by name."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from helpers import SMALL_LLAMA, close
from lora_jax.models import (
    LlamaConfig,
    LlamaForCausalLM,
    decoding,
    generate,
    generate_batch,
    init_cache,
)

# every projection, the LM head and the embedding lookup carry an adapter
TARGETS = r"(kernel|embedding)$"
SPECS = {"fr": dict(rank=3, alpha=7.0), "de": dict(rank=5, alpha=2.0, rslora=True),
         "es": dict(rank=1, alpha=3.0)}
ROWS = ["de", None, "es", "fr", "de"]
N_NEW = 9


@pytest.fixture(scope="module")
def setup():
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL_LLAMA, "num_key_value_heads": 1}))
    params = model.init_params(jax.random.key(1))
    params = jax.tree.map(  # bigger weights => peaked, tie-free argmax (as test_llama's tiny)
        lambda p: p * 10.0 if p.ndim > 1 and p.shape[-2:] != (97, 35) else p, params)
    prompt = np.random.RandomState(7).randint(0, 97, (len(ROWS), 7))
    # one lora(apply) for every reference: jitted decoding compiles once per function
    return model, params, prompt, _adapters(params), lj.lora(model.apply)


def _random_ab(tree, seed):
    """Nonzero A and B, N(0, 0.3^2), drawn host-side (no compilation per factor shape)."""
    rng = np.random.RandomState(seed)
    draw = lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)  # noqa: E731
    is_lora = lambda w: isinstance(w, lj.LoraWeight)  # noqa: E731
    return jax.tree.map(lambda w: dataclasses.replace(w, a=draw(w.a), b=draw(w.b))
                        if is_lora(w) else w, tree, is_leaf=is_lora)


def _adapters(base):
    return {n: _random_ab(lj.lorafy(base, targets=TARGETS, key=jax.random.key(i), **kw), 10 + i)
            for i, (n, kw) in enumerate(SPECS.items())}


def _alone(setup, name, prompt, **kw):
    """``prompt`` decoded by the plain model (name None) or one single-adapter tree."""
    model, params, _, ads, app = setup
    if name is None:
        return np.asarray(generate(model, params, prompt, N_NEW, **kw))
    return np.asarray(generate(model, ads[name], prompt, N_NEW, apply_fn=app, **kw))


def test_mixed_greedy_rows_equal_each_row_alone(setup):
    model, params, prompt, ads, app = setup
    multi = lj.stack_adapters(ads, pad_ranks=True)
    got = np.asarray(generate(model, multi, prompt, N_NEW, adapter_ids=ROWS))
    assert got.shape == (5, 7 + N_NEW)
    for i, name in enumerate(ROWS):
        np.testing.assert_array_equal(got[i], _alone(setup, name, prompt[i]))
        if name is not None:   # the adapter changes what this row says
            assert (got[i, 7:] != _alone(setup, None, prompt[i])[7:]).any(), name


def test_first_decode_step_logits_match_each_row_alone(setup):
    model, params, prompt, ads, app = setup
    multi = lj.stack_adapters(ads, pad_ranks=True)

    @jax.jit
    def prefill_and_step(p, ids):
        cache = init_cache(model.config, ids.shape[0], ids.shape[1] + 1)
        first, cache = app({"params": p}, ids, cache=cache)
        tok = jnp.argmax(first[:, -1], -1)[:, None]
        return first[:, -1], app({"params": p}, tok, cache=cache)[0][:, -1]

    # the explicit route: with_adapter_ids + lora(apply), no adapter_ids= keyword
    mixed = prefill_and_step(lj.with_adapter_ids(multi, ROWS), jnp.asarray(prompt))
    for i, name in enumerate(ROWS):
        ref = prefill_and_step(params if name is None else ads[name], jnp.asarray(prompt[i:i + 1]))
        for got, want in zip(mixed, ref):
            close(got[i:i + 1], want, 5e-5)   # batch 4 vs 1: XLA sums in another order


def test_sampled_mixed_rows_equal_rows_seeded_identically(setup):
    """One key draws the noise of the whole [B, vocab] batch, so a row is seeded identically
    when the same key samples a batch of the same shape: row i of the mixed batch equals row
    i of the batch decoded wholly with row i's adapter."""
    model, params, prompt, ads, app = setup
    multi = lj.stack_adapters(ads, pad_ranks=True)
    kw = dict(temperature=1.5, key=jax.random.key(3))
    got = np.asarray(generate(model, multi, prompt, N_NEW, adapter_ids=ROWS, **kw))
    for i, name in enumerate(ROWS):
        np.testing.assert_array_equal(got[i], _alone(setup, name, prompt, **kw)[i])
    greedy = np.asarray(generate(model, multi, prompt, N_NEW, adapter_ids=ROWS))
    assert (got != greedy).any()   # it sampled


def test_generate_batch_left_padded_rows_equal_each_row_alone(setup):
    model, params, prompt, ads, app = setup
    multi = lj.stack_adapters(ads, pad_ranks=True)
    prompts = [prompt[i, : (5 if i < 2 else 7)].tolist() for i in range(len(ROWS))]
    # batch_size 3: two batches, the second padded by repeating its last row and adapter
    got = generate_batch(model, multi, prompts, N_NEW, batch_size=3, adapter_ids=ROWS)
    for p, name, toks in zip(prompts, ROWS, got):
        assert toks == _alone(setup, name, np.asarray(p))[len(p):].tolist()
    compiled = decoding._greedy_padded._cache_size()
    # the same rows in reverse order, ids as indices (fr=0, de=1, es=2, base=-1)
    again = generate_batch(model, multi, prompts[::-1], N_NEW, batch_size=3,
                           adapter_ids=[1, 0, 2, -1, 1])
    assert again == got[::-1]
    assert decoding._greedy_padded._cache_size() == compiled   # new ids: no recompilation


def test_nf4_shared_base(setup):
    model, params, prompt, _, app = setup
    qbase = lj.quantize(params, "nf4", targets=r"layers/.*kernel$")
    ads = _adapters(qbase)
    multi = lj.stack_adapters(ads, pad_ranks=True)
    q = multi["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(q, lj.MultiLoraWeight) and lj.is_quantized(q.w0)
    rows = ["es", None, "fr"]
    got = np.asarray(generate(model, multi, prompt[:3], N_NEW, adapter_ids=rows))
    alone = (model, lj.merge(qbase), None, ads, app)   # base row: the dequantized model
    for i, name in enumerate(rows):
        np.testing.assert_array_equal(got[i], _alone(alone, name, prompt[i]))


def test_bad_adapter_ids_are_refused_by_name(setup):
    model, params, prompt, ads, _ = setup
    multi = lj.stack_adapters(ads, pad_ranks=True)
    with pytest.raises(ValueError, match=r"^generate: adapter_ids has 2 entries for 5 prompt"):
        generate(model, multi, prompt, 2, adapter_ids=["fr", None])
    with pytest.raises(ValueError, match=r"^generate_batch: adapter_ids has 6 entries for 5"):
        generate_batch(model, multi, prompt.tolist(), 2, adapter_ids=ROWS + ["fr"])
    with pytest.raises(ValueError, match=r"^generate: adapter_ids: unknown adapter 'it'"):
        generate(model, multi, prompt, 2, adapter_ids=["fr", "it", None, None, None])
    with pytest.raises(ValueError, match=r"^generate_batch: adapter_ids: adapter index 3 out"):
        generate_batch(model, multi, prompt.tolist(), 2, adapter_ids=[3, 0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"^generate: adapter_ids: params hold no MultiLora"):
        generate(model, ads["fr"], prompt, 2, adapter_ids=ROWS)
    with pytest.raises(TypeError, match=r"^generate: adapter_ids: rows must be a list"):
        generate(model, multi, prompt[:1], 2, adapter_ids="fr")
