"""lora_jax: LoRA for JAX and Flax as a pure functional transform.

``import lora_jax`` loads neither ``flax.linen`` nor ``flax.nnx``: the job runner (its demo
tasks are Flax models) and the NNX module wrapper load on first use of their names.
"""

import importlib

from lora_jax._src.adapters.combine import combine
from lora_jax._src.adapters.lift import disable, lift, overlay
from lora_jax._src.adapters.merge import merge, unmerge
from lora_jax._src.adapters.optim import labels, optimizer
from lora_jax._src.adapters.principal import to_standard as principal_to_lora
from lora_jax._src.adapters.quantize import dequantize, quantize
from lora_jax._src.adapters.stack import AdapterStack, stack_adapters
from lora_jax._src.adapters.summary import Summary, SummaryRow, summary
from lora_jax._src.cli.adapt import Adapted, adapt
from lora_jax._src.cli.deprecated import export_peft, import_peft, restore_train_state
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.plan import Target, plan
from lora_jax._src.core.tree import PyTree, paths
from lora_jax._src.factored.infer import infer_axes
from lora_jax._src.factored.interpreter import FallbackWarning
from lora_jax._src.factored.sampling import generate
from lora_jax._src.factored.wrap import wrap
from lora_jax._src.io.checkpoint import CheckpointMismatch, load_adapters, save_adapters
from lora_jax._src.io.checksums import ChecksumError
from lora_jax._src.io.hf_merge import merge_hf
from lora_jax._src.io.lineage import BaseMismatch
from lora_jax._src.io.names import NameMap, name_map
from lora_jax._src.io.names import Rule as NameRule
from lora_jax._src.io.peft_format import load_peft, save_peft
from lora_jax._src.io.quantized_io import load_quantized, save_quantized
from lora_jax._src.io.streaming import merge_checkpoint
from lora_jax._src.io.train_state import load_train_state, save_train_state
from lora_jax._src.io.zoo import ZooModel, load_hf
from lora_jax._src.numerics.qarray import QuantizedArray

__version__ = "0.4.0"

# Public names whose modules import Flax's model libraries, loaded when first used.
_LAZY = {"load_job_config": "lora_jax._src.cli.job", "run_job": "lora_jax._src.cli.job",
         "LoraModule": "lora_jax._src.factored.nnx_module",
         "nnx_module": "lora_jax._src.factored.nnx_module"}


def __getattr__(name: str):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "save_train_state",
    "save_adapters",
    "load_train_state",
    "load_adapters",
    "load_quantized",
    "save_quantized",
    "BaseMismatch",
    "CheckpointMismatch",
    "ChecksumError",
    "FallbackWarning",
    "Adapted",
    "adapt",
    "LoraConfig",
    "NameMap",
    "NameRule",
    "ZooModel",
    "load_hf",
    "generate",
    "LoraModule",
    "nnx_module",
    "name_map",
    "LoraParams",
    "AdapterStack",
    "PyTree",
    "QuantizedArray",
    "Summary",
    "SummaryRow",
    "Target",
    "disable",
    "save_peft",
    "load_peft",
    # Deprecated names (DeprecationWarning; removed in 0.5).
    "export_peft",
    "import_peft",
    "restore_train_state",
    "infer_axes",
    "combine",
    "dequantize",
    "labels",
    "lift",
    "load_job_config",
    "merge",
    "merge_checkpoint",
    "merge_hf",
    "optimizer",
    "overlay",
    "paths",
    "plan",
    "principal_to_lora",
    "quantize",
    "run_job",
    "stack_adapters",
    "summary",
    "unmerge",
    "wrap",
]
