"""Adapter checkpoints: size, exact resume, crash safety, corruption, wrong base; merged
export and the HF Llama name table; the atomic directory replace."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax import checkpoint as ck
from lora_jax.interop import HF_LLAMA_NAMES, export_merged, llama_from_hf, llama_to_hf

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------ helpers


def _base(key, d_in=13, d_h=11, d_out=7, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"d1": {"kernel": jax.random.normal(k1, (d_in, d_h), dtype) * 0.3,
                   "bias": jax.random.normal(k3, (d_h,), dtype) * 0.1},
            "d2": {"kernel": jax.random.normal(k2, (d_h, d_out), dtype) * 0.3}}


def _randomize_ab(params, key):
    """Nonzero A and B (a fresh lorafy has B = 0, which compresses to nothing)."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 1 << 30)))
    leaves, treedef = jax.tree.flatten(params, is_leaf=lambda x: isinstance(x, lj.LoraWeight))
    out = []
    for x in leaves:
        if isinstance(x, lj.LoraWeight):
            x = dataclasses.replace(
                x, a=jnp.asarray(rng.standard_normal(x.a.shape), x.a.dtype),
                b=jnp.asarray(rng.standard_normal(x.b.shape), x.b.dtype))
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(la, lb))


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def _tiny_llama():
    from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=67, hidden_size=24, intermediate_size=37, num_hidden_layers=3,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=8)
    model = LlamaForCausalLM(cfg)
    # eval_shape + numpy values: a real init compiles the model (seconds on 2 CPUs).
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 5), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.05, s.dtype), shapes)
    return cfg, model, params


# ------------------------------------------------------------------------------ size


def test_adapter_bytes_on_disk_close_to_trainable_bytes(tmp_path, capsys):
    _, _, base = _tiny_llama()
    params = lj.lorafy(base, rank=4, targets=r"layers/.*(q_proj|v_proj)/kernel",
                       key=jax.random.key(1))
    params = _randomize_ab(params, jax.random.key(2))
    n_ab = adapter_b = ck.adapter_bytes(params)
    full = ck.model_bytes(params)
    assert adapter_b == lj.count_params(params)["trainable"] * 4
    step_dir = Path(ck.save_adapter(tmp_path / "c", params, step=1))

    arrays = _dir_bytes(step_dir / "adapter")
    meta = _dir_bytes(step_dir / "lora_meta")
    total = _dir_bytes(step_dir)
    # Arrays: the raw bytes (random floats do not compress), plus per array ~0.5 KiB
    # of zarr headers and orbax tree metadata. Metadata JSON: < 1 KiB per base leaf.
    n_arrays = len(jax.tree.leaves(lj.split(params)[0]))
    n_base = len(jax.tree.leaves(lj.split(params)[1]))
    assert 0.9 * adapter_b <= arrays <= adapter_b + 512 * n_arrays + 2048, (arrays, adapter_b)
    assert meta <= 1024 * (n_base + n_arrays) + 2048, meta
    assert total <= adapter_b + 512 * n_arrays + 1024 * (n_base + n_arrays) + 8192
    with capsys.disabled():
        print(f"\n[checkpoint] tiny Llama: adapter {adapter_b} B (arrays on disk {arrays} B, "
              f"step dir {total} B incl. {meta} B metadata) vs full model {full} B: "
              f"adapter/full = {adapter_b / full:.4f}, on-disk/full = {total / full:.4f}")
    del n_ab


# ------------------------------------------------------------------------------ round trip


