"""Adapter kinds as data: the arrays an adapted path holds, their shapes, initialization,
update and PEFT names, one table entry per kind.

Every adapted path of an adapter tree ends in one entry, a dict of arrays. This module is the
one place that names them; the transforms, checkpoints, PEFT I/O, merges, stacks and reports
read and build entries through it. Each array lies on one *side* of the weight, which fixes
its shape and sharding and how PEFT stores it:

* side ``"a"``: shape ``stack + in + (rank,)``, sharded like the weight's input axes; PEFT
  stores it transposed, ``(rank, in)``;
* side ``"b"``: shape ``stack + (rank,) + out``, sharded like the output axes; PEFT stores
  ``(out, rank)``;
* side ``"m"``: shape ``stack + out`` (DoRA's magnitude), PEFT's ``lora_magnitude_vector``;
* an array with its own per-layer ``dims`` (a Kronecker factor of LoKr) is shaped
  ``stack + dims``, replicated, and stored by PEFT transposed; its side (``"a"``: rank last,
  ``"b"``: rank first, ``"k"``: no rank axis) says where its rank axis is.

A kind may also have *shared* arrays (``Shared``): one frozen array for all of its entries
(VeRA's random projections), stored once per adapter tree under ``adapters[SHARED][kind]``,
of which each entry uses a prefix slice.

Every kind's update is ``scale * A' @ B'`` for factors it forms from its arrays and its
shared arrays (``Kind.factors``), so the factored interpreter, ``merge`` and the streaming
merge run every kind through LoRA's product and formula (``lowrank.adapted_weight``); with
``m`` the adapted weight is DoRA's ``m ⊙ V / ‖V‖``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np


class Geometry(Protocol):
  """What an entry's shapes depend on (``plan.Target`` has these)."""

  stack_shape: tuple[int, ...]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  rank: int
  dora: bool
  kind: str


_SHAPES: dict[str, Callable[[Geometry], tuple[int, ...]]] = {
    "a": lambda t: (*t.stack_shape, *t.in_shape, t.rank),
    "b": lambda t: (*t.stack_shape, t.rank, *t.out_shape),
    "m": lambda t: (*t.stack_shape, *t.out_shape),
}


@dataclasses.dataclass(frozen=True)
class Array:
  """One array of an entry.

  Attributes:
    name: its key in the entry.
    side: ``"a"``, ``"b"``, ``"m"`` or ``"k"`` (see the module docstring).
    init: how ``lift`` fills it: a number (that constant), ``"lora"`` (``LoraConfig.init``:
      he-uniform over the input axes, or normal with std ``1/r``), ``"zeros"``, ``"fan_in"``
      (uniform in
      ``±1/sqrt(rows)``, ``rows`` the first size of its per-layer 2-D view: PyTorch's
      ``kaiming_uniform_(a=sqrt(5))`` of PEFT's transposed tensor), or ``"norm"`` (``‖W‖``
      over the input axes, DoRA's magnitude).
    peft: the tensor's name after the module in PEFT's ``adapter_model.safetensors``.
    dims: its per-layer shape (``ndim`` sizes), for an array not laid out over the weight's
      own axes; None for the side's shape.
    ndim: the number of per-layer axes of an array with its own ``dims``.
  """

  name: str
  side: str
  init: str | float
  peft: str
  dims: Callable[[Geometry], tuple[int, ...]] | None = None
  ndim: int = 2

  def shape(self, target: Geometry) -> tuple[int, ...]:
    if self.dims is not None:
      return (*target.stack_shape, *self.dims(target))
    return _SHAPES[self.side](target)

  def rows(self, target: Geometry) -> int:
    """The first size of the per-layer 2-D view (input size on side a, rank on side b)."""
    if self.dims is not None:
      return self.dims(target)[0]
    return math.prod(target.in_shape) if self.side == "a" else target.rank

  @property
  def per_layer_ndim(self) -> int:
    """The number of per-layer axes PEFT stores it with (2 for side a and b, 1 for side m)."""
    return self.ndim if self.dims is not None else (1 if self.side == "m" else 2)

  @property
  def follows_weight(self) -> bool:
    """Whether it lies over the weight's own axes (and so is sharded like them)."""
    return self.dims is None

  def rank_axis(self, n_stack: int) -> int | None:
    """The position of the rank axis (after ``n_stack`` stack axes), None without one."""
    return {"a": -1, "b": n_stack}.get(self.side)


