"""Reading YAML safely: standard tags only, bounded alias expansion, short errors.

``yaml.safe_load`` already refuses ``!!python`` tags, but it expands aliases
without limit: a few hundred bytes of nested aliases (a "billion laughs" file)
grow into gigabytes. The node graph is composed first and its expanded size
counted without expanding it; a file beyond ``MAX_NODES`` is refused.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 50


def _expanded_size(root: yaml.Node) -> int:
  """The number of nodes ``root`` expands to, counting each alias target at every use."""
  sizes: dict[int, int] = {}
  order: list[yaml.Node] = []
  stack, seen = [root], set()
  while stack:  # post-order without recursion (deep nesting must not overflow the stack)
    node = stack.pop()
    if id(node) in seen:
      continue
    seen.add(id(node))
    order.append(node)
    if isinstance(node, yaml.SequenceNode):
      stack.extend(node.value)
    elif isinstance(node, yaml.MappingNode):
      stack.extend(n for pair in node.value for n in pair)
  for node in reversed(order):
    if isinstance(node, yaml.SequenceNode):
      children = node.value
    elif isinstance(node, yaml.MappingNode):
      children = [n for pair in node.value for n in pair]
    else:
      children = []
    sizes[id(node)] = min(1 + sum(sizes.get(id(c), 1) for c in children), MAX_NODES + 1)
  return sizes[id(root)]


def _nesting(text: str) -> int:
  """The deepest nesting of flow collections and block indentation, from the tokens alone
  (the composer recurses per level: a deep file would overflow Python's stack)."""
  depth = deepest = 0
  try:
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
      if isinstance(token, (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken,
                            yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken)):
        depth += 1
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
          return deepest
      elif isinstance(token, (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken,
                              yaml.BlockEndToken)):
        depth -= 1
  except yaml.YAMLError:
    return deepest  # the parse below reports it
  return deepest


def load_yaml(text: str, where: str) -> Any:
  """Parses YAML text with the safe loader, refusing alias bombs and oversized input.

  Args:
    text: the YAML document.
    where: names the source in error messages (a file path, ``--set key``).

  Raises:
    ValueError: for invalid YAML, a non-standard tag, or a document that is
      too large or expands beyond ``MAX_NODES`` nodes.
  """
  if len(text) > MAX_BYTES:
    raise ValueError(f"{where}: {len(text):,} bytes; a job or LoRA config is at most "
                     f"{MAX_BYTES:,} bytes.")
  depth = _nesting(text)
  if depth > MAX_DEPTH:
    raise ValueError(f"{where}: nested {depth} levels deep; a job or LoRA config has at most "
                     f"{MAX_DEPTH} levels.")
  try:
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None and _expanded_size(node) > MAX_NODES:
      raise ValueError(f"{where}: its aliases (*name) expand to more than {MAX_NODES:,} values; "
                       "refusing to expand it. A config needs no deeply nested aliases.")
    return yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    hint = (" Only standard YAML tags are allowed: no !!python objects."
            if "tag" in str(problem) else "")
    raise ValueError(f"{where}: not valid YAML{at}: {str(problem)[:200]}.{hint}") from None


def short(value: Any, limit: int = 80) -> str:
  """``repr(value)`` cut to ``limit`` characters, for error messages."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."
