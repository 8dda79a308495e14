"""Named adapters over one base: stacking, per-row selection in one jitted call,
weighted combination (vs PEFT's add_weighted_adapter), checkpoints and PEFT export."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from helpers import close, random_hf_llama, randomize_b
from lora_jax import (
    MultiLoraWeight,
    adapter_ids,
    adapter_names,
    add_adapter,
    add_weighted_adapter,
    remove_adapter,
    restore_adapters,
    save_adapters,
    set_adapter,
    stack_adapters,
    to_peft_adapters,
    unstack_adapter,
    with_adapter_ids,
)
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(vocab_size=97, hidden_size=35, intermediate_size=33, num_hidden_layers=2,
                  num_attention_heads=5, num_key_value_heads=1, head_dim=6,
                  max_position_embeddings=64, rope_theta=500.0)
TARGETS = r"(q_proj|v_proj|down_proj)/kernel$"


@pytest.fixture(scope="module")
def llama():
    model = LlamaForCausalLM(CFG)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (5, 9)))
    params = model.init(jax.random.key(0), ids)["params"]
    return model, params, ids


def _adapters(params, specs):
    out = {}
    for i, (name, kw) in enumerate(specs.items()):
        lp = lj.lorafy(params, targets=TARGETS, key=jax.random.key(10 + i), **kw)
        out[name] = randomize_b(lp, jax.random.key(20 + i), scale=0.5)
    return out


SPECS = {"fr": dict(rank=4, alpha=8.0), "de": dict(rank=2, alpha=3.0, rslora=True),
         "es": dict(rank=4, alpha=4.0)}


def test_mixed_batch_equals_each_row_alone(llama):
    model, params, x = llama
    ad = _adapters(params, SPECS)
    mp = stack_adapters(ad, pad_ranks=True)
    q = mp["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, MultiLoraWeight)
    assert q.a.shape == (2, 3, 35, 4) and q.b.shape == (2, 3, 4, 30)
    assert q.ranks == (4, 2, 4)
    apply = lj.lora(model.apply)
    rows = ["de", None, "es", "fr", "de"]

    @jax.jit
    def mixed(p, x, ids):
        return apply({"params": with_adapter_ids(p, ids)}, x)

    out = mixed(mp, x, adapter_ids(mp, rows))
    single = jax.jit(lambda p, x: apply({"params": p}, x))
    base_out = jax.jit(model.apply)({"params": params}, x)
    assert float(jnp.abs(out - base_out).max()) > 0.1      # the adapters matter
    for i, name in enumerate(rows):
        ref = base_out[i:i + 1] if name is None else single(ad[name], x[i:i + 1])
        close(out[i:i + 1], ref, 1e-6)
        if name is None:
            np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(base_out[i]))
    # unstack gives back each adapter exactly
    for name, tree in ad.items():
        back = unstack_adapter(mp, name)
        for w1, w2 in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
            np.testing.assert_array_equal(np.asarray(w1), np.asarray(w2))
        assert jax.tree.structure(back) == jax.tree.structure(tree)


def test_no_recompile_on_switch_or_replace(llama):
    model, params, x = llama
    ad = _adapters(params, {"a": dict(rank=3), "b": dict(rank=3)})
    mp = stack_adapters(ad)
    apply = lj.lora(model.apply)
    traces = []

    @jax.jit
    def f(p, x, ids):
        traces.append(1)
        return apply({"params": with_adapter_ids(p, ids)}, x)

    y1 = f(mp, x, jnp.array([0, 0, 0, 0, 0], jnp.int32))
    y2 = f(mp, x, jnp.array([1, -1, 0, 1, 1], jnp.int32))
    # replace adapter "b" by new weights of the same shapes
    new_b = randomize_b(lj.lorafy(params, rank=3, targets=TARGETS, key=jax.random.key(7)),
                        jax.random.key(8))
    mp2 = set_adapter(mp, "b", new_b)
    y3 = f(mp2, x, jnp.array([1, -1, 0, 1, 1], jnp.int32))
    # one trace (the C++ dispatch cache size is not asserted: a long process may evict it)
    assert len(traces) == 1
    assert not np.allclose(np.asarray(y1), np.asarray(y2))
    close(y3[:1], jax.jit(lambda p, x: apply({"params": p}, x))(new_b, x[:1]), 1e-6)
    # ids set outside jit: also data only
    @jax.jit
    def g(p, x):
        traces.append(2)
        return apply({"params": p}, x)
    g(with_adapter_ids(mp, [0, 1, 0, 1, 0]), x)
    g(with_adapter_ids(mp, ["b", "b", None, "a", "a"]), x)
    assert traces == [1, 2]


def test_training_two_adapters_in_one_batch(llama):
    """Per-row gradients land in each row's own adapter slice."""
    model, params, x = llama
    mp = stack_adapters(_adapters(params, {"a": dict(rank=2), "b": dict(rank=2)}))
    apply = lj.lora(model.apply)
    tr, fr = lj.split(with_adapter_ids(mp, [0, 0, 0, 0, 0]))

    def loss(tr):
        return jnp.sum(apply({"params": lj.combine(tr, fr)}, x) ** 2)
    g = jax.grad(loss)(tr)
    ga = g["layers"]["self_attn"]["q_proj"]["kernel"].a        # [L, N, in, r]
    assert float(jnp.abs(ga[:, 0]).max()) > 0 and float(jnp.abs(ga[:, 1]).max()) == 0.0