SHARED = "~shared"
"""The adapter tree's root key holding each kind's shared arrays (``{kind: {name: array}}``)."""


@dataclasses.dataclass(frozen=True)
class Shared:
  """One frozen array all entries of a kind share, stored once per adapter tree.

  Side ``"a"`` is ``(max_in, rank)`` and an entry uses its first ``in`` rows; side ``"b"`` is
  ``(rank, max_out)`` and an entry uses its first ``out`` columns (``max_in``, ``max_out``: the
  largest flattened input and output sizes among the kind's targets), as PEFT slices its
  shared projections. ``lift`` draws it from ``LoraConfig.shared_seed`` (``draw_shared``), so
  an adapter checkpoint records the seed, not the array; PEFT stores it transposed as
  ``base_model.<peft>``. Execution stops its gradient, and ``lj.optimizer`` freezes it.
  """

  name: str
  side: str
  peft: str

  def shape(self, rank: int, max_in: int, max_out: int) -> tuple[int, int]:
    return (max_in, rank) if self.side == "a" else (rank, max_out)

  def slice(self, value: Any, target: Geometry) -> Any:
    """The part ``target``'s entry uses: ``(in, rank)`` or ``(rank, out)``."""
    if self.side == "a":
      return value[:math.prod(target.in_shape)]
    return value[:, :math.prod(target.out_shape)]


@dataclasses.dataclass(frozen=True)
class Kind:
  """One adapter kind.

  Attributes:
    name: ``LoraConfig.kind``.
    arrays: the entry's arrays, in order.
    factors: ``(A', B')`` with the update ``scale * A' @ B'`` (side a and side b shaped,
      of any rank), from the entry's arrays, the target and the kind's shared arrays (by
      name; empty without); differentiable, so gradients reach every array of the entry.
    peft_type: PEFT's ``peft_type``; ``peft_rank`` and ``peft_alpha`` name its rank and
      alpha fields. ``peft_alpha`` None: PEFT's config has no alpha, so an export multiplies
      the array ``peft_scaled`` (the update is linear in it) by the scale, and an import
      reads scale 1.
    peft_fields: the kind's own PEFT config fields, from what the export knows: ``dropout``,
      ``use_rslora``, ``use_dora``, ``target_parameters``, ``bias`` and ``fan_in_fan_out``.
    inits: the ``LoraConfig.init`` values it supports.
    dora: whether it takes DoRA's magnitude.
    lora_like: whether its arrays are LoRA's own ``A`` and ``B`` (combining, stacks,
      PiSSA's conversion, fused and expert PEFT modules work on those).
    doc: one line for the README's table.
    peft_refuses: why a target has no PEFT module of this kind's layout, or None.
    shared: the kind's shared arrays (``Shared``).
    peft_scaled: see ``peft_alpha``.
    peft_rslora: whether its PEFT config has a rank-stabilized scale (``use_rslora``).
    peft_bias: whether its PEFT config trains biases (``bias``: ``"all"``, ...).
  """

  name: str
  arrays: tuple[Array, ...]
  factors: Callable[[Mapping[str, Any], Geometry, Mapping[str, Any]], tuple[Any, Any]]
  peft_type: str
  peft_rank: str
  peft_alpha: str | None
  peft_fields: Callable[[Mapping[str, Any]], dict[str, Any]]
  inits: tuple[str, ...]
  dora: bool
  lora_like: bool
  doc: str
  peft_refuses: Callable[[Geometry], str | None] = lambda target: None
  shared: tuple[Shared, ...] = ()
  peft_scaled: str | None = None
  peft_rslora: bool = False
  peft_bias: bool = False

  def names(self) -> tuple[str, ...]:
    return tuple(x.name for x in self.arrays)


