"""The package's layers: every module imports only from its own layer or the layers below.

``lora_jax/_src`` is split into subpackages in layer order (``LAYERS``). This test reads every
import statement (module level and inside functions) and checks that no import goes up a
layer, that the modules of one layer import each other without a cycle, and that only the
command-line layer imports inside functions (to start quickly, never to dodge a cycle).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "lora_jax" / "_src"
LAYERS = ("numerics", "core", "adapters", "factored", "io", "cli")
LAZY_ALLOWED = {"cli"}


def _modules() -> dict[str, pathlib.Path]:
  return {f"{p.parent.name}.{p.stem}": p for p in sorted(SRC.glob("*/*.py"))
          if p.stem != "__init__"}


def _imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
  """``(layer.module or layer, line, inside a function)`` for each lora_jax._src import."""
  tree = ast.parse(path.read_text(), str(path))
  nested: set[int] = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      nested.update(id(n) for n in ast.walk(node) if n is not node)
  found = []
  for node in ast.walk(tree):
    names: list[str] = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.level:
        raise AssertionError(f"{path}:{node.lineno}: relative import; write lora_jax._src...")
      names = [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      parts = name.split(".")
      if parts[:2] == ["lora_jax", "_src"] and len(parts) > 2:
        target = ".".join(parts[2:4]) if len(parts) > 3 else parts[2]
        found.append((target, node.lineno, id(node) in nested))
  return found


def test_every_module_sits_in_a_layer():
  loose = [p.name for p in SRC.glob("*.py") if p.name != "__init__.py"]
  assert not loose, f"modules outside a layer subpackage: {loose}"
  assert sorted(p.name for p in SRC.iterdir()
                if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


def test_imports_only_look_down():
  errors = []
  for name, path in _modules().items():
    layer = name.split(".")[0]
    for target, line, lazy in _imports(path):
      to_layer = target.split(".")[0]
      if to_layer not in LAYERS:
        errors.append(f"{name}:{line} imports lora_jax._src.{target}, which is in no layer")
      elif LAYERS.index(to_layer) > LAYERS.index(layer):
        errors.append(f"{name}:{line} ({layer}) imports {target} from the higher layer "
                      f"{to_layer}")
      if lazy and layer not in LAZY_ALLOWED:
        errors.append(f"{name}:{line} imports {target} inside a function; import at the top "
                      "(a cycle is fixed by moving code down a layer, not by a lazy import)")
  assert not errors, "\n".join(errors)


def test_no_import_cycles():
  modules = _modules()
  graph = {name: sorted({t for t, _, _ in _imports(path) if t in modules and t != name})
           for name, path in modules.items()}
  state: dict[str, int] = {}
  cycles = []

  def visit(node: str, trail: list[str]) -> None:
    state[node] = 1
    for nxt in graph[node]:
      if state.get(nxt) == 1:
        cycles.append(" -> ".join([*trail[trail.index(nxt):], nxt]))
      elif nxt not in state:
        visit(nxt, [*trail, nxt])
    state[node] = 2

  for node in graph:
    if node not in state:
      visit(node, [node])
  assert not cycles, cycles


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_docstring_names_its_modules(layer):
  doc = ast.get_docstring(ast.parse((SRC / layer / "__init__.py").read_text()))
  assert doc and doc.startswith(f"Layer {LAYERS.index(layer) + 1}, ")
  missing = [p.stem for p in (SRC / layer).glob("*.py")
             if p.stem != "__init__" and f"``{p.stem}``" not in doc]
  assert not missing, f"{layer}/__init__.py does not name {missing}"


def _entry_key_uses(path: pathlib.Path) -> list[str]:
  """Code (not docstrings) that spells an adapter entry's keys: ``e["a"]``, ``{"b": ...}``,
  ``"m" in e``, ``e.get("m")``."""
  keys = {"a", "b", "m"}
  is_key = lambda node: isinstance(node, ast.Constant) and node.value in keys  # noqa: E731
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    hit = (isinstance(node, ast.Subscript) and is_key(node.slice)
           or isinstance(node, ast.Dict) and any(k is not None and is_key(k) for k in node.keys)
           or isinstance(node, ast.Compare) and is_key(node.left)
           and isinstance(node.ops[0], (ast.In, ast.NotIn))
           or isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
           and node.func.attr in ("get", "pop") and node.args and is_key(node.args[0]))
    if hit:
      found.append(f"{path.relative_to(SRC)}:{node.lineno}")
  return found


def test_the_adapter_schema_is_spelled_in_one_module():
  """Only ``core/kinds.py`` names an entry's arrays; every other module asks it."""
  found = [hit for name, path in _modules().items() if name != "core.kinds"
           for hit in _entry_key_uses(path)]
  assert not found, found
