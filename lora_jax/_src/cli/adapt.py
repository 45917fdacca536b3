"""One call from a model to what a LoRA training loop needs (PEFT's ``get_peft_model``).

``adapt(model, config, *example_args, key=...)`` takes the model as users hold it, finds its
parameters and its function of them, reads every target's axes from how the function uses
them (``infer_axes``), lifts, and returns ``Adapted(lp, config, apply)``: the parameters to
train (``lj.optimizer(tx, adapted.config)``), the config with the axes stated, and the
wrapped function ``apply(lp, *args, **kwargs)``. Leaves the user names in
``config.trainable`` (a new classification head, the biases) are trained in full.

Models it knows:

* an ``nnx.Module``: its ``nnx.Param`` state is lifted, the rest (RNG state, batch stats)
  passed beside it;
* a ``ZooModel`` (``lj.load_hf``): its parameters and ``model.apply`` (``(logits, cache)``);
* a Flax Linen module, with ``variables=`` (the ``params`` collection is lifted, the other
  collections passed as they are);
* a Hugging Face Flax model (``transformers<5``): ``model.params`` and ``model(...,
  params=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from lora_jax._src.adapters.lift import lift
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.tree import PyTree
from lora_jax._src.factored.infer import infer_axes
from lora_jax._src.factored.wrap import wrap
from lora_jax._src.io.zoo import ZooModel


class Adapted(NamedTuple):
  """What ``adapt`` returns.

  Attributes:
    lp: the ``LoraParams`` to train (frozen base, adapters, leaves trained in full).
    config: the ``LoraConfig`` with every target's axes inferred; use it for
      ``lj.optimizer``, ``save_adapters``, ``merge`` and ``save_peft``.
    apply: ``apply(lp, *args, **kwargs)``, the model's function on ``LoraParams``
      (factored), with ``lora_rng=`` for LoRA dropout.
    params_fn: the model's own function of plain parameters, ``fn(params, *args, **kwargs)``
      (for the merged parameters, ``lj.merge(lp, config)``).
  """
  lp: LoraParams
  config: LoraConfig
  apply: Callable[..., Any]
  params_fn: Callable[..., Any]


def _model_function(model: Any, variables: Mapping[str, Any] | None
                    ) -> tuple[PyTree, Callable[..., Any]]:
  """(parameters, fn(params, *args, **kwargs)) for each kind of model ``adapt`` knows."""
  if isinstance(model, ZooModel):
    return model.params, model.apply
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  if isinstance(model, nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return params, lambda p, *a, **k: nnx.merge(graphdef, p, rest)(*a, **k)
  if isinstance(model, nn.Module):
    if variables is None or "params" not in variables:
      raise TypeError("adapt: a Linen module needs its variables: adapt(module, config, "
                      "*example_args, key=..., variables=module.init(...)).")
    others = {k: v for k, v in variables.items() if k != "params"}
    return variables["params"], lambda p, *a, **k: model.apply({"params": p, **others}, *a,
                                                               **k)
  if hasattr(model, "params") and callable(model) and hasattr(model, "module"):
    return model.params, lambda p, *a, **k: model(*a, params=p, **k)  # transformers Flax
  raise TypeError(f"adapt: cannot tell the parameters of a {type(model).__name__}; it knows "
                  "nnx.Module, lj.load_hf models, Linen modules (with variables=) and Hugging "
                  "Face Flax models. For anything else: config = lj.infer_axes(fn, params, "
                  "...); lp = lj.lift(params, config, key=...); apply = lj.wrap(fn, config).")


def adapt(model: Any, config: LoraConfig, *example_args: Any, key: jax.Array,
          variables: Mapping[str, Any] | None = None, **example_kwargs: Any) -> Adapted:
  """Infers the axes, lifts and wraps ``model`` for LoRA training, in one call.

  Args:
    model: an ``nnx.Module``, a ``ZooModel`` (``lj.load_hf``), a Linen module (with
      ``variables``), or a Hugging Face Flax model.
    config: the ``LoraConfig``: which leaves to adapt (``targets``) and which to train in
      full (``trainable``, e.g. a new head).
    *example_args: example inputs of the model (arrays or ``jax.ShapeDtypeStruct``): the
      axes are read from one abstract trace, nothing is computed.
    key: the random key for the adapters' ``A``.
    variables: a Linen module's variables (``module.init(...)``).
    **example_kwargs: example keyword inputs.

  Returns:
    ``Adapted(lp, config, apply, params_fn)``.

  Raises:
    TypeError: for a model it does not know (the message gives the three-call recipe).
    ValueError: from ``infer_axes`` (a target the model never contracts) or ``lift``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import lora_jax as lj
    >>> net = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> adapted = lj.adapt(net, lj.LoraConfig(rank=2, targets=r"kernel$"),
    ...                    jnp.ones((1, 4)), key=jax.random.key(0))
    >>> adapted.config.in_axes
    (('^kernel$', (0,)),)
    >>> adapted.apply(adapted.lp, jnp.ones((1, 4))).shape
    (1, 3)
  """
  params, fn = _model_function(model, variables)
  config = infer_axes(fn, params, *example_args, config=config, **example_kwargs)
  lp = lift(params, config, key=key)
  return Adapted(lp, config, wrap(fn, config), fn)
