"""QLoRA beside LoRA: the character LM fine-tuned over an NF4 base and over the float32 base.

Pretrains the character-level LM of configs/charlm_qlora.yaml once (saving the base), then
fine-tunes LoRA adapters over that float32 base and over the same base stored as NF4
(4-bit NormalFloat, double-quantized scales), and prints held-out perplexity, the base's
bytes and bits per quantized parameter, and the time of each.
Run: python examples/qlora_char_lm.py [key=value ...] (the overrides apply to both runs).
"""

from __future__ import annotations

import pathlib
import sys

import lora_jax as lj

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "charlm_qlora.yaml"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
  """Columns as wide as their widest cell; the first left-aligned, the others right."""
  widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                             for i, (c, w) in enumerate(zip(r, widths)))
  return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def main(overrides: list[str]) -> dict[str, dict]:
  """Runs both fine-tunings and prints the comparison; returns their metrics."""
  run_root = pathlib.Path(lj.load_job_config(CONFIG, overrides)["run_dir"])
  runs = {"LoRA, float32 base": ["quantize=null", "save_base=true"],
          "QLoRA, NF4 base": [f"base_checkpoint={run_root / 'float32' / 'base'}"]}
  metrics = {}
  for (name, changes), slug in zip(runs.items(), ("float32", "nf4")):
    metrics[name] = lj.run_job(CONFIG, [*overrides, *changes, f"run_dir={run_root / slug}"])
  full, q = metrics["LoRA, float32 base"], metrics["QLoRA, NF4 base"]
  full_bytes = q["quantize"]["full_precision_base_bytes"]
  rows = [("frozen float32 base", f"{full['base']:.3f}", "", "", ""),
          ("frozen NF4 base", f"{q['base_quantized']:.3f}", "", "", ""),
          ("LoRA, float32 base", f"{full['lora']:.3f}", f"{full_bytes:,}", "32",
           f"{full['seconds']:.0f}"),
          ("QLoRA, NF4 base", f"{q['lora']:.3f}", f"{q['quantize']['base_bytes']:,}",
           f"{q['quantize']['bits_per_param']:.2f}", f"{q['seconds']:.0f}")]
  print()
  print(_table(("run", "test perplexity", "base bytes", "bits/param", "seconds"), rows))
  gap = q["lora"] / full["lora"] - 1
  print(f"QLoRA vs LoRA perplexity: {100 * gap:+.2f}% (relative); the first run's time "
        "includes pretraining")
  return metrics


if __name__ == "__main__":
  main(sys.argv[1:])
