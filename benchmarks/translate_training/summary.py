"""Print a markdown table of finished translate runs: best-epoch validation metrics and the time they took.

Usage: ``.venv/bin/python benchmarks/translate_training/summary.py runs/translate/isl_*``. Reads each run's
``model.json`` (metrics of the exported epoch) and the ``/usr/bin/time -v`` report in ``stderr.log``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bundle import time_v  # the same /usr/bin/time parser the bundled cards use

KEYS = ("val_mae", "val_mae_median", "val_psnr", "val_ssim", "val_mask_iou")


def row(run: Path) -> str | None:
    card_path = run / "model.json"
    if not card_path.is_file():
        return None
    card = json.loads(card_path.read_text(encoding="utf-8"))
    best = card.get("metrics", {}).get("best", {})
    t = time_v(run / "stderr.log")
    cells = [run.name, str(card.get("name")), f"{card.get('num_parameters', 0) / 1e6:.2f}M", str(best.get("epoch"))]
    cells += [f"{best[k]:.4g}" if k in best else "–" for k in KEYS]
    cpu = t.get("user_s", 0) + t.get("system_s", 0)
    cells += [f"{t.get('wall_s', float('nan')) / 60:.1f}", f"{cpu / 60:.1f}"]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    head = ["run", "model", "params", "best epoch", *KEYS, "wall min", "CPU min"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for arg in sys.argv[1:]:
        line = row(Path(arg))
        if line:
            print(line)
