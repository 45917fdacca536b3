"""``LoraConfig``: the static, hashable description of a LoRA transform."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax._src.core import kinds
from lora_jax._src.core.patterns import compile_safe
from lora_jax._src.core.yaml_io import load_yaml

_INITS = ("default", "gaussian")
# Initializations that take the adapters from the weight (``principal.py``).
_PRINCIPAL = ("pissa", "olora")
# The previous spelling of init="pissa" with pissa_niter=N (PEFT's init_lora_weights name).
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def _old_pissa_niter(init: Any) -> int | None:
  """N of ``init="pissa_niter_N"`` (the previous spelling), else None."""
  found = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
  return None if found is None else int(found.group(1))


def is_principal(init: str) -> bool:
  """Whether ``init`` takes the adapters from the weight (and so changes the base)."""
  return init in _PRINCIPAL

Axes = int | tuple[int, ...]
"""A number of axes, or explicit axis positions in a kernel (``in_axes``; ``stack_axes`` holds
positions only: a number ``n`` given there is stored as the leading ``n`` positions)."""

# Fields holding {regex: value} overrides, stored as tuples of pairs to stay hashable.
_PATTERN_FIELDS = ("rank_pattern", "alpha_pattern", "dora_pattern", "in_axes", "stack_axes",
                   "head_tied")
# Fields holding one regex or several.
_REGEX_FIELDS = ("targets", "exclude", "trainable")


def _as_regex_tuple(name: str, value: Any) -> tuple[str, ...]:
  if isinstance(value, str):
    value = (value,)
  if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
    raise TypeError(
        f"LoraConfig.{name} must be a regular expression string or a sequence of them, "
        f"got {value!r}. Example: {name}=(r'query/kernel$', r'value/kernel$').")
  for pattern in value:
    _compile(name, pattern)
  return tuple(value)


def _as_pattern_pairs(name: str, value: Any) -> tuple[tuple[str, Any], ...]:
  if isinstance(value, Mapping):
    value = tuple(value.items())
  try:
    pairs = tuple((str(k), v) for k, v in value)
  except (TypeError, ValueError):
    raise TypeError(
        f"LoraConfig.{name} must map regular expressions to values, e.g. "
        f"{{r'out/kernel$': 2}}, got {value!r}.") from None
  for pattern, _ in pairs:
    _compile(name, pattern)
  return pairs


def _compile(field: str, pattern: str) -> re.Pattern[str]:
  return compile_safe(pattern, f"LoraConfig.{field}")


def _first_match(pairs: tuple[tuple[str, Any], ...], path: str) -> Any:
  for pattern, value in pairs:
    if re.search(pattern, path):
      return value
  return None


def _positive_int(field: str, value: Any, where: str = "") -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(
        f"LoraConfig.{field}{where} must be a positive integer, got {value!r}. "
        "Typical ranks are 4, 8, 16 or 64.")
  return int(value)


def _axes_value(field: str, pattern: str, value: Any) -> int | tuple[int, ...]:
  """A count of axes (int >= 0) or explicit axis positions (a tuple of distinct ints)."""
  is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)  # noqa: E731
  if is_int(value) and value >= 0:
    return int(value)
  if (isinstance(value, (tuple, list)) and (value or field == "stack_axes")
      and all(is_int(v) for v in value)
      and len(set(value)) == len(value)):
    return tuple(int(v) for v in value)
  raise ValueError(
      f"LoraConfig.{field}[{pattern!r}] must be a number of axes (e.g. 1) or a list of "
      f"distinct axis positions in the kernel (e.g. (1,) or [0, 2]), got {value!r}.")


def _positive_float(field: str, value: Any, where: str = "") -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise ValueError(f"LoraConfig.{field}{where} must be a positive number, got {value!r}.")
  if not math.isfinite(value) or value <= 0:
    raise ValueError(
        f"LoraConfig.{field}{where} must be a positive finite number, got {value!r}. "
        "A common choice is alpha = 2 * rank.")
  return float(value)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which parameters get low-rank adapters, and how.

  A frozen weight ``W`` with input axes ``in`` and output axes ``out`` becomes
  ``W + scale * A @ B`` with ``A.shape == stack + in + (r,)``,
  ``B.shape == stack + (r,) + out`` and ``scale = alpha / r`` (``alpha / sqrt(r)``
  with ``use_rslora``). ``B`` starts at zero, so the lifted model starts equal to
  the base.

  Patterns are Python regular expressions matched with ``re.search`` against
  parameter paths such as ``params/Block_0/SelfAttention_0/query/kernel`` (see
  ``lora_jax.paths``). Mapping fields (``rank_pattern``, ``alpha_pattern``,
  ``in_axes``, ``stack_axes``) accept a dict and are stored as a tuple of
  ``(regex, value)`` pairs; the first matching pattern wins. The config is
  hashable, so it can be a static argument of ``jax.jit``.

  Attributes:
    rank: default adapter rank ``r``.
    alpha: default scaling numerator.
    targets: regex or regexes selecting the leaves that get adapters.
    exclude: regexes of paths never adapted even when a target matches.
    dropout: probability of dropping adapter-branch inputs while training
      (factored execution with an rng; see ``lora_jax.wrap``).
    rank_pattern: per-path rank overrides, ``{regex: rank}``.
    alpha_pattern: per-path alpha overrides, ``{regex: alpha}``.
    use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA).
    use_dora: DoRA (weight-decomposed LoRA, ``dora.py``): the adapted weight is
      ``m ⊙ V / ‖V‖`` for ``V = W + scale * A @ B``, the norm over the input axes
      per output unit, with a trainable magnitude ``m`` (shape ``stack + out``,
      initialized to ``‖W‖``) stored beside A and B as ``"m"``.
    dora_pattern: per-path DoRA overrides, ``{regex: bool}``.
    trainable: regexes of base leaves trained in full (biases, norms, a head).
    init: ``"default"`` (A he-uniform over its input axes) or ``"gaussian"``
      (A normal with standard deviation ``1 / r``), B zero in both; or, from the
      weight itself (the base leaf becomes ``W − s·A·B``, see ``principal.py``),
      ``"pissa"`` (top-r singular vectors) or ``"olora"`` (QR).
    pissa_niter: with ``init="pissa"``, 0 for the exact SVD or N ≥ 1 for a randomized SVD
      with N subspace iterations (PEFT's ``init_lora_weights="pissa_niter_N"``; that string,
      given as ``init``, still works with a ``DeprecationWarning``).
    in_axes: ``{regex: n}``, the number of input axes of matching kernels (the
      ``n`` axes after the stacked ones), or ``{regex: (i, ...)}``, their
      positions in the kernel: ``(1,)`` for a kernel stored ``(out, in)`` and
      used as ``x @ W.T``, or for Gemma's ``q_einsum/w`` ``(heads, embed, head_dim)``.
    stack_axes: ``{regex: (i, ...)}``, the positions of stacked-layer axes; ``{regex: n}``
      gives the leading ``n`` (1 for ``nn.scan``) and is stored as ``(0, ..., n - 1)``.
    dtype: dtype of the adapter arrays.
    head_tied: ``{regex: bool}`` for embedding tables: whether the model also
      uses the table as its output head (``logits = x @ E.T``: tied embeddings,
      as in GPT-2 and Gemma). ``infer_axes`` fills it in from how the model uses
      each table. The adapter then changes the lookup and the head, which PEFT's
      embedding adapter cannot express, so ``save_peft`` refuses such a table.
    kind: the adapter kind, one of ``kinds.KINDS``: ``"lora"`` (``A``, ``B``) by default;
      each kind's arrays, update and PEFT names are one entry of that table.
    shared_seed: for a kind with frozen shared arrays (VeRA's projections), the integer
      ``>= 0`` they are drawn from (``kinds.draw_shared``; PEFT's ``projection_prng_key``);
      recorded with the config, so an adapter checkpoint holds the seed instead of the arrays
      whenever they are still the ones it draws.

  Example:
    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=4, targets=r"(query|value)/kernel$",
    ...                        rank_pattern={r"value": 2})
    >>> config.rank_for("params/attn/value/kernel"), config.scale_for("params/attn/query/kernel")
    (2, 4.0)
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] | str = (r"kernel$",)
  exclude: tuple[str, ...] | str = ()
  dropout: float = 0.0
  rank_pattern: tuple[tuple[str, int], ...] | Mapping[str, int] = ()
  alpha_pattern: tuple[tuple[str, float], ...] | Mapping[str, float] = ()
  use_rslora: bool = False
  use_dora: bool = False
  dora_pattern: tuple[tuple[str, bool], ...] | Mapping[str, bool] = ()
  trainable: tuple[str, ...] | str = ()
  init: str = "default"
  pissa_niter: int = 0
  in_axes: tuple[tuple[str, Axes], ...] | Mapping[str, Axes] = ()
  stack_axes: tuple[tuple[str, Axes], ...] | Mapping[str, Axes] = ()
  dtype: str = "float32"
  head_tied: tuple[tuple[str, bool], ...] | Mapping[str, bool] = ()
  kind: str = "lora"
  shared_seed: int = 0

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    set_("rank", _positive_int("rank", self.rank))
    set_("alpha", _positive_float("alpha", self.alpha))
    for name in _REGEX_FIELDS:
      set_(name, _as_regex_tuple(name, getattr(self, name)))
    if not self.targets:
      raise ValueError("LoraConfig.targets is empty: give at least one regex, e.g. r'kernel$'.")
    for name in _PATTERN_FIELDS:
      set_(name, _as_pattern_pairs(name, getattr(self, name)))
    set_("rank_pattern", tuple(
        (p, _positive_int("rank_pattern", v, f"[{p!r}]")) for p, v in self.rank_pattern))
    set_("alpha_pattern", tuple(
        (p, _positive_float("alpha_pattern", v, f"[{p!r}]")) for p, v in self.alpha_pattern))
    for name in ("in_axes", "stack_axes"):
      set_(name, tuple((p, _axes_value(name, p, v)) for p, v in getattr(self, name)))
    # One meaning: stacked axes are positions (a count n is the leading n).
    set_("stack_axes", tuple((p, tuple(range(v)) if isinstance(v, int) else v)
                             for p, v in self.stack_axes))
    if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float, np.number))
        or not 0.0 <= self.dropout < 1.0):
      raise ValueError(
          f"LoraConfig.dropout must be a probability in [0, 1), got {self.dropout!r}. "
          "Use 0.0 to disable LoRA dropout; common values are 0.05 and 0.1.")
    set_("dropout", float(self.dropout))
    for name in ("use_rslora", "use_dora"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"LoraConfig.{name} must be True or False, got {getattr(self, name)!r}.")
    for name in ("dora_pattern", "head_tied"):
      for p, v in getattr(self, name):
        if not isinstance(v, bool):
          raise TypeError(f"LoraConfig.{name}[{p!r}] must be True or False, got {v!r}.")
    niter = _old_pissa_niter(self.init)
    if niter is not None:
      warnings.warn(f"LoraConfig(init={self.init!r}) is deprecated: use init='pissa', "
                    f"pissa_niter={niter}.", DeprecationWarning, stacklevel=3)
      if self.pissa_niter not in (0, niter):
        raise ValueError(f"LoraConfig: init={self.init!r} and pissa_niter={self.pissa_niter} "
                         "disagree; use init='pissa' with pissa_niter alone.")
      set_("init", "pissa")
      set_("pissa_niter", niter)
    if not isinstance(self.init, str) or not (self.init in _INITS or is_principal(self.init)):
      raise ValueError(f"LoraConfig.init must be one of {_INITS + _PRINCIPAL}, got "
                       f"{self.init!r} ('pissa' takes pissa_niter=N for a randomized SVD).")
    if (isinstance(self.pissa_niter, bool) or not isinstance(self.pissa_niter, (int, np.integer))
        or self.pissa_niter < 0):
      raise ValueError(f"LoraConfig.pissa_niter must be an integer >= 0 (0: the exact SVD), got "
                       f"{self.pissa_niter!r}.")
    set_("pissa_niter", int(self.pissa_niter))
    if self.pissa_niter and self.init != "pissa":
      raise ValueError(f"LoraConfig.pissa_niter={self.pissa_niter} applies to init='pissa' only, "
                       f"not init={self.init!r}; drop it or use init='pissa'.")
    try:  # jnp.dtype(None) is float64: None must not pass as a dtype
      dtype = None if self.dtype is None else jnp.dtype(self.dtype)
    except (TypeError, ValueError):
      dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"LoraConfig.dtype must name a floating dtype such as 'float32' or 'bfloat16', "
          f"got {self.dtype!r}.")
    set_("dtype", dtype.name)
    self._check_kind()

  def _check_kind(self) -> None:
    if not isinstance(self.kind, str) or self.kind not in kinds.KINDS:
      raise ValueError(f"LoraConfig.kind must be one of {sorted(kinds.KINDS)}, got "
                       f"{self.kind!r}.")
    kind = kinds.of(self.kind)
    family = "principal" if is_principal(self.init) else self.init
    if family not in kind.inits:
      raise ValueError(f"LoraConfig.init={self.init!r} does not apply to kind={self.kind!r} "
                       f"adapters (its initializations: {list(kind.inits)}); use "
                       f"init={kind.inits[0]!r} or kind='lora'.")
    if (isinstance(self.shared_seed, bool) or not isinstance(self.shared_seed, (int, np.integer))
        or self.shared_seed < 0):
      raise ValueError(f"LoraConfig.shared_seed must be an integer >= 0, got "
                       f"{self.shared_seed!r}.")
    object.__setattr__(self, "shared_seed", int(self.shared_seed))
    if self.shared_seed and not kind.shared:
      seeded = sorted(k for k, v in kinds.KINDS.items() if v.shared)
      raise ValueError(f"LoraConfig.shared_seed={self.shared_seed} seeds the shared arrays of "
                       f"kinds that have them ({seeded}), not kind={self.kind!r}; drop it.")
    if not kind.dora and (self.use_dora or any(v for _, v in self.dora_pattern)):
      raise ValueError(f"LoraConfig.use_dora / dora_pattern: DoRA's magnitude applies to LoRA "
                       f"adapters, not to kind={self.kind!r}; drop use_dora or use kind='lora'.")

  # Presets --------------------------------------------------------------------------

  @classmethod
  def low_rank(cls, **overrides: Any) -> LoraConfig:
    """Rank 4, alpha 8: the smallest adapters; ``overrides`` replace any field."""
    return cls(**{"rank": 4, "alpha": 8.0, **overrides})

  @classmethod
  def medium_rank(cls, **overrides: Any) -> LoraConfig:
    """Rank 16, alpha 32; ``overrides`` replace any field."""
    return cls(**{"rank": 16, "alpha": 32.0, **overrides})

  @classmethod
  def high_rank(cls, **overrides: Any) -> LoraConfig:
    """Rank 64, alpha 128; ``overrides`` replace any field."""
    return cls(**{"rank": 64, "alpha": 128.0, **overrides})

  # Per-path queries -----------------------------------------------------------------

  def is_target(self, path: str) -> bool:
    """Whether the leaf at ``path`` gets an adapter."""
    return (any(re.search(p, path) for p in self.targets)
            and not any(re.search(p, path) for p in self.exclude))

  def is_trainable(self, path: str) -> bool:
    """Whether the base leaf at ``path`` is trained in full."""
    return any(re.search(p, path) for p in self.trainable)

  def rank_for(self, path: str) -> int:
    """The adapter rank at ``path`` (``rank_pattern`` first, then ``rank``)."""
    found = _first_match(self.rank_pattern, path)
    return self.rank if found is None else found

  def alpha_for(self, path: str) -> float:
    """The alpha at ``path`` (``alpha_pattern`` first, then ``alpha``)."""
    found = _first_match(self.alpha_pattern, path)
    return self.alpha if found is None else found

  def head_tied_for(self, path: str) -> bool | None:
    """Whether the table at ``path`` is also the model's output head (None: not known)."""
    return _first_match(self.head_tied, path)

  def dora_for(self, path: str) -> bool:
    """Whether the adapter at ``path`` is DoRA (``dora_pattern`` first, then ``use_dora``)."""
    found = _first_match(self.dora_pattern, path)
    return self.use_dora if found is None else found

  def scale_for(self, path: str) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``, at ``path``."""
    rank = self.rank_for(path)
    return self.alpha_for(path) / (math.sqrt(rank) if self.use_rslora else rank)

  def in_axes_for(self, path: str) -> Axes | None:
    """The configured input axes at ``path`` (a count or positions), or None for the rule."""
    return _first_match(self.in_axes, path)

  def stack_axes_for(self, path: str) -> tuple[int, ...]:
    """The positions of the stacked-layer axes at ``path`` (none by default)."""
    found = _first_match(self.stack_axes, path)
    return () if found is None else found

  # Serialization --------------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict; ``LoraConfig.from_dict`` inverts it."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in _PATTERN_FIELDS:
        value = {p: list(v) if isinstance(v, tuple) else v for p, v in value}
      elif field.name in _REGEX_FIELDS:
        value = list(value)
      out[field.name] = value
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
    """Builds a config from a dict such as ``to_dict`` returns or a YAML file holds.

    Raises:
      ValueError: on a key that is not a ``LoraConfig`` field, naming the allowed ones.
    """
    if not isinstance(data, Mapping):
      raise TypeError(f"A LoRA config must be a mapping of field names, got {type(data).__name__}.")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
      raise ValueError(
          f"Unknown LoraConfig key(s) {unknown}; allowed keys are {allowed}.")
    data = dict(data)
    niter = _old_pissa_niter(data.get("init"))
    if niter is not None and "pissa_niter" not in data:  # a record written before pissa_niter
      data.update(init="pissa", pissa_niter=niter)
    return cls(**data)

  def to_json(self) -> str:
    """The config as a JSON string."""
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> LoraConfig:
    """Parses ``to_json`` output."""
    return cls.from_dict(json.loads(text))

  @classmethod
  def from_yaml(cls, path: str | os.PathLike[str], *, key: str | None = None) -> LoraConfig:
    """Loads a config from a YAML file, optionally from the mapping under ``key``.

    Example:
      >>> import lora_jax as lj
      >>> lj.LoraConfig.from_yaml("configs/low_rank.yaml").rank  # doctest: +SKIP
      4
    """
    with open(path, encoding="utf-8") as f:
      data = load_yaml(f.read(), os.fspath(path))
    if key is not None:
      if not isinstance(data, Mapping) or key not in data:
        raise ValueError(f"{os.fspath(path)}: no top-level key {key!r} holding a LoRA config.")
      data = data[key]
    try:
      return cls.from_dict(data)
    except (TypeError, ValueError) as e:
      raise type(e)(f"{os.fspath(path)}: {e}") from None
