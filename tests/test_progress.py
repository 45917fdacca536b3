"""lora-jax train's progress reporting and loss plot."""

import io
import xml.etree.ElementTree as ET

from lora_jax._src.cli.plot import loss_svg
from lora_jax._src.cli.progress import Progress


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class Tty(io.StringIO):
  def isatty(self):
    return True


def test_log_lines_show_live_counts():
  """A log gets a line per interval with the real step count (it froze at 1/600 before)."""
  stream, clock = io.StringIO(), FakeClock()
  progress = Progress(600, "lora", stream=stream, interval=10.0, clock=clock)
  for step in range(1, 601):
    clock.now = step / 8  # 8 steps/s, exact in binary
    progress.update(step, loss=1.0 / step if step % 25 == 0 else None)
  progress.close()
  lines = stream.getvalue().splitlines()
  assert lines[0] == "lora: 80/600 (13%) 8.0 steps/s loss 0.0133 eta 01:05"
  assert [int(line.split()[1].split("/")[0]) for line in lines] == [
      80, 160, 240, 320, 400, 480, 560, 600]
  assert lines[-1] == "lora: 600/600 (100%) 8.0 steps/s loss 0.0017 01:15 elapsed"
  assert "\r" not in stream.getvalue()


def test_terminal_line_is_redrawn_in_place():
  stream, clock = Tty(), FakeClock()
  progress = Progress(50, "pretrain", stream=stream, clock=clock)
  for step in range(1, 51):
    clock.now = step / 8
    progress.update(step, loss=2.0)
  progress.close()
  text = stream.getvalue()
  frames = text.split("\r")[1:]
  assert len(frames) == 26  # one redraw per 0.2 s (every 2nd step at 8 steps/s) + the final one
  assert frames[0].startswith("pretrain: 2/50 (4%) 8.0 steps/s loss 2.0000 eta 00:06")
  assert frames[-1].startswith("pretrain: 50/50 (100%)") and text.endswith("\n")


def test_loss_svg_is_valid_and_has_every_curve():
  svg = loss_svg({"pretrain": [2.3, 1.0, 0.5], "lora": [0.9, 0.2, float("nan"), 0.05],
                  "full <ft>": [0.8, 0.1]}, "digits")
  root = ET.fromstring(svg)
  ns = "{http://www.w3.org/2000/svg}"
  polylines = root.findall(f"{ns}polyline")
  assert [len(p.get("points").split()) for p in polylines] == [3, 3, 2]
  texts = [t.text for t in root.iter(f"{ns}text")]
  assert "full <ft>" in texts and "lora-jax train: digits" in texts
  assert {"0.05", "0.1", "1", "2"} <= set(texts)
