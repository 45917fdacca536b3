"""Peak memory and wall time of `lora-jax merge` against a plain restore-then-save copy.

Builds a synthetic float32 base checkpoint (20 transformer layers, d=1536, MLP 6144: about
2.3 GB) with orbax's StandardCheckpointer, LoRA adapters (r=16 on every kernel), then runs,
each under `/usr/bin/time -v` in a fresh process:
  baseline  python importing jax and orbax-checkpoint (the runtime's own memory)
  copy      StandardCheckpointer().restore(BASE) then .save(OUT)  (holds the whole model)
  merge     lora-jax merge --base BASE --adapters ADAPTERS --out OUT
Targets: merge peak RSS <= 0.5 x checkpoint size + baseline RSS; merge wall <= 1.5 x copy.

With --hf, instead: a synthetic Llama-shaped Hugging Face folder (float16, hidden 2048, MLP
5632, vocabulary 32000, 19 layers: about 2.07 GiB in 4 safetensors shards with an index, and a
config.json that transformers loads) and a PEFT LoRA adapter (r=16 on every projection), then
  baseline       python importing jax and lora_jax
  lora-jax merge lora-jax merge --base HF --adapters PEFT --out OUT
  peft baseline  python importing torch, transformers and peft
  peft merge     from_pretrained + PeftModel.from_pretrained + merge_and_unload +
                 save_pretrained (PEFT's own way; skipped without torch/transformers/peft)
Targets: merge peak RSS <= baseline + 0.5 x the largest shard; merge wall <= PEFT's.

Run: python benchmarks/merge_cli.py [--workdir DIR] [--layers 20] [--repeats 2] [--hf]
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

D, MLP, RANK = 1536, 6144, 16


def build(workdir: pathlib.Path, layers: int) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  import lora_jax as lj  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * 0.02  # noqa: E731
  params = {"params": {f"layer_{i}": {
      **{n: {"kernel": normal(D, D), "bias": np.zeros(D, np.float32)}
         for n in ("query", "key", "value", "out")},
      "mlp_in": {"kernel": normal(D, MLP)}, "mlp_out": {"kernel": normal(MLP, D)},
      "norm": {"scale": np.ones(D, np.float32)}} for i in range(layers)}}
  size = sum(x.nbytes for x in jax.tree.leaves(params))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(workdir / "base", params)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  config = lj.LoraConfig(rank=RANK, alpha=32.0, targets=r"kernel$")
  lp = lj.lift(abstract, config, key=jax.random.key(0))
  adapters = jax.tree.map(lambda s: normal(*s.shape), lp.adapters)  # B non-zero: real work
  # Saved with the base, so the merge also checks the base's fingerprint (lineage).
  lj.save_adapters(workdir / "adapters", lj.LoraParams(params, adapters), config)
  return size


HF_D, HF_MLP, HF_VOCAB, HF_LAYERS, HF_SHARDS = 2048, 5632, 32000, 19, 4
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_hf(workdir: pathlib.Path) -> tuple[int, int]:
  """A Llama-shaped Hugging Face folder in HF_SHARDS shards and a PEFT adapter; its size."""
  import json  # pylint: disable=import-outside-toplevel

  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  normal = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * 0.02)  # noqa: E731
  shapes = {"model.embed_tokens.weight": (HF_VOCAB, HF_D)}
  for i in range(HF_LAYERS):
    prefix = f"model.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      shapes[f"{prefix}self_attn.{name}.weight"] = (HF_D, HF_D)
    shapes[f"{prefix}mlp.gate_proj.weight"] = (HF_MLP, HF_D)
    shapes[f"{prefix}mlp.up_proj.weight"] = (HF_MLP, HF_D)
    shapes[f"{prefix}mlp.down_proj.weight"] = (HF_D, HF_MLP)
    shapes[f"{prefix}input_layernorm.weight"] = (HF_D,)
    shapes[f"{prefix}post_attention_layernorm.weight"] = (HF_D,)
  shapes["model.norm.weight"] = (HF_D,)
  shapes["lm_head.weight"] = (HF_VOCAB, HF_D)
  total = sum(int(np.prod(s)) * 2 for s in shapes.values())
  base = workdir / "hf_base"
  base.mkdir(parents=True)
  groups, size, weight_map = [[]], 0, {}
  for name, shape in shapes.items():
    if groups[-1] and size + np.prod(shape) * 2 > total / HF_SHARDS + 1:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += int(np.prod(shape)) * 2
  for k, names in enumerate(groups):
    file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
    save_file({n: (np.ones(shapes[n], np.float16) if len(shapes[n]) == 1
                   else normal(*shapes[n]).astype(np.float16)) for n in names},
              str(base / file), metadata={"format": "pt"})
    weight_map.update({n: file for n in names})
  (base / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}))
  (base / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HF_D,
      "intermediate_size": HF_MLP, "num_hidden_layers": HF_LAYERS, "num_attention_heads": 16,
      "num_key_value_heads": 16, "vocab_size": HF_VOCAB, "max_position_embeddings": 2048,
      "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float16"}))
  adapter = workdir / "hf_adapter"
  adapter.mkdir()
  tensors = {}
  for name, shape in shapes.items():
    if len(shape) == 2 and name.rsplit(".", 2)[-2] in HF_TARGETS:
      key = "base_model.model." + name.removesuffix(".weight")
      tensors[key + ".lora_A.weight"] = normal(RANK, shape[1])
      tensors[key + ".lora_B.weight"] = normal(shape[0], RANK)
  save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
  (adapter / "adapter_config.json").write_text(json.dumps({
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 32,
      "target_modules": list(HF_TARGETS), "lora_dropout": 0.0, "bias": "none",
      "base_model_name_or_path": None, "fan_in_fan_out": False, "inference_mode": True}))
  largest = max(sum(int(np.prod(shapes[n])) * 2 for n in g) for g in groups)
  return total, largest


_PEFT_MERGE = """
import sys, torch, transformers, peft
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float16)
model = peft.PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""


