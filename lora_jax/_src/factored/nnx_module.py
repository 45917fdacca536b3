"""A lifted model as an NNX module: for code that takes a module, such as Tunix's ``Sampler``.

``nnx_module(model, lp, config)`` returns a ``LoraModule``: an ``nnx.Module`` that holds the
frozen base module and the adapters as its state, and whose call runs the base module's call
through ``wrap`` (factored: nothing is merged). ``nnx.split`` / ``nnx.merge`` round-trip it, so
a sampler that splits the module to jit its decode step runs the adapters too. Attributes the
wrapper does not define (``config``, ``init_cache``, ``num_embed``, ...) are the base module's.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from lora_jax._src.adapters.stack import AdapterStack
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.tree import paths
from lora_jax._src.factored.wrap import wrap

_OWN = frozenset({"base_module", "adapters", "lora_config"})


def _is_variable(node: Any) -> bool:
  return isinstance(node, nnx.Variable)


class LoraModule(nnx.Module):
  """The base module with LoRA adapters, called factored. Build it with ``nnx_module``.

  Attributes:
    base_module: the NNX module with the frozen base parameters (``lp.base``).
    adapters: the adapter arrays, as ``nnx.Param`` leaves in ``lp.adapters``' structure.
    lora_config: the ``LoraConfig`` the adapters were lifted with.
  """

  def __init__(self, base_module: nnx.Module, adapters: Any, lora_config: LoraConfig):
    self.base_module = base_module
    self.adapters = nnx.data(jax.tree.map(nnx.Param, adapters))
    self.lora_config = lora_config

  def lora_params(self) -> LoraParams:
    """The module's state as ``LoraParams`` (the base module's ``nnx.Param`` state)."""
    params = nnx.state(self.base_module, nnx.Param)
    adapters = jax.tree.map(lambda v: v[...], self.adapters, is_leaf=_is_variable)
    return LoraParams(params, adapters)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    """The base module's call on ``args``, ``kwargs``, with the adapters applied factored."""
    graphdef, _, rest = nnx.split(self.base_module, nnx.Param, ...)
    run = lambda params, *a, **k: nnx.merge(graphdef, params, rest)(*a, **k)  # noqa: E731
    return wrap(run, self.lora_config)(self.lora_params(), *args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    # Only reached for names the wrapper lacks: they are the base module's.
    if name in _OWN or name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.base_module, name)


def nnx_module(model: Any, lp: LoraParams, config: LoraConfig) -> LoraModule:
  """``lp`` on ``model`` as an ``nnx.Module`` that runs the adapters factored.

  For code that expects an NNX module, such as Tunix's ``Sampler``
  (``Sampler(lj.nnx_module(model, lp, config), tokenizer, cache_config)``): its call is the
  model's call with ``lp``'s adapters, computed as ``wrap(..., config)`` computes it, without
  merging. The module is for running the adapters; train them with ``wrap`` and
  ``lj.optimizer``.

  Args:
    model: a ``ZooModel`` (``lj.load_hf``) or an ``nnx.Module`` whose ``nnx.Param`` state
      ``lp.base`` was lifted from (``lift(nnx.state(module, nnx.Param), config, ...)``). The
      module itself is not changed.
    lp: the lifted parameters, with one adapter set (select one from a stack:
      ``LoraParams(base, stack.select(name))``).
    config: the ``LoraConfig`` ``lp`` was lifted with.

  Returns:
    A ``LoraModule``.

  Raises:
    TypeError: ``lp`` is not ``LoraParams`` or ``model`` is not a ``ZooModel`` or
      ``nnx.Module``.
    ValueError: ``lp`` holds a stack of adapters, or ``lp.base`` does not have the
      structure of the module's ``nnx.Param`` state.
  """
  if not isinstance(lp, LoraParams):
    raise TypeError(f"nnx_module: lp must be lora_jax.LoraParams (from lj.lift), got "
                    f"{type(lp).__name__}.")
  if isinstance(lp.adapters, AdapterStack):
    raise ValueError(f"nnx_module: lp holds a stack of {len(lp.adapters)} adapters "
                     f"{list(lp.adapters.names)}; a module call has no adapter_ids. Select one: "
                     "LoraParams(lp.base, stack.select(name)), or use lj.generate(..., "
                     "adapter_ids=...) for a mixed batch.")
  if isinstance(model, nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  elif hasattr(model, "graphdef") and hasattr(model, "rest"):  # a ZooModel
    graphdef, params, rest = model.graphdef, model.params, model.rest
  else:
    raise TypeError(f"nnx_module: model must be a ZooModel (lj.load_hf) or an nnx.Module, "
                    f"got {type(model).__name__}.")
  if paths(lp.base) != paths(params):
    missing = sorted(set(paths(params)) - set(paths(lp.base)))[:3]
    extra = sorted(set(paths(lp.base)) - set(paths(params)))[:3]
    raise ValueError("nnx_module: lp.base does not have the paths of the model's nnx.Param "
                     f"state (missing {missing}, not in the model {extra}). Lift that state: "
                     "lj.lift(nnx.state(module, nnx.Param), config, key=...).")
  module = nnx.merge(graphdef, params, rest)  # new variables: the model is not changed
  base = lp.base
  if not isinstance(base, nnx.State):  # a pure dict (state.to_pure_dict())
    base = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(base, lp.base)
  nnx.update(module, base)
  return LoraModule(module, lp.adapters, config)
