"""``wrap``: run any function of the parameters on ``LoraParams``."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lora_jax._src.adapters.merge import check_adapters, fold
from lora_jax._src.adapters.stack import AdapterStack, check_ids, one_adapter_shapes
from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.lowrank import LowRank
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.plan import Target, plan
from lora_jax._src.core.tree import PyTree, leaves_with_paths, lookup, map_with_paths
from lora_jax._src.factored.interpreter import Context, run_factored
from lora_jax._src.numerics.qarray import is_quantized

_MODES = ("factored", "merge")


def freeze(base: PyTree, config: LoraConfig) -> PyTree:
  """Puts every base leaf not matched by ``config.trainable`` behind ``stop_gradient``."""

  def one(path: str, leaf: Any) -> Any:
    if is_quantized(leaf):
      if config.is_trainable(path):
        raise ValueError(f"{path}: quantized leaves are frozen and cannot be trained in full; "
                         "leave it out of LoraConfig.trainable, or of lora_jax.quantize's "
                         "targets.")
      return jax.tree.map(jax.lax.stop_gradient, leaf)
    if config.is_trainable(path) or not isinstance(leaf, (jax.Array, np.ndarray)):
      return leaf
    return jax.lax.stop_gradient(leaf)

  return map_with_paths(one, base)


def _check_layouts(targets: dict[str, Target], seen: dict[str, set[str]]) -> None:
  """Refuses kernels whose guessed input axes the function contracts as output axes."""
  wrong = [t for path, t in targets.items() if not t.layout_certain and seen.get(path) == {"out"}]
  if not wrong:
    return
  lines = [f"{t.path}: shape {t.shape}; the axis rule took axes {t.in_axes} as input, but the "
           f"function contracts axes {t.out_axes} with its input (x @ W.T). Set "
           f"in_axes={{{re.escape(t.path) + '$'!r}: {t.out_axes}}}" for t in wrong]
  raise ValueError(
      "These kernels are stored (out, in) (as Hugging Face GPT-2's are): their adapters would "
      "put A on the output side, which is not standard LoRA and exports wrongly to PEFT. State "
      "the layout in LoraConfig.in_axes and lift again:\n  - " + "\n  - ".join(lines))


def wrap(apply_fn: Callable[..., Any], config: LoraConfig, *, mode: str = "factored",
         params_kwarg: str | None = None) -> Callable[..., Any]:
  """Makes ``apply_fn(params, *args, **kwargs)`` take ``LoraParams`` instead.

  ``wrap(apply_fn, config)(lp, *args, **kwargs)`` equals
  ``apply_fn(merge(lp, config), *args, **kwargs)``. Base leaves not listed in
  ``config.trainable`` are behind ``jax.lax.stop_gradient``, so ``jax.grad``
  with respect to ``lp`` reaches only the adapters and ``trainable`` leaves.
  Pass ``lora_jax.disable(lp)`` to run the base model exactly.

  In the default ``"factored"`` mode every use of an adapted weight computes
  ``x·W + scale·(x·A)·B`` (or the transposed, convolution or embedding-lookup
  form) without forming ``W + scale·A·B``, and no gradient for ``W`` is
  computed. It works for any JAX function of the parameters (Linen ``apply``,
  NNX ``merge`` + call, plain ``jnp`` code). A use that cannot stay factored
  forms the weight for that use and emits one ``FallbackWarning`` per
  (primitive, path). ``mode="merge"`` forms every adapted weight up front.

  LoRA dropout (``config.dropout``) applies to the input of each adapter branch
  in factored mode when the call passes ``lora_rng=key``; without it dropout is
  off (evaluation).

  With ``lp.adapters`` an ``AdapterStack`` (``lora_jax.stack_adapters``) and
  ``adapter_ids=ids`` (one index per example, ``-1`` for the base alone), every
  example runs with its own adapter (``stack.py``).

  In factored mode, a kernel whose input axes the axis rule guessed (no
  ``config.in_axes`` pattern, and shapes that do not settle it) but which the
  function only ever contracts over its *output* axes (``x @ W.T``: a kernel
  stored ``(out, in)``) is an error that gives the ``in_axes`` to set.

  Args:
    apply_fn: any function whose first argument is the parameter tree, such as
      a Flax ``model.apply``, or that takes it as the keyword ``params_kwarg``.
    config: the ``LoraConfig`` used to lift.
    mode: ``"factored"`` (default) or ``"merge"``.
    params_kwarg: the keyword that ``apply_fn`` takes the parameters by, e.g.
      ``"params"`` for a Hugging Face Flax model (``model.__call__(input_ids,
      params=...)``); the wrapped function still takes ``lp`` first.

  Returns:
    ``fn(lp, *args, lora_rng=None, adapter_ids=None, **kwargs)``.

  Raises:
    ValueError: for an unknown mode, ``lora_rng`` with ``mode="merge"`` and
      dropout, or a kernel used as ``x @ W.T`` whose layout was guessed; a stack
      without ``adapter_ids`` (or ids without a stack), ids out of range, or an
      adapted weight used where mixed batches have no rule.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=2)
    >>> lp = lj.lift({"kernel": jnp.eye(3)}, config, key=jax.random.key(0))
    >>> apply = lj.wrap(lambda p, x: x @ p["kernel"], config)
    >>> apply(lp, jnp.ones((1, 3))).tolist()
    [[1.0, 1.0, 1.0]]
  """
  if mode not in _MODES:
    raise ValueError(f"wrap: mode must be one of {_MODES}, got {mode!r}.")
  warned: set[tuple[str, str]] = set()
  call = apply_fn
  if params_kwarg is not None:
    call = lambda params, *args, **kwargs: apply_fn(*args, **kwargs, **{params_kwarg: params})  # noqa: E731

  @functools.wraps(apply_fn)
  def wrapped(lp: LoraParams, *args: Any, lora_rng: jax.Array | None = None,
              adapter_ids: Any = None, **kwargs: Any) -> Any:
    if not isinstance(lp, LoraParams):
      raise TypeError(
          f"The wrapped function takes lora_jax.LoraParams as its first argument, got "
          f"{type(lp).__name__}. Lift the parameters first: lp = lora_jax.lift(params, config, "
          "key=...).")
    base = freeze(lp.base, config)
    stacked = isinstance(lp.adapters, AdapterStack)
    if stacked != (adapter_ids is not None):
      raise ValueError(
          "adapter_ids needs LoraParams(base, stack) with stack from lora_jax.stack_adapters"
          if not stacked else
          f"LoraParams holds a stack of {len(lp.adapters)} adapters {list(lp.adapters.names)}: "
          "pass adapter_ids=(one index per example, -1 for the base), or select one: "
          "LoraParams(base, stack.select(name)).")
    if stacked and mode == "merge":
      raise ValueError("adapter_ids needs mode='factored': one merged weight cannot hold a "
                       "different adapter per example.")
    quantized = any(is_quantized(leaf) for _, leaf in leaves_with_paths(base))
    if lp.adapters is None and not quantized:
      return call(base, *args, **kwargs)
    if mode == "merge":
      if lora_rng is not None and config.dropout > 0:
        raise ValueError("LoRA dropout needs mode='factored': a merged weight has no separate "
                         "adapter branch to drop inputs from. Drop lora_rng or use the default "
                         "mode.")
      return call(fold(base, lp.adapters, config), *args, **kwargs)
    leaves = leaves_with_paths(base)
    by_path = dict(leaves)
    # A stack is checked as one adapter (shapes only), then run with its leading axis.
    adapters = one_adapter_shapes(lp.adapters.adapters) if stacked else lp.adapters
    pairs = [] if adapters is None else check_adapters(plan(base, config), adapters)
    if stacked:
      entries = {t.path: lookup(lp.adapters.adapters, t.path) for t, *_ in pairs}
      # A stack (of LoRA adapters, whose factors are their arrays) keeps its adapter axis.
      pairs = [(t, *kinds.lowrank(entries[t.path], t)) for t, *_ in pairs]
    if stacked and lora_rng is not None and config.dropout > 0:
      raise ValueError("LoRA dropout is not supported with adapter_ids (mixed batches are for "
                       "inference and per-adapter evaluation); drop lora_rng.")
    # A mixed batch is a property of each adapted weight: its per-example adapter ids.
    ids = check_ids(adapter_ids, len(lp.adapters), "wrap") if stacked else None
    lowranks = {t.path: LowRank.from_target(t, by_path[t.path], a, b, m, ids)
                for t, a, b, m in pairs}
    paths = [p for p, _ in leaves]
    ctx = Context(warned, lora_rng, config.dropout)
    out = run_factored(call, base, lowranks, paths, args, kwargs, ctx)
    _check_layouts({t.path: t for t, *_ in pairs}, ctx.seen)
    return out

  return wrapped

