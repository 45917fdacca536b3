"""The README's Python blocks run as written."""

import pathlib
import re

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run(capsys):
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README has no python blocks"
  namespace: dict = {}
  # optax's Adam mixes a Python float with an int32 count, which strict promotion rejects.
  with jax.numpy_dtype_promotion("standard"):
    for block in blocks:
      exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  out = capsys.readouterr().out
  assert "params/query/kernel" in out and "trainable parameters" in out
  # The loop's claim: the wrapped model on LoraParams equals the model on merged variables.
  ns = namespace
  np.testing.assert_allclose(ns["apply"](ns["lp"], ns["x"], ns["x"]),
                             ns["model"].apply(ns["merged"], ns["x"], ns["x"]),
                             rtol=1e-4, atol=1e-5)
  assert np.isfinite(ns["loss"])
