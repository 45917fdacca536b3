"""The one jaxpr walk: evaluating a jaxpr equation by equation with values of any kind.

The factored interpreter walks a jaxpr with arrays, ``LowRank`` and quantized values; axis
inference walks it with the axes of the leaves it follows. Both bind the inputs, read
literals, hand each equation's input values to a step that returns the outputs (or None to
leave them unset), and skip dropped outputs; they differ only in their step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

# jax.extend.core has DropVar from JAX 0.8 on; JAX 0.7 keeps it in jax.core only.
DropVar = getattr(jcore, "DropVar", None) or jax.core.DropVar

# (position, eqn, input values, read) -> output values or None; read(var) is any variable's
# value so far (what the interpreter's recompute needs).
Step = Callable[[int, Any, list[Any], Callable[[Any], Any]], Sequence[Any] | None]
_UNSET = object()


def walk(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], step: Step, *,
         missing: Any = _UNSET) -> list[Any]:
  """Evaluates ``jaxpr``: ``step`` gives each equation's outputs from its inputs.

  Args:
    jaxpr: a ``jax.extend.core.Jaxpr`` (a closed jaxpr's ``.jaxpr``).
    consts: values of its constvars.
    args: values of its invars (``missing`` stands for one that is not followed).
    step: ``step(position, eqn, input values, read)`` returns the equation's output values,
      or None to leave them unset; ``read(var)`` is any variable's value so far.
    missing: the value of a variable that was never set; without it such a read is a
      ``KeyError`` (every variable is expected to have a value).

  Returns:
    The values of the jaxpr's outputs. A literal reads as its value.
  """
  env: dict[Any, Any] = {}

  def read(v: Any) -> Any:
    if isinstance(v, jcore.Literal):
      return v.val
    return env[v] if missing is _UNSET else env.get(v, missing)

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    if missing is _UNSET or val is not missing:
      env[var] = val
  for position, eqn in enumerate(jaxpr.eqns):
    outs = step(position, eqn, [read(v) for v in eqn.invars], read)
    if outs is None:
      continue
    for var, val in zip(eqn.outvars, outs):
      if not isinstance(var, DropVar) and (missing is _UNSET or val is not missing):
        env[var] = val
  return [read(v) for v in jaxpr.outvars]
