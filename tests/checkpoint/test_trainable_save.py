"""save_adapter / restore_adapter with fully trained leaves (PEFT's modules_to_save):
they are saved with A/B, restored exactly, and kept out of the frozen-base check."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import checkpoint as ck
from lora_jax.checkpoint.config import lora_config


def _params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"dense": {"kernel": jax.random.normal(k1, (7, 5))},
            "head": {"kernel": jax.random.normal(k2, (5, 3))},
            "norm": {"scale": jnp.ones(5)}}


def _template(params):
    return lj.lorafy(params, rank=2, targets="dense", trainable=["head", "norm"])


# PEFT tests/test_other.py::TestModulesToSave save/load: the saved module comes back.
def test_trainable_leaves_are_saved_and_restored(tmp_path):
    lp = _template(_params())
    t, f = lj.split(lp)
    trained = lj.combine(jax.tree.map(lambda x: x + 0.5, t), f)   # every trainable leaf moved
    tx = lj.lora_optimizer(optax.adam(1e-3), trained)
    state = tx.init(trained)
    ck.save_adapter(tmp_path, trained, step=1, opt_state=state)
    cfg = lora_config(trained)
    assert cfg["head/kernel"] == {"type": "Trainable", "dtype": "float32", "value_shape": [5, 3]}
    fp = ck.base_fingerprint(trained)
    assert sorted(fp) == ["dense/kernel/w0"]             # trained leaves are not the base

    back, state2 = ck.restore_adapter(tmp_path, _template(_params()), opt_state=state)
    np.testing.assert_array_equal(back["head"]["kernel"].value, trained["head"]["kernel"].value)
    np.testing.assert_array_equal(back["norm"]["scale"].value, trained["norm"]["scale"].value)
    np.testing.assert_array_equal(back["dense"]["kernel"].a, trained["dense"]["kernel"].a)
    np.testing.assert_array_equal(back["dense"]["kernel"].w0, _params()["dense"]["kernel"])
    for x, y in zip(jax.tree.leaves(state2), jax.tree.leaves(state)):
        np.testing.assert_array_equal(x, y)

    # The template's trainable values do not matter (they are what is restored) ...
    other_head = _params()
    other_head["head"]["kernel"] = other_head["head"]["kernel"] * 9.0
    again = ck.restore_adapter(tmp_path, _template(other_head))
    np.testing.assert_array_equal(again["head"]["kernel"].value, trained["head"]["kernel"].value)
    # ... but the frozen base does, and a template without the trainable leaf is refused.
    with pytest.raises(ck.BaseMismatchError, match="base weights differ"):
        ck.restore_adapter(tmp_path, _template(_params(seed=1)))
    with pytest.raises(ck.BaseMismatchError, match="head/kernel"):
        ck.restore_adapter(tmp_path, lj.lorafy(_params(), rank=2, targets="dense",
                                               trainable="norm"))
