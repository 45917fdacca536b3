"""Factored execution: run any function of the parameters with adapted weights kept low rank.

The function is traced to a jaxpr once per outer trace, then evaluated (``walk.py``) with
each adapted weight bound to a ``LowRank`` value. Each primitive that may consume one has a
``Rule`` in ``RULES``: it stays factored where the math allows (``dot_general``,
convolution, embedding ``gather``, ``ragged_dot``, ``transpose``, dtype conversion) and passes
the value through nested calls (``jit``, ``closed_call``, custom derivatives, ``remat``,
``scan``, ``cond``, ``while``). Any other use materializes ``W + scale * A @ B`` for that
use only, with one ``FallbackWarning`` per (primitive, path). The interpreter
also records which values were computed by elementwise equations, so an
adapted product whose input is one of them can recompute that input in the
backward pass instead of keeping it (``recompute.py``).

A ``QuantizedArray`` (a quantized frozen leaf, or the ``W`` of a ``LowRank``)
passes through the same structural primitives (transposes and dtype conversions
are recorded on it) and is dequantized inside each other use
(``dequantized.py``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax._src.adapters import stack
from lora_jax._src.core import lowrank as lr_ops
from lora_jax._src.core.lowrank import LowRank
from lora_jax._src.factored import experts, recompute
from lora_jax._src.factored.walk import walk
from lora_jax._src.numerics import dequantized
from lora_jax._src.numerics.qarray import QuantizedArray, is_quantized


class FallbackWarning(UserWarning):
  """An adapted weight was used by an operation that cannot stay factored.

  The result is still exact: the weight ``W + scale * A @ B`` was formed for that
  use. The message names the primitive, the parameter path and the reason.
  """


@dataclasses.dataclass
class Context:
  """Per-call state of the interpreter: dropout randomness and warnings issued."""

  warned: set[tuple[str, str]]
  rng: jax.Array | None = None
  rate: float = 0.0
  uses: int = 0
  # The dropout mask of the one adapted product of an equation run inside a quantized
  # base's decoding (see _dequantized_eqn), drawn outside it; None: draw from rng.
  mask: Any = None
  # Per adapted path, how the function used it: "in" (x @ W), "out" (x @ W.T) or the
  # primitive's name; read by wrap to catch a kernel whose input axes were guessed wrong.
  seen: dict[str, set[str]] = dataclasses.field(default_factory=dict)

  def with_rng(self, rng: jax.Array | None) -> Context:
    return Context(self.warned, rng, self.rate, seen=self.seen)

  def refuse_mixed(self, value: Any, primitive: str) -> None:
    """A mixed batch's weight (``LowRank.ids``) runs only where a rule has a ``mixed`` form."""
    if isinstance(value, LowRank) and value.ids is not None:
      raise ValueError(
          f"lora_jax: {value.path} is used by `{primitive}`, which has no mixed-batch rule; "
          "adapter_ids supports adapted weights used as x @ W (Dense, DenseGeneral, einsum "
          "over the input axes). Select one adapter instead (stack.select(name)).")

  def record(self, lr: LowRank, use: str) -> None:
    self.seen.setdefault(lr.path, set()).add(use)

  def with_mask(self, mask: Any) -> Context:
    """This context for the rule of one equation whose adapter-branch mask was drawn already."""
    return Context(self.warned, None, self.rate, seen=self.seen, mask=mask)

  def dropout_mask(self, x: jax.Array) -> jax.Array | None:
    """A fresh inverted-dropout mask for one adapter-branch input, or None when off."""
    if self.mask is not None:
      return self.mask
    if self.rng is None or self.rate == 0.0:
      return None
    key = jax.random.fold_in(self.rng, self.uses)
    self.uses += 1
    keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
    return keep.astype(x.dtype) / np.asarray(1.0 - self.rate, x.dtype)

  def materialize(self, value: Any, primitive: str, reason: str) -> Any:
    if isinstance(value, QuantizedArray):  # exact, no adapter: no warning
      return value.dequantize()
    self.refuse_mixed(value, primitive)
    if not isinstance(value, LowRank):
      return value
    if (primitive, value.path) not in self.warned:
      self.warned.add((primitive, value.path))
      hint = ("Use wrap(..., mode='merge') to silence this, or report the model pattern."
              if not value.layout_guessed else
              f"Its input axes {value.ins} were guessed from its shape (no in_axes pattern "
              "names it): if the model contracts other axes (einsum kernels such as Tunix's "
              "and Gemma's), adapters of the wrong shape are what breaks the factored form. "
              "Read them from the model: config = lj.infer_axes(apply_fn, params, "
              "*example_args, config=config), or state LoraConfig(in_axes=...); "
              "wrap(..., mode='merge') only silences this.")
      warnings.warn(
          f"lora_jax: {value.path} is used by `{primitive}`, which cannot run in factored form "
          f"({reason}); forming W + scale * A @ B for this use. The result is exact but costs "
          f"a weight-sized product and gradient. {hint}", FallbackWarning, stacklevel=2)
    return value.materialize()


