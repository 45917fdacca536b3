"""The ``lora-jax`` command line: ``train``, ``merge`` and ``inspect``."""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import time

import numpy as np

from lora_jax._src.adapters.summary import format_table, natural_key, natural_sorted


def _name_map(rules: list[str]):
  """``--name-map REGEX=REPLACEMENT`` rules as one function of a PEFT module name."""
  import re  # pylint: disable=import-outside-toplevel

  compiled = []
  for rule in rules:
    pattern, sep, replacement = rule.partition("=")
    if not sep:
      raise ValueError(f"--name-map takes REGEX=REPLACEMENT, got {rule!r}.")
    try:
      compiled.append((re.compile(pattern), replacement))
    except re.error as e:
      raise ValueError(f"--name-map {rule!r}: {pattern!r} is not a valid regex ({e}).") from None

  def name(module: str) -> str:
    for pattern, replacement in compiled:
      module = pattern.sub(replacement, module)
    return module

  return name


def _merge_hf(args: argparse.Namespace) -> int:
  from lora_jax._src.io.hf_merge import merge_hf  # pylint: disable=import-outside-toplevel

  given = [flag for flag, value in (("--format", args.format), ("--group-mb", args.group_mb),
                                     ("--force", args.force or None)) if value is not None]
  if given:
    raise ValueError(f"{', '.join(given)} do(es) not apply to a Hugging Face base: the output is "
                     "a Hugging Face folder of safetensors shards (--max-shard-size), read one "
                     "tensor at a time, and a PEFT adapter records no base fingerprint to "
                     "force past. Leave them out.")
  start = time.perf_counter()
  report = merge_hf(args.base, args.adapters, args.out, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, tensor_name=_name_map(args.name_map),
                    safe=args.safe, overwrite=args.overwrite)
  for path in report["removed_stale"]:
    print(f"removed {path}: staging left by a merge that was killed")
  for name in report["not_copied"]:
    print(f"not copied: {name} (weights in another format; the output holds only the merged "
          "safetensors)")
  print(f"merged {report['merged']} of {report['tensors']} tensors, wrote "
        f"{report['bytes'] / 2**20:.1f} MiB in {report['shards']} shard(s) to {report['out']} "
        f"in {time.perf_counter() - start:.1f} s (a Hugging Face folder: from_pretrained loads it)")
  return 0


def _merge(args: argparse.Namespace) -> int:
  from lora_jax._src.io.hf_merge import is_hf_folder  # pylint: disable=import-outside-toplevel
  from lora_jax._src.io.streaming import merge_checkpoint  # pylint: disable=import-outside-toplevel

  if is_hf_folder(args.base):
    if args.adapter is not None:
      raise ValueError("--adapter selects one adapter of a lora_jax adapter stack; a Hugging "
                       "Face merge takes one PEFT adapter folder.")
    return _merge_hf(args)
  if args.name_map:
    raise ValueError("--name-map applies to Hugging Face bases (a folder with "
                     "model.safetensors.index.json or model.safetensors).")
  start = time.perf_counter()
  report = merge_checkpoint(args.base, args.adapters, args.out, dtype=args.dtype, safe=args.safe,
                            output_format=args.format or "orbax",
                            group_bytes=(128 if args.group_mb is None else args.group_mb) << 20,
                            overwrite=args.overwrite, force=args.force, adapter=args.adapter)
  for path in report["removed_stale"]:
    print(f"removed {path}: staging left by a merge that was killed")
  print(f"merged {report['merged']} of {report['leaves']} leaves ({report['trained']} trained "
        f"in full), wrote "
        f"{report['bytes'] / 2**20:.1f} MiB to {report['out']} in "
        f"{time.perf_counter() - start:.1f} s")
  if report["verified"] is None:
    print("base: no checksum record (not written by lora_jax), so its bytes were not verified; "
          "the output records the SHA-256 of every leaf")
  else:
    print(f"base: all {report['verified']} leaves verified against their SHA-256 record")
  if report["lineage"] is None:
    print("adapters: no fingerprint of the base they were trained on (saved from lp.adapters "
          "alone, or by lora_jax < 0.3), so the base could not be checked against it")
  else:
    print(f"adapters: {report['lineage']} adapted base leaves match the fingerprint of the base "
          "they were trained on")
    for line in report["lineage_unchecked"]:
      print(f"adapters: not compared: {line}")
  return 0