def test_roundtrip_keeps_target_shardings_and_metadata(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    base = _base(jax.random.key(0), d_in=24, d_h=16, d_out=7)
    params = _randomize_ab(lj.lorafy(base, rank=3, alpha=5.0, key=jax.random.key(1)),
                           jax.random.key(2))

    def shard(p):
        specs = {"d1": {"kernel": lj.LoraWeight(w0=P("x", None), a=P("x", None), b=P(None, "x"),
                                                alpha=5.0),
                        "bias": P("x")},
                 "d2": {"kernel": lj.LoraWeight(w0=P("x", None), a=P("x", None), b=P(),
                                                alpha=5.0)}}
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), p, specs)

    params = shard(params)
    ck.save_adapter(tmp_path, params, step=3, metadata={"run": "unit", "lr": 1e-3})
    template = shard(lj.lorafy(base, rank=3, alpha=5.0, key=jax.random.key(9)))
    restored = ck.restore_adapter(tmp_path, template)
    assert _tree_equal(restored, params)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(template)):
        assert got.sharding == want.sharding
    a1 = restored["d1"]["kernel"].a
    assert len({s.device for s in a1.addressable_shards}) == 8

    meta = ck.read_adapter_metadata(tmp_path)
    assert meta["user"] == {"run": "unit", "lr": 1e-3}
    assert meta["targets"] == ["d1/kernel", "d2/kernel"]
    assert meta["lora"]["d1/kernel"] == {"type": "LoraWeight", "rank": 3, "alpha": 5.0,
                                         "rslora": False, "in_axes": [0],
                                         "a_shape": [24, 3], "b_shape": [3, 16],
                                         "dtype": "float32"}
    assert set(meta["base"]) == {"d1/bias", "d1/kernel/w0", "d2/kernel/w0"}
    assert meta["library_version"] == lj.__version__
    assert meta["quantization"] == {}


def test_fingerprint_is_sharding_independent_and_sampled_for_big_leaves():
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    big = jax.random.normal(jax.random.key(0), (8 * 37, 301))    # > 65536 elements: sampled
    params = lj.lorafy({"m": {"kernel": big}}, rank=2)
    fp = ck.base_fingerprint(params)["m/kernel/w0"]
    assert fp["sampled"] and fp["shape"] == [296, 301]
    w = params["m"]["kernel"]
    sharded = {"m": {"kernel": dataclasses.replace(
        w, w0=jax.device_put(w.w0, NamedSharding(mesh, P("x", None))))}}
    assert ck.base_fingerprint(sharded)["m/kernel/w0"] == fp
    other = lj.lorafy({"m": {"kernel": big.at[0, 0].add(1.0)}}, rank=2)
    assert ck.base_fingerprint(other)["m/kernel/w0"]["content"] != fp["content"]


# ------------------------------------------------------------------------------ resume


def _train_setup():
    base = _base(jax.random.key(0))
    params = lj.lorafy(base, rank=3, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (9, 13))
    y = jax.random.normal(jax.random.key(3), (9, 7))

    def mlp(p, x):
        h = jnp.tanh(x @ p["d1"]["kernel"] + p["d1"]["bias"][None, :])
        return h @ p["d2"]["kernel"]

    fwd = lj.lora(mlp)
    tx = optax.masked(optax.adam(3e-2), lj.trainable_mask(params))

    @jax.jit
    def step(params, opt_state):
        trainable, frozen = lj.split(params)

        def loss_fn(tr):
            return jnp.mean((fwd(lj.combine(tr, frozen), x) - y) ** 2)

        loss, g_tr = jax.value_and_grad(loss_fn)(trainable)
        grads = lj.combine(g_tr, jax.tree.map(jnp.zeros_like, frozen))
        with jax.numpy_dtype_promotion("standard"):   # optax: b1 ** int32 count
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return params, tx, step


