"""LoRA, DoRA, PiSSA and LoRA+ side by side: one task, one pretrained base, one table.

Pretrains the text classifier of configs/textcls.yaml once (saving the base), then fine-tunes
it with each variant from that same base and prints the test accuracy, the trained parameters
and the time of each. Run: python examples/lora_variants.py [key=value ...]
(the overrides apply to every run, e.g. finetune.steps=100).
"""

from __future__ import annotations

import pathlib
import sys

import lora_jax as lj

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "textcls.yaml"
VARIANTS = {
    "LoRA": [],
    "DoRA": ["lora.use_dora=true"],
    "PiSSA": ["lora.init=pissa"],
    "LoRA+ (ratio 16)": ["finetune.lora_plus_ratio=16"],
    "LoRA+ (ratio 16, lr / 4)": ["finetune.lora_plus_ratio=16", "finetune.lr=0.00075"],
}


def main(overrides: list[str], names: list[str] | None = None) -> list[tuple[str, ...]]:
  """Runs the variants (``names``, default all; the first pretrains) and prints the table."""
  run_root = pathlib.Path(lj.load_job_config(CONFIG, overrides)["run_dir"]) / "variants"
  chosen = {n: VARIANTS[n] for n in (names or VARIANTS)}
  rows, base = [], None
  for name, changes in chosen.items():
    start = ["save_base=true"] if base is None else [f"base_checkpoint={base}"]
    slug = name.replace("+", "plus").replace(" / ", "_over_")
    slug = "".join(ch for ch in slug if ch.isalnum() or ch == "_")
    base = base or run_root / slug / "base"
    metrics = lj.run_job(CONFIG, [*overrides, *start, *changes, "full_finetune=false",
                                  f"run_dir={run_root / slug}"])
    rows.append((name, f"{metrics['lora']:.2f}", f"{metrics['trainable_params']:,}",
                 f"{metrics['seconds']:.0f}"))
  header = ("variant", "test accuracy %", "trained params", "seconds")
  widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
  print()
  for row in (header, tuple("-" * w for w in widths), *rows):
    cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    print("  ".join(cells))
  print(f"(frozen base: {metrics['base']:.2f}%; the first run's time includes pretraining)")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