def _inspect_quantized(path: str) -> int:
  """A quantized base (``lora_jax.save_quantized``): its quantized leaves and their bits."""
  from lora_jax._src.io.streaming import open_base  # pylint: disable=import-outside-toplevel

  reader = open_base(path)
  rows, params, nbytes = [], 0, 0
  for p in natural_sorted(reader.quantized):
    q = reader.quantized[p]
    size = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in q.arrays)
    params, nbytes = params + q.size, nbytes + size
    block = "per channel" if q.block_size is None else str(q.block_size)
    rows.append((p, q.kind, str(tuple(q.shape)), np.dtype(q.dtype).name, block,
                 "yes" if q.double_quantized else "no", f"{size:,}", f"{8 * size / q.size:.3f}"))
  print(format_table(("quantized leaf", "kind", "shape", "dtype", "block", "double quant",
                      "bytes", "bits/param"), rows, right_from=2))
  others = [leaf for leaf in reader.leaves if leaf.path not in reader.quantized]
  print(f"\n{len(rows)} quantized leaves, {params:,} parameters in {nbytes:,} bytes "
        f"({8 * nbytes / max(params, 1):.3f} bits each); {len(others)} other leaves, "
        f"{sum(leaf.nbytes for leaf in others):,} bytes")
  return 0


def _inspect(args: argparse.Namespace) -> int:
  import jax  # pylint: disable=import-outside-toplevel

  from lora_jax._src.io.quantized_io import (  # pylint: disable=import-outside-toplevel
      is_quantized_checkpoint,
  )

  if is_quantized_checkpoint(pathlib.Path(args.path)):
    return _inspect_quantized(args.path)

  from lora_jax._src.adapters.stack import AdapterStack  # pylint: disable=import-outside-toplevel
  from lora_jax._src.core import kinds  # pylint: disable=import-outside-toplevel
  from lora_jax._src.core.params import LoraParams  # pylint: disable=import-outside-toplevel
  from lora_jax._src.core.tree import (  # pylint: disable=import-outside-toplevel
    adapter_paths,
    leaves_with_paths,
    lookup,
  )
  from lora_jax._src.io import drawn  # pylint: disable=import-outside-toplevel
  from lora_jax._src.io.checkpoint import (  # pylint: disable=import-outside-toplevel
    load_with_lineage,
  )

  loaded, config, record = load_with_lineage(args.path)
  trained = dict(leaves_with_paths(loaded.base)) if isinstance(loaded, LoraParams) else {}
  adapters = loaded.adapters if isinstance(loaded, LoraParams) else loaded
  print("config:", json.dumps(config.to_dict(), indent=2, sort_keys=True))
  if isinstance(adapters, AdapterStack):
    print(f"\na stack of {len(adapters)} adapters (leading axis of every A and B): "
          f"{', '.join(adapters.names)}")
    adapters = adapters.adapters
  rows, total, nbytes = [], 0, 0
  entries = {p: lookup(adapters, p) for p in adapter_paths(adapters)}
  arrays = kinds.of(config.kind).arrays
  dora = any(kinds.has_magnitude(e) for e in entries.values())
  columns = (*arrays, *((kinds.M,) if dora else ()))
  for path in natural_sorted(entries):
    entry = entries[path]
    n = sum(x.size for x in entry.values())
    total += n
    nbytes += sum(x.nbytes for x in entry.values())
    shapes = [str(tuple(entry[x.name].shape)) if x.name in entry else "-" for x in columns]
    rows.append((path, str(config.rank_for(path)), *shapes, f"{n:,}",
                 f"{config.scale_for(path):g}"))
  print()
  labels = [("DoRA m" if x is kinds.M else x.name.upper() if len(x.name) == 1 else x.name)
            + " shape" for x in columns]
  print(format_table(("path", "rank", *labels, "params", "scale"), rows, right_from=1))
  shared = kinds.shared_of(adapters, config.kind) or {}
  if shared:
    kept = (f"drawn from shared_seed={config.shared_seed}: the checkpoint holds the seed"
            if drawn.seeded(adapters, config) else "stored in the checkpoint")
    print("\nshared (frozen, one for all adapted leaves): "
          + ", ".join(f"{n} {tuple(x.shape)}" for n, x in shared.items())
          + f", {sum(x.size for x in shared.values()):,} parameters ({kept})")
  dtypes = sorted({str(np.dtype(x.dtype)) for x in jax.tree.leaves(adapters)})
  print(f"\n{len(rows)} adapted leaves, {total:,} adapter parameters, {nbytes:,} bytes "
        f"({', '.join(dtypes)})")
  if trained:
    print()
    print(format_table(("trained in full", "shape", "params"),
                       [(p, str(tuple(v.shape)), f"{v.size:,}")
                        for p, v in sorted(trained.items(), key=lambda kv: natural_key(kv[0]))],
                       right_from=1))
    full = sum(v.size for v in trained.values())
    print(f"\n{len(trained)} leaves trained in full, {full:,} parameters; "
          f"{total + full:,} trained parameters in all")
  print()
  if record is None:
    print("base fingerprint: none (saved from lp.adapters alone, or by lora_jax < 0.3)")
  else:
    def digest(entry: dict) -> str:  # of the sampled values, to compare bases by eye
      values = entry.get("values")
      return hashlib.sha256(values.encode()).hexdigest()[:12] if values else "-"

    print(format_table(("trained on base leaf", "shape", "dtype", "sample digest"),
                       [(p, str(tuple(r["shape"])), r["dtype"], digest(r))
                        for p, r in sorted(record.items(), key=lambda kv: natural_key(kv[0]))],
                       right_from=1))
  return 0


