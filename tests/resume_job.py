"""A small LoRA training job that checkpoints and resumes; driven by test_checkpoint.py.

Usage: python resume_job.py CKPT_DIR OUT.npz TOTAL_STEPS SAVE_EVERY [STEP_SLEEP_S]
Prints "saved N" after each checkpoint. Data for step i is a pure function of i,
so an interrupted and resumed run must end with the same adapters as an
uninterrupted one.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj


def main():
  ckpt, out, total, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
  pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
  params = {"l1": {"kernel": jax.random.normal(jax.random.key(0), (16, 32)) / 4,
                   "bias": jnp.zeros(32)},
            "l2": {"kernel": jax.random.normal(jax.random.key(1), (32, 4)) / 4}}
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"kernel$", trainable=r"bias$",
                         dropout=0.1)
  apply = lj.wrap(lambda p, x: jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
                  @ p["l2"]["kernel"], config)
  tx = lj.optimizer(optax.adam(1e-2), config)
  lp = lj.lift(params, config, key=jax.random.key(2))

  @jax.jit
  def step_fn(lp, opt_state, i):
    key = jax.random.fold_in(jax.random.key(3), i)
    x = jax.random.normal(key, (32, 16))
    y = jnp.sin(x[:, :4])
    loss = lambda lp: jnp.mean((apply(lp, x, lora_rng=key) - y) ** 2)  # noqa: E731
    grads = jax.grad(loss)(lp)
    updates, opt_state = tx.update(grads, opt_state, lp)
    return optax.apply_updates(lp, updates), opt_state

  def state_of(lp, opt_state):
    return {"adapters": lp.adapters, "bias": lp.base["l1"]["bias"], "opt_state": opt_state}

  opt_state = tx.init(lp)
  start = 0
  found = lj.load_train_state(ckpt, state_of(lp, opt_state), config=config)
  if found is not None:
    start, state = found
    base = {**params, "l1": {**params["l1"], "bias": state["bias"]}}
    lp, opt_state = lj.LoraParams(base, state["adapters"]), state["opt_state"]
    print(f"resumed {start}", flush=True)
  with jax.numpy_dtype_promotion("standard"):  # optax Adam mixes float and int32 counts
    for i in range(start, total):
      lp, opt_state = step_fn(lp, opt_state, i)
      time.sleep(pause)
      if (i + 1) % every == 0:
        lj.save_train_state(ckpt, i + 1, state_of(lp, opt_state), config)
        print(f"saved {i + 1}", flush=True)
  flat = {p: np.asarray(x) for p, x in zip(lj.paths(lp), jax.tree.leaves(lp))}
  np.savez(out, **flat)


if __name__ == "__main__":
  main()
