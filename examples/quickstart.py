"""Quickstart: pretrain a small Flax MLP, then adapt it to a shifted task with LoRA.

Run: python examples/quickstart.py
Prints the frozen base's and the LoRA model's test loss on the new task, the
trainable-parameter share, and checks that the merged weights give the same outputs.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(256)(x))
    x = nn.gelu(nn.Dense(256)(x))
    return nn.Dense(4)(x)


def task(shift: float):
  """A smooth 32 -> 4 regression target; `shift` moves it away from the pretraining task."""
  w0 = jax.random.normal(jax.random.key(100), (32, 4)) / 4
  w = w0 + shift * jax.random.normal(jax.random.key(101), (32, 4)) / 4
  return lambda x: jnp.sin(x @ w) + 0.5 * jnp.cos(2 * x @ w)


def data(seed: int, target, n: int):
  x = jax.random.normal(jax.random.key(seed), (n, 32))
  return x, target(x)


def fit(loss, params, tx, xy, steps, batch=256):
  x, y = xy

  @jax.jit
  def step(params, opt_state, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = tx.init(params)
  for i in range(steps):
    start = (i * batch) % (len(x) - batch)
    params, opt_state, _ = step(params, opt_state, x[start:start + batch], y[start:start + batch])
  return params


def main():
  t0 = time.perf_counter()
  model = Mlp()
  old, new = task(0.0), task(1.0)
  train_old, train_new, test_new = data(1, old, 8192), data(2, new, 8192), data(3, new, 2048)

  # 1. A base model trained on the old task (stands in for a pretrained checkpoint).
  mse = lambda p, x, y: jnp.mean((model.apply(p, x) - y) ** 2)  # noqa: E731
  params = model.init(jax.random.key(0), train_old[0][:1])
  params = fit(mse, params, optax.adam(1e-3), train_old, steps=1500)

  # 2. LoRA: adapters on every Dense kernel, biases trained in full, base frozen.
  config = lj.LoraConfig(rank=8, alpha=16.0, targets=r"kernel$", trainable=r"bias$",
                         rank_pattern={r"Dense_2/kernel$": 4})  # the 4-wide head
  lp = lj.lift(params, config, key=jax.random.key(1))
  apply = lj.wrap(model.apply, config)
  lora_mse = lambda lp, x, y: jnp.mean((apply(lp, x) - y) ** 2)  # noqa: E731
  lp = fit(lora_mse, lp, lj.optimizer(optax.adam(3e-3), config), train_new, steps=1500)

  # 3. Deploy: fold the adapters into plain Flax variables.
  merged = lj.merge(lp, config)
  base_loss = float(mse(params, *test_new))
  lora_loss = float(lora_mse(lp, *test_new))
  merged_loss = float(mse(merged, *test_new))
  np.testing.assert_allclose(model.apply(merged, test_new[0]), apply(lp, test_new[0]),
                             rtol=1e-4, atol=1e-4)

  s = lj.summary(lp, config)
  print(s)
  print()
  print(f"test MSE on the shifted task: frozen base {base_loss:.4f}  ->  LoRA {lora_loss:.4f} "
        f"(merged {merged_loss:.4f})")
  print(f"trained {s.trainable_params:,} of {s.base_params:,} parameters "
        f"({s.trainable_percent:.2f}%) in {time.perf_counter() - t0:.1f} s")
  assert lora_loss < 0.5 * base_loss, "LoRA should clearly beat the frozen base"


if __name__ == "__main__":
  main()