def test_add_remove_and_errors(llama):
    model, params, x = llama
    ad = _adapters(params, {"a": dict(rank=2), "b": dict(rank=3)})
    with pytest.raises(ValueError, match="pad_ranks=True"):
        stack_adapters(ad)
    mp = stack_adapters({"a": ad["a"]})
    mp = add_adapter(mp, "b", ad["b"])
    assert adapter_names(mp) == ("a", "b")
    assert adapter_names(remove_adapter(mp, "a")) == ("b",)
    with pytest.raises(ValueError, match=r"unknown adapter 'zz'.*\['a', 'b'\]"):
        unstack_adapter(mp, "zz")
    with pytest.raises(ValueError, match="out of range for 2 adapters"):
        with_adapter_ids(mp, jnp.array([0, 2, 0, 0, 0]))
    with pytest.raises(ValueError, match="out of range"):
        adapter_ids(mp, [5])
    with pytest.raises(ValueError, match="exists already"):
        add_adapter(mp, "a", ad["a"])
    apply = lj.lora(model.apply)
    with pytest.raises(ValueError, match="with_adapter_ids"):
        apply({"params": mp}, x)
    with pytest.raises(ValueError, match="one id per row"):
        apply({"params": with_adapter_ids(mp, [0, 1])}, x)
    # (embedding lookups and convolutions with per-row adapters: test_multi_gaps.py)
    with pytest.raises(ValueError, match="another tree structure"):
        stack_adapters({"a": ad["a"], "c": {"x": ad["b"]}})
    from lora_jax import to_dora
    with pytest.raises(TypeError, match="only plain LoRA adapters"):     # weighting needs LoRA
        add_weighted_adapter({"a": ad["a"], "d": to_dora(ad["b"])}, [1.0, 1.0])


def _leaf(tree, path=("layers", "self_attn", "q_proj", "kernel")):
    for k in path:
        tree = tree[k]
    return tree


