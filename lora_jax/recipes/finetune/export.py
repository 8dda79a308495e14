"""``lora-jax export``: a finished run as a PEFT adapter and/or a merged HF model.

* ``peft``: the LoRA factors as a PEFT adapter directory (:func:`lora_jax.to_peft`), for
  ``PeftModel.from_pretrained(base, DIR)`` over the original (unquantized) base. LoRA runs
  only: a full fine-tuning run has no adapter.
* ``merged``: ``W0 + s*A@B`` in every adapted layer as plain float32 weights
  (:func:`lora_jax.export_merged`; a QLoRA run's quantized base is dequantized first),
  with ``config.json`` and the tokenizer files, for
  ``AutoModelForCausalLM.from_pretrained(DIR)`` / ``AutoTokenizer.from_pretrained(DIR)``.
  An HF-directory base's tokenizer files are copied; a GGUF base (the default SmolLM2)
  has none, so ``tokenizer.json`` is written from the tokenizer built from the GGUF
  metadata, with a ``tokenizer_config.json`` holding its BOS / EOS tokens and chat template.

Every output directory is written atomically; a non-empty one is only replaced with
``overwrite=True``, and never when it holds the run itself.

Example::

    export_run("runs/finetune", peft="out/peft", merged="out/merged")
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

from lora_jax.checkpoint import replace_dir
from lora_jax.interop import export_merged, to_peft
from lora_jax.recipes.finetune.runs import ADAPTER_DIR, MODEL_DIR, Run, check_run_dir, load_run

__all__ = ["TOKENIZER_FILES", "export_run", "write_merged", "write_tokenizer_files"]

#: the tokenizer files an HF checkpoint directory may hold (copied when present)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


def write_tokenizer_files(tokenizer, base_path, out_dir) -> list[str]:
    """The tokenizer of ``base_path`` as HF files in ``out_dir``; returns their names."""
    base_path, out_dir = Path(base_path), Path(out_dir)
    if base_path.is_dir() and (base_path / "tokenizer.json").is_file():
        names = [n for n in TOKENIZER_FILES if (base_path / n).is_file()]
        for n in names:
            shutil.copyfile(base_path / n, out_dir / n)
        return names
    tokenizer.backend.save(str(out_dir / "tokenizer.json"))

    def token(i):
        return None if i is None else tokenizer.backend.id_to_token(int(i))

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(tokenizer.bos_id),
           "eos_token": token(tokenizer.eos_id), "add_bos_token": bool(tokenizer.add_bos),
           "chat_template": tokenizer.chat_template}
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2))
    return ["tokenizer.json", "tokenizer_config.json"]


def write_merged(run: Run, out_dir, *, overwrite: bool = False) -> Path:
    """``out_dir`` = the run's merged weights + ``config.json`` + tokenizer files."""
    def write(tmp: Path):
        export_merged(run.params, tmp)          # into the fresh (empty) temporary directory
        (tmp / "config.json").write_text(json.dumps(run.model.config.to_hf(), indent=2))
        write_tokenizer_files(run.tokenizer, run.base_path, tmp)
    return replace_dir(out_dir, write, overwrite=overwrite, what="export --merged")


def _check_dest(flag: str, dest: Path, run_dir: Path, overwrite: bool) -> None:
    d, r = dest.resolve(), run_dir.resolve()
    own = (r / ADAPTER_DIR, r / MODEL_DIR)
    if d == r or d in r.parents or any(d == o or o in d.parents for o in own):
        raise ValueError(f"{flag} {dest} would replace the run's own files; pass a new "
                         f"directory (outside {run_dir}, or a new one inside it)")
    if d.exists() and not overwrite and (not d.is_dir() or any(d.iterdir())):
        raise FileExistsError(f"{flag} {dest} exists and is not empty; pass --overwrite to "
                              f"replace it, or another directory")


def export_run(run, *, peft=None, merged=None, overwrite: bool = False) -> dict[str, Path]:
    """Write the PEFT adapter of ``run`` (a :class:`Run` or the directory to load it from)
    to ``peft`` and/or its merged model to ``merged``; returns ``{"peft": path, "merged":
    path}`` for those written. Every destination is checked before the model loads."""
    if peft is None and merged is None:
        raise ValueError("export needs --peft DIR and/or --merged DIR")
    run_dir = run.directory if isinstance(run, Run) else Path(run)
    cfg = run.config if isinstance(run, Run) else check_run_dir(run_dir)
    if peft is not None and cfg.rank == 0:
        raise ValueError(f"--peft: {run_dir} is a full fine-tuning run (rank 0); it has no LoRA "
                         f"adapter to export. Use --merged DIR for its trained model")
    dests = {k: Path(v) for k, v in (("peft", peft), ("merged", merged)) if v is not None}
    if len(dests) == 2 and dests["peft"].resolve() == dests["merged"].resolve():
        raise ValueError("--peft and --merged must be different directories")
    for k, d in dests.items():
        _check_dest(f"--{k}", d, run_dir, overwrite)
    if not isinstance(run, Run):
        run = load_run(run_dir)
    elif not run.adapter:
        raise ValueError(f"{run_dir}: loaded without its adapter; export the trained run")
    out = {}
    if "peft" in dests:
        kw = {"overwrite": overwrite} if "overwrite" in inspect.signature(to_peft).parameters \
            else {}
        out["peft"] = Path(to_peft(run.params, dests["peft"],
                                   base_model_name_or_path=run.base_name, **kw))
    if "merged" in dests:
        out["merged"] = write_merged(run, dests["merged"], overwrite=overwrite)
    return out