A = Array("a", "a", "lora", "lora_A.weight")
B = Array("b", "b", "zeros", "lora_B.weight")
M = Array("m", "m", "norm", "lora_magnitude_vector")


def _lora_fields(known: Mapping[str, Any]) -> dict[str, Any]:
  return {"lora_dropout": known.get("dropout", 0.0), "use_rslora": known.get("use_rslora"),
          "use_dora": known.get("use_dora"), "target_parameters": known.get("target_parameters"),
          "bias": known.get("bias", "none"), "fan_in_fan_out": known.get("fan_in_fan_out"),
          "init_lora_weights": True}


LORA = Kind("lora", (A, B), lambda e, target, shared: (e[A.name], e[B.name]), "LORA", "r",
            "lora_alpha", _lora_fields, inits=("default", "gaussian", "principal"), dora=True,
            lora_like=True, doc="LoRA: ΔW = s·A·B", peft_rslora=True, peft_bias=True)



def _khatri_rao(a1: Any, a2: Any, b1: Any, b2: Any, target: Geometry) -> tuple[Any, Any]:
  """Factors of rank r² of ``(a1·b1) ⊙ (a2·b2)``: ``A'[…, i, (k, l)] = a1[…, i, k]·a2[…, i, l]``
  and ``B'[…, (k, l), o] = b1[…, k, o]·b2[…, l, o]``, since the Hadamard product of two
  sums over k and over l is one sum over the pairs (k, l). In float32, returned in the
  arrays' dtype."""
  f32, n_stack = jnp.float32, len(target.stack_shape)
  r = a1.shape[-1]
  a = (a1.astype(f32)[..., :, None] * a2.astype(f32)[..., None, :]).reshape(*a1.shape[:-1], r * r)
  lead, out = b1.shape[:n_stack], b1.shape[n_stack + 1:]
  b1_ = b1.astype(f32).reshape(*lead, r, 1, -1)  # k, (l), o
  b2_ = b2.astype(f32).reshape(*lead, 1, r, -1)  # (k), l, o
  b = (b1_ * b2_).reshape(*lead, r * r, *out)
  return a.astype(a1.dtype), b.astype(b1.dtype)


A1 = Array("a1", "a", "fan_in", "hada_w1_b")
B1 = Array("b1", "b", "fan_in", "hada_w1_a")
A2 = Array("a2", "a", "zeros", "hada_w2_b")
B2 = Array("b2", "b", "fan_in", "hada_w2_a")

LOHA = Kind(
    "loha", (A1, B1, A2, B2),
    lambda e, target, shared: _khatri_rao(e[A1.name], e[A2.name], e[B1.name], e[B2.name], target),
    "LOHA", "r", "alpha",
    lambda known: {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                   "init_weights": True},
    inits=("default",), dora=False, lora_like=False,
    doc="LoHa: ΔW = s·(A₁B₁) ⊙ (A₂B₂), run as rank-r² factors")



def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
  """``(m, n)``, ``m ≤ n``, ``m·n = dimension``: PEFT's LoKr split of a size (the divisor pair
  nearest the square root, or ``factor`` and ``dimension / factor``), so that a LoKr adapter
  made here has the shapes PEFT makes for the same module."""
  if factor > 0 and dimension % factor == 0:
    return factor, dimension // factor
  factor = dimension if factor == -1 else factor
  m, n = 1, dimension
  while m < n:
    new_m = m + 1
    while dimension % new_m:
      new_m += 1
    new_n = dimension // new_m
    if new_m + new_n > m + n or new_m > factor:
      break
    m, n = new_m, new_n
  return min(m, n), max(m, n)


def _lokr_dims(target: Geometry) -> tuple[tuple[int, int], tuple[int, int]]:
  """``((in_m, in_n), (out_l, out_k))``: the Kronecker split of the input and output sizes."""
  return (factorization(math.prod(target.in_shape)), factorization(math.prod(target.out_shape)))