def test_weighted_combination_math(llama):
    _, params, _ = llama
    ad = _adapters(params, SPECS)
    ws = [0.7, -1.3, 0.4]
    want = sum(w * _leaf(ad[n]).delta() for n, w in zip(ad, ws))
    cat = add_weighted_adapter(ad, ws, combination_type="cat")
    c = _leaf(cat)
    assert c.rank == 10 and c.scale == 1.0
    close(c.delta(), want, 1e-5)
    # from a stacked tree, names picking the order
    cat2 = add_weighted_adapter(stack_adapters(ad, pad_ranks=True), ws[::-1],
                                names=["es", "de", "fr"], combination_type="cat")
    close(_leaf(cat2).delta(), want, 1e-5)
    # svd at full rank (>= rank of the sum) is exact; truncated = best rank-k approximation
    full = add_weighted_adapter(ad, ws, combination_type="svd", svd_rank=10)
    close(_leaf(full).delta(), want, 1e-4)
    k = 3
    tr = _leaf(add_weighted_adapter(ad, ws, combination_type="svd", svd_rank=k))
    assert tr.rank == k
    for layer in range(2):
        u, s, vh = np.linalg.svd(np.asarray(want[layer], np.float64))
        best = (u[:, :k] * s[:k]) @ vh[:k]
        close(tr.delta()[layer], best, 1e-4)
    with pytest.raises(ValueError, match="'linear' needs one rank"):
        add_weighted_adapter(ad, ws, combination_type="linear")
    with pytest.raises(ValueError, match="not supported"):
        add_weighted_adapter(ad, ws, combination_type="ties_linear")
    with pytest.raises(ValueError, match="3 weights for 2"):
        add_weighted_adapter({"fr": ad["fr"], "es": ad["es"]}, ws)


def test_checkpoint_roundtrip(llama, tmp_path):
    _, params, _ = llama
    ad = _adapters(params, SPECS)
    mp = stack_adapters(ad, pad_ranks=True)
    def zeroed(m):
        if not isinstance(m, MultiLoraWeight):
            return m
        return dataclasses.replace(m, a=jnp.zeros_like(m.a), b=jnp.zeros_like(m.b))
    zero = jax.tree.map(zeroed, mp, is_leaf=lambda m: isinstance(m, MultiLoraWeight))
    for separate in (False, True):
        d = tmp_path / f"sep{separate}"
        save_adapters(d, mp, step=1, separate=separate)
        back = restore_adapters(d, zero, separate=separate)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(mp)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert jax.tree.structure(back) == jax.tree.structure(mp)
    # one adapter of a separate save restores on its own
    one = lj.restore_adapter(tmp_path / "sepTrue" / "de", unstack_adapter(zero, "de"))
    close(_leaf(one).b, _leaf(ad["de"]).b, 0)


# ----------------------------------------------------------------------------- against PEFT

@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from lora_jax.models import from_pretrained
    hf = random_hf_llama(torch, transformers)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    model, params = from_pretrained(path)
    return path, model, params


def _peft_two(path, out):
    """A PEFT model with adapters 'a' (r=4, q/v) and 'b' (r=2, q/o), random factors."""
    import peft
    import torch
    import transformers
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    cfg_a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(hf, cfg_a, adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.eval()
    pm.save_pretrained(out)            # out/a? no: 'a' and 'b' both in subfolders
    return pm


pytestmark_peft = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                             "ignore::DeprecationWarning")


