"""The user's text for a language-model job: JSONL records -> packed token windows with labels.

Each line of the JSONL file is one JSON object in one of three forms:

* ``{"text": ...}``: every token is a target;
* ``{"prompt": ..., "completion": ...}``: the completion's tokens are targets, the prompt's
  are context only;
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the model's own chat
  template (``tokenizer_config.json``'s ``chat_template``, Jinja2), the assistant turns are
  targets.

Text is tokenized with the folder's ``tokenizer.json`` (the ``tokenizers`` library); a token
is a target when its characters lie in a target span. Each record ends with the EOS token
(a target, so the model learns to stop; added unless the text already ends with it).
Records are packed: the token stream is cut into windows of ``seq_len + 1``; ``x`` is a
window without its last token, ``y`` the next tokens with ``-1`` where the next token is not
a target. Nothing here guesses: a record of another form, a template whose rendering of a
conversation does not start with its rendering of the conversation so far, or a tokenizer
without an EOS token is an error naming the line.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_FORMS = ({"text"}, {"prompt", "completion"}, {"messages"})


class Tokenizer:
  """A Hugging Face folder's ``tokenizer.json`` with its special tokens and chat template."""

  def __init__(self, folder: str | pathlib.Path):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError('Reading a Hugging Face tokenizer needs the tokenizers package: '
                        'pip install "lora_jax[models]".') from None
    folder = pathlib.Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
      raise FileNotFoundError(f"{folder}: tokenizer.json is missing; the job tokenizes the "
                              "data with the model's own tokenizer (save it with "
                              "tokenizer.save_pretrained(folder)).")
    self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
    settings: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
      settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    model_config = json.loads((folder / "config.json").read_text(encoding="utf-8")) \
        if (folder / "config.json").is_file() else {}
    self.chat_template = settings.get("chat_template")
    self.bos_token = _token_text(settings.get("bos_token"))
    self.eos_token = _token_text(settings.get("eos_token"))
    eos = model_config.get("eos_token_id")
    if isinstance(eos, list):
      eos = eos[0] if eos else None
    if eos is None and self.eos_token is not None:
      eos = self.tokenizer.token_to_id(self.eos_token)
    if eos is None:
      raise ValueError(f"{folder}: no EOS token (config.json eos_token_id or "
                       "tokenizer_config.json eos_token); records could not end.")
    self.eos_id = int(eos)
    if self.eos_token is None:
      self.eos_token = self.tokenizer.id_to_token(self.eos_id)
    self.vocab_size = self.tokenizer.get_vocab_size()

  def encode(self, text: str, special: bool) -> tuple[list[int], list[tuple[int, int]]]:
    found = self.tokenizer.encode(text, add_special_tokens=special)
    return list(found.ids), [tuple(o) for o in found.offsets]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids))

  def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    import jinja2  # pylint: disable=import-outside-toplevel
    from jinja2 import sandbox  # pylint: disable=import-outside-toplevel

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                undefined=jinja2.StrictUndefined)
    env.globals["raise_exception"] = _raise
    return env.from_string(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _token_text(token: Any) -> str | None:
  if isinstance(token, Mapping):  # {"content": "<s>", ...}
    return token.get("content")
  return token


def _raise(message: str) -> None:
  raise ValueError(f"the chat template refused the conversation: {message}")


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of a JSONL file, each checked to be one of the three forms."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config key 'data.jsonl': {path} does not exist.")
  records = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      record = json.loads(line)
    except ValueError as e:
      raise ValueError(f"{where}: not a JSON object ({e}).") from None
    if not isinstance(record, dict) or set(record) not in _FORMS:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise ValueError(f"{where}: a record holds exactly one of {{text}}, {{prompt, "
                       f"completion}} or {{messages}}; found {keys}.")
    strings = [record[k] for k in record if k != "messages"]
    if not all(isinstance(s, str) for s in strings):
      raise ValueError(f"{where}: text, prompt and completion must be strings.")
    if "messages" in record:
      messages = record["messages"]
      if (not isinstance(messages, list) or not messages or not all(
          isinstance(m, dict) and set(m) >= {"role", "content"}
          and isinstance(m["role"], str) and isinstance(m["content"], str)
          for m in messages)):
        raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}} "
                         "strings.")
      if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to learn.")
    records.append({"where": where, **record})
  if not records:
    raise ValueError(f"config key 'data.jsonl': {path} holds no records.")
  return records


