"""Which base an adapter checkpoint was trained on: a fingerprint saved with it, checked on use.

Adapters merged into, or loaded onto, another base than the one they were
trained on give a model nobody trained, silently: shapes usually still fit (a
different fine-tune of the same architecture, another release). ``save_adapters``
therefore records, for every adapted leaf of the base, its shape, dtype and
``SAMPLE`` of its values at evenly spaced positions (about 1 KB a leaf, cheap for
any size: the leaf is never read whole). ``load_adapters(..., base=...)`` and
``lora-jax merge`` compare the base they are given with it and refuse a mismatch
with ``BaseMismatch``, naming the leaves that differ, unless forced.

Sampled values must be equal: bit for bit in the same dtype; in another floating
dtype, after rounding the wider to the narrower (the same weights saved in bf16
after training on a float32 copy match; a fine-tune of them does not, since
changes of even 0.1% move most values across a rounding step). A sample catches
another base, not a deliberate edit of values between sampled positions; the
SHA-256 records of the arrays themselves (``checksums.py``) are for damage.

Adapters trained on a quantized base (QLoRA) record a sample of its codes: a base
quantized the same way must hold the same codes, and the full-precision original
(which QLoRA users merge into) must quantize to them. Adapters trained on a
full-precision base and used over a quantized copy are checked by shape only.
"""

from __future__ import annotations

import base64
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.numerics.qarray import is_quantized, quantize_array

SAMPLE = 256


class BaseMismatch(ValueError):
  """The base differs from the one an adapter checkpoint was trained on."""


def _sample_positions(size: int) -> np.ndarray:
  return np.unique(np.linspace(0, size - 1, num=min(size, SAMPLE)).round().astype(np.int64))


def _sample(value: Any, shape: tuple[int, ...]) -> np.ndarray:
  """The values at ``_sample_positions``, read shard by shard (no array is gathered whole)."""
  positions = _sample_positions(int(np.prod(shape, dtype=np.int64)))
  if isinstance(value, np.ndarray):
    return value.reshape(-1)[positions]
  index = np.unravel_index(positions, shape)
  out = np.empty(len(positions), np.dtype(value.dtype))
  filled = np.zeros(len(positions), bool)
  for shard in value.addressable_shards:
    bounds = [s.indices(n)[:2] for s, n in zip(shard.index, shape)]
    inside = ~filled
    for axis, (start, stop) in enumerate(bounds):
      inside &= (index[axis] >= start) & (index[axis] < stop)
    if inside.any():
      local = tuple(index[axis][inside] - start for axis, (start, _) in enumerate(bounds))
      out[inside] = np.asarray(shard.data[local] if local else shard.data)
      filled |= inside
  return out


def _sample_of(value: Any) -> np.ndarray | None:
  """The sampled values of a leaf; None for values without data here
  (``jax.ShapeDtypeStruct``, or an array spread over several processes)."""
  concrete = isinstance(value, np.ndarray) or (
      isinstance(value, jax.Array) and value.is_fully_addressable)
  if not concrete or not np.size(value):
    return None
  if not np.ndim(value):  # a scalar (a quantized leaf's offset)
    return np.asarray(value).reshape(1)
  return np.ascontiguousarray(_sample(value, tuple(int(d) for d in value.shape)))


def _encoded(sample: np.ndarray | None) -> str | None:
  return None if sample is None else base64.b64encode(sample.tobytes()).decode("ascii")


def leaf_fingerprint(value: Any) -> dict[str, Any]:
  """``{"shape", "dtype", "values"}`` of one leaf: ``values`` is the sample's bytes in
  base64, or None (see ``_sample_of``). A quantized leaf records how it was quantized
  and a sample of its codes instead (see ``differences``)."""
  if is_quantized(value):
    return {"shape": [int(d) for d in value.shape], "dtype": jnp.dtype(value.dtype).name,
            "values": None, "quantized": _how(value),
            "codes": _encoded(_sample_of(value.codes)),
            # the scales too: the same codes under a doubled block scale are another base
            "arrays": [_encoded(_sample_of(a)) for a in value.arrays]}
  sample = _sample_of(value)
  return {"shape": [int(d) for d in value.shape], "dtype": np.dtype(value.dtype).name,
          "values": None if sample is None else base64.b64encode(sample.tobytes()).decode("ascii")}


