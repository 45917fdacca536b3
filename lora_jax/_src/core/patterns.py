"""Regular expressions that cannot hang a match: the shapes of pattern that backtrack
without bound are refused when a pattern is made.

Python's ``re`` backtracks. A pattern that nests one repeat inside another
(``(a+)+``, ``(a|aa)*``), refers back to a group, or chains many unbounded repeats
(``.*.*.*.*x``) can take exponential or high-polynomial time on a short path, and
patterns arrive from files (a PEFT ``rank_pattern``, a checkpoint's config). Every
pattern lora_jax matches is checked here first: no repeat of anything that itself
repeats or branches, no backreference, and at most ``MAX_UNBOUNDED`` unbounded
repeats. Every pattern that names parameter paths (``kernel$``,
``layers_\\d+/attn/(query|value)``, ``.*q_proj``) fits within these bounds; matching
then takes at most polynomial time of low degree in the path length, which paths
keep short.
"""

from __future__ import annotations

import re
from typing import Any

try:  # Python 3.11+
  from re import _constants as _sre  # type: ignore[attr-defined]
  from re import _parser as _parse  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
  import sre_constants as _sre  # type: ignore[no-redef]
  import sre_parse as _parse  # type: ignore[no-redef]

MAX_UNBOUNDED = 2
MAX_PATH = 512  # longest path or module name matched against a pattern from a file
MAX_LENGTH = 1000
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None))


def _walk(items: Any, inside_repeat: bool, found: list[str], counts: list[int]) -> None:
  for op, arg in items:
    if op in _REPEATS and op is not None:
      low, high, body = arg
      repeats = high is _sre.MAXREPEAT or high > 1
      if repeats and inside_repeat:
        found.append("a repeat inside a repeat, such as (a+)+")
      if high is _sre.MAXREPEAT:
        counts[0] += 1
      _walk(body, inside_repeat or repeats, found, counts)
    elif op is _sre.SUBPATTERN:
      _walk(arg[-1], inside_repeat, found, counts)
    elif op is _sre.BRANCH:
      if inside_repeat:
        found.append("alternatives inside a repeat, such as (a|aa)*")
      for branch in arg[1]:
        _walk(branch, inside_repeat, found, counts)
    elif op in (_sre.GROUPREF, getattr(_sre, "GROUPREF_EXISTS", None)):
      found.append("a backreference to a group")
    elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
      _walk(arg[1], inside_repeat, found, counts)


def compile_safe(pattern: str, where: str) -> re.Pattern[str]:
  """Compiles ``pattern`` after refusing the shapes that can make a match hang.

  Raises:
    ValueError: naming ``where``, the pattern and what makes it unsafe, or its syntax error.
  """
  if not isinstance(pattern, str):
    raise ValueError(f"{where}: {pattern!r} is not a regular expression string.")
  if len(pattern) > MAX_LENGTH:
    raise ValueError(f"{where}: a pattern of {len(pattern)} characters; at most {MAX_LENGTH}.")
  try:
    compiled = re.compile(pattern)
    parsed = _parse.parse(pattern)
  except re.error as e:
    raise ValueError(f"{where}: {pattern!r} is not a valid regular expression ({e}). Patterns "
                     "are Python regular expressions matched against paths like "
                     "'params/Dense_0/kernel'; escape special characters with re.escape.") \
        from None
  found: list[str] = []
  counts = [0]
  _walk(parsed, False, found, counts)
  if counts[0] > MAX_UNBOUNDED:
    found.append(f"{counts[0]} unbounded repeats (at most {MAX_UNBOUNDED})")
  if found:
    raise ValueError(f"{where}: {pattern!r} could take exponential time to match: it has "
                     f"{found[0]}. Patterns are checked so that one from a file cannot hang a "
                     "merge; write it without nested repeats (e.g. 'layers_\\d+/attn' instead "
                     "of '(layers_\\d+/)+attn').")
  return compiled
