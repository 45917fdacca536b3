"""Saves adapter checkpoints to one place in a loop; driven by test_reliability.py.

Usage: python save_loop.py DIR WRITER COUNT
Each save holds adapters filled with ``WRITER * 1000 + i`` (i = 1..COUNT), written
with ``overwrite=True`` as ``lora-jax train`` does; prints "saved i" after each.
"""

import sys

import jax
import jax.numpy as jnp

import lora_jax as lj


def adapters_for(value: float):
  config = lj.LoraConfig(rank=8)
  params = {"layer": {"kernel": jnp.zeros((512, 512))}}
  lp = lj.lift(params, config, key=jax.random.key(0))
  return jax.tree.map(lambda x: jnp.full_like(x, value), lp.adapters), config


def main():
  directory, writer, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  for i in range(1, count + 1):
    adapters, config = adapters_for(writer * 1000 + i)
    lj.save_adapters(directory, adapters, config, overwrite=True)
    print(f"saved {i}", flush=True)


if __name__ == "__main__":
  main()