def _kronecker(w1: Any, a2: Any, b2: Any, target: Geometry) -> tuple[Any, Any]:
  """Factors of ``ΔW = W₁ ⊗ (a2·b2)`` (the weight's ``(in, out)`` view, ``W₁`` ``(in_m,
  out_l)``): by the mixed-product rule ``(P·Q) ⊗ (a·b) = (P ⊗ a)·(Q ⊗ b)`` with ``W₁ = I·W₁``
  (rank ``in_m·r``) or ``W₁·I`` (rank ``out_l·r``), whichever is smaller. In float32,
  returned in the arrays' dtype."""
  f32, lead = jnp.float32, w1.shape[:-2]
  (in_m, in_n), (out_l, out_k) = _lokr_dims(target)
  r = a2.shape[-1]
  w1_, a2_, b2_ = w1.astype(f32), a2.astype(f32), b2.astype(f32)
  if in_m <= out_l:  # A' = I ⊗ a2, B' = W₁ ⊗ b2
    eye = jnp.eye(in_m, dtype=f32)
    a = jnp.einsum("mp,...nr->...mnpr", eye, a2_).reshape(*lead, in_m * in_n, in_m * r)
    b = jnp.einsum("...pl,...rk->...prlk", w1_, b2_).reshape(*lead, in_m * r, out_l * out_k)
  else:  # A' = W₁ ⊗ a2, B' = I ⊗ b2
    eye = jnp.eye(out_l, dtype=f32)
    a = jnp.einsum("...ml,...nr->...mnlr", w1_, a2_).reshape(*lead, in_m * in_n, out_l * r)
    b = jnp.einsum("lp,...rk->...lrpk", eye, b2_).reshape(*lead, out_l * r, out_l * out_k)
  a = a.reshape(*lead, *target.in_shape, a.shape[-1])
  b = b.reshape(*lead, b.shape[-2], *target.out_shape)
  return a.astype(a2.dtype), b.astype(b2.dtype)


def _lokr_peft_refuses(target: Geometry) -> str | None:
  (_, in_n), (_, out_k) = _lokr_dims(target)
  if target.rank >= max(out_k, in_n) / 2:
    return (f"rank {target.rank} is at least half of the second Kronecker factor's size "
            f"{max(out_k, in_n)}, where PEFT stores a full lokr_w2 instead of lokr_w2_a and "
            f"lokr_w2_b; use a rank below {max(out_k, in_n) / 2:g} for this module")
  return None


W1 = Array("w1", "k", "zeros", "lokr_w1", dims=lambda t: (_lokr_dims(t)[0][0], _lokr_dims(t)[1][0]))
KA2 = Array("a2", "a", "fan_in", "lokr_w2_b", dims=lambda t: (_lokr_dims(t)[0][1], t.rank))
KB2 = Array("b2", "b", "fan_in", "lokr_w2_a", dims=lambda t: (t.rank, _lokr_dims(t)[1][1]))

LOKR = Kind(
    "lokr", (KA2, KB2, W1),
    lambda e, target, shared: _kronecker(e[W1.name], e[KA2.name], e[KB2.name], target),
    "LOKR", "r", "alpha",
    lambda known: {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                   "decompose_both": False, "decompose_factor": -1,
                   "rank_dropout_scale": False, "init_weights": True},
    inits=("default",), dora=False, lora_like=False,
    doc="LoKr: ΔW = s·W₁ ⊗ (A₂B₂)", peft_refuses=_lokr_peft_refuses)



def _vera(e: Mapping[str, Any], target: Geometry, shared: Mapping[str, Any]) -> tuple[Any, Any]:
  """Factors of ``ΔW = (P_a·diag(λ_d))·(P_b·diag(λ_b))`` with the frozen shared projections'
  slices ``P_a`` ``(in, r)`` and ``P_b`` ``(r, out)``: rank r, like LoRA's."""
  lambda_d, lambda_b = e[LD.name], e[LB.name]
  lead, r = lambda_d.shape[:-1], lambda_d.shape[-1]
  a = shared[VA.name] * lambda_d[..., None, :]
  b = shared[VB.name] * lambda_b.reshape(*lead, 1, -1)
  return (a.reshape(*lead, *target.in_shape, r).astype(lambda_d.dtype),
          b.reshape(*lead, r, *target.out_shape).astype(lambda_b.dtype))