def _decode(entry: Mapping[str, Any]) -> np.ndarray:
  return np.frombuffer(base64.b64decode(entry["values"]), np.dtype(jnp.dtype(entry["dtype"])))


def _same_values(saved: np.ndarray, found: np.ndarray) -> bool:
  if saved.dtype == found.dtype:
    return saved.tobytes() == found.tobytes()
  floating = [jnp.issubdtype(v.dtype, jnp.floating) for v in (saved, found)]
  if not all(floating) or saved.shape != found.shape:
    return False
  # The narrower dtype (fewer significand bits) is what both are compared in.
  narrow = min((saved.dtype, found.dtype), key=lambda d: jnp.finfo(d).nmant)
  as_narrow = [v.astype(np.float64).astype(narrow) for v in (saved, found)]
  return np.array_equal(as_narrow[0], as_narrow[1], equal_nan=True)


def fingerprint(leaves: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """The fingerprint of ``{path: leaf}`` (the base leaves that carry adapters)."""
  return {path: leaf_fingerprint(value) for path, value in leaves.items()}


class Unchecked(str):
  """A ``differences`` result saying what could not be compared (not a difference)."""


def _valid_entry(saved: Any) -> bool:
  return (isinstance(saved, Mapping) and isinstance(saved.get("shape"), list)
          and all(isinstance(d, int) and not isinstance(d, bool) for d in saved["shape"])
          and isinstance(saved.get("dtype"), str)
          and (saved.get("values") is None or isinstance(saved["values"], str)))


def differences(recorded: Mapping[str, Any], path: str, value: Any | None) -> str | None:
  """How the base leaf ``value`` at ``path`` differs from the record (None: it does not;
  an ``Unchecked`` string: what could not be compared)."""
  saved = recorded[path]
  if not _valid_entry(saved):
    return f"{path}: its recorded fingerprint is damaged (found {str(saved)[:80]})"
  if value is None:
    return f"{path}: absent from this base"
  shape, dtype = [int(d) for d in value.shape], np.dtype(value.dtype).name
  if shape != saved["shape"]:
    return (f"{path}: shape {tuple(shape)} {dtype} here, trained on "
            f"{tuple(saved['shape'])} {saved['dtype']}")
  if "quantized" in saved:
    return _quantized_difference(saved, path, value)
  if saved.get("values") is None:
    return Unchecked(f"{path}: shape and dtype only (no values were recorded: the base was "
                     "spread over several processes or abstract when the adapters were saved)")
  if is_quantized(value):
    return Unchecked(f"{path}: shape only (trained on a full-precision base; this base is "
                     "quantized, and its values cannot be compared with the original's)")
  sample = _sample_of(value)
  if sample is None:
    return Unchecked(f"{path}: shape and dtype only (this base's values are not all on this "
                     "process)")
  if not _same_values(_decode(saved), sample):
    return (f"{path}: other values ({dtype} here, trained on {saved['dtype']}; "
            f"compared at {SAMPLE} sampled positions)")
  return None


def _how(q: Any) -> dict[str, Any]:
  return {"kind": q.kind, "block_size": q.block_size, "double_quant": q.double_quantized,
          "scale_axes": None if q.scale_axes is None else list(q.scale_axes)}


def _quantized_difference(saved: Mapping[str, Any], path: str, value: Any) -> str | None:
  """Trained on a quantized leaf: the base given (quantized the same way, or the
  full-precision original, which is quantized here) must give the same codes."""
  how = saved["quantized"]
  if is_quantized(value):
    mine = _how(value)
    if mine != how:
      return f"{path}: quantized as {mine} here, trained on a base quantized as {how}"
    q = value
  else:
    concrete = isinstance(value, np.ndarray) or (
        isinstance(value, jax.Array) and value.is_fully_addressable)
    if not concrete or saved.get("codes") is None:
      return Unchecked(f"{path}: shape only (no codes recorded, or this base's values are not "
                       "all on this process)")
    axes = how.get("scale_axes")
    q = quantize_array(jnp.asarray(value), how["kind"], how["block_size"],
                       how["double_quant"], None if axes is None else tuple(axes))
  arrays = saved.get("arrays")
  recorded_arrays = arrays if isinstance(arrays, list) else [saved.get("codes")]
  for name, want, have in zip(("codes", "scales", "scales of scales", "offset"),
                              recorded_arrays, q.arrays):
    sample = _sample_of(have)
    if want is None or sample is None:
      return Unchecked(f"{path}: its {name} could not be compared (not recorded, or not all "
                       "on this process)")
    saved_sample = np.frombuffer(base64.b64decode(want), sample.dtype)
    same = (saved_sample.shape == sample.shape and (
        np.allclose(saved_sample, sample, rtol=1e-5, atol=0.0)  # float scales: ulps apart
        if jnp.issubdtype(sample.dtype, jnp.floating) else np.array_equal(saved_sample, sample)))
    if not same:
      return (f"{path}: other values (trained on a {how['kind']} base; this base's "
              f"{how['kind']} {name} differ at {SAMPLE} sampled positions)")
  if not isinstance(arrays, list):
    return Unchecked(f"{path}: codes only (recorded by lora_jax 0.3.0, before scales were "
                     "recorded)")
  return None


def report(found: list[str], total: int, what: str, *, force: bool) -> None:
  """Raises ``BaseMismatch`` for the differences ``found`` (or warns with ``force``)."""
  if not found:
    return
  message = (f"{what}: the base differs from the one these adapters were trained on, in "
             f"{len(found)} of {total} adapted leaves:\n  - " + "\n  - ".join(found[:10])
             + (f"\n  - ... and {len(found) - 10} more" if len(found) > 10 else "")
             + "\nApplied to this base they would give a model nobody trained. Use the base "
             "they were trained on (the same weights in another floating dtype match); if the "
             "difference is intended, pass force=True (lora-jax merge --force).")
  if force:
    warnings.warn(message, stacklevel=3)
    return
  raise BaseMismatch(message)


def check(recorded: Mapping[str, Any] | None, lookup: Callable[[str], Any | None], what: str,
          *, force: bool) -> int | None:
  """Compares a base (``lookup(path)`` gives its leaf or None) with the record.

  Returns the number of leaves whose values were compared, or None (with a warning)
  when the checkpoint has no record (saved from ``lp.adapters`` alone, or before
  lora_jax 0.3). Leaves that could be compared by shape only are named in a warning.
  """
  if recorded is None:
    warnings.warn(f"{what} records no base fingerprint (saved from lp.adapters alone, or "
                  "by lora_jax before 0.3), so the base it is used with cannot be checked.",
                  stacklevel=3)
    return None
  if not isinstance(recorded, Mapping):
    raise BaseMismatch(f"{what}: its base fingerprint is damaged.")
  results = [differences(recorded, p, lookup(p)) for p in sorted(recorded)]
  unchecked = [d for d in results if isinstance(d, Unchecked)]
  report([d for d in results if d and not isinstance(d, Unchecked)], len(recorded), what,
         force=force)
  warn_unchecked(unchecked, what)
  return len(recorded) - len(unchecked)


def warn_unchecked(unchecked: list[str], what: str) -> None:
  """Says plainly which leaves lineage could not compare (never counted as a match)."""
  if unchecked:
    warnings.warn(f"{what}: the base could not be fully checked against the one these adapters "
                  f"were trained on, for {len(unchecked)} leaves:\n  - "
                  + "\n  - ".join(unchecked[:10]), stacklevel=3)
