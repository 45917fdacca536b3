"""Training progress for ``lora-jax train``: a live line on a terminal, plain lines in a log.

On a terminal the line is redrawn in place (``\\r``) at most every ``interval``
seconds with the step count, steps per second, the latest loss and the time
left. Anywhere else (a log file, a pipe, CI) a full line is written every
``interval`` seconds (10 by default) and once at the end, so a log shows the
run advancing instead of one frozen count.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  minutes, seconds = divmod(seconds, 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class Progress:
  """Reports ``step / total`` of one training phase.

  Args:
    total: the number of steps in the phase.
    desc: the phase's name, shown first on every line.
    stream: where to write (default ``sys.stderr``).
    interval: seconds between reports (default 0.2 on a terminal, 10 otherwise).
    clock: the time source (``time.monotonic``); tests pass a fake one.
  """

  def __init__(self, total: int, desc: str, *, stream: TextIO | None = None,
               interval: float | None = None, clock: Callable[[], float] = time.monotonic):
    self.total, self.desc = total, desc
    self.stream = stream if stream is not None else sys.stderr
    isatty = getattr(self.stream, "isatty", None)
    self.live = bool(isatty and isatty())
    self.interval = interval if interval is not None else (0.2 if self.live else 10.0)
    self.clock = clock
    self.start = self.last = clock()
    self.step = 0
    self.loss: float | None = None
    self.width = 0

  def line(self) -> str:
    """The current report, e.g. ``lora: 120/600 (20%) 85.3 steps/s loss 0.4121 eta 00:05``."""
    elapsed = self.clock() - self.start
    rate = self.step / elapsed if elapsed > 0 else 0.0
    parts = [f"{self.desc}: {self.step}/{self.total} ({100 * self.step // max(self.total, 1)}%)",
             f"{rate:.1f} steps/s"]
    if self.loss is not None:
      parts.append(f"loss {self.loss:.4f}")
    if self.step < self.total and rate > 0:
      parts.append(f"eta {_duration((self.total - self.step) / rate)}")
    else:
      parts.append(f"{_duration(elapsed)} elapsed")
    return " ".join(parts)

  def update(self, step: int, loss: float | None = None) -> None:
    """Records that ``step`` steps are done (and the latest loss); reports when due."""
    self.step = step
    if loss is not None:
      self.loss = loss
    now = self.clock()
    if now - self.last >= self.interval:
      self.last = now
      self._write()

  def close(self) -> None:
    """Writes the final report (and ends the live line)."""
    self._write()
    if self.live:
      self.stream.write("\n")
    self.stream.flush()

  def _write(self) -> None:
    text = self.line()
    if self.live:
      self.stream.write("\r" + text.ljust(self.width))
      self.width = len(text)
    else:
      self.stream.write(text + "\n")
    self.stream.flush()
