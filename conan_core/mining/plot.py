"""Draw DHNM metrics (the paper's Fig. 2): mean hard-negative score over steps and stale fraction per check."""

from __future__ import annotations

import json
from pathlib import Path

from conan_core.errors import ConanError


def read_hardness(jsonl_path: str | Path) -> tuple[list[dict], list[dict]]:
    """(step lines, check lines) of a DHNM metrics JSONL file."""
    path = Path(jsonl_path)
    if not path.is_file():
        raise ConanError(f"{path}: no DHNM metrics file")
    steps, checks = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise ConanError(f"{path}:{number}: not JSON") from None
        (checks if item.get("kind") == "check" else steps).append(item)
    return steps, checks


def plot_hardness(jsonl_path: str | Path, png_path: str | Path) -> Path:
    """Write a two-panel PNG from the metrics file; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    steps, checks = read_hardness(jsonl_path)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot([s["step"] for s in steps], [s["mean_neg_score"] for s in steps], linewidth=0.8)
    top.set_ylabel("mean hard-negative score")
    top.set_title("Dynamic hard negative mining")
    for check in checks:
        if check.get("replaced"):
            top.axvline(check["step"], color="tab:red", alpha=0.2, linewidth=0.8)
    bottom.plot([c["step"] for c in checks], [c["stale_fraction"] for c in checks], marker="o", markersize=3)
    bottom.set_ylabel("stale fraction per check")
    bottom.set_xlabel("step")
    figure.tight_layout()
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return png
