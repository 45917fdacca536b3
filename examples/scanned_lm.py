"""Scanned layers: the character LM built with ``nn.scan`` over its blocks (stacked kernels).

Adapters get a leading layer axis too (``stack_axes``); factored execution slices them per
scan iteration. Run: python examples/scanned_lm.py [key=value ...]
(config: configs/charlm_scan.yaml)
"""

import pathlib
import sys

import lora_jax as lj

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "charlm_scan.yaml"

if __name__ == "__main__":
  lj.run_job(CONFIG, sys.argv[1:])
