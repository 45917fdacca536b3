"""Fine-tuning tasks for ``lora-jax train``, on data that ships with Python or with lora_jax.

* ``digits``: an MLP on the UCI handwritten digits (shipped in ``data/``), pretrained on the
  original images and adapted to rotated ones (Flax Linen or NNX).
* ``textcls``: a small Transformer encoder classifying standard-library docstrings by
  package; pretrained on four packages, adapted to four others with a new head.
* ``charlm``: a character-level Transformer LM pretrained on standard-library Python
  source and adapted to English prose (the CPython license and module docstrings);
  optionally with ``nn.scan`` over its blocks.

Nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pathlib
import pkgutil
import sysconfig
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Task(NamedTuple):
  """What the training job needs from a task."""

  init: Callable[[jax.Array], Any]                   # key -> parameters
  apply: Callable[..., jax.Array]                    # (params, inputs) -> outputs
  loss: Callable[[jax.Array, jax.Array], jax.Array]  # (outputs, targets) -> scalar
  pretrain: tuple[np.ndarray, np.ndarray]
  train: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  metric: str                                        # "accuracy" or "perplexity"
  sample: Callable[[Any, Callable[..., jax.Array]], str] | None = None
  # (batch_size, seed) -> an iterator of (x, y) batches with get_state/set_state (grain);
  # None: the job draws from ``train`` itself.
  batches: Callable[[int, int], Any] | None = None


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


# --- digits ----------------------------------------------------------------------------


class LinenMlp(nn.Module):
  hidden: tuple[int, ...]
  classes: int

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.classes, name="head")(x)


class NnxMlp(nnx.Module):
  def __init__(self, features: int, hidden: tuple[int, ...], classes: int, rngs: nnx.Rngs):
    widths = (features, *hidden)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths, widths[1:])])
    self.head = nnx.Linear(widths[-1], classes, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.head(x)


def _shift_digits(images: np.ndarray, shift: str, rng: np.random.Generator) -> np.ndarray:
  square = images.reshape(-1, 8, 8)
  if shift == "rotate":
    square = np.rot90(square, k=1, axes=(1, 2))
  elif shift == "noise":
    square = np.clip(square + rng.normal(0, 0.35, square.shape), 0, 1)
  elif shift == "invert":
    square = 1.0 - square
  return np.ascontiguousarray(square.reshape(-1, 64), np.float32)


DIGITS_FILE = pathlib.Path(__file__).parent / "data" / "digits.csv.gz"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """The 1,797 8x8 UCI digits (CC BY 4.0, see data/README.md): pixels / 16 and labels."""
  table = np.loadtxt(DIGITS_FILE, delimiter=",", dtype=np.int64)
  return (table[:, :-1] / 16.0).astype(np.float32), table[:, -1].astype(np.int32)


def digits(model: dict[str, Any], data: dict[str, Any], framework: str, seed: int) -> Task:
  x, y = load_digits()
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(x))
  half = len(x) // 2
  pre, rest = order[:half], order[half:]
  shifted = _shift_digits(x[rest], data["shift"], rng)
  cut = int(len(rest) * (1 - data["test_fraction"]))
  hidden = tuple(model["hidden"])
  if framework == "nnx":
    graphdef, state = nnx.split(NnxMlp(64, hidden, 10, nnx.Rngs(seed)))
    init = lambda key: state  # noqa: E731 - NNX initialises eagerly from its own rngs
    apply = lambda params, x: nnx.merge(graphdef, params)(x)  # noqa: E731
  else:
    net = LinenMlp(hidden, 10)
    init = lambda key: net.init(key, jnp.zeros((1, 64)))  # noqa: E731
    apply = net.apply
  return Task(init, apply, cross_entropy, (x[pre], y[pre]), (shifted[:cut], y[rest][:cut]),
              (shifted[cut:], y[rest][cut:]), "accuracy")


# --- Transformer pieces ----------------------------------------------------------------


class Block(nn.Module):
  heads: int
  mlp: int
  causal: bool

  @nn.compact
  def __call__(self, x, _=None):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2])) if self.causal else None
    x = x + nn.SelfAttention(num_heads=self.heads, name="attn")(nn.LayerNorm()(x), mask=mask)
    h = nn.gelu(nn.Dense(self.mlp, name="mlp_in")(nn.LayerNorm()(x)))
    return x + nn.Dense(x.shape[-1], name="mlp_out")(h), None


class Transformer(nn.Module):
  vocab: int
  d_model: int
  heads: int
  layers: int
  mlp: int
  max_len: int
  causal: bool
  classes: int = 0      # > 0: mean-pool and classify
  scan: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
    x = x + pos[:tokens.shape[1]]
    if self.scan:
      stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=self.layers)
      x, _ = stack(self.heads, self.mlp, self.causal, name="blocks")(x, None)
    else:
      for i in range(self.layers):
        x, _ = Block(self.heads, self.mlp, self.causal, name=f"block_{i}")(x)
    x = nn.LayerNorm()(x)
    if self.classes:
      return nn.Dense(self.classes, name="head")(x.mean(axis=1))
    return nn.Dense(self.vocab, name="lm_head")(x)


def _ascii(text: str) -> np.ndarray:
  codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32)
  return np.minimum(codes, 127)


def _windows(codes: np.ndarray, length: int) -> np.ndarray:
  """Non-overlapping windows of ``length`` codes (a trailing remainder is dropped)."""
  n = (len(codes) - 1) // length
  return codes[:n * length].reshape(n, length)


# --- charlm ------------------------------------------------------------------------------

_SOURCE_FILES = ("textwrap.py", "string.py", "glob.py", "fnmatch.py", "shlex.py", "base64.py",
                 "bisect.py", "heapq.py", "difflib.py", "calendar.py", "csv.py", "copy.py")
_PROSE_MODULES = ("os", "re", "json", "collections", "itertools", "functools", "textwrap",
                  "string", "random", "statistics", "datetime", "calendar", "difflib", "heapq",
                  "csv", "argparse", "logging", "decimal", "fractions", "pathlib", "shutil",
                  "tempfile", "zipfile", "tarfile", "pickle", "copy", "pprint", "enum", "typing",
                  "dataclasses", "inspect", "contextlib", "io", "threading", "queue",
                  "subprocess", "socket", "hashlib", "uuid", "base64", "struct", "codecs",
                  "locale", "operator", "weakref", "types", "traceback", "email", "http.client")


@functools.cache
def python_source() -> str:
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return "\n".join((stdlib / f).read_text(encoding="utf-8", errors="replace")
                   for f in _SOURCE_FILES if (stdlib / f).exists())


@functools.cache
def english_prose() -> str:
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  parts = []
  license_file = stdlib / "LICENSE.txt"
  if license_file.exists():
    parts.append(license_file.read_text(encoding="utf-8", errors="replace"))
  with warnings.catch_warnings():  # some modules warn on attribute access (typing.io)
    warnings.simplefilter("ignore")
    for name in _PROSE_MODULES:
      module = importlib.import_module(name)
      for _, obj in [("", module), *inspect.getmembers(module)]:
        doc = inspect.getdoc(obj) if (obj is module or inspect.isclass(obj)
                                      or inspect.isfunction(obj)) else None
        if doc and len(doc) > 80:
          parts.append(doc)
  return "\n\n".join(dict.fromkeys(parts))


def charlm(model: dict[str, Any], data: dict[str, Any], framework: str, seed: int) -> Task:
  del framework
  length = model["max_len"]
  source = _windows(_ascii(python_source()), length + 1)
  prose = _windows(_ascii(english_prose()), length + 1)
  rng = np.random.default_rng(seed)
  prose = prose[rng.permutation(len(prose))]
  cut = int(len(prose) * (1 - data["test_fraction"]))
  net = Transformer(128, model["d_model"], model["heads"], model["layers"], model["mlp"],
                    length, causal=True, scan=model["scan"])

  def split(windows):
    return windows[:, :-1], windows[:, 1:]

  def sample(params, apply, prompt="The ", n=80):
    """Greedy continuation of ``prompt``; causal, so padding after the context is ignored."""
    tokens = list(_ascii(prompt))
    step = jax.jit(lambda p, t: apply(p, t)[0])
    for _ in range(n):
      context = tokens[-length:]
      window = np.zeros((1, length), np.int32)
      window[0, :len(context)] = context
      tokens.append(int(np.argmax(np.asarray(step(params, window))[len(context) - 1])))
    return bytes(tokens).decode("ascii", "replace")

  init = lambda key: net.init(key, jnp.zeros((1, length), jnp.int32))  # noqa: E731
  return Task(init, net.apply, cross_entropy, split(source), split(prose[:cut]),
              split(prose[cut:]), "perplexity", sample)


# --- textcls -----------------------------------------------------------------------------


# The standard-library packages whose docstrings the textcls task may read. Importing a
# package runs its code (``antigravity`` opens a browser), so a job config chooses from
# this list, never any installed name.
TEXTCLS_PACKAGES = ("asyncio", "collections", "concurrent", "email", "encodings", "html",
                    "http", "importlib", "json", "logging", "multiprocessing", "sqlite3",
                    "unittest", "urllib", "wsgiref", "xml", "xmlrpc", "zoneinfo")


@functools.cache
def _docstrings(package: str) -> list[str]:
  if package not in TEXTCLS_PACKAGES:
    raise ValueError(f"textcls reads docstrings of {list(TEXTCLS_PACKAGES)} only, not "
                     f"{package!r}.")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    root = importlib.import_module(package)
    names = [package]
    if hasattr(root, "__path__"):
      names += [n for _, n, _ in pkgutil.walk_packages(root.__path__, package + ".")
                if "test" not in n and "__main__" not in n]
    found: list[str] = []
    for name in names:
      try:
        module = importlib.import_module(name)
      except Exception:  # noqa: BLE001 - optional platform modules may not import
        continue
      for _, obj in inspect.getmembers(module):
        if getattr(obj, "__module__", None) != name:
          continue
        members = [obj]
        if inspect.isclass(obj):
          members += [m for _, m in inspect.getmembers(obj, inspect.isfunction)
                      if m.__qualname__.startswith(obj.__name__)]
        found += [m.__doc__ for m in members
                  if (inspect.isclass(m) or inspect.isfunction(m)) and m.__doc__]
  return sorted(set(found))


def textcls(model: dict[str, Any], data: dict[str, Any], framework: str, seed: int) -> Task:
  del framework
  length = model["max_len"]
  rng = np.random.default_rng(seed)

  def dataset(packages):
    xs, ys = [], []
    for label, package in enumerate(packages):
      for doc in _docstrings(package):
        codes = _ascii(" ".join(doc.split()))[:length]
        xs.append(np.pad(codes, (0, length - len(codes))))
        ys.append(label)
    order = rng.permutation(len(xs))
    return np.stack(xs)[order].astype(np.int32), np.asarray(ys, np.int32)[order]

  pre_x, pre_y = dataset(data["pretrain_packages"])
  x, y = dataset(data["finetune_packages"])
  classes = max(len(data["pretrain_packages"]), len(data["finetune_packages"]))
  cut = int(len(x) * (1 - data["test_fraction"]))
  net = Transformer(128, model["d_model"], model["heads"], model["layers"], model["mlp"],
                    length, causal=False, classes=classes)
  init = lambda key: net.init(key, jnp.zeros((1, length), jnp.int32))  # noqa: E731
  return Task(init, net.apply, cross_entropy, (pre_x, pre_y), (x[:cut], y[:cut]),
              (x[cut:], y[cut:]), "accuracy")


TASKS = {"digits": digits, "charlm": charlm, "textcls": textcls}
