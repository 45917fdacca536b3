"""All the way: a Hugging Face checkpoint -> `lora-jax train` -> PyTorch PEFT, same tokens.

1. Pretrains a small Llama-architecture model (transformers, PyTorch) as a character LM on
   Python source from the standard library, and saves it as a Hugging Face folder
   (safetensors, config.json, tokenizer.json made with the tokenizers library).
2. Writes a JSONL file of English prose (the standard library's module docstrings).
3. Fine-tunes the folder on it with the job (`lj.run_job`, as `lora-jax train` runs it):
   Tunix's Llama 3 through `lj.load_hf`, LoRA on every projection, held-out perplexity.
4. Loads the exported PEFT folder with transformers + PEFT and decodes greedily; our
   sampler (`lj.generate`, adapters unmerged) must give the same tokens.

Needs the test and models extras (torch, transformers, peft, google-tunix).
Run: python examples/hf_end_to_end.py [OUT_DIR] [--small]
"""

from __future__ import annotations

import json
import pathlib
import sys
import sysconfig
import time

import lora_jax as lj

SOURCE_FILES = ("textwrap.py", "string.py", "glob.py", "fnmatch.py", "shlex.py", "base64.py",
                "bisect.py", "heapq.py", "difflib.py", "calendar.py", "csv.py", "copy.py")
PROSE_MODULES = ("os", "re", "json", "collections", "itertools", "functools", "textwrap",
                 "string", "random", "statistics", "datetime", "calendar", "difflib", "heapq",
                 "csv", "argparse", "logging", "decimal", "fractions", "pathlib", "shutil")
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def save_tokenizer(folder: pathlib.Path) -> None:
  """A character-level tokenizer.json (the tokenizers library)."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
  tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
  tokenizer.decoder = decoders.Fuse()
  tokenizer.add_special_tokens(SPECIALS)
  tokenizer.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                            "eos_token": "</s>"}))


def encode(text: str) -> list[int]:
  index = {c: i + len(SPECIALS) for i, c in enumerate(CHARS)}
  return [index.get(c, 3) for c in text]


def pretrain(folder: pathlib.Path, steps: int) -> float:
  """A Llama-architecture char LM on stdlib Python source, saved as a Hugging Face folder."""
  import torch
  import transformers
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  text = "\n".join((stdlib / f).read_text(encoding="utf-8", errors="replace")
                   for f in SOURCE_FILES if (stdlib / f).exists())
  codes = torch.tensor(encode(text))
  config = transformers.LlamaConfig(
      vocab_size=len(SPECIALS) + len(CHARS), hidden_size=128, intermediate_size=384,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
      max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
      rope_theta=1e6,  # google-tunix 0.1.6-0.1.7: Llama 3 applies base 1e6 whatever it says
      bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
  generator = torch.Generator().manual_seed(0)
  loss = torch.tensor(0.0)
  for _ in range(steps):
    starts = torch.randint(0, len(codes) - 65, (32,), generator=generator)
    batch = torch.stack([codes[s:s + 65] for s in starts])
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  model.eval().save_pretrained(folder, safe_serialization=True)
  save_tokenizer(folder)
  return float(loss)


def write_records(path: pathlib.Path) -> int:
  """English prose (module docstrings) as {"text"} records of about 300 characters."""
  import importlib
  import inspect
  chunks = []
  for name in PROSE_MODULES:
    doc = inspect.getdoc(importlib.import_module(name)) or ""
    for paragraph in doc.split("\n\n"):
      paragraph = " ".join(paragraph.split())
      while len(paragraph) > 40:
        chunks.append(paragraph[:300])
        paragraph = paragraph[300:]
  path.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
  return len(chunks)


def main() -> None:
  args = [a for a in sys.argv[1:] if not a.startswith("--")]
  small = "--small" in sys.argv
  out = pathlib.Path(args[0] if args else "runs/hf_end_to_end").absolute()
  out.mkdir(parents=True, exist_ok=True)
  folder, data, run_dir = out / "model", out / "prose.jsonl", out / "run"
  started = time.perf_counter()
  print(f"1. pretraining a Llama-architecture char LM (transformers) into {folder}")
  print(f"   final pretraining loss {pretrain(folder, 30 if small else 400):.3f}")
  print(f"2. {write_records(data)} prose records in {data}")
  print("3. lora-jax train (Tunix's Llama 3, LoRA on every projection)")
  metrics = lj.run_job(None, [
      f"model.hf={folder}", f"data.jsonl={data}", "data.seq_len=64", "data.samples=1",
      f"finetune.steps={20 if small else 300}", "finetune.batch_size=16", "finetune.lr=0.003",
      "finetune.log_every=10", "lora.rank=8", "lora.alpha=16.0", f"run_dir={run_dir}"])
  print("4. transformers + PEFT against our sampler, greedy")
  import peft
  import torch
  import transformers
  prompt = "The module provides"
  ids = [1] + encode(prompt)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder)
  peft_model = peft.PeftModel.from_pretrained(torch_model, run_dir / "peft").eval()
  with torch.no_grad():
    theirs = peft_model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
  model = lj.load_hf(folder)
  adapters, config = lj.load_adapters(run_dir / "adapters")
  ours = lj.generate(model, lj.LoraParams(model.params, adapters), [ids], config=config,
                     max_new_tokens=48)[0].tolist()
  decode = lambda tokens: "".join(CHARS[t - len(SPECIALS)] if t >= len(SPECIALS) else "?"  # noqa: E731
                                  for t in tokens)
  same = sum(a == b for a, b in zip(theirs, ours))
  print(f"   PEFT:     {prompt}{decode(theirs)!r}")
  print(f"   lora_jax: {prompt}{decode(ours)!r}")
  print(f"   same tokens: {same}/{len(ours)}")
  summary = {"base_perplexity": metrics["base"], "lora_perplexity": metrics["lora"],
             "trainable_percent": metrics["trainable_percent"],
             "same_tokens": same, "generated": len(ours),
             "seconds": time.perf_counter() - started}
  print(json.dumps(summary, indent=2))
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  if same != len(ours):
    raise SystemExit("the PEFT model and our sampler disagree")


if __name__ == "__main__":
  main()