@pytestmark_peft
def test_peft_mixed_batch_combination_and_export(hf_base, tmp_path):
    import torch

    from lora_jax.interop import from_peft
    path, model, params = hf_base
    pm = _peft_two(path, tmp_path / "peft")
    ad = {n: from_peft(tmp_path / "peft" / n, params) for n in ("a", "b")}
    mp = stack_adapters(ad, pad_ranks=True)
    x = np.random.RandomState(1).randint(0, 97, (4, 11))
    rows = ["a", "b", None, "b"]
    ours = jax.jit(lj.lora(model.apply))({"params": with_adapter_ids(mp, rows)}, jnp.asarray(x))
    with torch.no_grad():
        ref = pm(torch.tensor(x), adapter_names=[r or "__base__" for r in rows]).logits.numpy()
    close(ours, ref, 1e-4)

    # "cat" combination == PEFT's add_weighted_adapter(combination_type="cat")
    ws = [0.6, -1.5]
    pm.add_weighted_adapter(["a", "b"], ws, "ab_cat", combination_type="cat")
    pm.add_weighted_adapter(["a", "b"], ws, "ab_svd", combination_type="svd", svd_rank=3)
    cat = add_weighted_adapter(mp, ws, combination_type="cat")
    svd = add_weighted_adapter(mp, ws, combination_type="svd", svd_rank=3)
    apply = jax.jit(lj.lora(model.apply))
    for name, tree in (("ab_cat", cat), ("ab_svd", svd)):
        pm.set_adapter(name)
        with torch.no_grad():
            ref = pm(torch.tensor(x)).logits.numpy()
        close(apply({"params": tree}, jnp.asarray(x)), ref, 1e-4)
        # the factors themselves, per layer (cat: same concatenation; svd: up to sign)
        mod = pm.base_model.model.model.layers[1].self_attn.q_proj
        A = mod.lora_A[name].weight.detach().numpy()
        B = mod.lora_B[name].weight.detach().numpy()
        w = _leaf(tree)
        close((B @ A).T * mod.scaling[name], w.delta()[1], 1e-5)
        if name == "ab_cat":
            close(A.T, w.a[1], 1e-6)
            close(B.T, w.b[1], 1e-6)

    # export: one PEFT folder per adapter, loadable by PEFT as two named adapters
    import peft
    import transformers
    paths = to_peft_adapters(mp, tmp_path / "export")
    assert paths["a"] == tmp_path / "export" / "a"
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    pm2 = peft.PeftModel.from_pretrained(hf, paths["a"], adapter_name="a")
    pm2.load_adapter(paths["b"], adapter_name="b")
    pm2.eval()
    with torch.no_grad():
        ref2 = pm2(torch.tensor(x), adapter_names=[r or "__base__" for r in rows]).logits.numpy()
    close(ours, ref2, 1e-4)


def test_qlora_base_with_some_leaves_lorafied_stacks_and_combines():
    """An NF4 base where only one of two quantized kernels carries LoRA: the other
    QuantizedWeight is frozen base, not an adapter, so stacking and combining work, and
    the mixed batch equals each adapter alone."""
    key = jax.random.key(4)
    base = {"q": {"kernel": jax.random.normal(key, (35, 33))},
            "v": {"kernel": jax.random.normal(jax.random.key(5), (33, 11))}}
    qbase = lj.quantize(base, "nf4")

    def fn(p, x):
        return jnp.tanh(x @ p["q"]["kernel"]) @ p["v"]["kernel"]

    ads = {n: randomize_b(lj.lorafy(qbase, rank=3, targets="q/kernel", key=jax.random.key(i)),
                          jax.random.key(10 + i)) for i, n in enumerate(["a", "b"])}
    mp = stack_adapters(ads)
    assert lj.is_quantized(mp["v"]["kernel"]) and isinstance(mp["q"]["kernel"], MultiLoraWeight)
    x = jax.random.normal(jax.random.key(6), (3, 35))
    got = lj.lora(fn, strict=True)(with_adapter_ids(mp, ["b", None, "a"]), x)
    for row, name in ((0, "b"), (2, "a")):
        close(got[row], lj.lora(fn)(ads[name], x)[row], 1e-5)
    close(got[1], fn(lj.merge(qbase), x)[1], 1e-5)
    combined = add_weighted_adapter(ads, [1.0, 0.5], combination_type="cat")
    expected = lj.merge(ads["a"])["q"]["kernel"] + 0.5 * (
        lj.merge(ads["b"])["q"]["kernel"] - lj.merge(qbase)["q"]["kernel"])
    close(lj.merge(combined)["q"]["kernel"], expected, 1e-5)


def test_adapters_over_different_bases_are_refused():
    """PiSSA rewrites w0: stacking it with a plain adapter would serve wrong base rows."""
    base = {"d": {"kernel": jax.random.normal(jax.random.key(0), (7, 5))}}
    plain = lj.lorafy(base, rank=2)
    pissa = lj.pissa_init(lj.lorafy(base, rank=2))
    with pytest.raises(ValueError, match=r"adapter 'p' has another base weight at 'd/kernel'"):
        stack_adapters({"a": plain, "p": pissa})
    with pytest.raises(ValueError, match="another base weight"):
        add_weighted_adapter({"a": plain, "p": pissa}, [1.0, 1.0])