def main_hf(workdir: pathlib.Path, repeats: int) -> None:
  total, largest = build_hf(workdir)
  py = sys.executable
  commands = {
      "baseline": [py, "-c", "import jax, jax.numpy as jnp, lora_jax; jnp.ones(1)"],
      "lora-jax merge": [py, "-m", "lora_jax", "merge", "--base",
                         str(workdir / "hf_base"), "--adapters", str(workdir / "hf_adapter"),
                         "--out", str(workdir / "merged")],
  }
  try:
    import peft  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    print("torch / transformers / peft not installed: skipping PEFT's merge")
  else:
    commands["peft baseline"] = [py, "-c", "import torch, transformers, peft"]
    commands["peft merge"] = [py, "-c", _PEFT_MERGE, str(workdir / "hf_base"),
                              str(workdir / "hf_adapter"), str(workdir / "peft_merged")]
  med = medians(commands, repeats, [workdir / "merged", workdir / "peft_merged"])
  gib = 2 ** 30
  print(f"Hugging Face folder: {total / gib:.2f} GiB float16 in {HF_SHARDS} shards (largest "
        f"{largest / gib:.2f} GiB), {HF_LAYERS} layers; PEFT adapter r={RANK} on "
        f"{', '.join(HF_TARGETS)}; medians of {repeats} interleaved runs")
  print(f"{'run':15} {'wall s':>7} {'peak RSS GiB':>13} {'(RSS-baseline)/largest shard':>29}")
  for name, (wall, rss) in med.items():
    own = med["peft baseline" if name.startswith("peft") else "baseline"][1]
    print(f"{name:15} {wall:7.1f} {rss / gib:13.2f} {(rss - own) / largest:29.3f}")
  wall, rss = med["lora-jax merge"]
  print(f"\nlora-jax merge peak RSS = baseline + {(rss - med['baseline'][1]) / largest:.3f} x the "
        "largest shard (target <= 0.5)", end="")
  if "peft merge" in med:
    print(f"; wall / PEFT's merge_and_unload + save_pretrained = "
          f"{wall / med['peft merge'][0]:.2f} (target <= 1.0)")
  else:
    print()
  shutil.rmtree(workdir, ignore_errors=True)


def timed(command: list[str]) -> tuple[float, float]:
  """(wall seconds, peak RSS bytes) of a command under /usr/bin/time -v."""
  result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                          check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{command} failed:\n{result.stdout}\n{result.stderr}")
  rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1]) * 1024
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr)[1]
  seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
  return seconds, rss


def medians(commands: dict[str, list[str]], repeats: int, outputs: list[pathlib.Path]
            ) -> dict[str, tuple[float, float]]:
  """{name: (median wall s, median peak RSS bytes)} over interleaved runs of each command,
  removing ``outputs`` before every run."""
  results = {name: [] for name in commands}
  for _ in range(repeats):  # interleaved, so machine noise hits every command alike
    for name, command in commands.items():
      for out in outputs:
        shutil.rmtree(out, ignore_errors=True)
      results[name].append(timed(command))
  return {name: (float(np.median([w for w, _ in r])), float(np.median([m for _, m in r])))
          for name, r in results.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--layers", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--hf", action="store_true",
                      help="the Hugging Face case: sharded safetensors + a PEFT adapter")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="lora_jax_merge_bench_"))
  if args.hf:
    main_hf(workdir, args.repeats)
    return
  size = build(workdir, args.layers)
  py = sys.executable
  commands = {
      "baseline": [py, "-c", "import jax, jax.numpy as jnp, orbax.checkpoint; jnp.ones(1)"],
      "copy": [py, "-c", "import sys, orbax.checkpoint as ocp; c = ocp.StandardCheckpointer(); "
               "t = c.restore(sys.argv[1]); c.save(sys.argv[2], t); c.wait_until_finished()",
               str(workdir / "base"), str(workdir / "copy")],
      "merge": [py, "-m", "lora_jax", "merge", "--base", str(workdir / "base"),
                "--adapters", str(workdir / "adapters"), "--out", str(workdir / "merged")],
  }
  med = medians(commands, args.repeats, [workdir / "copy", workdir / "merged"])
  gib = 2 ** 30
  base_rss = med["baseline"][1]
  print(f"checkpoint: {size / gib:.2f} GiB float32, {args.layers} layers; "
        f"medians of {args.repeats} interleaved runs")
  print(f"{'run':9} {'wall s':>7} {'peak RSS GiB':>13} {'(RSS-baseline)/ckpt':>20}")
  for name, (wall, rss) in med.items():
    print(f"{name:9} {wall:7.1f} {rss / gib:13.2f} {(rss - base_rss) / size:20.3f}")
  merge_wall, merge_rss = med["merge"]
  print(f"\nmerge peak RSS = baseline + {(merge_rss - base_rss) / size:.3f} x checkpoint "
        f"(target <= 0.5); merge wall / copy wall = {merge_wall / med['copy'][0]:.2f} "
        "(target <= 1.5)")
  shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
