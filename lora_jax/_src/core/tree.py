"""Parameter paths: naming the leaves of any pytree with ``/``-joined strings.

A path joins the keys that lead to a leaf: dict keys as they are, sequence
indices as numbers, attribute names for dataclasses and Flax NNX nodes. The
``value`` attribute of an NNX ``Variable`` is not part of its path, so the
kernel of ``nnx.Linear`` in ``model.linear`` is ``linear/kernel``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

from lora_jax._src.core import kinds
from lora_jax._src.numerics.qarray import is_quantized

PyTree = Any
"""Any JAX pytree: nested dicts, Flax ``FrozenDict`` or NNX ``State``, dataclasses."""


def _is_nnx_variable(node: Any) -> bool:
  # Imported lazily: flax.nnx is heavy and only needed when NNX trees appear.
  from flax import nnx  # pylint: disable=import-outside-toplevel

  return isinstance(node, nnx.Variable)


def _key_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def _variable_key_paths(tree: PyTree) -> set[tuple[Any, ...]]:
  """Key paths of the NNX ``Variable`` nodes in ``tree`` (empty for other trees)."""
  found: set[tuple[Any, ...]] = set()

  def visit(key_path, node):
    if _is_nnx_variable(node):
      found.add(tuple(key_path))

  jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_is_nnx_variable)
  return found


def _path_strings(key_paths: Iterable[tuple[Any, ...]], tree: PyTree) -> list[str]:
  variables = _variable_key_paths(tree)
  names = []
  key_paths_list = [tuple(k) for k in key_paths]
  for key_path in key_paths_list:
    keys = list(key_path)
    if (variables and keys and isinstance(keys[-1], jax.tree_util.GetAttrKey)
        and tuple(keys[:-1]) in variables):
      keys = keys[:-1]
    names.append("/".join(_key_str(k) for k in keys))
  if len(set(names)) != len(names):
    _raise_collisions(names, key_paths_list)
  return names


def _raise_collisions(names: list[str], key_paths: list[tuple[Any, ...]]) -> None:
  first: dict[str, tuple[Any, ...]] = {}
  errors = []
  for name, key_path in zip(names, key_paths):
    if name in first:
      errors.append(f"{name!r}: the leaves at {jax.tree_util.keystr(first[name])} and "
                    f"{jax.tree_util.keystr(key_path)}")
    first.setdefault(name, key_path)
  raise ValueError(
      "Two leaves of the parameter tree have the same path, so patterns, adapters and "
      "checkpoints could not tell them apart (a key containing '/' beside nested keys, or two "
      "keys that print alike):\n  - " + "\n  - ".join(errors[:10])
      + "\nRename the keys so every '/'-joined path is distinct.")


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """Returns ``(path, leaf)`` for every leaf of ``tree``, in flattening order.

  A ``QuantizedArray`` is one leaf (its codes and scales are not separate parameters).
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
  names = _path_strings((kp for kp, _ in flat), tree)
  return [(name, leaf) for name, (_, leaf) in zip(names, flat)]


def map_with_paths(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  """Like ``jax.tree.map`` but ``fn`` also receives each leaf's path string (a
  ``QuantizedArray`` is one leaf)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
  names = _path_strings((kp for kp, _ in flat), tree)
  return jax.tree_util.tree_unflatten(
      treedef, [fn(name, leaf) for name, (_, leaf) in zip(names, flat)])


def paths(tree: PyTree) -> list[str]:
  """Lists the path of every leaf of a parameter tree.

  These are the strings that ``LoraConfig`` patterns are matched against with
  ``re.search``.

  Args:
    tree: any pytree (Linen variables, NNX state, nested dicts, abstract trees).

  Returns:
    The paths in flattening order.

  Example:
    >>> import jax.numpy as jnp
    >>> import lora_jax as lj
    >>> lj.paths({"params": {"Dense_0": {"kernel": jnp.zeros((2, 3)),
    ...                                  "bias": jnp.zeros(3)}}})
    ['params/Dense_0/bias', 'params/Dense_0/kernel']
  """
  return [name for name, _ in leaves_with_paths(tree)]


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Builds a nested dict from ``{"a/b/c": value}`` entries.

  Raises:
    ValueError: when one path is a prefix of another (``a/b`` and ``a/b/c``),
      which would silently drop a value.
  """
  root: dict[str, Any] = {}
  leaf = object()
  seen: dict[str, Any] = {}
  for path, value in flat.items():
    node = root
    *parents, last = path.split("/")
    for i, part in enumerate(parents):
      node = node.setdefault(part, {})
      if not isinstance(node, dict) or seen.get("/".join(parents[:i + 1])) is leaf:
        raise ValueError(f"Paths collide: {'/'.join(parents[:i + 1])!r} is a leaf and also a "
                         f"prefix of {path!r}.")
    if last in node:
      raise ValueError(f"Paths collide: {path!r} is given twice, or is also a prefix of "
                       "another path.")
    node[last] = value
    seen[path] = leaf
  return root


def lookup(tree: Mapping[str, Any] | None, path: str) -> Any:
  """Returns the entry of a nested dict at ``path``, or None when absent."""
  node: Any = tree
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  return node


def adapter_paths(adapters: Mapping[str, Any] | None) -> list[str]:
  """Paths of the entries (``kinds.is_entry``) of an adapter tree (not its shared arrays,
  ``kinds.SHARED``)."""
  found: list[str] = []

  def visit(node: Any, prefix: str) -> None:
    if isinstance(node, Mapping):
      if kinds.is_entry(node):
        found.append(prefix)
        return
      for key, child in node.items():
        if not prefix and key == kinds.SHARED:
          continue
        visit(child, f"{prefix}/{key}" if prefix else str(key))

  visit(adapters, "")
  return found


def trained_leaves(base: PyTree, is_trainable: Callable[[str], bool]) -> dict[str, Any]:
  """The leaves of ``base`` whose path ``is_trainable`` accepts, as a nested dict."""
  return nest({p: leaf for p, leaf in leaves_with_paths(base) if is_trainable(p)})
