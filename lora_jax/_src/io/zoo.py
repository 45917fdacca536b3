"""Hugging Face checkpoints through a maintained JAX model zoo (``tunix.models``).

``load_hf(folder)`` reads ``config.json``, builds the matching Tunix model (Llama 3, Qwen 2,
Qwen 3, Gemma 1/2, Gemma 3 text), loads the safetensors weights with Tunix's own loader, and
returns the model split for ``lift``: its ``nnx.Param`` state, the rest, and the name map
between its leaves and the Hugging Face module names (``names.NAME_MAPS``).

A config setting that the Tunix model does not implement (Llama 3.1's ``rope_scaling``,
biases where the family has none, another activation) is refused: the model would load and
give other logits than transformers, silently. Every safetensors file in the folder must be
one the folder's index names (Tunix's loader reads every ``*.safetensors`` it finds) and passes
the checked reader (``safetensors_io``). Tunix is an optional dependency:
``pip install "lora_jax[models]"``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core.tree import PyTree
from lora_jax._src.io.names import NAME_MAPS, NameMap
from lora_jax._src.io.safetensors_io import INDEX, SINGLE, model_tensors

INSTALL = 'pip install "lora_jax[models]"'


def _tunix(module: str) -> Any:
  try:
    return importlib.import_module(f"tunix.models.{module}")
  except ImportError as e:
    raise ImportError(f"Loading a Hugging Face checkpoint needs the Tunix model zoo "
                      f"(google-tunix), which is not installed ({e}). Install it: {INSTALL}."
                      ) from None


def _refuse(where: pathlib.Path, problems: list[str]) -> None:
  if problems:
    raise ValueError(f"{where}: the Tunix model would not compute what transformers computes "
                     "for this config, so it is refused rather than loaded:\n  - "
                     + "\n  - ".join(problems))


def _get(cfg: Mapping[str, Any], where: pathlib.Path, key: str) -> Any:
  if key not in cfg or cfg[key] is None:
    raise ValueError(f"{where}: config.json lacks {key!r}, which the model needs.")
  return cfg[key]


def _head_dim(cfg: Mapping[str, Any], where: pathlib.Path) -> int:
  return cfg.get("head_dim") or _get(cfg, where, "hidden_size") // _get(
      cfg, where, "num_attention_heads")


def _common(cfg: Mapping[str, Any], where: pathlib.Path) -> dict[str, Any]:
  return dict(num_layers=_get(cfg, where, "num_hidden_layers"),
              embed_dim=_get(cfg, where, "hidden_size"),
              hidden_dim=_get(cfg, where, "intermediate_size"),
              num_heads=_get(cfg, where, "num_attention_heads"),
              head_dim=_head_dim(cfg, where),
              num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"])


def _check(cfg: Mapping[str, Any], where: pathlib.Path, *, act_key: str, act: str,
           falsy: tuple[str, ...] = (), extra: list[str] | None = None) -> None:
  problems = list(extra or [])
  found_act = cfg.get(act_key)
  if found_act != act:
    problems.append(f"{act_key} is {found_act!r}; the Tunix model computes {act!r}.")
  problems += [f"{key} is {cfg[key]!r}; the Tunix model does not implement it."
               for key in falsy if cfg.get(key)]
  _refuse(where, problems)


def _rope_base_applied(module: Any, keyword: str) -> float | None:
  """The RoPE base the Tunix attention applies whatever the config says, or ``None`` when its
  ``apply_rope`` calls pass one (the config's). Some Tunix releases call ``apply_rope`` without
  it, so its default (1e6 for Llama 3 and Qwen 3 in google-tunix 0.1.6 and 0.1.7) applies to
  every checkpoint."""
  source = inspect.getsource(module.Attention)
  calls = re.findall(r"apply_rope\((.*?)\)", source, flags=re.S)
  if not calls or any(keyword in call for call in calls):
    return None
  default = inspect.signature(module.apply_rope).parameters[keyword].default
  return None if default is inspect.Parameter.empty else float(default)


def _check_rope(module: Any, keyword: str, cfg: Mapping[str, Any], where: pathlib.Path,
                default: float) -> None:
  applied = _rope_base_applied(module, keyword)
  wanted = float(cfg.get("rope_theta", default))
  if applied is not None and applied != wanted:
    _refuse(where, [f"rope_theta is {wanted:g}, but this release of google-tunix applies RoPE "
                    f"with base {applied:g} whatever the config says ({module.__name__}), so "
                    "every position after the first would differ from transformers'."])


def _llama_like(family: str, cfg: Mapping[str, Any], where: pathlib.Path) -> Any:
  module = _tunix(f"{family}.model")
  _check_rope(module, "rope_theta", cfg, where, 10000.0)
  falsy = ("rope_scaling", "attention_bias", "mlp_bias", "use_sliding_window")
  if family == "qwen2":
    falsy = ("rope_scaling", "use_sliding_window")
  _check(cfg, where, act_key="hidden_act", act="silu", falsy=falsy)
  tied = bool(cfg.get("tie_word_embeddings", False))
  fields = dict(_common(cfg, where), vocab_size=_get(cfg, where, "vocab_size"),
                rope_theta=cfg.get("rope_theta", 10000.0), norm_eps=_get(cfg, where,
                                                                         "rms_norm_eps"))
  if family == "llama3":
    fields["weight_tying"] = tied
  else:
    fields["use_tied_embedding"] = tied
  return module.ModelConfig(**fields)


def _gemma(cfg: Mapping[str, Any], where: pathlib.Path) -> Any:
  module = _tunix("gemma.model")
  gemma2 = cfg.get("model_type") == "gemma2"
  if not gemma2:
    _refuse(where, ["model_type is 'gemma' (Gemma 1): Tunix's safetensors loader reads the "
                    "Gemma 2 layout only (it needs pre_feedforward_layernorm), so Gemma 1 "
                    "folders do not load through it."])
  _check_rope(module, "max_wavelength", cfg, where, 10000.0)
  problems = []
  head_dim = _head_dim(cfg, where)
  if gemma2 and cfg.get("query_pre_attn_scalar", head_dim) != head_dim:
    problems.append(f"query_pre_attn_scalar is {cfg['query_pre_attn_scalar']}; the Tunix Gemma "
                    f"model scales queries by head_dim ({head_dim}).")
  _check(cfg, where, act_key="hidden_activation", act="gelu_pytorch_tanh",
         falsy=("rope_scaling", "attention_bias"), extra=problems)
  layers = _get(cfg, where, "num_hidden_layers")
  kinds = module.AttentionType
  want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
  if cfg.get("layer_types") is not None and list(cfg["layer_types"]) != want:
    _refuse(where, [f"layer_types is {cfg['layer_types']}; the Tunix Gemma 2 model "
                    f"alternates {want[:2]}."])
  types = tuple(kinds.LOCAL_SLIDING if i % 2 == 0 else kinds.GLOBAL for i in range(layers))
  return module.ModelConfig(
      **_common(cfg, where), num_embed=_get(cfg, where, "vocab_size"),
      final_logit_softcap=cfg.get("final_logit_softcapping"),
      attn_logits_soft_cap=cfg.get("attn_logit_softcapping"),
      use_post_attn_norm=True, use_post_ffw_norm=True, attention_types=types,
      sliding_window_size=cfg.get("sliding_window"))


def _gemma3(cfg: Mapping[str, Any], where: pathlib.Path) -> Any:
  module = _tunix("gemma3.model")
  problems = []
  pattern = module.GEMMA3_ATTENTION_PATTERN
  layers = _get(cfg, where, "num_hidden_layers")
  want = ["sliding_attention" if pattern[i % len(pattern)] == module.AttentionType.LOCAL_SLIDING
          else "full_attention" for i in range(layers)]
  if cfg.get("layer_types") is not None and list(cfg["layer_types"]) != want:
    problems.append(f"layer_types is {cfg['layer_types']}; the Tunix Gemma 3 model uses "
                    f"{want}.")
  scaling = cfg.get("rope_scaling")
  scale = 1.0
  if scaling:
    if scaling.get("rope_type", scaling.get("type")) != "linear":
      problems.append(f"rope_scaling is {scaling}; the Tunix model implements linear only.")
    else:
      scale = float(scaling["factor"])
  head_dim = _head_dim(cfg, where)
  norms = module.QueryPreAttentionNormalisation
  scalar = cfg.get("query_pre_attn_scalar", head_dim)
  if scalar == head_dim:
    query_norm = norms.BY_ONE_OVER_SQRT_HEAD_DIM
  elif scalar == cfg["hidden_size"] // cfg["num_attention_heads"]:
    query_norm = norms.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
  else:
    problems.append(f"query_pre_attn_scalar is {scalar}; the Tunix model scales by head_dim "
                    "or hidden_size / num_attention_heads only.")
    query_norm = None
  _check(cfg, where, act_key="hidden_activation", act="gelu_pytorch_tanh",
         falsy=("final_logit_softcapping", "attn_logit_softcapping", "attention_bias"),
         extra=problems)
  return module.ModelConfig(
      **_common(cfg, where), num_embed=_get(cfg, where, "vocab_size"),
      sliding_window_size=cfg.get("sliding_window"),
      local_base_frequency=int(cfg.get("rope_local_base_freq", 10000)),
      global_base_frequency=int(cfg.get("rope_theta", 10000)),
      global_scale_factor=scale, query_pre_attn_norm=query_norm, param_dtype=jnp.float32)


# Hugging Face model_type -> (Tunix family, config builder).
_FAMILIES: dict[str, tuple[str, Callable[[Mapping[str, Any], pathlib.Path], Any]]] = {
    "llama": ("llama3", lambda c, w: _llama_like("llama3", c, w)),
    "qwen2": ("qwen2", lambda c, w: _llama_like("qwen2", c, w)),
    "qwen3": ("qwen3", lambda c, w: _llama_like("qwen3", c, w)),
    "gemma": ("gemma2", _gemma),
    "gemma2": ("gemma2", _gemma),
    "gemma3_text": ("gemma3", _gemma3),
}


@dataclasses.dataclass(frozen=True, eq=False)
class ZooModel:
  """A Tunix model loaded from a Hugging Face folder, split for ``lift``.

  Attributes:
    architecture: ``"tunix/<family>"`` (a key of ``NAME_MAPS``).
    graphdef: the NNX graph definition.
    params: the ``nnx.Param`` state: what ``lift`` takes.
    rest: every other state of the model (may be empty).
    name_map: leaves ↔ Hugging Face module names, for ``save_peft`` / ``load_peft``.
    hf_config: the folder's ``config.json``.
    config: the Tunix ``ModelConfig``.
    folder: the folder it was loaded from.
  """
  architecture: str
  graphdef: Any
  params: PyTree
  rest: PyTree
  name_map: NameMap
  hf_config: Mapping[str, Any]
  config: Any
  folder: pathlib.Path

  def module(self, params: PyTree) -> Any:
    """The NNX module with ``params`` in place of the loaded ones (arrays or a merged tree)."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    return nnx.merge(self.graphdef, params, self.rest)

  def apply(self, params: PyTree, tokens: jax.Array, *, cache: Any = None,
            positions: jax.Array | None = None,
            attention_mask: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """``(logits, cache)`` for ``tokens`` ``[batch, length]``: the Tunix forward pass.

    Without ``positions`` and ``attention_mask``, a causal mask over the whole input. Runs
    under standard dtype promotion, which the Tunix models need.
    """
    batch, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    if attention_mask is None:
      attention_mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)),
                                        (batch, length, length))
    # Tunix's models rely on standard promotion (int positions / float timescales).
    with jax.numpy_dtype_promotion("standard"):
      return self.module(params)(tokens, positions, cache, attention_mask)


