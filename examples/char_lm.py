"""Sequence generation: a character-level LM pretrained on Python source, adapted to prose.

Reports held-out perplexity of the frozen base, LoRA and full fine-tuning, and prints greedy
samples before and after. Run: python examples/char_lm.py [key=value ...]
(config: configs/charlm.yaml)
"""

import pathlib
import sys

import lora_jax as lj

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "charlm.yaml"

if __name__ == "__main__":
  lj.run_job(CONFIG, sys.argv[1:])
