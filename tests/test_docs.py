"""The README tour and the docstring examples run."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_tour(capsys):
    text = (ROOT / "README.md").read_text()
    tour = text.split("## Tour", 1)[1]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    with jax.numpy_dtype_promotion("standard"):   # optax's Adam uses standard promotion
        exec(compile(code, "README.md#tour", "exec"), {})
    n, first, last = capsys.readouterr().out.split()
    assert int(n) == (5 * 4 + 4 * 33) + (33 * 4 + 4 * 7)
    assert float(last) < 0.5 * float(first)


def test_readme_frameworks():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it with your framework", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md#frameworks", "exec"), {})


def _modules_with_examples():
    import lora_jax
    names = []
    for info in pkgutil.walk_packages(lora_jax.__path__, "lora_jax."):
        tests = doctest.DocTestFinder().find(importlib.import_module(info.name))
        if any(not e.options.get(doctest.SKIP) for t in tests for e in t.examples):
            names.append(info.name)
    return names


@pytest.mark.parametrize("module", _modules_with_examples())
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    globs = dict(vars(mod))
    globs.update(vars(importlib.import_module("lora_jax")))
    result = doctest.testmod(mod, globs=globs, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
