"""Strict JAX for every test: no silent dtype or rank promotion, fixed keys, 8 CPU devices.

Warnings are errors through pyproject.toml's ``filterwarnings``; hypothesis draws a fixed
sequence of examples (``derandomize``) so a failure reproduces on the next run.
"""

import gc
import os

# Must be set before jax initialises its backends; appended so other XLA flags survive.
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _XLA_FLAGS:
    os.environ["XLA_FLAGS"] = f"{_XLA_FLAGS} --xla_force_host_platform_device_count=8".strip()

import hypothesis  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

STRICT = {"jax_numpy_dtype_promotion": "strict", "jax_numpy_rank_promotion": "raise"}
for _name, _value in STRICT.items():
    jax.config.update(_name, _value)

hypothesis.settings.register_profile("lora_jax", derandomize=True, database=None)
hypothesis.settings.load_profile("lora_jax")


@pytest.fixture(autouse=True)
def _strict_jax():
    """Fail the test that leaves a promotion mode loosened (it would weaken every later test)."""
    yield
    leaked = {k: getattr(jax.config, k) for k in STRICT if getattr(jax.config, k) != STRICT[k]}
    for name in leaked:
        jax.config.update(name, STRICT[name])
    assert not leaked, f"test changed jax config {leaked}; use a `with` context manager instead"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. Each XLA:CPU executable holds a few
    memory mappings while a cache keeps it; over the whole suite they passed the kernel's
    ``vm.max_map_count`` (65530), and the compiler segfaulted on its next mapping."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def key():
    return jax.random.key(0)
