"""Writing outputs so that a crash, a kill or a second writer never loses data.

Every checkpoint, merge output and PEFT export is written under a staging name
beside its destination (``<name>.lora-jax-partial-<host>-<pid>-<token>``) and
moved into place only when complete:

* a new destination is a plain ``rename``;
* an existing one is swapped with the staging copy in one atomic
  ``renameat2(RENAME_EXCHANGE)`` on Linux, so the destination name always holds
  a complete old or new output; elsewhere the old output is first renamed aside
  and deleted only after the new one is in place (a crash in between leaves it
  under ``<name>.lora-jax-old-...``, never deleted);
* writers to one destination take an exclusive lock
  (``.<name>.lora-jax-lock`` beside it, ``flock``): concurrent writers are
  serialized, each output is complete, and the last to finish is what stays;
* every writer goes through ``Output.staged`` (one lock, one stale-staging cleanup, one
  "may I replace this?" rule, one commit, one discard on failure); small files
  (metrics, plots) through ``write_file``, which is the same path for one file;
* staging folders left by killed processes (their pid no longer runs on this
  host) are removed by the next writer to the same destination, and listed by
  ``stale_staging``. A multi-process save's staging names no host (all
  processes must agree on it), so it is never removed automatically.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import pathlib
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator

_PARTIAL = ".lora-jax-partial-"
_OLD = ".lora-jax-old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _host() -> str:
  return socket.gethostname().replace("-", "_").replace("/", "_") or "host"


def staging_path(final: pathlib.Path, *, host: str | None = None, pid: int | None = None,
                 token: str | None = None) -> pathlib.Path:
  """A fresh staging name beside ``final``, naming this host and process (or those given)."""
  host = _host() if host is None else host
  pid = os.getpid() if pid is None else pid
  token = secrets.token_hex(4) if token is None else token
  return final.with_name(f"{final.name}{_PARTIAL}{host}-{pid}-{token}")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def stale_staging(final: pathlib.Path) -> list[pathlib.Path]:
  """Staging folders or files for ``final`` whose writer no longer runs on this host.

  Staging names written on another host are never reported: their writer may
  still be running there.
  """
  final = pathlib.Path(final).absolute()
  found = []
  prefix = f"{final.name}{_PARTIAL}"
  if not final.parent.is_dir():
    return []
  for entry in final.parent.iterdir():
    if not entry.name.startswith(prefix):
      continue
    parts = entry.name[len(prefix):].split("-")
    if len(parts) < 3 or parts[0] != _host() or not parts[1].isdigit():
      continue
    if not _pid_alive(int(parts[1])):
      found.append(entry)
  return sorted(found)


def remove(path: pathlib.Path) -> None:
  """Removes a file or a folder tree (missing is fine)."""
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


def clean_stale(final: pathlib.Path) -> list[pathlib.Path]:
  """Removes ``stale_staging(final)``; returns what was removed."""
  stale = stale_staging(final)
  for path in stale:
    remove(path)
  return stale


@contextlib.contextmanager
def locked(final: pathlib.Path) -> Iterator[None]:
  """Holds an exclusive lock for writing ``final`` (waits for another writer to finish)."""
  import fcntl  # pylint: disable=import-outside-toplevel  # POSIX only

  final.parent.mkdir(parents=True, exist_ok=True)
  lock_file = final.parent / f".{final.name}.lora-jax-lock"
  fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Atomically swaps two paths (Linux ``renameat2``); False where unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                        ctypes.c_uint]
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
    return False  # the file system cannot exchange
  raise OSError(code, os.strerror(code), str(a))


def commit(staging: pathlib.Path, final: pathlib.Path) -> None:
  """Moves a complete ``staging`` output to ``final``, replacing what is there.

  Call while holding ``locked(final)``. The old output, if any, is deleted
  only after the new one is in place.
  """
  if not (final.exists() or final.is_symlink()):
    os.rename(staging, final)
    return
  if _exchange(staging, final):
    remove(staging)  # now holds the old output
    return
  aside = final.with_name(f"{final.name}{_OLD}{secrets.token_hex(4)}")
  os.rename(final, aside)
  os.rename(staging, final)
  remove(aside)


def occupied(path: pathlib.Path) -> bool:
  """Whether writing ``path`` would replace something: a file, a link or a non-empty folder."""
  if path.is_symlink() or path.is_file():
    return True
  return path.is_dir() and any(path.iterdir())


def check_replaceable(path: pathlib.Path, *, overwrite: bool,
                      ours: Callable[[pathlib.Path], bool], what: str,
                      alternative: str = "choose another path") -> None:
  """Refuses to write ``path`` where that would replace something it must not.

  An empty folder or nothing at all is fine. Anything else needs ``overwrite``,
  and even then only ``what`` (as ``ours`` recognizes it) is ever replaced.

  Raises:
    FileExistsError: naming ``path`` and the fix.
  """
  if not occupied(path):
    return
  if not overwrite:
    raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite on the "
                          f"command line) to replace it, or {alternative}.")
  if not ours(path):
    raise FileExistsError(f"{path} exists and is not {what}; refusing to replace it even with "
                          "overwrite=True. Remove it yourself or choose another path.")


def discard(staging: pathlib.Path) -> None:
  """Removes a staging output and the pending folders a writer left beside it under its name."""
  for partial in staging.parent.glob(f"{staging.name}*"):
    remove(partial)


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
  return path == folder or folder in path.parents


def check_separate(out: str | os.PathLike[str],
                   inputs: Iterable[tuple[str, str | os.PathLike[str]]], what: str) -> None:
  """Refuses an output that is, contains, or lies inside one of the inputs.

  Args:
    out: the output path.
    inputs: ``(name, path)`` of each input (e.g. ``("--base", base)``).
    what: the writer, for the message (e.g. ``"lora-jax merge"``).

  Raises:
    ValueError: naming the clashing input.
  """
  out_real = pathlib.Path(os.path.realpath(out))
  for name, path in inputs:
    real = pathlib.Path(os.path.realpath(path))
    if _inside(out_real, real) or _inside(real, out_real):
      relation = ("is" if out_real == real else
                  "lies inside" if _inside(out_real, real) else "contains")
      raise ValueError(f"{what}: the output {out} {relation} the input {name} {path}; "
                       "writing there could destroy the input. Choose an output path outside "
                       "every input.")


@dataclasses.dataclass(frozen=True)
class Stage:
  """A staging output being written: ``path`` (write here) and the stale staging removed."""

  path: pathlib.Path
  removed: tuple[pathlib.Path, ...]


@dataclasses.dataclass(frozen=True)
class Output:
  """One destination lora_jax writes, and the one rule for replacing what is there.

  Attributes:
    final: the destination (absolute).
    overwrite: whether something already there may be replaced at all.
    ours: recognizes what this writer may replace (its own earlier output).
    what: how messages name that kind of output.
    alternative: the other way out, for the message.
  """

  final: pathlib.Path
  overwrite: bool
  ours: Callable[[pathlib.Path], bool]
  what: str
  alternative: str = "choose another path"

  def check(self) -> None:
    """``check_replaceable`` for this destination (call early, before any work)."""
    check_replaceable(self.final, overwrite=self.overwrite, ours=self.ours, what=self.what,
                      alternative=self.alternative)

  @contextlib.contextmanager
  def staged(self, *, lock: pathlib.Path | None = None, staging: pathlib.Path | None = None,
             primary: bool = True, sync: Callable[[str], None] | None = None
             ) -> Iterator[Stage]:
    """Writes under a staging name and commits it to ``final`` when the block completes.

    Under the lock (``lock``, default ``final``): stale staging of killed writers is
    removed, the destination is checked again (another writer may have finished
    first), the block writes ``Stage.path``, and the result replaces ``final``
    atomically. If the block raises (or the process is killed), the staging output
    and any pending folders beside it are removed and ``final`` is as it was.

    Args:
      lock: the path whose lock serializes writers (a folder of steps shares one).
      staging: a staging name all processes agree on (multi-process saves).
      primary: whether this process locks, checks and commits (process 0); the
        others only write their shards into ``staging``.
      sync: called with ``"written"`` before the commit and ``"committed"`` after it
        (a barrier across processes).
    """
    self.check()
    self.final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(self.final) if staging is None else staging
    with locked(lock or self.final) if primary else contextlib.nullcontext():
      removed: list[pathlib.Path] = []
      if primary:
        removed = clean_stale(self.final)
        self.check()
      try:
        yield Stage(staging, tuple(removed))
        if sync is not None:
          sync("written")
        if primary:
          commit(staging, self.final)
        if sync is not None:
          sync("committed")
      except BaseException:
        if primary:
          discard(staging)
        raise


def write_file(final: str | os.PathLike[str], data: bytes | str, *,
               ours: Callable[[pathlib.Path], bool] = lambda p: p.is_file(),
               what: str = "a file") -> pathlib.Path:
  """Writes one small file atomically (fsynced, then renamed over ``final``).

  An existing file at ``final`` is replaced only if ``ours`` recognizes it (by
  default any regular file: the writer's own output by name, such as a run's
  ``metrics.json``); a folder or link there is never replaced.
  """
  final = pathlib.Path(final).absolute()
  out = Output(final, overwrite=True, ours=ours, what=what)
  with out.staged() as stage:
    with open(stage.path, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
  return final


class InUse(RuntimeError):
  """A folder another process holds for its whole run (``owned``)."""


@contextlib.contextmanager
def owned(folder: pathlib.Path, what: str) -> Iterator[None]:
  """Holds ``folder`` for one writer for the whole block; a second one is refused at once.

  Raises:
    InUse: (a ``RuntimeError``) when another process holds it, naming the folder and
      the fix.
  """
  import fcntl  # pylint: disable=import-outside-toplevel  # POSIX only

  folder.mkdir(parents=True, exist_ok=True)
  fd = os.open(folder / ".lora-jax-owner", os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
      raise InUse(f"{folder} is in use by {what} running as {holder}; two runs into one "
                         "folder would mix their outputs. Wait for it to finish or choose "
                         "another folder.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {_host()}".encode("ascii"), 0)
    yield
  finally:
    os.close(fd)