LD = Array("lambda_d", "a", 0.1, "vera_lambda_d", dims=lambda t: (t.rank,), ndim=1)
LB = Array("lambda_b", "m", "zeros", "vera_lambda_b")
VA = Shared("projection_a", "a", "vera_A")
VB = Shared("projection_b", "b", "vera_B")

VERA = Kind(
    "vera", (LD, LB), _vera, "VERA", "r", None,
    lambda known: {"vera_dropout": known.get("dropout", 0.0), "d_initial": 0.1,
                   "projection_prng_key": 0, "save_projection": True,
                   "bias": known.get("bias", "none"), "fan_in_fan_out": False,
                   "init_weights": True},
    inits=("default",), dora=False, lora_like=False,
    doc="VeRA: ΔW = s·(P_a·diag(λ_d))·(P_b·diag(λ_b)), P frozen and shared by all layers",
    shared=(VA, VB), peft_scaled=LB.name, peft_bias=True)

KINDS: dict[str, Kind] = {k.name: k for k in (LORA, LOHA, LOKR, VERA)}


def of(kind: str) -> Kind:
  """The kind named ``kind``; a ``ValueError`` naming the kinds for any other name."""
  if kind not in KINDS:
    raise ValueError(f"unknown adapter kind {kind!r}; the kinds are {sorted(KINDS)}.")
  return KINDS[kind]


def arrays(target: Geometry) -> tuple[Array, ...]:
  """The arrays of ``target``'s entry, in order (DoRA's ``m`` last)."""
  own = of(target.kind).arrays
  return (*own, M) if target.dora else own


def names(target: Geometry) -> tuple[str, ...]:
  """The keys of ``target``'s entry."""
  return tuple(x.name for x in arrays(target))


def shapes(target: Geometry) -> dict[str, tuple[int, ...]]:
  """The shape of each array of ``target``'s entry, by key."""
  return {x.name: x.shape(target) for x in arrays(target)}


def size(target: Geometry) -> int:
  """The number of adapter parameters of ``target``'s entry."""
  return sum(math.prod(shape) for shape in shapes(target).values())


def kind_of(entry: Mapping[str, Any]) -> Kind | None:
  """The kind whose arrays (plus, for DoRA kinds, ``m``) are exactly ``entry``'s keys."""
  keys = set(entry)
  for kind in KINDS.values():
    own = set(kind.names())
    if keys == own or (kind.dora and keys == own | {M.name}):
      return kind
  return None


def is_entry(node: Any) -> bool:
  """Whether ``node`` is one entry (a dict of exactly a kind's keys, holding no dicts)."""
  return (isinstance(node, Mapping) and not any(isinstance(v, Mapping) for v in node.values())
          and kind_of(node) is not None)


def has_magnitude(entry: Mapping[str, Any]) -> bool:
  """Whether ``entry`` carries DoRA's magnitude."""
  return M.name in entry


def lowrank(entry: Mapping[str, Any], target: Geometry,
            shared: Mapping[str, Any] | None = None) -> tuple[Any, Any, Any]:
  """``(A', B', m)``: the factors of any entry's update ``scale * A' @ B'`` and DoRA's ``m``
  (None without DoRA), for ``target``'s geometry, given the kind's shared arrays (``shared_of``,
  which the caller has checked with ``shared_error``; their gradient is stopped). What
  execution and merging use (through ``merge.check_adapters``)."""
  kind = kind_of(entry)
  if kind is None:
    raise ValueError(f"not an adapter entry: keys {sorted(entry)}; expected {describe()}.")
  if kind.shared:
    shared = {x.name: jax.lax.stop_gradient(x.slice(shared[x.name], target)) for x in kind.shared}
  a, b = kind.factors(entry, target, shared or {})
  return a, b, entry.get(M.name)


def is_shared_path(path: str) -> bool:
  """Whether ``path`` (of an adapter tree's leaf) lies under ``SHARED``."""
  return path == SHARED or path.startswith(SHARED + "/")


