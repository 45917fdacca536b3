"""Text classification: a Transformer encoder labelling standard-library docstrings by package.

Pretrained on four packages, adapted with LoRA (attention and MLP kernels, head in full) to
four others. Run: python examples/text_classification.py [key=value ...]
(config: configs/textcls.yaml)
"""

import pathlib
import sys

import lora_jax as lj

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "textcls.yaml"

if __name__ == "__main__":
  lj.run_job(CONFIG, sys.argv[1:])
