"""The Python blocks of the README and of the pages in docs/ run as written, and docs/api.md
names every public name."""

import pathlib
import re

import jax
import numpy as np

import lora_jax as lj

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The pages' blocks continue the README's training loop (its `lj`, `config`, `lp`, ...), in
# this order; blocks tagged otherwise (```python tunix) run in tests/test_tunix.py.
PAGES = ["README.md", "docs/api.md", "docs/variants.md", "docs/kinds.md", "docs/adapters.md",
         "docs/factored.md",
         "docs/benchmarks.md", "docs/qlora.md", "docs/jobs.md", "docs/checkpoints.md",
         "docs/merging.md", "docs/peft.md", "docs/axes.md", "docs/configuration.md",
         "docs/multihost.md", "docs/guarantees.md", "docs/tests.md", "docs/huggingface.md"]


def test_every_page_is_listed_and_linked():
  assert sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")) == sorted(
      PAGES[1:])
  readme = (ROOT / "README.md").read_text()
  for page in PAGES[1:]:
    assert f"]({page})" in readme, f"README links no {page}"
  for page in PAGES:  # relative links between pages point at files that exist
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / page).read_text()):
      assert (ROOT / page).parent.joinpath(target).resolve().exists(), (page, target)


def test_python_blocks_run(capsys):
  namespace: dict = {}
  ran = 0
  # optax's Adam mixes a Python float with an int32 count, which strict promotion rejects.
  with jax.numpy_dtype_promotion("standard"):
    for page in PAGES:
      for block in re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S):
        exec(compile(block, page, "exec"), namespace)  # noqa: S102
        ran += 1
  assert ran >= 9
  out = capsys.readouterr().out
  assert "params/query/kernel" in out and "trainable parameters" in out
  # The loop's claim: the wrapped model on LoraParams equals the model on merged variables.
  ns = namespace
  np.testing.assert_allclose(ns["apply"](ns["lp"], ns["x"], ns["x"]),
                             ns["model"].apply(ns["merged"], ns["x"], ns["x"]),
                             rtol=1e-4, atol=1e-5)
  assert np.isfinite(ns["loss"])


def test_api_page_names_every_public_name():
  text = (ROOT / "docs" / "api.md").read_text()
  table = "\n".join(line for line in text.splitlines() if line.startswith("| "))
  code = " ".join(re.findall(r"`([^`]+)`", table))
  missing = [n for n in lj.__all__ if not re.search(rf"\b{re.escape(n)}\b", code)]
  assert not missing, f"docs/api.md's table does not name {missing}"
