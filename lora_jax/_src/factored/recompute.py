"""Which adapter inputs are cheap to recompute, and how.

LoRA's ``dA = xᵀ·(s·dy·Bᵀ)`` needs the input ``x`` of every adapted product in
the backward pass, while the base model's own backward pass often does not:
``x`` may be a GELU output or a LayerNorm output that only the (frozen) weight
consumed. Keeping it costs one activation-sized buffer per adapted product.
When ``x`` is computed from earlier values by elementwise work only, the
interpreter records that computation (its *cone*) and the adapted product
keeps the earlier values and recomputes ``x`` during the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from jax.extend import core as jcore

# Primitives whose recomputation costs one pass over their operands.
ELEMENTWISE = frozenset({
    "abs", "add", "and", "broadcast_in_dim", "cbrt", "clamp", "convert_element_type", "cos",
    "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expand_dims", "expm1", "ge", "gt",
    "integer_pow", "le", "log", "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg", "not",
    "or", "pow", "reshape", "rsqrt", "select_n", "sign", "sin", "sqrt", "square", "squeeze",
    "slice", "stop_gradient", "sub", "tan", "tanh"})
# Elementwise primitives whose derivative needs no value of the forward pass (or only a
# constant operand's): the model's own backward pass through them keeps nothing.
_LINEAR = frozenset({
    "add", "broadcast_in_dim", "convert_element_type", "expand_dims", "neg", "reshape",
    "slice", "squeeze", "stop_gradient", "sub", "and", "or", "not", "eq", "ne", "ge", "gt",
    "le", "lt", "sign"})
# Call primitives and the parameter holding their body (shared with the interpreter).
CALL_BODIES = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
               "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
               "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
# Calls that may be recomputed when their body is all elementwise (``jax.nn.gelu`` is jitted).
_RECOMPUTABLE_CALLS = frozenset({"pjit", "jit", "closed_call", "custom_jvp_call"})
MAX_EQUATIONS = 64
# Keep the leaves only if they are at most this much larger than the input itself.
MAX_LEAF_RATIO = 1.25
# Recompute only if that costs at most this fraction of the adapted product's FLOPs
# (counting one operation per output element of every elementwise equation).
MAX_WORK_RATIO = 1 / 32


def cheap(eqn: Any) -> bool:
  """Whether ``eqn`` is elementwise work, directly or inside a call."""
  name = eqn.primitive.name
  if name in ELEMENTWISE:
    return True
  body = eqn.params.get(CALL_BODIES[name]) if name in _RECOMPUTABLE_CALLS else None
  if body is None:
    return False
  return all(cheap(e) for e in getattr(body, "jaxpr", body).eqns)


def _nbytes(var: Any) -> int:
  aval = var.aval
  return int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def _residuals(eqns: Any) -> int:
  """Bytes the model's own backward pass keeps for ``eqns`` if ``x`` is not recomputed.

  An estimate: the outputs of every equation whose derivative needs forward values
  (a product of two computed values, a ``tanh``, a call such as ``jax.nn.gelu``).
  Recomputing ``x`` from its leaves inside the adapted product's backward pass
  makes those values dead in the forward pass.
  """
  total = 0
  for eqn in eqns:
    name = eqn.primitive.name
    if name in _LINEAR:
      continue
    if name == "mul" and any(isinstance(v, jcore.Literal) for v in eqn.invars):
      continue
    total += sum(_nbytes(v) for v in eqn.outvars)
  return total


def _work(eqns: Any) -> int:
  """Output elements of ``eqns``, counting the equations inside call bodies."""
  total = 0
  for eqn in eqns:
    name = eqn.primitive.name
    body = eqn.params.get(CALL_BODIES[name]) if name in CALL_BODIES else None
    if body is not None:
      total += _work(getattr(body, "jaxpr", body).eqns)
    else:
      total += sum(int(np.prod(v.aval.shape)) for v in eqn.outvars)
  return total


def _crosses_residual(eqns: Sequence[Any], leaves: Iterable[Any], size: int) -> bool:
  """Whether the cone adds (or subtracts) two values computed from different large leaves.

  That is a residual connection: ``x + norm(attention(x))``. With Gemma's post-norms every
  step of a residual stream is elementwise, so a cone through it reaches back across layers;
  the model's backward pass keeps those values for its own gradients, so recomputing from
  them saves no memory and repeats the work in every adapted product that reads the stream
  (measured on Gemma 3: 13% more FLOPs and more temporary memory). A gated MLP's
  ``gelu(gate) * up`` multiplies its two leaves and stays recomputable.
  """
  depends: dict[Any, frozenset[int]] = {
      v: frozenset({i}) if _nbytes(v) >= size else frozenset() for i, v in enumerate(leaves)}
  for eqn in eqns:
    sources = [depends.get(v, frozenset()) for v in eqn.invars
               if not isinstance(v, jcore.Literal)]
    if (eqn.primitive.name in ("add", "sub") and len(sources) == 2 and all(sources)
        and not sources[0] & sources[1]):
      return True
    joined = frozenset().union(*sources)
    for out in eqn.outvars:
      depends[out] = joined
  return False


def cone(var: Any, producers: dict[Any, tuple[int, Any]],
         product_flops: float) -> tuple[list[Any], list[Any]] | None:
  """``(equations, leaves)``: how ``var`` is computed elementwise from ``leaves``.

  ``producers`` maps each variable computed so far by a cheap equation to that
  equation's position and the equation. Returns None when ``var`` has no cheap
  producer, or when the cone is larger than ``MAX_EQUATIONS``. Leaves larger than
  ``var`` (beyond ``MAX_LEAF_RATIO``) are kept only if what the model's backward pass
  would keep for the cone (``_residuals``) makes up the difference and recomputing
  costs at most ``MAX_WORK_RATIO`` of ``product_flops``, the adapted product's: a
  gated MLP's ``gelu(gate) * up`` from the one projection holding both.
  """
  if var not in producers:
    return None
  found: dict[int, Any] = {}  # position -> equation
  leaves: dict[Any, None] = {}
  stack = [var]
  while stack:
    v = stack.pop()
    if v not in producers:
      leaves[v] = None
      continue
    position, eqn = producers[v]
    if position not in found:
      found[position] = eqn
      if len(found) > MAX_EQUATIONS:
        return None
      stack.extend(u for u in eqn.invars if not isinstance(u, jcore.Literal))
  if _crosses_residual([found[i] for i in sorted(found)], leaves, _nbytes(var)):
    return None
  kept = sum(_nbytes(v) for v in leaves)
  if kept > _nbytes(var) * MAX_LEAF_RATIO and (
      kept > _nbytes(var) * MAX_LEAF_RATIO + _residuals(found.values())
      or _work(found.values()) > product_flops * MAX_WORK_RATIO):
    return None
  return [found[i] for i in sorted(found)], list(leaves)


def replay(eqns: Sequence[Any], leaves: Sequence[Any], out: Any,
           bind: Callable[[Any, list[Any]], list[Any]]) -> Callable[..., Any]:
  """A function of the leaves' values that re-runs ``eqns`` and returns ``out``'s value."""

  def fn(*values: Any) -> Any:
    env = dict(zip(leaves, values))
    for eqn in eqns:
      outs = bind(eqn, [v.val if isinstance(v, jcore.Literal) else env[v] for v in eqn.invars])
      env.update(zip(eqn.outvars, outs))
    return env[out]

  return fn
