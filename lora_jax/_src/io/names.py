"""Name maps: which PyTorch (Hugging Face / PEFT) module holds each leaf of a JAX model.

A ``NameMap`` is a list of rules, each a regex over our leaf paths (``layers/3/attn/q_proj/w``)
and the Hugging Face module(s) and parameter that leaf is (``model.layers.3.self_attn.q_proj``,
``weight``). One leaf can hold several Hugging Face modules side by side: Gemma's
``qkv_einsum`` kernel ``(3, heads, embed, head_dim)`` is ``q_proj``, ``k_proj`` and ``v_proj``
stacked along axis 0. LoRA on such a fused kernel (one ``A``, one ``B`` over all three) is
exactly three adapters that share ``A``, each with its slice of ``B``; that is how
``save_peft`` writes it, and ``load_peft`` joins PEFT's three back (block-diagonal when
their ``A`` differ).

The same map serves both directions (``save_peft(module_name=...)`` and
``load_peft(module_name=...)``), so a name that is right one way is right the other. A plain
callable ``path -> module name`` still works as ``module_name``; ``parts`` turns either into
the one form the PEFT code reads.

The built-in maps (``NAME_MAPS``) cover the models of ``tunix.models`` (Llama 3, Qwen 2,
Qwen 3, Gemma 2, Gemma 3) and the Gemma 2 and 3 text models of DeepMind's ``gemma`` package;
each was checked against the real ``transformers`` model and PEFT (tests/test_tunix.py,
tests/test_gemma_package.py), never against our own reading of a format.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

# Flax leaf names and the PyTorch parameter each one becomes; any other leaf name is the
# module's weight (Tunix's Einsum kernels are ``w``).
TORCH_PARAM = {"kernel": "weight", "embedding": "weight", "weight": "weight",
               "scale": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class Part:
  """One PyTorch module's share of a leaf.

  Attributes:
    module: the PyTorch module name (``model.layers.0.self_attn.q_proj``).
    param: its parameter (``weight`` or ``bias``).
    axis: the leaf axis along which fused modules are stacked (``None``: the whole leaf).
    index: this module's position along ``axis``.
    count: how many modules share the leaf along ``axis``.
    stacked: the leaf stacks one layer per index of its stack axis (``nn.scan``); ``module``
      holds ``{layer}`` for the layer's number.
    layer: which layer this part is (set where the layers are enumerated).
    experts: the leaf is a 3-D experts parameter ``(experts, d1, d2)`` that PEFT adapts
      through ``target_parameters`` (``param`` is its name in ``module``).
    transposed: PEFT's ``is_transposed`` for that module (its layout of the A/B factors).
    order: the rule's position in its map: PEFT nests several target parameters of one
      module in the order the module registers them, which the map's rule order states.
  """
  module: str
  param: str = "weight"
  axis: int | None = None
  index: int = 0
  count: int = 1
  stacked: bool = False
  layer: int | None = None
  experts: bool = False
  transposed: bool = False
  order: int = 0

  def at(self, layer: int) -> Part:
    """This part for one layer of a stacked leaf."""
    return dataclasses.replace(self, module=self.module.replace("{layer}", str(layer)),
                               layer=layer)


@dataclasses.dataclass(frozen=True)
class Rule:
  """``leaf`` (a regex, matched in full) is ``modules`` (templates with ``\\1``... groups).

  Several modules mean a fused leaf: they are stacked along leaf axis ``fused_axis``. With
  ``stacked``, the leaf holds one layer per index of its stack axis (scanned layers, as
  ``nn.scan`` makes them): each module template holds ``{layer}``.

  With ``experts``, the leaf is a mixture-of-experts parameter ``(experts, d1, d2)`` held as a
  bare ``nn.Parameter`` named ``param`` by the one module (``mlp.experts.gate_up_proj``), which
  PEFT adapts through ``target_parameters``: the leaf must have the parameter's layout, and
  its adapters one per expert (stack axis 0). PEFT nests several such parameters of one module
  in the order the module registers them; list their rules in that order. ``transposed`` is
  PEFT's ``is_transposed`` of the module class (how it lays out the factors; ``False`` for
  GPT-OSS).
  """
  leaf: str
  modules: tuple[str, ...]
  param: str = "weight"
  fused_axis: int | None = None
  stacked: bool = False
  experts: bool = False
  transposed: bool = False

  def __post_init__(self):
    if self.experts and (len(self.modules) != 1 or self.stacked or self.param == "weight"):
      raise ValueError(f"Rule {self.leaf!r}: an experts rule names one module, not stacked, and "
                       "the parameter's own name (param='gate_up_proj', say).")
    if self.transposed and not self.experts:
      raise ValueError(f"Rule {self.leaf!r}: transposed applies to experts rules only.")
    if (len(self.modules) > 1) != (self.fused_axis is not None):
      raise ValueError(f"Rule {self.leaf!r}: several modules need fused_axis, one needs none.")
    if self.stacked != all("{layer}" in m for m in self.modules) or (
        self.stacked and self.fused_axis is not None):
      raise ValueError(f"Rule {self.leaf!r}: a stacked rule's modules hold '{{layer}}' (and "
                       "are not fused); other rules' modules do not.")


@dataclasses.dataclass(frozen=True)
class NameMap:
  """Leaf paths of one model family ↔ its Hugging Face module names.

  Attributes:
    architecture: what the map is for (``"tunix/llama3"``).
    rules: the rules, tried in order; a leaf no rule matches has no PyTorch counterpart.
  """
  architecture: str
  rules: tuple[Rule, ...]

  def parts(self, path: str) -> tuple[Part, ...] | None:
    """The PyTorch module(s) ``path`` is, or ``None`` when no rule matches it."""
    for order, rule in enumerate(self.rules):
      found = re.fullmatch(rule.leaf, path)
      if found:
        names = [found.expand(m) for m in rule.modules]
        return tuple(Part(n, rule.param, rule.fused_axis, i, len(names), rule.stacked,
                          experts=rule.experts, transposed=rule.transposed, order=order)
                     for i, n in enumerate(names))
    return None

  def __call__(self, path: str) -> str:
    """The module name of an unfused leaf: the map used where a ``module_name`` is expected."""
    found = self.parts(path)
    if found is None:
      raise ValueError(f"{path}: the {self.architecture} name map has no rule for this leaf "
                       f"(its leaves: {[r.leaf for r in self.rules][:6]}...).")
    if len(found) > 1:
      raise ValueError(f"{path}: this leaf holds {len(found)} PyTorch modules "
                       f"({[p.module for p in found]}); read it through NameMap.parts.")
    return found[0].module


Naming = Callable[[str], str] | NameMap


def default_module_name(path: str) -> str:
  """``params/Dense_0/kernel`` -> ``Dense_0``: drop ``params/`` and the leaf name; join by ``.``.

  A leaf named ``kernel``, ``embedding``, ``weight``, ``scale`` or ``bias`` is
  the module's parameter, so ``params/Dense_0/bias`` is in module ``Dense_0`` too.
  """
  parts = path.split("/")
  if parts and parts[0] == "params":
    parts = parts[1:]
  if len(parts) > 1 and parts[-1] in TORCH_PARAM:
    parts = parts[:-1]
  return ".".join(parts)


def parts(naming: Naming, path: str) -> tuple[Part, ...] | None:
  """The one reading of a ``module_name`` argument, both directions.

  A ``NameMap`` answers from its rules. A callable gives the module name; the parameter is
  named by the leaf (``kernel``/``embedding``/``weight``/``scale`` → ``weight``, ``bias`` →
  ``bias``, any other leaf name → ``weight``); it may return ``None`` for a leaf with no
  PyTorch counterpart.
  """
  if isinstance(naming, NameMap):
    return naming.parts(path)
  module = naming(path)
  if module is None:
    return None
  return (Part(module, TORCH_PARAM.get(path.rpartition("/")[2], "weight")),)


def _layer_rule(leaf: str, hf: str) -> Rule:
  return Rule(rf"layers/(\d+)/{leaf}", (rf"model.layers.\1.{hf}",))


def _decoder_rules(attention: Iterable[tuple[str, tuple[str, ...], str, int | None]],
                   norms: Iterable[tuple[str, str]], mlp: str = "mlp",
                   embed: str = "embedder/input_embedding") -> tuple[Rule, ...]:
  rules = [Rule(embed, ("model.embed_tokens",)), Rule("lm_head/w", ("lm_head",))]
  for leaf, modules, param, axis in attention:
    rules.append(Rule(rf"layers/(\d+)/{leaf}",
                      tuple(rf"model.layers.\1.self_attn.{m}" for m in modules), param, axis))
  for proj in ("gate_proj", "up_proj", "down_proj"):
    rules.append(_layer_rule(f"{mlp}/{proj}/kernel", f"mlp.{proj}"))
  for leaf, hf in norms:
    rules.append(Rule(leaf, (hf,)) if leaf.startswith("final") else _layer_rule(leaf, hf))
  return tuple(rules)


_LLAMA_ATTENTION = tuple((f"attn/{p}/w", (p,), "weight", None)
                         for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
_LLAMA_NORMS = (("input_layernorm/w", "input_layernorm"),
                ("post_attention_layernorm/w", "post_attention_layernorm"),
                ("final_norm/w", "model.norm"))
_QK_NORMS = (("attn/q_norm/w", "self_attn.q_norm"), ("attn/k_norm/w", "self_attn.k_norm"))
_QWEN2_BIASES = tuple((f"attn/{x}_bias", (f"{x}_proj",), "bias", None) for x in "qkv")
_GEMMA_ATTENTION = (("attn/q_einsum/w", ("q_proj",), "weight", None),
                    ("attn/kv_einsum/w", ("k_proj", "v_proj"), "weight", 0),
                    ("attn/qkv_einsum/w", ("q_proj", "k_proj", "v_proj"), "weight", 0),
                    ("attn/attn_vec_einsum/w", ("o_proj",), "weight", None))
_GEMMA_NORMS = (("pre_attention_norm/scale", "input_layernorm"),
                ("post_attn_norm/scale", "post_attention_layernorm"),
                ("pre_ffw_norm/scale", "pre_feedforward_layernorm"),
                ("post_ffw_norm/scale", "post_feedforward_layernorm"),
                ("final_norm/scale", "model.norm"))
_GEMMA3_NORMS = _GEMMA_NORMS + (("attn/_query_norm/scale", "self_attn.q_norm"),
                                ("attn/_key_norm/scale", "self_attn.k_norm"))


def _gemma_package_rules(qk_norms: bool) -> tuple[Rule, ...]:
  """DeepMind's ``gemma`` package (``gm.nn.Gemma2_*``/``Gemma3_*``, Linen): its leaf names.

  Its MLP is one fused kernel, ``mlp/gating_einsum`` ``(2, hidden, embed)`` (gate, then up);
  its leaves sit under ``params/`` or at the top (the tree ``gm.ckpts.load_params`` returns).
  """
  layer = r"(?:params/)?layer_(\d+)/"
  hf = r"model.layers.\1."
  rules = [Rule(r"(?:params/)?embedder/input_embedding", ("model.embed_tokens",))]
  for leaf, modules, axis in (("attn/q_einsum/w", ("q_proj",), None),
                              ("attn/kv_einsum/w", ("k_proj", "v_proj"), 0),
                              ("attn/qkv_einsum/w", ("q_proj", "k_proj", "v_proj"), 0),
                              ("attn/attn_vec_einsum/w", ("o_proj",), None)):
    rules.append(Rule(layer + leaf, tuple(hf + "self_attn." + m for m in modules), "weight",
                      axis))
  rules.append(Rule(layer + "mlp/gating_einsum", (hf + "mlp.gate_proj", hf + "mlp.up_proj"),
                    "weight", 0))
  rules.append(Rule(layer + "mlp/linear", (hf + "mlp.down_proj",)))
  norms = [("pre_attention_norm", "input_layernorm"),
           ("post_attention_norm", "post_attention_layernorm"),
           ("pre_ffw_norm", "pre_feedforward_layernorm"),
           ("post_ffw_norm", "post_feedforward_layernorm")]
  if qk_norms:
    norms += [("attn/_query_norm", "self_attn.q_norm"), ("attn/_key_norm", "self_attn.k_norm")]
  rules += [Rule(layer + leaf + "/scale", (hf + module,)) for leaf, module in norms]
  rules.append(Rule(r"(?:params/)?final_norm/scale", ("model.norm",)))
  return tuple(rules)


NAME_MAPS: dict[str, NameMap] = {
    "tunix/llama3": NameMap("tunix/llama3", _decoder_rules(_LLAMA_ATTENTION, _LLAMA_NORMS)),
    "tunix/qwen2": NameMap("tunix/qwen2", _decoder_rules(_LLAMA_ATTENTION + _QWEN2_BIASES,
                                                         _LLAMA_NORMS)),
    "tunix/qwen3": NameMap("tunix/qwen3", _decoder_rules(_LLAMA_ATTENTION,
                                                         _LLAMA_NORMS + _QK_NORMS)),
    "tunix/gemma2": NameMap("tunix/gemma2", _decoder_rules(_GEMMA_ATTENTION, _GEMMA_NORMS)),
    "tunix/gemma3": NameMap("tunix/gemma3", _decoder_rules(_GEMMA_ATTENTION, _GEMMA3_NORMS)),
    "gemma/gemma2": NameMap("gemma/gemma2", _gemma_package_rules(qk_norms=False)),
    "gemma/gemma3": NameMap("gemma/gemma3", _gemma_package_rules(qk_norms=True)),
}
"""The built-in name maps, by ``"zoo/family"``."""


def name_map(architecture: str) -> NameMap:
  """The built-in name map for ``architecture`` (a key of ``NAME_MAPS``).

  Raises:
    KeyError: for an architecture without a built-in map (the message lists them).
  """
  try:
    return NAME_MAPS[architecture]
  except KeyError:
    raise KeyError(f"No built-in name map for {architecture!r}; known: {sorted(NAME_MAPS)}. "
                   "Write one with lj.NameMap(architecture, rules=(lj.NameRule(...), ...)), or "
                   "pass a callable path -> module name.") from None
