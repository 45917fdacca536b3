"""Adapter and training-state checkpoints with orbax-checkpoint.

An adapter checkpoint is a directory holding orbax items: ``adapters`` (the
arrays), ``config`` (the ``LoraConfig`` as JSON) and, when saved from a
``LoraParams``, ``trained`` (the base leaves trained in full). Orbax writes into a
temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax._src.config import LoraConfig
from lora_jax._src.lift import LoraParams
from lora_jax._src.tree import PyTree, leaves_with_paths, trained_leaves

_ADAPTERS, _CONFIG, _STATE, _TRAINED = "adapters", "config", "state", "trained"


def _composite() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _manager(directory: pathlib.Path, max_to_keep: int | None = None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(directory, options=options)


def _steps(directory: pathlib.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def save_adapters(directory: str | os.PathLike[str], adapters: LoraParams | Mapping[str, Any],
                  config: LoraConfig, *, step: int | None = None,
                  overwrite: bool = False) -> pathlib.Path:
  """Saves adapters and their config; returns once the checkpoint is complete on disk.

  Pass the whole ``LoraParams`` to save everything a run trained: the adapters
  and the base leaves trained in full (``config.trainable``: a head, biases).
  The frozen base is never saved here.

  Args:
    directory: where to write. With ``step``, a step folder ``directory/<step>``
      is written (orbax ``CheckpointManager`` layout) and others are kept.
    adapters: the ``LoraParams`` (adapters and trained leaves), or ``lp.adapters``.
      Saving only ``lp.adapters`` while ``config.trainable`` names leaves is an
      error: those leaves would be lost.
    config: the ``LoraConfig`` they were made with (saved as JSON beside them).
    step: optional training step.
    overwrite: replace an existing checkpoint at the same place.

  Returns:
    The directory of the written checkpoint.

  Raises:
    FileExistsError: if a checkpoint is already there and ``overwrite`` is False.

  Example:
    >>> import jax, jax.numpy as jnp, tempfile
    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=2)
    >>> lp = lj.lift({"d": {"kernel": jnp.ones((4, 4))}}, config, key=jax.random.key(0))
    >>> path = lj.save_adapters(tempfile.mkdtemp() + "/ckpt", lp.adapters, config)
    >>> adapters, restored = lj.load_adapters(path)
    >>> restored == config
    True
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}.")
  directory = pathlib.Path(directory).absolute()
  items = {_CONFIG: ocp.args.JsonSave(config.to_dict())}
  if isinstance(adapters, LoraParams):
    if adapters.adapters is None:
      raise ValueError("save_adapters: the LoraParams has no adapters (lora_jax.disable?).")
    trained = trained_leaves(adapters.base, config.is_trainable)
    if trained:
      items[_TRAINED] = ocp.args.StandardSave(trained)
    adapters = adapters.adapters
  elif config.trainable:
    raise ValueError(
        f"save_adapters: config.trainable {list(config.trainable)} names base leaves trained "
        "in full, which lp.adapters does not hold; saving it alone would lose them. Pass the "
        "whole LoraParams: save_adapters(directory, lp, config).")
  items[_ADAPTERS] = ocp.args.StandardSave(adapters)
  args = ocp.args.Composite(**items)
  if step is None:
    if directory.exists() and not overwrite:
      raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it, "
                            "or save with step=N to keep several checkpoints.")
    with _composite() as checkpointer:
      checkpointer.save(directory, args, force=overwrite)
    return directory
  with _manager(directory) as manager:
    if step in manager.all_steps():
      if not overwrite:
        raise FileExistsError(f"{directory / str(step)} already exists; pass overwrite=True.")
      manager.delete(step)
    manager.save(step, args=args)
    manager.wait_until_finished()
  return directory / str(step)


def _resolve(directory: pathlib.Path, step: int | None) -> pathlib.Path:
  """The folder holding the ``adapters`` and ``config`` items."""
  if (directory / _CONFIG).is_dir() and step is None:
    return directory
  steps = _steps(directory)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} in {directory}; found steps {steps}.")
    return directory / str(step)
  if steps:
    return directory / str(steps[-1])
  raise FileNotFoundError(
      f"No adapter checkpoint at {directory}: expected the folders '{_ADAPTERS}/' and "
      f"'{_CONFIG}/' written by lora_jax.save_adapters, or step folders of them.")


def _array_metadata(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in leaves_with_paths(tree)}


class CheckpointMismatch(ValueError):
  """A checkpoint that reads fine but does not hold what was expected."""


def check_tree_matches(found: Mapping[str, tuple[tuple[int, ...], Any]],
                       expected: Mapping[str, tuple[tuple[int, ...], Any]], where: str) -> None:
  """Raises a ValueError listing missing, unexpected and mis-shaped leaves."""
  errors = [f"missing {p}: expected shape {expected[p][0]}" for p in expected if p not in found]
  errors += [f"unexpected {p}: shape {found[p][0]}" for p in found if p not in expected]
  errors += [f"{p}: shape {found[p][0]} in the checkpoint, expected {expected[p][0]}"
             for p in expected if p in found and found[p][0] != expected[p][0]]
  if errors:
    raise CheckpointMismatch(f"{where} does not match the expected tree:\n  - "
                             + "\n  - ".join(errors))