def test_resume_is_bit_exact(tmp_path):
    params, tx, step = _train_setup()
    opt_state = tx.init(params)
    losses = []
    p, s = params, opt_state
    for i in range(10):
        p, s, loss = step(p, s)
        losses.append(np.asarray(loss))
        if i + 1 == 5:
            ck.save_adapter(tmp_path, p, step=5, opt_state=s)
    # What was saved: A/B and their moments + counts, never w0 or the bias.
    meta = ck.read_adapter_metadata(tmp_path, step=5)
    saved_paths = [v["path"] for v in meta["arrays"]["opt_state"].values()]
    assert all(q.endswith(("/a", "/b", "count")) for q in saved_paths), saved_paths
    assert len(saved_paths) == 1 + 2 * 4

    # A fresh process state: a freshly lorafied template and a fresh opt_state.
    tmpl = lj.lorafy(_base(jax.random.key(0)), rank=3, key=jax.random.key(7))
    p2, s2 = ck.restore_adapter(tmp_path, tmpl, opt_state=tx.init(tmpl))
    resumed = []
    for _ in range(5):
        p2, s2, loss = step(p2, s2)
        resumed.append(np.asarray(loss))
    assert [x.tobytes() for x in resumed] == [x.tobytes() for x in losses[5:]]
    assert _tree_equal(p2, p)


def test_split_tree_optimizer_state_roundtrips(tmp_path):
    params = _randomize_ab(lj.lorafy(_base(jax.random.key(0)), rank=2), jax.random.key(1))
    trainable, _ = lj.split(params)
    tx = optax.adamw(1e-3)
    state = tx.init(trainable)
    state = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    ck.save_adapter(tmp_path, params, step=0, opt_state=state)
    _, s2 = ck.restore_adapter(tmp_path, params, opt_state=tx.init(trainable))
    assert _tree_equal(s2, state)
    with pytest.raises(ValueError, match="opt_state leaves"):
        ck.restore_adapter(tmp_path, params, opt_state=optax.sgd(0.1, momentum=0.9).init(trainable))


def test_keep_and_steps(tmp_path):
    params = lj.lorafy(_base(jax.random.key(0)), rank=2)
    for s in (1, 2, 5, 7):
        ck.save_adapter(tmp_path, params, step=s, keep=2)
    assert ck.adapter_steps(tmp_path) == [5, 7]
    assert not (tmp_path / ".deleted").exists()
    with pytest.raises(FileExistsError, match="step 7 already exists"):
        ck.save_adapter(tmp_path, params, step=7)


# ------------------------------------------------------------------------------ faults


