"""What every process of a multi-process save must agree on: one staging name, and barriers.

A checkpoint written by several processes (each writing its shards) is staged in one
folder that all of them name alike: process 0's pid and a random token, broadcast to
the others. Barriers order the writes before process 0's commit and the commit before
anyone goes on. With one process both are local.
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np

from lora_jax._src.io import atomic


def sync(name: str) -> None:
  """A barrier across processes (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(name)


def agreed_staging(final: pathlib.Path) -> pathlib.Path:
  """A staging name for ``final`` all processes agree on (process 0's pid and token)."""
  if jax.process_count() == 1:
    return atomic.staging_path(final)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  mine = np.array([os.getpid(), int.from_bytes(os.urandom(3), "little")], np.int32)
  pid, token = (int(v) for v in multihost_utils.broadcast_one_to_all(mine))
  return atomic.staging_path(final, host="multiprocess", pid=pid, token=f"{token:06x}")


def is_primary() -> bool:
  """Whether this process locks, checks and commits (process 0)."""
  return jax.process_index() == 0