def shared_of(adapters: Any, kind: Kind | str) -> Mapping[str, Any] | None:
  """The shared arrays of ``kind`` in an adapter tree, or None."""
  name = kind if isinstance(kind, str) else kind.name
  node = adapters.get(SHARED) if isinstance(adapters, Mapping) else None
  found = node.get(name) if isinstance(node, Mapping) else None
  return found if isinstance(found, Mapping) else None


def with_shared(adapters: Mapping[str, Any], kind: Kind, arrays: Mapping[str, Any]
                ) -> dict[str, Any]:
  """``adapters`` holding ``arrays`` as ``kind``'s shared arrays."""
  return {**adapters, SHARED: {kind.name: dict(arrays)}}


def shared_shapes(kind: Kind, targets: Any) -> dict[str, tuple[int, int]]:
  """The shape of each of ``kind``'s shared arrays for its ``targets`` (one rank for all, the
  largest input and output sizes); a ``ValueError`` for several ranks."""
  targets = [t for t in targets if t.kind == kind.name]
  if not kind.shared or not targets:
    return {}
  ranks = sorted({t.rank for t in targets})
  if len(ranks) > 1:
    raise ValueError(f"{kind.name} adapters share one pair of projections, so every target needs "
                     f"the same rank; found ranks {ranks} (rank_pattern). Use one rank.")
  max_in = max(math.prod(t.in_shape) for t in targets)
  max_out = max(math.prod(t.out_shape) for t in targets)
  return {x.name: x.shape(ranks[0], max_in, max_out) for x in kind.shared}