def test_killed_saves_never_leave_a_partial_checkpoint(tmp_path):
    """SIGKILL a saving process at 10 random moments; the latest complete step always loads."""
    sys.path.insert(0, str(HERE))
    try:
        from _ckpt_worker import params_for
    finally:
        sys.path.remove(str(HERE))
    rng = random.Random(20240611)
    d = tmp_path / "ck"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    template = params_for(0)
    opt_template = {"count": np.zeros((), np.int32)}
    seen_tmp = 0
    for trial in range(10):
        proc = subprocess.Popen([sys.executable, str(HERE / "_ckpt_worker.py"), str(d)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        first = proc.stdout.readline().decode()
        if first.startswith("saved"):
            time.sleep(rng.uniform(0.0, 0.4))   # a save takes ~0.1 s
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        assert first.startswith("saved"), (first, err.decode()[-2000:])
        printed = [int(line.split()[1]) for line in (first + out.decode()).split("\n") if line]
        seen_tmp += any("tmp" in p.name for p in d.iterdir())

        steps = ck.adapter_steps(d)
        assert steps and steps[-1] >= printed[-1], (trial, steps, printed)
        assert len(steps) <= 4   # keep=3, plus at most one committed while deleting the oldest
        for s in steps[:-1]:     # every offered step is complete and loads
            assert _tree_equal(ck.restore_adapter(d, template, step=s), params_for(s))
        latest, o = ck.restore_adapter(d, template, opt_state=opt_template)
        assert _tree_equal(latest, params_for(steps[-1]))
        assert int(o["count"]) == steps[-1]
    print(f"\n[checkpoint] kills that left an interrupted tmp dir behind: {seen_tmp}/10")


def _saved(tmp_path):
    params = _randomize_ab(lj.lorafy(_base(jax.random.key(0)), rank=3), jax.random.key(5))
    step_dir = Path(ck.save_adapter(tmp_path, params, step=1))
    return params, step_dir


def test_truncated_array_file_names_the_file(tmp_path):
    params, step_dir = _saved(tmp_path)
    chunk = next((step_dir / "adapter" / "d2.kernel.a").glob("0*"))
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(ck.CheckpointIntegrityError, match=r"d2\.kernel\.a") as e:
        ck.restore_adapter(tmp_path, params)
    assert "d2/kernel/a" in str(e.value)


def test_bit_flip_in_array_file_is_detected(tmp_path):
    params, step_dir = _saved(tmp_path)
    chunk = next((step_dir / "adapter" / "d1.kernel.b").glob("0*"))
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ck.CheckpointIntegrityError, match=r"d1\.kernel\.b") as e:
        ck.restore_adapter(tmp_path, params)
    assert "d1/kernel/b" in str(e.value)


def test_corrupted_or_missing_metadata_names_the_file(tmp_path):
    params, step_dir = _saved(tmp_path)
    meta_file = step_dir / "lora_meta" / "metadata"
    text = meta_file.read_text()
    meta_file.write_text(text.replace('"alpha": 3.0', '"alpha": 4.0', 1)
                         if '"alpha": 3.0' in text else text.replace("3.0", "4.0", 1))
    with pytest.raises(ck.CheckpointIntegrityError, match="metadata.*sha256"):
        ck.restore_adapter(tmp_path, params)
    meta_file.write_text(text[: len(text) // 2])
    with pytest.raises(ck.CheckpointIntegrityError, match=str(meta_file)):
        ck.restore_adapter(tmp_path, params)
    meta_file.unlink()
    with pytest.raises(ck.CheckpointIntegrityError, match="missing"):
        ck.restore_adapter(tmp_path, params)


def test_missing_directory_or_step(tmp_path):
    params, _ = _saved(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint directory"):
        ck.restore_adapter(tmp_path / "nope", params)
    with pytest.raises(FileNotFoundError, match=r"step 4 .*available steps: \[1\]"):
        ck.restore_adapter(tmp_path / "c", params, step=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete adapter checkpoint"):
        ck.restore_adapter(tmp_path / "empty", params)


def test_no_pickle_anywhere(tmp_path):
    _, step_dir = _saved(tmp_path)
    for f in step_dir.rglob("*"):
        if f.is_file():
            assert not f.read_bytes().startswith(b"\x80"), f"{f} looks like a pickle"
    json.loads((step_dir / "lora_meta" / "metadata").read_text())


# ------------------------------------------------------------------------------ wrong base


def test_wrong_base_is_refused_with_what_differs(tmp_path):
    base = _base(jax.random.key(0))
    params = _randomize_ab(lj.lorafy(base, rank=3), jax.random.key(1))
    ck.save_adapter(tmp_path, params, step=1)

    other_shape = lj.lorafy(_base(jax.random.key(0), d_in=15), rank=3)
    with pytest.raises(ck.BaseMismatchError,
                       match=r"d1/kernel/w0: saved \(13, 11\), params \(15, 11\)"):
        ck.restore_adapter(tmp_path, other_shape)
    with pytest.raises(ValueError, match="shapes differ"):
        ck.restore_adapter(tmp_path, other_shape, allow_different_base=True)

    other_dtype = lj.lorafy(jax.tree.map(lambda x: x.astype(jnp.bfloat16), base), rank=3,
                            dtype=jnp.float32)
    with pytest.raises(ck.BaseMismatchError,
                       match=r"dtypes differ: .*saved float32, params bfloat16"):
        ck.restore_adapter(tmp_path, other_dtype, allow_different_base=True)

    other_tree = lj.lorafy({**base, "d3": {"kernel": jnp.ones((7, 5))}}, rank=3)
    with pytest.raises(ck.BaseMismatchError,
                       match="in params but not in the checkpoint: d3/kernel"):
        ck.restore_adapter(tmp_path, other_tree, allow_different_base=True)

    other_rank = lj.lorafy(base, rank=2)
    with pytest.raises(ck.BaseMismatchError, match="rank saved 3 vs params 2"):
        ck.restore_adapter(tmp_path, other_rank)

    other_weights = lj.lorafy(_base(jax.random.key(42)), rank=3)
    with pytest.raises(ck.BaseMismatchError,
                       match=r"base weights differ .* 3 of 3 leaves.*allow_different_base"):
        ck.restore_adapter(tmp_path, other_weights)
    restored = ck.restore_adapter(tmp_path, other_weights, allow_different_base=True)
    assert np.array_equal(restored["d1"]["kernel"].a, params["d1"]["kernel"].a)
    assert np.array_equal(restored["d1"]["kernel"].w0, other_weights["d1"]["kernel"].w0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _FakeQuant(lj.ImplicitArray):
    """Stand-in for QuantizedWeight: packed uint8 codes + float32 scales, static config."""
    codes: jax.Array
    scales: jax.Array
    kind: str = dataclasses.field(default="nf4", metadata={"static": True})
    block_size: int = dataclasses.field(default=64, metadata={"static": True})
    out_shape: tuple = dataclasses.field(default=(), metadata={"static": True})

    @property
    def shape(self):
        return self.out_shape

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    def materialize(self):
        lo = (self.codes & 0xF).astype(jnp.float32)
        hi = (self.codes >> 4).astype(jnp.float32)
        vals = jnp.stack([hi, lo], axis=-1).reshape(-1)[: int(np.prod(self.out_shape))]
        return vals.reshape(self.out_shape) * self.scales[0]


def _fake_quantized(key, shape=(13, 11), block_size=64):
    n = int(np.prod(shape))
    codes = jax.random.randint(key, ((n + 1) // 2,), 0, 256, jnp.int32).astype(jnp.uint8)
    return _FakeQuant(codes, jnp.full((n // block_size + 1,), 0.01, jnp.float32),
                      block_size=block_size, out_shape=shape)


def test_quantized_base_fingerprint_and_config(tmp_path):
    def qparams(key, block_size=64):
        q = _fake_quantized(key, block_size=block_size)
        w = lj.LoraWeight(w0=q, a=jnp.ones((13, 3)) * 0.5, b=jnp.ones((3, 11)), alpha=6.0)
        return {"d": {"kernel": w, "bias": jnp.zeros((11,))}}

    params = qparams(jax.random.key(0))
    ck.save_adapter(tmp_path, params, step=1)
    meta = ck.read_adapter_metadata(tmp_path)
    assert meta["quantization"] == {"d/kernel/w0": {"type": "_FakeQuant", "shape": [13, 11],
                                                    "dtype": "float32", "kind": "nf4",
                                                    "block_size": 64, "out_shape": [13, 11]}}
    assert set(meta["base"]) == {"d/bias", "d/kernel/w0/codes", "d/kernel/w0/scales"}
    assert meta["base"]["d/kernel/w0/codes"]["dtype"] == "uint8"
    assert _tree_equal(ck.restore_adapter(tmp_path, params), params)
    with pytest.raises(ck.BaseMismatchError, match="base weights differ .*d/kernel/w0/codes"):
        ck.restore_adapter(tmp_path, qparams(jax.random.key(1)))
    with pytest.raises(ck.BaseMismatchError, match="block_size saved 64 vs params 32"):
        ck.restore_adapter(tmp_path, qparams(jax.random.key(0), block_size=32))


# ------------------------------------------------------------------------------ export


def test_export_merged_llama_in_hf_layout(tmp_path):
    from safetensors.numpy import load_file

    from lora_jax.models import hf_state_dict_to_params
    cfg, model, base = _tiny_llama()
    params = _randomize_ab(lj.lorafy(base, rank=3, targets=r"layers/.*_proj/kernel"),
                           jax.random.key(3))
    f = export_merged(params, tmp_path / "export")
    sd = load_file(f)
    assert "model.layers.2.self_attn.q_proj.weight" in sd
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (24, 37)     # (out, in)
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (8, 24)
    assert "model.layers.0.input_layernorm.weight" in sd and "lm_head.weight" in sd
    assert sorted(os.listdir(tmp_path)) == ["export"]                      # no temp dir left
    back = hf_state_dict_to_params(sd, cfg)
    merged = lj.merge(params)
    assert jax.tree.structure(back) == jax.tree.structure(merged)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(FileExistsError):
        export_merged(params, tmp_path / "export")
    export_merged(params, tmp_path / "export", overwrite=True)


def test_export_merged_generic_paths_and_requantize(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file
    params = _randomize_ab(lj.lorafy(_base(jax.random.key(0)), rank=3), jax.random.key(1))
    sd = load_file(export_merged(params, tmp_path / "plain"))
    assert set(sd) == {"d1/kernel", "d1/bias", "d2/kernel"}
    np.testing.assert_array_equal(sd["d1/kernel"], np.asarray(lj.merge(params)["d1"]["kernel"]))

    def rq(name, x):
        return _fake_quantized(jax.random.key(0), x.shape) if name == "d2/kernel" else x

    f = export_merged(params, tmp_path / "q", requantize=rq)
    sd = load_file(f)
    assert set(sd) == {"d1/kernel", "d1/bias", "d2/kernel.codes", "d2/kernel.scales"}
    with safe_open(f, "np") as fh:
        info = json.loads(fh.metadata()["lora_jax.quantized"])
    assert info["d2/kernel"]["kind"] == "nf4" and info["d2/kernel"]["shape"] == [11, 7]


def test_qlora_base_roundtrip_and_export(tmp_path):
    from safetensors import safe_open
    base = _base(jax.random.key(0), d_in=19, d_h=13, d_out=7)
    params = _randomize_ab(lj.lorafy(lj.quantize(base, "nf4", block_size=64), rank=3),
                           jax.random.key(1))
    ck.save_adapter(tmp_path / "c", params, step=2)
    meta = ck.read_adapter_metadata(tmp_path / "c")
    q = meta["quantization"]["d1/kernel/w0"]
    assert q["type"] == "QuantizedWeight" and q["kind"] == "nf4" and q["block_size"] == 64
    assert meta["base"]["d1/kernel/w0/codes"]["dtype"] == "uint8"
    tmpl = lj.lorafy(lj.quantize(base, "nf4", block_size=64), rank=3, key=jax.random.key(5))
    assert _tree_equal(ck.restore_adapter(tmp_path / "c", tmpl), params)
    other = lj.lorafy(lj.quantize(_base(jax.random.key(3), d_in=19, d_h=13, d_out=7), "nf4"),
                      rank=3)
    with pytest.raises(ck.BaseMismatchError, match="d1/kernel/w0/codes"):
        ck.restore_adapter(tmp_path / "c", other)
    fp4 = lj.lorafy(lj.quantize(base, "fp4", block_size=64), rank=3)
    with pytest.raises(ck.BaseMismatchError, match="kind saved 'nf4' vs params 'fp4'"):
        ck.restore_adapter(tmp_path / "c", fp4)
    assert ck.model_bytes(params) < ck.model_bytes(lj.lorafy(base, rank=3))

    f = export_merged(params, tmp_path / "e", requantize="nf4")
    with safe_open(f, "np") as fh:
        names = set(fh.keys())
        info = json.loads(fh.metadata()["lora_jax.quantized"])
    assert "d1/kernel.codes" in names and "d1/bias" in names
    assert info["d1/kernel"]["kind"] == "nf4" and info["d1/kernel"]["shape"] == [19, 13]


def test_abstract_trees_count_bytes_without_allocating():
    shapes = jax.eval_shape(lambda: lj.lorafy({"k": jnp.ones((5, 7), jnp.bfloat16)}, rank=2,
                                              targets="k", key=jax.random.key(0)))
    assert ck.adapter_bytes(shapes) == (5 * 2 + 2 * 7) * 2          # A, B in bf16
    assert ck.model_bytes(shapes) == (5 * 2 + 2 * 7 + 5 * 7) * 2
    assert ck.nbytes(None) == 0 and ck.nbytes(np.float64(1.0)) == 8


def test_metadata_written_with_in_ndim_restores(tmp_path):
    """Checkpoints saved before layouts became ``in_axes`` recorded ``in_ndim``."""
    import hashlib

    from lora_jax.checkpoint.arrays import canonical
    params, step_dir = _saved(tmp_path)
    f = step_dir / "lora_meta" / "metadata"
    meta = json.loads(f.read_text())
    del meta["meta_sha256"]
    for cfg in meta["lora"].values():
        assert cfg.pop("in_axes") == [0]
        cfg["in_ndim"] = 1
    meta["meta_sha256"] = hashlib.sha256(canonical(meta)).hexdigest()
    f.write_text(json.dumps(meta))
    assert _tree_equal(ck.restore_adapter(tmp_path, params), params)
    for cfg in meta["lora"].values():
        cfg["in_ndim"] = 2
    del meta["meta_sha256"]
    meta["meta_sha256"] = hashlib.sha256(canonical(meta)).hexdigest()
    f.write_text(json.dumps(meta))
    with pytest.raises(ck.BaseMismatchError, match=r"in_axes saved \[0, 1\] vs params \[0\]"):
        ck.restore_adapter(tmp_path, params)


# ------------------------------------------------------------------------------ HF names


def test_hf_llama_names_both_ways():
    x = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    ours = {"layers/self_attn/q_proj/kernel": x, "norm/scale": np.ones(7, np.float32),
            "layers/input_layernorm/scale": x[:, 0, :]}
    sd = llama_to_hf(ours)
    q1 = sd["model.layers.1.self_attn.q_proj.weight"]
    assert q1.shape == (7, 5) and q1[3, 4] == 1 * 35 + 4 * 7 + 3          # (out, in) = x[1].T
    np.testing.assert_array_equal(sd["model.layers.0.input_layernorm.weight"], x[0, 0])
    assert sorted(sd) == sorted(["model.norm.weight"] + [
        f"model.layers.{i}.{m}.weight" for i in (0, 1)
        for m in ("self_attn.q_proj", "input_layernorm")])
    back = llama_from_hf({k.removeprefix("model."): v for k, v in sd.items()}, num_layers=2)
    assert sorted(back) == sorted(ours)
    for k in ours:
        np.testing.assert_array_equal(back[k], ours[k])
    assert HF_LLAMA_NAMES["lm_head/kernel"] == "lm_head.weight"
    with pytest.raises(ValueError, match="no HF Llama name for leaf 'layers/extra/kernel'"):
        llama_to_hf({"layers/extra/kernel": x})
    with pytest.raises(ValueError, match=r"unexpected HF Llama tensors: \['model.layers.2"):
        llama_from_hf(sd | {"model.layers.2.mlp.up_proj.weight": x[0]}, num_layers=2)
    del sd["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(ValueError,
                       match=r"layers \[1\] are missing .*layers\.\*\.self_attn\.q_proj"):
        llama_from_hf(sd, num_layers=2)


# ------------------------------------------------------------------------------ atomic replace


def test_replace_dir_is_all_or_nothing(tmp_path):
    out = tmp_path / "d"
    ck.replace_dir(out, lambda d: (d / "a.txt").write_text("one"))
    with pytest.raises(FileExistsError, match="mine: .* exists and is not empty"):
        ck.replace_dir(out, lambda d: None, overwrite=False, what="mine")

    def fails(d):
        (d / "a.txt").write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        ck.replace_dir(out, fails)
    assert (out / "a.txt").read_text() == "one"
    ck.replace_dir(out, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]              # nothing left aside