def _check_weight_files(folder: pathlib.Path) -> None:
  """The folder's weights through the checked reader (``model_tensors``), and no other
  ``*.safetensors`` beside them: Tunix's loader reads every one it finds."""
  if not any(folder.glob("*.safetensors")):
    raise FileNotFoundError(f"{folder}: no *.safetensors weights (a Hugging Face folder as "
                            "save_pretrained(..., safe_serialization=True) writes).")
  shards, _ = model_tensors(folder)
  stray = sorted({p.name for p in folder.glob("*.safetensors")} - set(shards))
  if stray:
    raise ValueError(f"{folder}: {stray} are safetensors files the model does not name "
                     f"({INDEX if (folder / INDEX).is_file() else SINGLE}); the loader would "
                     "read them into the model. Move them out of the folder.")


def _axis_names(node: Any) -> set[str]:
  """The mesh axis names a Tunix sharding config refers to."""
  if isinstance(node, str):
    return {node}
  if isinstance(node, (tuple, list)):
    return set().union(*map(_axis_names, node)) if node else set()
  if dataclasses.is_dataclass(node):
    return set().union(*(_axis_names(getattr(node, f.name)) for f in dataclasses.fields(node)))
  return set()


def _local_mesh(model_config: Any) -> jax.sharding.Mesh | None:
  """With several processes, a one-device mesh on this process's first device.

  Tunix's loader puts the weights on ``jax.devices()[0]`` without a mesh: with several
  processes that is process 0's device, so every other process would hold arrays it cannot
  read. Each process loads the whole model on its own device instead; the job then shards it.
  """
  if jax.process_count() == 1:
    return None
  names = sorted(_axis_names(getattr(model_config, "shd_config", None)))
  devices = np.asarray(jax.local_devices()[:1]).reshape((1,) * len(names))
  return jax.sharding.Mesh(devices, tuple(names))


