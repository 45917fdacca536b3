"""Classifier: an MLP pretrained on the UCI digits (shipped with lora_jax), adapted to rotated ones.

Run: python examples/digits_classifier.py [key=value ...]   (config: configs/digits.yaml)
Prints test accuracy of the frozen base, LoRA and full fine-tuning, and the trainable share.
"""

import pathlib
import sys

import lora_jax as lj

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"

if __name__ == "__main__":
  lj.run_job(CONFIG, sys.argv[1:])