def _abstract(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs (with the leaves' shardings, if any) that orbax restores onto."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def load_adapters(directory: str | os.PathLike[str], *, target: PyTree | None = None,
                  step: int | None = None
                  ) -> tuple[dict[str, Any] | LoraParams, LoraConfig]:
  """Loads adapters and their config saved by ``save_adapters``.

  Restoring is strict: with ``target`` (arrays or ``jax.ShapeDtypeStruct``,
  e.g. ``lp.adapters`` or ``jax.eval_shape`` of them), any missing, unexpected
  or mis-shaped leaf is an error, and arrays are restored straight onto the
  target's shardings.

  Args:
    directory: a checkpoint written by ``save_adapters``, or a folder of step
      checkpoints (the latest, or ``step``, is loaded).
    target: optional tree giving the expected structure, shapes, dtypes and
      shardings: the adapters, or a ``LoraParams`` for a checkpoint saved from one
      (its base's trained leaves are the target of the trained leaves).
    step: which step to load from a folder of step checkpoints.

  Returns:
    ``(adapters, config)``; for a checkpoint saved from a ``LoraParams``,
    ``(LoraParams(trained, adapters), config)`` where ``trained`` holds just the
    leaves trained in full at their paths: ``lora_jax.overlay(base, loaded)``
    puts them into the original base.

  Raises:
    FileNotFoundError: when there is no checkpoint.
    ValueError: when the checkpoint does not match ``target`` or cannot be read.
  """
  path = _resolve(pathlib.Path(directory).absolute(), step)
  try:
    with _composite() as checkpointer:
      config_dict = checkpointer.restore(
          path, ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG]
      config = LoraConfig.from_dict(config_dict)
      has_trained = (path / _TRAINED).is_dir()
      is_lp = isinstance(target, LoraParams)
      targets = {_ADAPTERS: target.adapters if is_lp else target}
      if has_trained:
        targets[_TRAINED] = trained_leaves(target.base, config.is_trainable) if is_lp else None
      elif is_lp and config.trainable:
        raise CheckpointMismatch(
            f"Adapter checkpoint {path} holds no trained leaves, but its config trains "
            f"{list(config.trainable)} in full.")
      restored = {}
      for item, item_target in targets.items():
        # The handler reads the item's own metadata; a Checkpointer would look for a
        # checkpoint-level _CHECKPOINT_METADATA inside the item and log a warning.
        saved = ocp.PyTreeCheckpointHandler().metadata(path / item)
        saved = getattr(saved, "tree", saved)
        if item_target is not None:
          expected = {p: (tuple(x.shape), np.dtype(x.dtype))
                      for p, x in leaves_with_paths(item_target)}
          check_tree_matches(_array_metadata(saved), expected,
                             f"Adapter checkpoint {path} ({item})")
          restore = ocp.args.StandardRestore(_abstract(item_target))
        else:
          restore = ocp.args.StandardRestore()
        restored[item] = checkpointer.restore(
            path, ocp.args.Composite(**{item: restore}))[item]
  except (CheckpointMismatch, FileNotFoundError):
    raise
  except Exception as e:  # orbax and tensorstore raise many kinds for damaged files
    raise ValueError(f"Cannot read the adapter checkpoint at {path}: it is damaged or not a "
                     f"lora_jax checkpoint ({type(e).__name__}: {e}).") from e
  adapters = restored[_ADAPTERS]
  if has_trained:
    return LoraParams(restored[_TRAINED], adapters), config
  return adapters, config


def save_train_state(directory: str | os.PathLike[str], step: int, state: PyTree,
                     config: LoraConfig, *, max_to_keep: int | None = 3) -> pathlib.Path:
  """Saves a training state (adapters, optimizer state, anything else) for exact resume.

  Each step is a separate orbax checkpoint ``directory/<step>``; older ones
  beyond ``max_to_keep`` are deleted. A save interrupted by a crash leaves only
  a temporary folder that ``restore_train_state`` ignores, so the previous
  checkpoint stays usable.

  Args:
    directory: the folder of step checkpoints.
    step: the number of completed training steps.
    state: a pytree of arrays, e.g. ``{"adapters": lp.adapters, "opt_state": opt_state}``.
    config: the ``LoraConfig``, saved beside the state.
    max_to_keep: how many step checkpoints to keep (None keeps all).

  Returns:
    The step checkpoint's directory.
  """
  directory = pathlib.Path(directory).absolute()
  args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                               _CONFIG: ocp.args.JsonSave(config.to_dict())})
  with _manager(directory, max_to_keep) as manager:
    manager.save(step, args=args, force=True)
    manager.wait_until_finished()
  return directory / str(step)


def restore_train_state(directory: str | os.PathLike[str], target: PyTree
                        ) -> tuple[int, PyTree] | None:
  """Restores the latest complete training state saved by ``save_train_state``.

  Args:
    directory: the folder of step checkpoints.
    target: a tree like the saved ``state`` (arrays or ``jax.ShapeDtypeStruct``),
      giving structure, dtypes and shardings.

  Returns:
    ``(step, state)``, or None when there is no complete checkpoint yet.

  Example (the resume recipe)::

    start, state = 0, {"adapters": lp.adapters, "opt_state": tx.init(lp)}
    if (found := lj.restore_train_state(ckpt_dir, state)) is not None:
      start, state = found
    for step in range(start, num_steps):
      ...  # train; then every k steps:
      lj.save_train_state(ckpt_dir, step + 1, state, config)
  """
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    return None
  with _manager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      return None
    restored = manager.restore(step, args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(_abstract(target))}))
  return step, restored[_STATE]