def load_hf(folder: str | pathlib.Path, *, dtype: Any = jnp.float32) -> ZooModel:
  """Loads a Hugging Face causal-LM folder into the matching Tunix model.

  Args:
    folder: holds ``config.json`` and safetensors weights (``model.safetensors`` or shards
      with ``model.safetensors.index.json``).
    dtype: the parameter dtype (default float32).

  Returns:
    A ``ZooModel``: ``lift(model.params, config, key=...)`` adapts it, ``model.apply``
    runs it, ``model.name_map`` names its leaves for PEFT.

  Raises:
    ImportError: Tunix is not installed (the message says what to install).
    ValueError: an architecture Tunix does not have, or a config setting the Tunix model
      does not implement (its logits would differ from transformers'), or stray or damaged
      weight files.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  folder = pathlib.Path(folder)
  config_path = folder / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{folder}: config.json is missing (not a Hugging Face model "
                            "folder).")
  hf_config = json.loads(config_path.read_text(encoding="utf-8"))
  model_type = hf_config.get("model_type")
  if model_type not in _FAMILIES:
    raise ValueError(f"{config_path}: model_type {model_type!r} has no Tunix model here; "
                     f"supported: {sorted(_FAMILIES)}.")
  family, build = _FAMILIES[model_type]
  model_config = build(hf_config, folder)
  _check_weight_files(folder)
  package = "gemma" if family == "gemma2" else family
  loader = _tunix(f"{package}.params_safetensors" if family.startswith("gemma")
                  else f"{family}.params")
  model = loader.create_model_from_safe_tensors(str(folder), model_config, dtype=dtype,
                                                mesh=_local_mesh(model_config))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  architecture = f"tunix/{family}"
  return ZooModel(architecture, graphdef, params, rest, NAME_MAPS[architecture], hf_config,
                  model_config, folder)
