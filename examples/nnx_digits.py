"""NNX: the digits recipe on a Flax NNX model, lifted from its ``nnx.split`` state.

Run: python examples/nnx_digits.py [key=value ...]   (config: configs/digits_nnx.yaml)
"""

import pathlib
import sys

import lora_jax as lj

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits_nnx.yaml"

if __name__ == "__main__":
  lj.run_job(CONFIG, sys.argv[1:])
