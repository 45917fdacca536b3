"""Plain NumPy reference for LoRA merging, independent of lora_jax's own merge."""

from __future__ import annotations

import jax
import numpy as np

import lora_jax as lj


def adapter_entry(adapters, path):
  node = adapters
  for part in path.split("/"):
    node = node[part]
  return node


def reference_merge(params, adapters, config: lj.LoraConfig):
  """``W + scale * A @ B`` in float64 for every adapted leaf, cast to W's dtype."""
  leaves, treedef = jax.tree.flatten(params)
  names = lj.paths(params)
  out = []
  for name, w in zip(names, leaves):
    if not config.is_target(name):
      out.append(w)
      continue
    entry = adapter_entry(adapters, name)
    a = np.asarray(entry["a"], np.float64)
    b = np.asarray(entry["b"], np.float64)
    n_stack = len(config.stack_axes_for(name))
    stack = a.shape[:n_stack]
    s = int(np.prod(stack))
    r = a.shape[-1]
    a3 = a.reshape(s, -1, r)
    b3 = b.reshape(s, r, -1)
    delta = np.einsum("sir,sro->sio", a3, b3).reshape(w.shape)
    merged = np.asarray(w, np.float64) + config.scale_for(name) * delta
    out.append(np.asarray(merged).astype(w.dtype))
  return jax.tree.unflatten(treedef, out)
