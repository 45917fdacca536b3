"""Packaging: every import of the package is declared, and `import lora_jax` stays light.

CI installs the project into an empty virtual environment, so an undeclared dependency also
fails there; these tests name the culprit directly.
"""

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("matplotlib", "sklearn", "tqdm", "torch", "peft", "transformers", "pandas")
# Not loaded by `import lora_jax` either: Flax's model libraries load with the job runner or
# the NNX wrapper, on first use of their names.
MODEL_LIBRARIES = ("flax.linen", "flax.nnx", "tunix", "grain")


def _imported_top_level_names(package: pathlib.Path, module_level: bool = False
                              ) -> dict[str, str]:
  """Top-level package names imported anywhere (or, with ``module_level``, at import time:
  outside function bodies) in ``package``."""
  names: dict[str, str] = {}
  for file in package.rglob("*.py"):
    tree = ast.parse(file.read_text(), str(file))
    nodes = ast.walk(tree)
    if module_level:  # every node but those inside a function body
      inside = {id(n) for f in ast.walk(tree)
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(f) if n is not f}
      nodes = [n for n in ast.walk(tree) if id(n) not in inside]
    for node in nodes:
      if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        found = [node.module]
      else:
        continue
      for name in found:
        names.setdefault(name.split(".")[0], str(file.relative_to(ROOT)))
  return names


def _declared(extra: str | None = None) -> set[str]:
  """The distributions the package requires (or, with ``extra``, that extra adds)."""
  requirements = importlib.metadata.requires("lora-jax") or []
  chosen = [r for r in requirements if ("extra ==" not in r if extra is None
                                        else re.search(rf"extra == .{extra}.", r))]
  return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in chosen}


@pytest.mark.slow
def test_every_import_is_a_declared_dependency():
  """Runtime dependencies are declared; the models extra's packages (the Hugging Face task)
  are declared there and imported only inside the functions that need them, so the plain
  install imports and runs without them."""
  distributions = importlib.metadata.packages_distributions()
  declared, models = _declared(), _declared("models")
  at_import = _imported_top_level_names(ROOT / "lora_jax", module_level=True)
  missing = []
  for name, where in sorted(_imported_top_level_names(ROOT / "lora_jax").items()):
    if name in sys.stdlib_module_names or name == "lora_jax":
      continue
    dists = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
    if dists & declared:
      continue
    if dists & models and name not in at_import:
      continue
    missing.append(f"{name} (imported in {at_import.get(name, where)}; distribution "
                   f"{sorted(dists)})")
  assert not missing, f"undeclared runtime dependencies: {missing}; declared: {sorted(declared)}"


def test_import_lora_jax_is_light():
  code = ("import sys, lora_jax; "
          f"print(sorted(m for m in {HEAVY + MODEL_LIBRARIES!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_lazy_names_and_python_dash_m():
  code = ("import sys, lora_jax as lj; assert lj.run_job.__module__ == 'lora_jax._src.cli.job'; "
          "assert 'flax.nnx' in sys.modules; assert set(lj.__all__) <= set(dir(lj)); "
          "from lora_jax import *; print(nnx_module.__name__)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "nnx_module"
  out = subprocess.run([sys.executable, "-m", "lora_jax", "--version"], capture_output=True,
                       text=True, check=True)
  assert out.stdout.startswith("lora-jax ")


@pytest.mark.slow
def test_digits_job_runs_without_optional_packages(tmp_path):
  """The main job's task needs none of scikit-learn, matplotlib, tqdm (blocked here)."""
  code = f"""
import sys

import pytest
for name in {HEAVY!r}:
  sys.modules[name] = None  # any import of these now raises ImportError
import pytest

import lora_jax as lj
metrics = lj.run_job({str(ROOT / "configs" / "quickstart.yaml")!r},
                     ["pretrain.steps=2", "finetune.steps=2", "run_dir={tmp_path}"])
print("OK", metrics["lora"])
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK" in out.stdout
  assert (tmp_path / "loss.svg").exists() and (tmp_path / "adapters").is_dir()


# Examples and benchmarks are written against the public API, as a user would write them.
# One exception, for what no user needs: the mixed-batch benchmark swaps the internal
# per-example rule for its alternatives to compare them.
PRIVATE_ALLOWED = {"benchmarks/mixed_batch.py": "adapters.stack"}


def test_examples_and_benchmarks_use_the_public_api():
  found = []
  for path in sorted([*ROOT.glob("examples/*.py"), *ROOT.glob("benchmarks/*.py")]):
    rel = path.relative_to(ROOT).as_posix()
    for line in path.read_text().splitlines():
      if re.search(r"lora_jax\._src", line) and not line.lstrip().startswith("#"):
        allowed = PRIVATE_ALLOWED.get(rel)
        if not (allowed and re.search(rf"lora_jax\._src(\.| import ){allowed}\b", line)):
          found.append(f"{rel}: {line.strip()}")
  assert not found, found
