"""A kind's shared arrays kept in an adapter checkpoint as the seed they are drawn from.

VeRA's frozen projections are drawn from ``LoraConfig.shared_seed`` (``kinds.draw_shared``).
When a tree's shared arrays are still, bit for bit, what that seed draws, ``save_adapters``
leaves them out and writes this record instead: the kind, the seed and the checksum of each
drawn array. A load draws them again and checks them against those checksums, so a draw that
came out different anywhere (another numpy, another platform) is refused, never used. Shared
arrays the seed does not draw (imported from PEFT, which draws with torch, or changed by hand)
are written as arrays, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lora_jax._src.core import kinds
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.io.checksums import ChecksumError, check_record, record


def _host(value: Any) -> np.ndarray | None:
  """The whole of ``value`` on this host, or None (sharded across processes, or abstract)."""
  if isinstance(value, np.ndarray):
    return value
  if not isinstance(value, jax.Array):
    return None
  if value.is_fully_addressable:
    return np.asarray(value)
  if value.is_fully_replicated:  # every process holds a whole copy
    return np.asarray(value.addressable_data(0))
  return None


def seeded(adapters: Mapping[str, Any], config: LoraConfig) -> dict[str, Any] | None:
  """The record standing for the kind's shared arrays in ``adapters`` when
  ``config.shared_seed`` draws exactly them (bit for bit), else None."""
  kind = kinds.of(config.kind)
  shared = kinds.shared_of(adapters, kind)
  if not kind.shared or not shared:
    return None
  found = {name: _host(value) for name, value in shared.items()}
  dtypes = {None if v is None else v.dtype for v in found.values()}
  if None in dtypes or len(dtypes) != 1:
    return None
  drawn = kinds.draw_shared(kind, {n: v.shape for n, v in found.items()}, config.shared_seed,
                            dtypes.pop())
  if any(found[n].tobytes() != drawn[n].tobytes() for n in drawn):
    return None
  return {"kind": kind.name, "seed": config.shared_seed, "arrays": record(drawn),
          "numpy": np.__version__}


def split(adapters: Mapping[str, Any], config: LoraConfig
          ) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
  """``(adapters to write, record)``: without the kind's shared arrays and with their record
  (``seeded``) when the config's seed draws them; else ``(adapters, None)``."""
  found = seeded(adapters, config)
  if found is None:
    return adapters, None
  return {k: v for k, v in adapters.items() if k != kinds.SHARED}, found


def redraw(saved: Any, config: LoraConfig, where: str) -> dict[str, np.ndarray]:
  """The kind's shared arrays ``split`` recorded, drawn again on the host and checked against
  their checksums.

  Raises:
    ChecksumError: for a damaged record, or a draw that differs from the one saved.
  """
  kind = kinds.of(config.kind)
  names = sorted(x.name for x in kind.shared)
  arrays = saved.get("arrays") if isinstance(saved, Mapping) else None
  if (not isinstance(arrays, Mapping) or sorted(arrays) != names
      or saved.get("kind") != kind.name or saved.get("seed") != config.shared_seed
      or not all(isinstance(e, Mapping) and isinstance(e.get("shape"), list)
                 and isinstance(e.get("dtype"), str) for e in arrays.values())
      or len({e["dtype"] for e in arrays.values()}) != 1):
    raise ChecksumError(
        f"{where}: its record of the shared arrays drawn from the config's seed is damaged or "
        f"not for this config (expected kind {kind.name!r}, seed {config.shared_seed} and "
        f"arrays {names}, found {saved!r:.300}).")
  try:
    drawn = kinds.draw_shared(kind, {n: tuple(e["shape"]) for n, e in arrays.items()},
                              config.shared_seed, np.dtype(next(iter(arrays.values()))["dtype"]))
  except (TypeError, ValueError) as e:
    raise ChecksumError(f"{where}: its record of the shared arrays is damaged ({e}).") from e
  try:
    check_record(drawn, arrays, where)
  except ChecksumError as e:
    raise ChecksumError(
        f"{e}\nThe shared {kind.name} arrays were saved as seed {config.shared_seed} (drawn "
        f"with numpy {saved.get('numpy')}); drawn here with numpy {np.__version__} they come "
        f"out different, so they are not used. Load this checkpoint with numpy "
        f"{saved.get('numpy')}, and report the difference.") from None
  return drawn
