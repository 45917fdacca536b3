"""``LoraParams``: the pair every transform passes around, a frozen base and its adapters."""

from __future__ import annotations

from typing import Any, NamedTuple

from lora_jax._src.core.tree import PyTree


class LoraParams(NamedTuple):
  """A parameter tree split into a frozen ``base`` and low-rank ``adapters``.

  ``base`` has the structure of the lifted parameters. ``adapters`` is a nested
  dict that mirrors ``base`` along each adapted path, ending in
  ``{"a": A, "b": B}``; ``None`` means adapters are switched off (see
  ``lora_jax.disable``). It is a pytree, so it passes through ``jax.jit``,
  ``jax.grad`` and optax directly.
  """

  base: PyTree
  adapters: dict[str, Any] | None
