"""LoRA-train a small Flax model on a synthetic task and print the loss falling.

    python -m experiments.quickstart
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (64, 64):
            x = jax.nn.gelu(nn.Dense(width)(x))
        return nn.Dense(3)(x)


def main(steps: int = 200):
    key = jax.random.key(0)
    kx, kt, kp = jax.random.split(key, 3)
    x = jax.random.normal(kx, (256, 17))
    teacher = jax.random.normal(kt, (17, 3))
    y = jnp.argmax(x @ teacher, axis=-1)

    model = MLP()
    params = lj.lorafy(model.init(kp, x)["params"], rank=4, alpha=8, key=kp,
                       targets=r"Dense_[01]/kernel")  # the 3-wide head stays frozen
    trainable, frozen = lj.split(params)
    apply = lj.lora(model.apply)
    tx = optax.adam(1e-2)
    opt_state = tx.init(trainable)

    def loss_fn(tr, x, y):
        logits = apply({"params": lj.combine(tr, frozen)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(tr, opt_state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(tr, x, y)
        updates, opt_state = tx.update(g, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, loss

    counts = lj.count_params(params)
    print(f"trainable {counts['trainable']:,} of {counts['total']:,} "
          f"({100 * counts['trainable_fraction']:.1f}%)")
    for i in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state, x, y)
        if i % 40 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.4f}")
    return float(loss)


if __name__ == "__main__":
    main()
