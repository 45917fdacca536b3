"""Training-state checkpoints for exact resume: one verified step folder per save.

``directory/<step>`` holds the ``state`` item (adapters, optimizer state,
anything else), the ``config`` and the arrays' checksums, written atomically as
adapter checkpoints are (``checkpoint.write``). Restoring takes the newest step
that reads back intact and falls back past damaged ones, saying which it skipped.
"""

from __future__ import annotations

import os
import pathlib
import warnings

from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.tree import PyTree
from lora_jax._src.io import atomic
from lora_jax._src.io.checkpoint import (
  CheckpointMismatch,
  check_step,
  is_checkpoint,
  read,
  steps,
  write,
)

_STATE = "state"


def save_train_state(directory: str | os.PathLike[str], step: int, state: PyTree,
                     config: LoraConfig, *, max_to_keep: int | None = 3) -> pathlib.Path:
  """Saves a training state (adapters, optimizer state, anything else) for exact resume.

  Each step is a separate checkpoint ``directory/<step>``, written under a
  staging name and moved into place when complete: a save interrupted by a
  crash leaves the earlier steps untouched. Saving a step that exists replaces
  it atomically. Once the new step is in place, the oldest steps beyond
  ``max_to_keep`` are deleted.

  Args:
    directory: the folder of step checkpoints.
    step: the number of completed training steps (an int >= 0).
    state: a pytree of arrays, e.g. ``{"adapters": lp.adapters, "opt_state": opt_state}``.
    config: the ``LoraConfig``, saved beside the state.
    max_to_keep: how many step checkpoints to keep (None keeps all).

  Returns:
    The step checkpoint's directory.
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}.")
  if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                  or max_to_keep < 1):
    raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep!r}.")
  directory = pathlib.Path(directory).absolute()
  step = check_step(step)
  newer = [s for s in steps(directory) if s > step]
  if newer:
    raise FileExistsError(
        f"save_train_state: {directory} already holds step(s) {_span(newer)}, newer than step "
        f"{step}: another run's checkpoints, or this run restarted from scratch. Saving here "
        "would let retention delete this run's steps, and a resume would continue the other "
        "run. Resume from them (load_train_state), or save to a new directory.")
  final = write(directory / str(step), {_STATE: state}, config, overwrite=True,
                what="training-state checkpoint", lock=directory)
  if max_to_keep is not None:
    # Only steps older than the one just written (never it: a newer step was refused).
    for old in [s for s in steps(directory) if s <= step][:-max_to_keep]:
      if is_checkpoint(directory / str(old)):
        atomic.remove(directory / str(old))
  return final


def _span(found: list[int]) -> str:
  return str(found) if len(found) <= 4 else f"{found[0]}..{found[-1]} ({len(found)} steps)"


def _config_differences(saved: LoraConfig, given: LoraConfig) -> list[str]:
  mine, theirs = saved.to_dict(), given.to_dict()
  return [f"{k}: {theirs.get(k)!r} given, {mine.get(k)!r} saved"
          for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]


def load_train_state(directory: str | os.PathLike[str], target: PyTree, *,
                     config: LoraConfig | None = None, allow_config_change: bool = False
                     ) -> tuple[int, PyTree] | None:
  """Restores the newest intact training state saved by ``save_train_state``.

  Every array is verified against its recorded checksum. A step that cannot
  be read or fails verification is skipped with a ``UserWarning`` naming it,
  and the next older step is tried.

  Args:
    directory: the folder of step checkpoints.
    target: a tree like the saved ``state`` (arrays or ``jax.ShapeDtypeStruct``),
      giving structure, dtypes and shardings.
    config: the ``LoraConfig`` of the run that resumes: compared with the one saved
      beside the state (rank, alpha, rsLoRA, targets, ...). A resume under another
      config would continue training other math silently, so it is refused.
    allow_config_change: resume even when ``config`` differs (a warning names the
      fields).

  Returns:
    ``(step, state)``, or None when there is no checkpoint yet.

  Raises:
    CheckpointMismatch: when a checkpoint does not hold a tree like ``target``
      (another model or optimizer: not skipped, as every step would differ), or was
      saved with another config than ``config`` (naming the fields).
    ValueError: when step folders exist but none reads back intact.

  Example (the resume recipe)::

    start, state = 0, {"adapters": lp.adapters, "opt_state": tx.init(lp)}
    if (found := lj.load_train_state(ckpt_dir, state, config=config)) is not None:
      start, state = found
    for step in range(start, num_steps):
      ...  # train; then every k steps:
      lj.save_train_state(ckpt_dir, step + 1, state, config)
  """
  directory = pathlib.Path(directory).absolute()
  skipped: list[str] = []
  for step in reversed(steps(directory)):
    try:
      saved, restored = read(directory / str(step), {_STATE: target},
                             "Training-state checkpoint")
    except CheckpointMismatch:
      raise
    except (ValueError, OSError) as e:  # damaged, or a file of it missing
      skipped.append(f"step {step}: {str(e).splitlines()[0]}")
      continue
    differ = [] if config is None else _config_differences(saved, config)
    if differ:
      message = (f"load_train_state: step {step} in {directory} was saved with another "
                 "LoraConfig than this run's:\n  - " + "\n  - ".join(differ))
      if not allow_config_change:
        raise CheckpointMismatch(message + "\nResuming would continue training other math. "
                                 "Resume with the saved config, or pass "
                                 "allow_config_change=True if the change is meant.")
      warnings.warn(message, stacklevel=2)
    if skipped:
      warnings.warn(f"load_train_state: resuming from step {step}; skipped newer damaged "
                    "step(s):\n  - " + "\n  - ".join(skipped), stacklevel=2)
    return step, restored[_STATE]
  if skipped:
    raise ValueError(f"load_train_state: no intact checkpoint in {directory}:\n  - "
                     + "\n  - ".join(skipped))
  return None