def _distributed() -> None:
  """Joins JAX's multi-controller runtime: ``jax.distributed.initialize`` with the
  coordinator, process count and id from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
  and ``JAX_PROCESS_ID`` where set, or detected (Cloud TPU, Slurm, Open MPI, Kubernetes)."""
  import os  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  def number(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
      return None
    if not value.isdigit():
      raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    return int(value)

  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes
  jax.distributed.initialize(num_processes=number("JAX_NUM_PROCESSES"),
                             process_id=number("JAX_PROCESS_ID"))


def _train(args: argparse.Namespace) -> int:
  from lora_jax._src.cli.job import load_job_config, run  # pylint: disable=import-outside-toplevel

  config = load_job_config(args.config, args.set)  # config errors before joining others
  if args.distributed:
    _distributed()
  run(config)
  return 0


def _generate(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  import jax

  from lora_jax._src.adapters.lift import overlay
  from lora_jax._src.adapters.stack import AdapterStack
  from lora_jax._src.cli.textdata import Tokenizer
  from lora_jax._src.core.params import LoraParams
  from lora_jax._src.factored.sampling import generate
  from lora_jax._src.io.checkpoint import load_adapters
  from lora_jax._src.io.zoo import load_hf

  if not args.prompt:
    raise ValueError("give at least one --prompt.")
  model = load_hf(args.model)
  tokenizer = Tokenizer(args.model)
  params, config, ids = model.params, None, None
  if args.adapters:
    adapters, config = load_adapters(args.adapters)
    if isinstance(adapters, LoraParams):  # leaves trained in full come with the adapters
      params, adapters = overlay(params, adapters.base), adapters.adapters
    if isinstance(adapters, AdapterStack):
      if args.adapter is not None:
        try:
          adapters = adapters.select(args.adapter)  # a plain tree for the stack's config
        except KeyError as e:
          raise ValueError(str(e).strip("'\"")) from None
      elif args.adapter_ids:
        ids = [int(i) for i in args.adapter_ids.split(",")]
        if len(ids) != len(args.prompt):
          raise ValueError(f"--adapter-ids gives {len(ids)} ids for {len(args.prompt)} "
                           "prompts; give one per prompt (-1: the base).")
      else:
        raise ValueError(f"{args.adapters} holds a stack of adapters {list(adapters.names)}: "
                         "choose one with --adapter NAME, or one per prompt with "
                         "--adapter-ids 0,1,-1.")
    params = LoraParams(params, adapters)
  elif args.adapter is not None or args.adapter_ids:
    raise ValueError("--adapter and --adapter-ids need --adapters.")
  prompts = [tokenizer.encode(p, True)[0] for p in args.prompt]
  out = generate(model, params, prompts, config=config, adapter_ids=ids,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, key=jax.random.key(args.seed))
  for prompt, tokens in zip(args.prompt, out.tolist()):
    if tokenizer.eos_id in tokens:
      tokens = tokens[:tokens.index(tokenizer.eos_id)]
    print(prompt + tokenizer.decode(tokens))
  return 0


_EXAMPLES = """examples:
  lora-jax train --config configs/quickstart.yaml
  lora-jax train --config configs/charlm.yaml --set finetune.steps=100 --set lora.rank=4
  lora-jax inspect runs/quickstart/adapters
  lora-jax generate --model HF_MODEL_DIR --adapters RUN_DIR/adapters --prompt "Once upon"
  lora-jax merge --base BASE_CKPT --adapters runs/quickstart/adapters --out merged
  lora-jax merge --base model.safetensors --adapters ADAPTERS --out merged.safetensors \\
                 --format safetensors --dtype bfloat16
  lora-jax merge --base HF_MODEL_DIR --adapters PEFT_ADAPTER_DIR --out MERGED_DIR \\
                 --max-shard-size 2GB
"""


def build_parser() -> argparse.ArgumentParser:
  from lora_jax import __version__  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(prog="lora-jax", description="LoRA for JAX and Flax.",
                                   epilog=_EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--version", action="version", version=f"lora-jax {__version__}")
  commands = parser.add_subparsers(dest="command", required=True)
  merge = commands.add_parser(
      "merge", help="fold an adapter checkpoint into a base checkpoint, streaming leaf by leaf")
  merge.add_argument("--base", required=True, help="orbax checkpoint folder, CheckpointManager "
                     "step folder, or .safetensors file of the base parameters; or a Hugging "
                     "Face model folder (sharded safetensors with their index)")
  merge.add_argument("--adapters", required=True, help="adapter checkpoint from save_adapters "
                     "(a PEFT adapter folder for a Hugging Face base)")
  merge.add_argument("--out", required=True, help="output folder (orbax, or Hugging Face for a "
                     "Hugging Face base) or file (safetensors)")
  merge.add_argument("--max-shard-size", default="5GB",
                     help="Hugging Face base: the largest output shard (default 5GB)")
  merge.add_argument("--name-map", action="append", default=[], metavar="REGEX=REPLACEMENT",
                     help="Hugging Face base: rewrite PEFT module names into the base's tensor "
                          "names (repeatable; default: the names match)")
  merge.add_argument("--dtype", default=None, help="cast floating leaves, e.g. bfloat16")
  merge.add_argument("--safe", action="store_true",
                     help="refuse to write if a merged leaf has NaN or Inf")
  merge.add_argument("--format", choices=("orbax", "safetensors"), default=None,
                     help="output format for an orbax or safetensors base (default orbax)")
  merge.add_argument("--group-mb", type=int, default=None,
                     help="read at most this many MiB of base leaves at once (default 128)")
  merge.add_argument("--overwrite", action="store_true", help="replace an existing output")
  merge.add_argument("--force", action="store_true",
                     help="merge even if the base differs from the one the adapters were "
                          "trained on (their recorded fingerprint)")
  merge.add_argument("--adapter", default=None, metavar="NAME",
                     help="the adapter to merge from a saved adapter stack (stack_adapters)")
  merge.set_defaults(run=_merge)
  train = commands.add_parser("train", help="run a LoRA fine-tuning job from a YAML config")
  train.add_argument("--config", required=True,
                     help="job YAML, e.g. configs/quickstart.yaml (keys: see the README)")
  train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, dotted for nested keys "
                     "(e.g. finetune.steps=100); repeatable")
  train.add_argument("--distributed", action="store_true",
                     help="run as one of several processes (one per host): joins "
                     "jax.distributed from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                     "JAX_PROCESS_ID, or the cluster's own settings on Cloud TPU / Slurm")
  train.set_defaults(run=_train)
  gen = commands.add_parser("generate", help="continue prompts with a Hugging Face model "
                            "folder and an adapter checkpoint, the adapters unmerged")
  gen.add_argument("--model", required=True, help="Hugging Face model folder (config.json, "
                   "safetensors, tokenizer.json; Tunix zoo)")
  gen.add_argument("--adapters", default=None, help="adapter checkpoint (save_adapters, "
                   "RUN_DIR/adapters); without it, the base model")
  gen.add_argument("--adapter", default=None, metavar="NAME",
                   help="the adapter of a saved stack to use for every prompt")
  gen.add_argument("--adapter-ids", default=None, metavar="I,J,...",
                   help="a saved stack: one adapter index per prompt (-1: the base)")
  gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  gen.add_argument("--max-new-tokens", type=int, default=32)
  gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
  gen.add_argument("--top-k", type=int, default=None)
  gen.add_argument("--top-p", type=float, default=None)
  gen.add_argument("--seed", type=int, default=0, help="the sampling key's seed")
  gen.set_defaults(run=_generate)
  inspect = commands.add_parser("inspect", help="print an adapter checkpoint's config and table, "
                                  "or a quantized base's leaves and bits per parameter")
  inspect.add_argument("path")
  inspect.set_defaults(run=_inspect)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from lora_jax._src.io.atomic import InUse  # pylint: disable=import-outside-toplevel

  try:
    return args.run(args)
  except (ValueError, OSError, InUse, ImportError) as e:  # ImportError: a missing extra
    print(f"lora-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