def _bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns: Sequence[Any] = ()
  if isinstance(bind_params, tuple):  # JAX < 0.7 returns (subfuns, params)
    subfuns, bind_params = bind_params
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  return list(out) if eqn.primitive.multiple_results else [out]


def interpret(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list[Any]:
  """Evaluates ``jaxpr`` where some inputs may be ``LowRank``; outputs may be too."""
  producers: dict[Any, tuple[int, Any]] = {}  # computed by cheap equations: (position, eqn)

  def step(position: int, eqn: Any, invals: list[Any], read: Callable[[Any], Any]
           ) -> list[Any]:
    if any(isinstance(v, _STRUCTURED) for v in invals):
      return _lowrank_eqn(eqn, invals, ctx,
                          lambda var, flops: _recompute(var, producers, read, flops))
    outs = _bind(eqn, invals)
    if recompute.cheap(eqn):
      producers.update((var, (position, eqn)) for var in eqn.outvars)
    return outs

  return walk(jaxpr, consts, args, step)


def _recompute(var: Any, producers: dict[Any, tuple[int, Any]], read: Callable[[Any], Any],
               product_flops: float) -> Any:
  """``(fn, leaf values)`` recomputing ``var`` elementwise, or None (see recompute.py)."""
  found = recompute.cone(var, producers, product_flops)
  if found is None:
    return None
  eqns, leaves = found
  return recompute.replay(eqns, leaves, var, _bind), [read(v) for v in leaves]


def _materialized(values: Sequence[Any], ctx: Context, primitive: str, reason: str) -> list[Any]:
  return [ctx.materialize(v, primitive, reason) for v in values]


def _record_uses(invals: Sequence[Any], ctx: Context, use: str) -> None:
  for value in invals:
    if isinstance(value, LowRank):
      ctx.record(value, use)


def _fallback(eqn: Any, invals: Sequence[Any], ctx: Context, reason: str) -> list[Any]:
  _record_uses(invals, ctx, eqn.primitive.name)
  return _bind(eqn, _materialized(invals, ctx, eqn.primitive.name, reason))


_STRUCTURED = (LowRank, QuantizedArray)


def _quantized(v: Any) -> QuantizedArray | None:
  if isinstance(v, QuantizedArray):
    return v
  if isinstance(v, LowRank) and is_quantized(v.w):
    return v.w
  return None


def _adapted_input(eqn: Any, invals: list[Any]) -> tuple[int, float] | None:
  """``(position, product FLOPs)`` of the activation of an adapted product (the input
  its adapter's gradient needs), or None."""
  name = eqn.primitive.name
  out_size = math.prod(eqn.outvars[0].aval.shape)
  if name == "dot_general" and len(invals) == 2:
    rhs = isinstance(invals[1], LowRank)
    if rhs == isinstance(invals[0], LowRank):
      return None
    position = 0 if rhs else 1
    dims = eqn.params["dimension_numbers"][0][position]
    return position, 2.0 * out_size * math.prod(invals[position].shape[d] for d in dims)
  if name in ("ragged_dot_general", "ragged_dot") and isinstance(invals[1], LowRank):
    return 0, 2.0 * out_size * invals[0].shape[-1]
  return None


def _dequantized_eqn(eqn: Any, invals: list[Any], ctx: Context,
                     recompute_of: Callable[[Any, float], Any]) -> list[Any]:
  """Runs one equation with its quantized weights dequantized inside (``dequantized.py``).

  An adapted product whose input is cheap to recompute keeps what it is computed from
  instead (``recompute.py``), as the float rules do."""
  weights = [q for q in map(_quantized, invals) if q is not None]
  adapted = _adapted_input(eqn, invals)
  cone = None
  if adapted is not None and isinstance(invals[adapted[0]], jax.Array):
    cone = recompute_of(eqn.invars[adapted[0]], adapted[1])
  others: list[Any] = []
  for i, v in enumerate(invals):
    if isinstance(v, LowRank):
      others.extend((v.a, v.b) if v.m is None else (v.a, v.b, v.m))
    elif not isinstance(v, QuantizedArray):
      recomputed = cone is not None and i == adapted[0]
      others.append(v if isinstance(v, (jax.Array, np.ndarray)) and not recomputed else None)
  n_cone = 0 if cone is None else len(cone[1])
  others.extend([] if cone is None else cone[1])
  mask = None
  if ctx.rng is not None and ctx.rate > 0 and any(isinstance(v, LowRank) for v in invals):
    act = [v for v in invals if isinstance(v, jax.Array) and jnp.issubdtype(v.dtype,
                                                                             jnp.floating)]
    mask = ctx.dropout_mask(act[0]) if act else None
  others.append(mask)

  def fn(ws: list[jax.Array], arrays: list[Any]) -> list[jax.Array]:
    ws_iter, arrays_iter = iter(ws), iter(arrays)
    n_in = len(arrays) - n_cone - 1
    leaves, preset = arrays[n_in:n_in + n_cone], arrays[-1]
    rebuilt = []
    for i, v in enumerate(invals):
      if isinstance(v, LowRank):  # W dequantized (or as it was), then its factors
        w = next(ws_iter) if is_quantized(v.w) else v.w
        a, b, *m = (next(arrays_iter) for _ in range(2 if v.m is None else 3))
        rebuilt.append(v.replace(w=w, a=a, b=b, m=m[0] if m else None))
      elif isinstance(v, QuantizedArray):
        rebuilt.append(next(ws_iter))
      else:
        a = next(arrays_iter)
        if cone is not None and i == adapted[0]:
          a = cone[0](*leaves)
        rebuilt.append(v if a is None else a)
    if not any(isinstance(v, LowRank) for v in rebuilt):
      return _bind(eqn, rebuilt)
    inner = ctx.with_mask(preset)
    x_var = None if cone is None else eqn.invars[adapted[0]]
    return _lowrank_eqn(eqn, rebuilt, inner, lambda var, flops: (
        (cone[0], leaves) if cone is not None and var is x_var else None))

  sizes = [(v.size, i) for i, v in enumerate(others)
           if isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jnp.floating)]
  return dequantized.apply(fn, weights, others, max(sizes)[1] if sizes else None)