def _spans(record: Mapping[str, Any], tokenizer: Tokenizer) -> tuple[str, list[tuple[int, int]],
                                                                     bool]:
  """(text, target character spans, whether to add the tokenizer's special tokens)."""
  if "text" in record:
    return record["text"], [(0, len(record["text"]))], True
  if "prompt" in record:
    text = record["prompt"] + record["completion"]
    return text, [(len(record["prompt"]), len(text))], True
  if tokenizer.chat_template is None:
    raise ValueError(f"{record['where']}: a chat record, but the model folder's "
                     "tokenizer_config.json has no chat_template.")
  messages = record["messages"]
  spans = []
  previous = ""
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    before = tokenizer.render(messages[:i], add_generation_prompt=True)
    through = tokenizer.render(messages[:i + 1], add_generation_prompt=False)
    if not (before.startswith(previous) and through.startswith(before)):
      raise ValueError(f"{record['where']}: the chat template's rendering of the conversation "
                       "up to an assistant turn is not a prefix of its rendering with that "
                       "turn, so the assistant's tokens cannot be told apart; use "
                       "prompt/completion records instead.")
    spans.append((len(before), len(through)))
    previous = through
  text = tokenizer.render(messages, add_generation_prompt=False)
  if not text.startswith(previous):
    raise ValueError(f"{record['where']}: the chat template renders the whole conversation "
                     "differently from its turns; use prompt/completion records instead.")
  return text, spans, False


def tokenize(record: Mapping[str, Any], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens, is_target)`` of one record, EOS appended (a target)."""
  text, spans, special = _spans(record, tokenizer)
  ids, offsets = tokenizer.encode(text, special)
  target = [any(lo <= start < hi for lo, hi in spans) and end > start
            for start, end in offsets]
  if not ids or ids[-1] != tokenizer.eos_id:  # a chat template may end with EOS itself
    ids, target = ids + [tokenizer.eos_id], target + [True]
  return np.asarray(ids, np.int32), np.asarray(target, bool)


def pack(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int
         ) -> tuple[np.ndarray, np.ndarray]:
  """Packs records into ``(x, y)`` windows ``[n, seq_len]``; ``y`` is -1 where not a target.

  The last window is padded (labels -1) so no record is dropped.
  """
  tokens = np.concatenate([t for t, _ in examples])
  target = np.concatenate([m for _, m in examples])
  rows = max(1, -(-(len(tokens) - 1) // seq_len))
  size = rows * seq_len + 1
  pad = size - len(tokens)
  tokens = np.concatenate([tokens, np.zeros(pad, np.int32)])
  target = np.concatenate([target, np.zeros(pad, bool)])
  index = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  windows, targets = tokens[index], target[index]
  x = windows[:, :-1]
  y = np.where(targets[:, 1:], windows[:, 1:], -1).astype(np.int32)
  return x, y


def split_examples(records: list[dict[str, Any]], tokenizer: Tokenizer, test_fraction: float,
                   seed: int) -> tuple[list, list]:
  """Tokenized records, shuffled with ``seed``, split into (train, held-out)."""
  examples = [tokenize(r, tokenizer) for r in records]
  for record, (ids, _) in zip(records, examples):
    if ids.max(initial=0) >= tokenizer.vocab_size:
      raise ValueError(f"{record['where']}: token id {ids.max()} is outside the vocabulary.")
  order = np.random.default_rng(seed).permutation(len(examples))
  held = max(1, round(test_fraction * len(examples)))
  if held >= len(examples):
    raise ValueError(f"config key 'data.test_fraction': {test_fraction} of {len(examples)} "
                     "records leaves none to train on; add records or lower it.")
  return ([examples[i] for i in order[held:]], [examples[i] for i in order[:held]])


def prompts_for_samples(records: list[dict[str, Any]], tokenizer: Tokenizer, count: int
                        ) -> list[tuple[str, list[int]]]:
  """The first ``count`` records' prompts (text: its first half), as (text, ids)."""
  out = []
  for record in records[:count]:
    if "prompt" in record:
      text, special = record["prompt"], True
    elif "messages" in record:
      first = next(i for i, m in enumerate(record["messages"]) if m["role"] == "assistant")
      text, special = tokenizer.render(record["messages"][:first], True), False
    else:
      text, special = record["text"][:max(1, len(record["text"]) // 2)], True
    ids, _ = tokenizer.encode(text, special)
    if ids:
      out.append((text, ids))
  return out
