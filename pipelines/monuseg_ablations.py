"""The ablations side by side: pretrained minus scratch, paired by seed, one row per experiment.

    python pipelines/monuseg_ablations.py -o ablations.png \\
        "4,000 steps (the table)=monuseg-exp" "body at 0.1 x lr=abl-bodylr" "10,000 steps=abl-long"

Each ``LABEL=DIR`` names an ``--out`` folder of pipelines/monuseg_experiment.py that trained both
starts; its results.json holds the paired differences. The picture shows every seed's
difference as a dot and the mean as a bar, with the issue's +0.02 goal drawn for Dice and AJI,
so that a gain carried by one seed reads as such. The same numbers go to a Markdown table
(``OUT`` with the suffix .md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# The experiment's own cell format (mean ± sample std; the mean alone for one seed). This script
# sits beside it in pipelines/, which Python puts on the path when it runs a script from there.
from monuseg_experiment import _cell as mean_std_cell

# (results.json key, label, goal drawn on the panel or None)
DELTAS = (("dice", "Δ Dice", 0.02), ("aji", "Δ AJI", 0.02), ("pq", "Δ PQ", None))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", metavar="LABEL=DIR", help="a row's label and its experiment's --out folder")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the picture (.png); the table goes beside it (.md)")
    parser.add_argument("--target", default="distance", help="the fine-tuning target compared (default distance)")
    parser.add_argument("--fraction", type=float, default=0.1, help="the label fraction compared (default 0.1)")
    return parser.parse_args(argv)


def read_rows(specs: list[str], target: str, fraction: float) -> list[dict[str, Any]]:
    """Each row's per-seed paired differences, read from its results.json."""
    rows = []
    key = f"{target}/difference@{fraction:g}"
    for spec in specs:
        label, sep, folder = spec.rpartition("=")
        if not sep or not label:
            raise SystemExit(f"{spec!r}: give each row as LABEL=DIR, e.g. '10,000 steps=abl-long'")
        results = Path(folder) / "results.json"
        if not results.is_file():
            raise SystemExit(f"{results} is missing: run pipelines/monuseg_experiment.py --out {folder} first")
        result = json.loads(results.read_text())
        if key not in result["table"]:
            raise SystemExit(f"{results} has no paired difference for {key!r}: that experiment needs both starts, "
                             f"--targets {target} and --fractions {fraction:g}")
        seeds = result["settings"]["seeds"]
        rows.append({"label": label, "seeds": seeds,
                     "deltas": {k: result["table"][key][k] for k, _, _ in DELTAS}})
    return rows


def _cell(delta: dict[str, Any]) -> str:
    per_seed = ", ".join(f"{v:+.3f}" for v in delta["per_seed"])
    return f"{mean_std_cell(delta['mean'], delta['std'], signed=True)} ({per_seed})"


def write_markdown(rows: list[dict[str, Any]], path: Path, target: str, fraction: float) -> None:
    lines = [f"Pretrained minus scratch, paired by seed ({target} target, {fraction:.0%} labels): "
             "mean ± sample std (per seed).", "",
             "| pretrained start | " + " | ".join(label for _, label, _ in DELTAS) + " |",
             "|---|" + "---:|" * len(DELTAS)]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(_cell(row["deltas"][k]) for k, _, _ in DELTAS) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]], path: Path, target: str, fraction: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = list(range(len(rows)))[::-1]  # the first row on top
    fig, axes = plt.subplots(1, len(DELTAS), figsize=(3.6 * len(DELTAS), 0.55 * len(rows) + 1.4), sharey=True)
    for ax, (key, label, goal) in zip(axes, DELTAS):
        means = [row["deltas"][key]["mean"] for row in rows]
        ax.barh(ys, means, height=0.55, color=["tab:blue" if m > 0 else "tab:red" for m in means], alpha=0.35)
        for y, row in zip(ys, rows):
            values = row["deltas"][key]["per_seed"]
            ax.scatter(values, [y] * len(values), s=14, color="black", zorder=3)
        ax.axvline(0.0, color="black", linewidth=0.8)
        if goal is not None:
            ax.axvline(goal, color="tab:green", linestyle="--", linewidth=1, label=f"goal +{goal:g}")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{label} (pretrained − scratch)", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(ys, [row["label"] for row in rows], fontsize=8)
    fig.suptitle(f"MoNuSeg test images, {target} target, {fraction:.0%} labels: bars are means over seeds, "
                 "dots single seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = read_rows(args.rows, args.target, args.fraction)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out, args.target, args.fraction)
    write_markdown(rows, args.out.with_suffix(".md"), args.target, args.fraction)
    print(f"{args.out}\n{args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
