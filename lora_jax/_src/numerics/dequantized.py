"""The factored interpreter's rule for quantized weights: dequantize inside each use.

Any use of a ``QuantizedArray`` (a frozen leaf, or the base ``W`` of an adapted
weight) runs as ``fn(dequantized weights, other operands)`` under a custom VJP:

* the forward pass dequantizes, computes the use and keeps only the codes, the
  scales and the other operands, so the dequantized weight dies with the use;
* the forward dequantization is tied to the use's activation (the same trick as
  below), so XLA schedules it next to the use instead of decoding every weight
  of the model at the start of the step;
* the backward pass dequantizes again (tied to the cotangent, as in
  ``lowrank_dot.anti_cse``, so XLA cannot merge it with the forward one and keep
  the weight alive between the passes) and takes the use's VJP. The use's own
  forward result is dead there and XLA removes it; for an adapted product only
  the r-wide ``x·A`` is recomputed.

So a training step holds the quantized base plus the dequantized weights of the
uses in flight, never a full-precision copy of all weights, and no weight
gradient is formed unless the scales' gradient is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax

from lora_jax._src.numerics.lowrank_dot import anti_cse, one_product, rebuild_input
from lora_jax._src.numerics.qarray import QuantizedArray


def apply(fn: Callable[[list[jax.Array], list[Any]], list[jax.Array]],
          weights: Sequence[QuantizedArray], others: Sequence[Any],
          activation: int | None = None) -> list[jax.Array]:
  """``fn([w.dequantize() for w in weights], others)`` with the VJP described above.

  ``others`` are arrays (or None); ``others[activation]``, if given, is the
  activation the decoding waits for. ``fn`` must not close over traced values.
  """
  metas = list(weights)
  q_arrays = tuple(tuple(w.arrays) for w in weights)

  def run(q_arrays, others):
    if activation is not None:
      flat, tree = jax.tree.flatten(q_arrays)
      tie = lax.stop_gradient(others[activation])
      q_arrays = jax.tree.unflatten(tree, anti_cse(tuple(flat), tie))
    ws = [m.with_arrays(a).dequantize() for m, a in zip(metas, q_arrays)]
    return fn(ws, list(others))

  @jax.custom_vjp
  def f(q_arrays, others):
    return run(q_arrays, others)

  def f_fwd(q_arrays, others):
    with one_product():  # the output is kept for the backward pass: one buffer, not two
      return run(q_arrays, others), (q_arrays, others)

  def f_bwd(res, dys):
    flat, tree = jax.tree.flatten(res)
    outs, to_leaves = rebuild_input(tuple(flat), lambda *leaves: run(
        *jax.tree.unflatten(tree, leaves)), dys[0], True)
    del outs  # dead: XLA removes the forward result
    return jax.tree.unflatten(tree, list(to_leaves(dys)))

  f.defvjp(f_fwd, f_bwd)
  return f(q_arrays, tuple(others))
