"""``infer_axes``: each target's input and stack axes, read from how the model uses it.

The model is traced once on abstract inputs (nothing is computed) and the
jaxpr is walked with every targeted leaf tracked through the ops that only
move its axes (transpose, dtype casts, size-1 reshapes, broadcasts, slices) and
into nested calls, ``scan``, ``cond`` and ``while``. Where a tracked weight
meets the activations, the op says what its axes are:

* ``dot_general`` (matmuls, einsums): contracted axes are inputs, batch axes
  (an einsum over experts) are stacked;
* ``ragged_dot`` (MoE, tokens grouped by expert): the group axis is stacked;
* ``conv_general_dilated``: the spatial and input-feature axes are inputs;
* ``gather`` with a batch of indices (an embedding lookup): the looked-up axis
  is the input; with a single index (``w[i]``) the axis is a stacked-layer axis,
  as is an axis that ``scan`` slices or a static index removes.

The result is an explicit ``LoraConfig`` whose ``in_axes`` and ``stack_axes``
state every target's axes by position, to be reviewed and saved as YAML.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.tree import PyTree, leaves_with_paths
from lora_jax._src.factored.recompute import CALL_BODIES
from lora_jax._src.factored.walk import walk

_SAME_AXES = frozenset({"convert_element_type", "copy", "copy_p", "sharding_constraint",
                        "reduce_precision", "optimization_barrier", "pvary", "mesh_cast"})


@dataclasses.dataclass(frozen=True)
class _Track:
  """A value derived from a targeted leaf: ``axes[i]`` is the leaf axis of value axis ``i``
  (None for an axis the value gained); ``indexed`` are leaf axes a single index removed."""

  path: str
  axes: tuple[int | None, ...]
  indexed: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True)
class Use:
  """One use of a target: the op, and (for contractions) the stack and input axes it implies."""

  op: str
  stack: tuple[int, ...] | None = None
  ins: tuple[int, ...] | None = None

  def __str__(self) -> str:
    if self.ins is None:
      return f"{self.op} (not a contraction with activations)"
    return f"{self.op}: input axes {self.ins}, stack axes {self.stack}"


def _leaf_axes(track: _Track, dims: Any) -> tuple[int, ...] | None:
  found = [track.axes[d] for d in dims]
  return None if any(a is None for a in found) else tuple(sorted(found))


class _Walker:
  def __init__(self):
    self.uses: dict[str, list[Use]] = {}

  def note(self, track: _Track, op: str, stack: Any = None, ins: Any = None) -> None:
    """Records a use; with both ``stack`` and ``ins`` (leaf axes; None where an axis is not the
    leaf's own) it is a contraction that says the axes, else a use that says nothing."""
    if stack is not None and ins is not None:
      use = Use(op, tuple(sorted(set(stack) | track.indexed)), tuple(ins))
    else:
      use = Use(op)
    if use not in self.uses.setdefault(track.path, []):
      self.uses[track.path].append(use)

  def walk(self, jaxpr: Any, tracks: list[_Track | None]) -> list[_Track | None]:
    """Follows the leaves' axes through ``jaxpr`` (``walk.walk``, with tracks as values)."""
    def step(position: int, eqn: Any, invals: list[Any], read: Any) -> list[Any] | None:
      ins = [v if isinstance(v, _Track) else None for v in invals]  # literals follow nothing
      return self.rule(eqn, ins) if any(t is not None for t in ins) else None

    outs = walk(jaxpr, (), tracks, step, missing=None)
    return [v if isinstance(v, _Track) else None for v in outs]

  def rule(self, eqn: Any, ins: list[_Track | None]) -> list[_Track | None]:
    name, params = eqn.primitive.name, eqn.params
    none = [None] * len(eqn.outvars)
    first = ins[0]
    if name in _SAME_AXES:
      return list(ins[:len(eqn.outvars)]) + none[len(ins):]
    if name == "transpose" and first is not None:
      return [dataclasses.replace(first, axes=tuple(first.axes[p] for p in params["permutation"]))]
    if name in ("slice", "dynamic_slice") and first is not None:
      return [first]
    if name == "squeeze" and first is not None:
      dims = set(params["dimensions"])
      gone = {first.axes[d] for d in dims if first.axes[d] is not None}
      return [dataclasses.replace(first, axes=tuple(a for d, a in enumerate(first.axes)
                                                     if d not in dims),
                                  indexed=first.indexed | gone)]
    if name == "broadcast_in_dim" and first is not None:
      axes: list[int | None] = [None] * len(params["shape"])
      for i, d in enumerate(params["broadcast_dimensions"]):
        axes[d] = first.axes[i]
      return [dataclasses.replace(first, axes=tuple(axes))]
    if name == "reshape" and first is not None:
      return [self.reshape(eqn, first)]
    if name == "gather" and first is not None and ins[1] is None:
      return [self.gather(eqn, first)]
    if name == "dot_general":
      return [self.dot(eqn, ins)]
    if name in ("ragged_dot_general", "ragged_dot"):
      return [self.ragged(eqn, ins)]
    if name == "conv_general_dilated":
      return [self.conv(eqn, ins)]
    if CALL_BODIES.get(name) in params:
      inner = params[CALL_BODIES[name]]
      inner = getattr(inner, "jaxpr", inner)
      return self.walk(inner, ins)[:len(eqn.outvars)]
    if name in ("remat", "remat2", "checkpoint"):
      return self.walk(params["jaxpr"], ins)
    if name == "scan":
      return self.scan(eqn, ins)
    if name == "cond":
      for branch in params["branches"]:
        self.walk(branch.jaxpr, ins[1:])
      return none
    if name == "while":
      nc, nb = params["cond_nconsts"], params["body_nconsts"]
      self.note_all(ins[nc + nb:], "while (loop carry)")
      self.walk(params["cond_jaxpr"].jaxpr, [*ins[:nc], *[None] * (len(ins) - nc - nb)])
      self.walk(params["body_jaxpr"].jaxpr, [*ins[nc:nc + nb], *[None] * (len(ins) - nc - nb)])
      return none
    self.note_all(ins, name)
    return none

  def note_all(self, ins: list[_Track | None], op: str) -> None:
    for t in ins:
      if t is not None:
        self.note(t, op)

  def reshape(self, eqn: Any, track: _Track) -> _Track | None:
    """Only reshapes that add or drop size-1 axes keep the axes' identities."""
    old = eqn.invars[0].aval.shape
    new = tuple(eqn.params["new_sizes"])
    if [d for d in old if d != 1] != [d for d in new if d != 1]:
      self.note(track, "reshape")
      return None
    kept = iter([a for a, d in zip(track.axes, old) if d != 1])
    dropped = {a for a, d in zip(track.axes, old) if d == 1 and a is not None}
    axes = tuple(next(kept) if d != 1 else None for d in new)
    return dataclasses.replace(track, axes=axes, indexed=track.indexed | dropped)

  def gather(self, eqn: Any, track: _Track) -> _Track | None:
    dn = eqn.params["dimension_numbers"]
    indices = eqn.invars[1].aval.shape
    collapsed = tuple(dn.collapsed_slice_dims)
    if math.prod(indices[:-1]) == 1 and not dn.operand_batching_dims:  # w[i]: an index
      kept = [track.axes[d] for d in range(len(track.axes)) if d not in collapsed]
      axes: list[int | None] = [None] * len(eqn.outvars[0].aval.shape)
      for position, a in zip(dn.offset_dims, kept):
        axes[position] = a
      gone = {track.axes[d] for d in collapsed if track.axes[d] is not None}
      return dataclasses.replace(track, axes=tuple(axes), indexed=track.indexed | gone)
    leaf = _leaf_axes(track, collapsed) if collapsed else None
    self.note(track, "gather" if leaf is None else "gather (embedding lookup)", (), leaf)
    return None

  def dot(self, eqn: Any, ins: list[_Track | None]) -> None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if ins[0] is not None and ins[1] is not None:
      self.note_all(ins, "dot_general (two weights)")
      return None
    track, contract, batch = (ins[1], rc, rb) if ins[1] is not None else (ins[0], lc, lb)
    self.note(track, "dot_general", _leaf_axes(track, batch),
              _leaf_axes(track, contract) if contract else None)
    return None

  def ragged(self, eqn: Any, ins: list[_Track | None]) -> None:
    if ins[0] is not None or ins[1] is None:
      self.note_all(ins, eqn.primitive.name)
      return None
    track = ins[1]
    dn = eqn.params.get("ragged_dot_dimension_numbers")
    if dn is None:  # ragged_dot(lhs [m, k], rhs [g, k, n])
      contract, batch, groups = (1,), (), (0,)
    else:
      (_, contract), (_, batch) = dn.dot_dimension_numbers
      groups = tuple(dn.rhs_group_dimensions)
    self.note(track, "ragged_dot", _leaf_axes(track, (*batch, *groups)),
              _leaf_axes(track, contract))
    return None

  def conv(self, eqn: Any, ins: list[_Track | None]) -> None:
    if ins[0] is not None or ins[1] is None:
      self.note_all(ins, "conv_general_dilated (as the input)")
      return None
    _, rhs_spec, _ = eqn.params["dimension_numbers"]
    self.note(ins[1], "conv_general_dilated", (), _leaf_axes(ins[1], (rhs_spec[1], *rhs_spec[2:])))
    return None

  def scan(self, eqn: Any, ins: list[_Track | None]) -> list[None]:
    params = eqn.params
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    body = list(ins)
    for i in range(n_consts, n_consts + n_carry):
      if ins[i] is not None:
        self.note(ins[i], "scan (carry)")
        body[i] = None
    for i in range(n_consts + n_carry, len(ins)):
      t = ins[i]
      if t is not None:  # scanning over the leading axis slices one layer per step
        gone = {t.axes[0]} if t.axes[0] is not None else set()
        body[i] = dataclasses.replace(t, axes=t.axes[1:], indexed=t.indexed | gone)
    self.walk(params["jaxpr"].jaxpr, body)
    return [None] * len(eqn.outvars)


def _decide(path: str, shape: tuple[int, ...], uses: list[Use]
            ) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
  """``(stack, ins)`` agreed by every contraction, or an error message."""
  found = [u for u in uses if u.ins is not None]
  listed = "; ".join(str(u) for u in uses) or "none"
  if not found:
    return (f"{path} (shape {shape}): never contracted with activations by the function "
            f"(uses: {listed}); is it a target by mistake, or does the function not use it?")
  stacks = {u.stack for u in found}
  if len(stacks) > 1:
    return f"{path} (shape {shape}): its uses disagree on the stacked axes: {listed}"
  (stack,) = stacks
  options = {u.ins for u in found}
  if len(options) == 1:
    (ins,) = options
  else:
    # A tied weight used as x @ W and as y @ W.T: the two sets are complements. An
    # embedding lookup settles which is the input (its rows); otherwise it is not known.
    free = set(range(len(shape))) - set(stack)
    lookups = {u.ins for u in found if u.op.startswith("gather")}
    complements = len(options) == 2 and set(min(options)) | set(max(options)) == free \
        and not set(min(options)) & set(max(options))
    if not (complements and len(lookups) == 1):
      return (f"{path} (shape {shape}): used with incompatible contractions: {listed}; state "
              "its in_axes in the config")
    (ins,) = lookups
  if len(set(stack) | set(ins)) == len(shape):
    return f"{path} (shape {shape}): every axis is an input or stacked axis ({listed})"
  return stack, ins


def _generalize(path: str) -> str:
  """``^...$`` for ``path`` with every run of digits matching any number (layer indices)."""
  return "^" + re.sub(r"\d+", r"\\d+", re.escape(path)) + "$"


def _patterns(found: dict[str, Any]) -> dict[str, Any]:
  """One pattern per group of paths that differ only in numbers, where all agree; else one
  pattern per path."""
  out: dict[str, Any] = {}
  groups: dict[str, list[str]] = {}
  for path in found:
    groups.setdefault(_generalize(path), []).append(path)
  for pattern, members in groups.items():
    if len(members) > 1 and len({found[p] for p in members}) == 1:
      out[pattern] = found[members[0]]
    else:
      out.update({f"^{re.escape(p)}$": found[p] for p in members})
  return out


def infer_axes(apply_fn: Callable[..., Any], params: PyTree, *example_args: Any,
               config: LoraConfig, **example_kwargs: Any) -> LoraConfig:
  """Reads every target's input and stack axes from how ``apply_fn`` uses it.

  ``apply_fn(params, *example_args, **example_kwargs)`` is traced once on
  abstract values (``jax.ShapeDtypeStruct``s are enough; nothing is computed),
  and each leaf ``config`` targets is followed to where it meets activations
  (see the module docstring for the rules). The returned config equals
  ``config`` with ``in_axes`` and ``stack_axes`` entries, by position, for every
  target, ahead of the existing patterns (numbered layers that agree share one
  pattern), so ``lift`` gives standard LoRA shapes (``A: stack + in + (r,)``)
  for any layout, and the config can be reviewed and saved
  (``to_dict`` / YAML).

  Args:
    apply_fn: the model's function of the parameters, e.g. ``model.apply``.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    *example_args: example inputs (arrays or ``jax.ShapeDtypeStruct``); other
      values are passed through as they are.
    config: the ``LoraConfig`` selecting the targets.
    **example_kwargs: example keyword inputs, as for ``example_args``.

  Returns:
    A ``LoraConfig`` with every target's axes stated.

  Raises:
    ValueError: naming each target that the function never contracts with
      activations, or contracts in incompatible ways, with its uses.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> params = {"w": jnp.zeros((8, 4))}               # stored (out, in)
    >>> apply = lambda p, x: x @ p["w"].T
    >>> config = lj.infer_axes(apply, params, jax.ShapeDtypeStruct((2, 4), jnp.float32),
    ...                        config=lj.LoraConfig(rank=2, targets=r"w$"))
    >>> config.in_axes
    (('^w$', (1,)),)
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}.")
  leaves = leaves_with_paths(params)
  targets = {p: tuple(leaf.shape) for p, leaf in leaves
             if config.is_target(p) and len(getattr(leaf, "shape", ())) >= 2}
  if not targets:
    raise ValueError(f"infer_axes: config.targets {list(config.targets)} select no leaf with "
                     "two or more axes (see lora_jax.paths).")
  abstract = [jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for _, leaf in leaves]
  treedef = jax.tree.structure(params)
  arg_leaves, arg_tree = jax.tree.flatten((example_args, example_kwargs))
  dynamic = [i for i, leaf in enumerate(arg_leaves)
             if isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))]

  def traced(base_leaves, dynamic_leaves):
    values = list(arg_leaves)
    for i, leaf in zip(dynamic, dynamic_leaves):
      values[i] = leaf
    args, kwargs = jax.tree.unflatten(arg_tree, values)
    return apply_fn(jax.tree.unflatten(treedef, base_leaves), *args, **kwargs)

  closed = jax.make_jaxpr(traced)(abstract, [
      jax.ShapeDtypeStruct(np.shape(arg_leaves[i]), arg_leaves[i].dtype) for i in dynamic])
  tracks = [_Track(p, tuple(range(len(targets[p])))) if p in targets else None
            for p, _ in leaves]
  walker = _Walker()
  walker.walk(closed.jaxpr, [*tracks, *[None] * len(dynamic)])
  decided: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
  errors = []
  for path, shape in targets.items():
    result = _decide(path, shape, walker.uses.get(path, []))
    if isinstance(result, str):
      errors.append(result)
    else:
      decided[path] = result
  if errors:
    raise ValueError("infer_axes: cannot tell the axes of these targets from the function:\n"
                     "  - " + "\n  - ".join(errors))
  in_axes = _patterns({p: ins for p, (_, ins) in decided.items()})
  stack_axes = _patterns({p: (stack if stack else 0) for p, (stack, _) in decided.items()})
  # Tables looked up by row: is the same table also contracted as the output head?
  tables = {p: [u for u in walker.uses.get(p, []) if u.ins is not None] for p in decided}
  head_tied = _patterns({p: any(not u.op.startswith("gather") for u in uses)
                         for p, uses in tables.items()
                         if any(u.op.startswith("gather") for u in uses)})
  return dataclasses.replace(config, in_axes=(*in_axes.items(), *config.in_axes),
                             stack_axes=(*stack_axes.items(), *config.stack_axes),
                             head_tied=(*head_tied.items(), *config.head_tied))