def _mixed_dot(eqn: Any, invals: list[Any], ctx: Context) -> list[jax.Array]:
  """``x·W`` with each example's own adapter (``LowRank.ids``, ``stack.mixed_product``)."""
  x, w = invals
  rhs = isinstance(w, LowRank)
  lr, x = (w, x) if rhs else (x, w)
  if isinstance(x, LowRank):
    ctx.refuse_mixed(x, "dot_general of two adapted weights")
  (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
  x_c, w_c = (lhs_c, rhs_c) if rhs else (rhs_c, lhs_c)
  if lr.stack or lhs_b or rhs_b or sorted(w_c) != sorted(lr.ins) or lr.m is not None:
    ctx.refuse_mixed(lr, "dot_general (not x @ W over all input axes of an unstacked, "
                     "non-DoRA weight)")
  ctx.record(lr, "in")
  operands = [x, lr.w] if rhs else [lr.w, x]
  if is_quantized(lr.w):  # decoded inside the product, as any quantized product
    base = _dequantized_eqn(eqn, operands, ctx, lambda var, flops: None)[0]
  else:
    base = _bind(eqn, operands)[0]
  x_contract = tuple(x_c[list(w_c).index(p)] for p in lr.ins)
  n_x, n_w = x.ndim - len(x_c), len(lr.outs)
  if not rhs:  # W @ x (jnp.einsum picks the order): x's free axes first, and back after
    base = jnp.transpose(base, [*range(n_w, n_w + n_x), *range(n_w)])
  out = stack.mixed_product(x, base, lr.a, lr.b, lr.ids, x_contract=x_contract,
                            ins=lr.ins, outs=lr.outs, path=lr.path)
  return [out if rhs else jnp.transpose(out, [*range(n_x, n_x + n_w), *range(n_x)])]


RecomputeOf = Callable[[Any, float], Any]


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one primitive runs when an input is an adapted (``LowRank``) or quantized weight.

  ``passes_through``: the primitive moves or restructures its inputs without computing with
  them (a transpose, a cast, a call, a loop), so a quantized base and a mixed batch's weight
  go through it as values; any other use computes with the weight.
  ``mixed``: the use with a mixed batch's weight (``LowRank.ids``: one adapter per example);
  None refuses such a weight here.
  """

  apply: Callable[[Any, list[Any], Context, RecomputeOf], list[Any]]
  passes_through: bool = False
  mixed: Callable[[Any, list[Any], Context], list[Any]] | None = None


def _lowrank_eqn(eqn: Any, invals: list[Any], ctx: Context, recompute_of: RecomputeOf
                 ) -> list[Any]:
  """Runs one equation with a structured input by its rule in ``RULES``, or forms the weight.

  A use that computes with a weight (a rule that does not pass it through, or no rule) runs
  a mixed batch's weight by the rule's ``mixed`` form (refused without one), and decodes a
  quantized base inside the use (``dequantized.py``); the rule itself then sees float weights.
  """
  name = eqn.primitive.name
  rule = RULES.get(name)
  if rule is None or not rule.passes_through:
    if any(isinstance(v, LowRank) and v.ids is not None for v in invals):
      if rule is None or rule.mixed is None:
        for v in invals:
          ctx.refuse_mixed(v, name)
      return rule.mixed(eqn, invals, ctx)
    if any(_quantized(v) is not None for v in invals):
      return _dequantized_eqn(eqn, invals, ctx, recompute_of)
  if rule is None:
    return _fallback(eqn, invals, ctx, "no factored rule for this primitive")
  return rule.apply(eqn, invals, ctx, recompute_of)


def _dot_general(eqn: Any, invals: list[Any], ctx: Context, recompute_of: RecomputeOf
                 ) -> list[Any]:
  params = eqn.params
  x, w = invals
  if isinstance(x, LowRank) and isinstance(w, LowRank):
    return _fallback(eqn, invals, ctx, "both operands are adapted weights")
  rhs = isinstance(w, LowRank)
  lr, x = (w, x) if rhs else (x, w)
  ctx.record(lr, lr_ops.contracted_side(lr, params, rhs) or "dot_general")
  mask = ctx.dropout_mask(x)
  contracted = math.prod(x.shape[d] for d in params["dimension_numbers"][0][0 if rhs else 1])
  flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted
  # Rules accumulate in float32 or wider and round once to the original result's dtype.
  out_dtype = eqn.outvars[0].aval.dtype
  out = lr_ops.dot_general_apply(x, lr, rhs, params, mask, out_dtype,
                                 recompute_of(eqn.invars[0 if rhs else 1], flops))
  if out is None:
    out = experts.batched_dot_apply(x, lr, rhs, params, mask, out_dtype)
  if out is None:
    return _fallback(eqn, invals, ctx, "the contraction is neither over all input axes nor "
                     "over all output axes of the weight, or uses batch dimensions")
  return [out]


def _conv(eqn: Any, invals: list[Any], ctx: Context, recompute_of: RecomputeOf) -> list[Any]:
  _record_uses(invals, ctx, eqn.primitive.name)
  x, w = invals
  if isinstance(w, LowRank) and not isinstance(x, LowRank):
    out = lr_ops.conv_apply(x, w, eqn.params, ctx.dropout_mask(x), eqn.outvars[0].aval.dtype)
    if out is not None:
      return [out]
  return _fallback(eqn, invals, ctx, "only an ungrouped convolution whose kernel's last axis "
                   "is its output-feature axis stays factored")


def _gather(eqn: Any, invals: list[Any], ctx: Context, recompute_of: RecomputeOf) -> list[Any]:
  _record_uses(invals, ctx, eqn.primitive.name)
  if isinstance(invals[0], LowRank) and not isinstance(invals[1], LowRank):
    out = lr_ops.gather_apply(invals[0], invals[1], eqn.params)
    if out is not None:
      return [out]
  return _fallback(eqn, invals, ctx, "only row lookups over the input axes stay factored")


def _ragged_dot(eqn: Any, invals: list[Any], ctx: Context, recompute_of: RecomputeOf
                ) -> list[Any]:
  x, w, group_sizes = invals[:3]
  if isinstance(w, LowRank) and not isinstance(x, LowRank) and len(invals) == 3:
    ctx.record(w, "in")
    flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * x.shape[-1]
    out = experts.ragged_dot_apply(x, w, group_sizes, eqn.params, ctx.dropout_mask(x),
                                   eqn.outvars[0].aval.dtype,
                                   recompute_of(eqn.invars[0], flops))
    if out is not None:
      return [out]
  return _fallback(eqn, invals, ctx, "only ragged_dot(x, W[groups, in, out]) over the "
                   "weight's stacked group axis stays factored")


def _transpose(eqn: Any, invals: list[Any], ctx: Context, recompute_of: RecomputeOf
               ) -> list[Any]:
  (value,) = invals
  permutation = tuple(eqn.params["permutation"])
  if isinstance(value, QuantizedArray):
    return [value.transpose(permutation)]
  return [lr_ops.transpose_apply(value, permutation)]


def _structural(eqn: Any, invals: list[Any], ctx: Context, recompute_of: RecomputeOf
                ) -> list[Any]:
  """A dtype conversion, sharding constraint or copy: recorded on the weight it moves."""
  name, params = eqn.primitive.name, eqn.params
  (value,) = invals
  cast = name == "convert_element_type"
  if isinstance(value, QuantizedArray):
    if not cast:
      return [value]
    if jnp.issubdtype(params["new_dtype"], jnp.floating):
      return [value.astype(params["new_dtype"])]
    return _bind(eqn, [value.dequantize()])
  if is_quantized(value.w):
    return [value.replace(w=value.w.astype(params["new_dtype"]) if cast else value.w)]
  return [value.replace(w=eqn.primitive.bind(value.w, **params))]


def _call(eqn: Any, invals: list[Any], ctx: Context, recompute_of: RecomputeOf) -> list[Any]:
  body = recompute.CALL_BODIES[eqn.primitive.name]
  if body not in eqn.params:
    return _fallback(eqn, invals, ctx, "no factored rule for this primitive")
  inner = eqn.params[body]
  return interpret(inner.jaxpr, inner.consts, invals, ctx)


def _flatten(values: Sequence[Any]) -> tuple[list[Any], Callable[[Sequence[Any]], list[Any]]]:
  """Splits ``LowRank`` and ``QuantizedArray`` values into their arrays, with the inverse."""
  flat: list[Any] = []
  layout: list[Any] = []
  for v in values:
    layout.append(v if isinstance(v, _STRUCTURED) else None)
    flat.extend(v.arrays if isinstance(v, _STRUCTURED) else (v,))

  def rebuild(arrays: Sequence[Any]) -> list[Any]:
    out, i = [], 0
    for meta in layout:
      if meta is None:
        out.append(arrays[i])
        i += 1
      else:
        n = len(meta.arrays)
        out.append(meta.with_arrays(tuple(arrays[i:i + n])))
        i += n
    return out

  return flat, rebuild


def _remat(eqn: Any, invals: list[Any], ctx: Context) -> list[Any]:
  params = eqn.params
  flat, rebuild = _flatten(invals)

  def body(*arrays):
    outs = interpret(params["jaxpr"], (), rebuild(arrays), ctx)
    return _materialized(outs, ctx, "remat", "a checkpointed function returned the weight")

  return list(jax.checkpoint(body, prevent_cse=params["prevent_cse"],
                             policy=params["policy"])(*flat))


def _scan(eqn: Any, invals: list[Any], ctx: Context) -> list[Any]:
  params = eqn.params
  n_consts, n_carry = params["num_consts"], params["num_carry"]
  consts = invals[:n_consts]
  init = _materialized(invals[n_consts:n_consts + n_carry], ctx, "scan",
                       "an adapted weight in a scan carry")
  # A structured value scanned over its stacked axis keeps its arrays; the per-step value
  # is the same value with that axis dropped from its metadata, over the sliced arrays.
  xs = [_sliced_layout(v, ctx) if isinstance(v, _STRUCTURED) else v
        for v in invals[n_consts + n_carry:]]
  xs_flat, rebuild = _flatten(xs)
  keys = None if ctx.rng is None else jax.random.split(ctx.rng, params["length"])
  closed = params["jaxpr"]

  def body(carry, sliced):
    arrays, key = sliced
    x_vals = rebuild(arrays)
    outs = interpret(closed.jaxpr, closed.consts, [*consts, *carry, *x_vals],
                     ctx.with_rng(key) if key is not None else ctx)
    outs = _materialized(outs, ctx, "scan", "a scan body returned the weight")
    return outs[:n_carry], outs[n_carry:]

  carry, ys = lax.scan(body, init, (xs_flat, keys), length=params["length"],
                       reverse=params["reverse"], unroll=params["unroll"],
                       _split_transpose=params.get("_split_transpose", False))
  return [*carry, *ys]


def _sliced_layout(v: Any, ctx: Context) -> Any:
  ctx.refuse_mixed(v, "scan")
  dropped = v.drop_leading_axis()
  if dropped is None:
    return ctx.materialize(v, "scan", "scanned over an axis that is not a stacked-layer axis")
  return dropped


def _cond(eqn: Any, invals: list[Any], ctx: Context) -> list[Any]:
  index, operands = invals[0], invals[1:]
  flat, rebuild = _flatten(operands)

  def branch(closed):
    def run(*arrays):
      outs = interpret(closed.jaxpr, closed.consts, rebuild(arrays), ctx)
      return _materialized(outs, ctx, "cond", "a branch returned the weight")
    return run

  return list(lax.switch(index, [branch(b) for b in eqn.params["branches"]], *flat))


def _while(eqn: Any, invals: list[Any], ctx: Context) -> list[Any]:
  params = eqn.params
  nc, nb = params["cond_nconsts"], params["body_nconsts"]
  cond_consts, body_consts = invals[:nc], invals[nc:nc + nb]
  init = _materialized(invals[nc + nb:], ctx, "while", "an adapted weight in a loop carry")
  cond_jaxpr, body_jaxpr = params["cond_jaxpr"], params["body_jaxpr"]

  def cond_fn(carry):
    return interpret(cond_jaxpr.jaxpr, cond_jaxpr.consts, [*cond_consts, *carry], ctx)[0]

  def body_fn(carry):
    outs = interpret(body_jaxpr.jaxpr, body_jaxpr.consts, [*body_consts, *carry], ctx)
    return _materialized(outs, ctx, "while", "a loop body returned the weight")

  return list(lax.while_loop(cond_fn, body_fn, init))


def _control(run: Callable[[Any, list[Any], Context], list[Any]]) -> Rule:
  return Rule(lambda eqn, invals, ctx, recompute_of: run(eqn, invals, ctx), passes_through=True)


# One rule per primitive; any other primitive forms the weight for that use (FallbackWarning).
RULES: dict[str, Rule] = {
    "dot_general": Rule(_dot_general, mixed=_mixed_dot),
    "conv_general_dilated": Rule(_conv),
    "gather": Rule(_gather),
    "ragged_dot_general": Rule(_ragged_dot),
    "ragged_dot": Rule(_ragged_dot),
    "transpose": Rule(_transpose, passes_through=True),
    **{name: Rule(_structural, passes_through=True)
       for name in ("convert_element_type", "sharding_constraint", "copy", "copy_p")},
    **{name: _control(_remat) for name in ("remat", "remat2", "checkpoint")},
    "scan": _control(_scan),
    "cond": _control(_cond),
    "while": _control(_while),
    **{name: Rule(_call, passes_through=True) for name in recompute.CALL_BODIES},
}


def _is_dynamic(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def run_factored(apply_fn: Callable[..., Any], base: Any, lowranks: dict[str, LowRank],
                 leaf_paths: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any],
                 ctx: Context) -> Any:
  """Calls ``apply_fn(base, *args, **kwargs)`` with the leaves at ``lowranks`` factored."""
  base_leaves, base_tree = jax.tree.flatten(base, is_leaf=is_quantized)
  arg_leaves, arg_tree = jax.tree.flatten((args, kwargs))
  dynamic = [i for i, leaf in enumerate(arg_leaves) if _is_dynamic(leaf)]
  out_tree: list[Any] = []

  def traced(base_leaves, dynamic_leaves):
    leaves = list(arg_leaves)
    for i, leaf in zip(dynamic, dynamic_leaves):
      leaves[i] = leaf
    call_args, call_kwargs = jax.tree.unflatten(arg_tree, leaves)
    out = apply_fn(jax.tree.unflatten(base_tree, base_leaves), *call_args, **call_kwargs)
    flat, tree = jax.tree.flatten(out)
    out_tree.append(tree)
    return flat

  # NumPy inputs enter as JAX arrays, as jit would pass them: canonical dtypes (float64 is
  # float32 without x64), so that the rules see the dtypes the jaxpr was traced with.
  dynamic_leaves = [jnp.asarray(arg_leaves[i]) if isinstance(arg_leaves[i], (np.ndarray,
                                                                            np.generic))
                    else arg_leaves[i] for i in dynamic]
  # The function is traced with a quantized leaf's logical shape and dtype.
  closed = jax.make_jaxpr(traced)(
      [jax.ShapeDtypeStruct(v.shape, v.dtype) if is_quantized(v) else v for v in base_leaves],
      dynamic_leaves)
  inputs = [lowranks.get(path, leaf) for path, leaf in zip(leaf_paths, base_leaves)]
  outs = interpret(closed.jaxpr, closed.consts, [*inputs, *dynamic_leaves], ctx)
  outs = _materialized(outs, ctx, "return", "the function returned the adapted weight")
  return jax.tree.unflatten(out_tree[0], outs)