def draw_shared(kind: Kind, shapes: Mapping[str, tuple[int, ...]], seed: int, dtype: Any
                ) -> dict[str, np.ndarray]:
  """``kind``'s shared arrays of ``shapes`` drawn from ``seed``, on the host.

  Each is uniform in ``±sqrt(6 / rows)`` (PEFT's ``_kaiming_init`` of its transposed layout),
  from the raw 64-bit stream of numpy's ``PCG64`` seeded by ``SeedSequence([seed, i])`` for
  the kind's ``i``-th shared array, turned into a float64 in ``[0, 1)`` from its top 53 bits,
  scaled in float64 and rounded once to float32, then to ``dtype``. Integer bits and exact
  IEEE arithmetic: no JAX setting (PRNG implementation, ``jax_threefry_partitionable``) and no
  platform's rounding enters, and numpy does not change its bit generators' algorithms
  between releases (numpy 1.26 and 2.4 draw the same bits; ``tests/test_kinds.py`` pins
  them). So a checkpoint can hold the seed alone; it also records the drawn arrays'
  checksums, which every load checks (``io/drawn.py``).
  """
  made = {}
  for i, x in enumerate(kind.shared):
    shape = tuple(shapes[x.name])
    bits = np.random.PCG64(np.random.SeedSequence([int(seed), i])).random_raw(math.prod(shape))
    unit = (np.asarray(bits, np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    bound = math.sqrt(6.0 / shape[0])
    value = ((2.0 * unit - 1.0) * bound).astype(np.float32).reshape(shape)
    made[x.name] = value.astype(jnp.dtype(dtype))
  return made


def shared_error(shared: Mapping[str, Any] | None, kind: Kind, rank: int | None = None,
                 target: Geometry | None = None) -> str | None:
  """What is wrong with ``kind``'s shared arrays, or None: they are the kind's names, each
  2-D, with ``rank`` (when given) on its rank axis and covering ``target`` (when given)."""
  names = sorted(x.name for x in kind.shared)
  if not kind.shared:
    return None if not shared else (f"{kind.name} adapters have no shared arrays, but the tree "
                                    f"holds {sorted(shared)} under {SHARED!r}")
  if shared is None or sorted(shared) != names:
    return (f"a {kind.name} adapter needs its shared arrays {names} at adapters[{SHARED!r}]"
            f"[{kind.name!r}], found {None if shared is None else sorted(shared)}: keep the "
            "whole adapter tree that lift (or load_peft) made")
  for x in kind.shared:
    shape = tuple(getattr(shared[x.name], "shape", ()))
    need = (None if target is None else
            math.prod(target.in_shape) if x.side == "a" else math.prod(target.out_shape))
    if len(shape) != 2 or (rank is not None and shape[1 if x.side == "a" else 0] != rank) or (
        need is not None and shape[0 if x.side == "a" else 1] < need):
      r = "r" if rank is None else rank
      want = ((need or "max_in", r) if x.side == "a" else (r, need or "max_out"))
      return (f"the shared {kind.name} array {x.name!r} has shape {shape}, expected "
              f"{want}{' or more' if need else ''} (rank {r})")
  return None


def factors(entry: Mapping[str, Any], where: str = "") -> tuple[Any, Any, Any]:
  """``(A, B, m)`` of a LoRA entry, ``m`` None without DoRA: for the operations on LoRA's own
  factors (combining, stacks, PiSSA's conversion). Another kind is refused."""
  kind = kind_of(entry)
  if kind is None or not kind.lora_like:
    found = "no kind" if kind is None else f"a {kind.name} adapter"
    raise ValueError(f"{where or 'this operation'} works on LoRA's A and B; the entry with keys "
                     f"{sorted(entry)} is {found}. Use LoRA adapters (LoraConfig(kind='lora')) "
                     "here, or merge the adapter first (lj.merge).")
  return entry[A.name], entry[B.name], entry.get(M.name)


def entry(a: Any, b: Any, m: Any = None) -> dict[str, Any]:
  """The LoRA entry holding ``A``, ``B`` and, when given, DoRA's ``m``."""
  made = {A.name: a, B.name: b}
  if m is not None:
    made[M.name] = m
  return made


def role(name: str, kind: Kind | str) -> Array:
  """The array ``kind``'s entry key ``name`` holds (DoRA's ``m`` too); a ``KeyError`` for any
  other key. Two kinds may use one key for different arrays."""
  kind = of(kind) if isinstance(kind, str) else kind
  return {x.name: x for x in (*kind.arrays, *((M,) if kind.dora else ()))}[name]


def key(path: str, array: Array) -> str:
  """The flat path of one array of the entry at ``path`` (``"<path>/<name>"``)."""
  return f"{path}/{array.name}"


def describe() -> str:
  """The entry schemas in words, for error messages."""
  kinds = "; ".join(f"{k.name}: {sorted(k.names())}" for k in KINDS.values())
  return f"one kind's arrays ({kinds}; plus {M.name!r}, the magnitude, for DoRA)"


def shape_error(entry: Mapping[str, Any], rank: int, n_stack: int) -> str | None:
  """What is wrong with an entry's shapes for ``rank`` and ``n_stack`` stack axes when the
  weight is not at hand (a checkpoint's config alone), or None: every array's rank axis is
  ``rank``, all share the stack shape, side-a arrays share their input shape and side-b
  arrays (and ``m``) their output shape."""
  kind = kind_of(entry)
  if kind is None:
    return f"keys {sorted(entry)} are not {describe()}"
  stacks, ins, outs = set(), set(), set()
  for array in (*kind.arrays, *((M,) if has_magnitude(entry) else ())):
    shape = tuple(getattr(entry[array.name], "shape", ()))
    axis = array.rank_axis(n_stack)
    least = array.ndim if not array.follows_weight else 1 if axis is None else 2
    if len(shape) < n_stack + least or (axis is not None and shape[axis] != rank):
      break
    stacks.add(shape[:n_stack])
    if not array.follows_weight:  # its own dims: only its rank axis and stack are known
      if len(shape) != n_stack + array.ndim:
        break
    elif array.side == "a":
      ins.add(shape[n_stack:-1])
    else:
      outs.add(shape[n_stack + (array.side == "b"):])
  else:
    if len(stacks) == 1 and len(ins) <= 1 and len(outs) <= 1:
      return None
  found = ", ".join(f"{x.name} {tuple(getattr(entry[x.name], 'shape', ()))}"
                    for x in (*kind.arrays, M) if x.name in entry)
  return (f"{found} do not fit the config (rank {rank}, {n_stack} stack axes: side a = stack "
          f"+ in + ({rank},), side b = stack + ({rank},) + out, m = stack + out)")
