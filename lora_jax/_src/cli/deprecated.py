"""Names of the previous release, kept for one release with a ``DeprecationWarning``.

Every writer now takes the directory first (``save_adapters``, ``save_quantized``,
``save_train_state``, ``save_peft``), and every pair is ``save_`` / ``load_``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

from lora_jax._src.io.peft_format import load_peft, save_peft
from lora_jax._src.io.train_state import load_train_state

REMOVED_IN = "0.5"


def _warn(old: str, new: str) -> None:
  warnings.warn(f"lora_jax.{old} is deprecated and will be removed in {REMOVED_IN}; use "
                f"{new}.", DeprecationWarning, stacklevel=3)


def _renamed(old: str, new: Callable[..., Any]) -> Callable[..., Any]:
  @functools.wraps(new)
  def call(*args: Any, **kwargs: Any) -> Any:
    _warn(old, f"lora_jax.{new.__name__} (same arguments)")
    return new(*args, **kwargs)
  call.__name__ = call.__qualname__ = old
  call.__doc__ = f"Deprecated: ``{new.__name__}`` under its previous name."
  return call


def export_peft(adapters: Any, config: Any, directory: Any, **kwargs: Any) -> Any:
  """Deprecated: ``save_peft(directory, adapters, config, ...)`` (directory first)."""
  _warn("export_peft(adapters, config, directory)",
        "lora_jax.save_peft(directory, adapters, config) (the directory first, as in every "
        "writer)")
  return save_peft(directory, adapters, config, **kwargs)


import_peft = _renamed("import_peft", load_peft)
restore_train_state = _renamed("restore_train_state", load_train_state)
