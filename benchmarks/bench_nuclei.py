"""The built-in nuclei model in `segment` on the CPU: nuclei-Mpx/s end to end, with and without
test-time augmentation, against the network's own forward pass on the same windows, in one run.

    python benchmarks/bench_nuclei.py [--slide ../shared/data/slides/CMU-1-Small-Region.svs] [--repeats 2]

For each setting, `segment_slide` runs on the slide in process (the whole slide: tissue,
stains, windows, stitching, watershed, every output written), then the network alone runs on
as many random windows of the same size and batch (``SegmentationModel.forward``, TTA as in
the run). nuclei-Mpx/s is the tissue area segmented per second in megapixels at the model's
resolution. Median of ``--repeats``; the machine is waited on until it is idle first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import cpu_model, wait_for_idle

ROOT = Path(__file__).resolve().parents[1]


def network_alone(model, n_windows: int, batch_size: int) -> float:
    """Seconds for the model's forward pass (TTA as set) on ``n_windows`` random windows."""
    x = torch.rand(batch_size, 3, model.patch_px, model.patch_px) * 2 - 1
    model.forward(x[:1])  # warm-up
    started = time.perf_counter()
    for start in range(0, n_windows, batch_size):
        model.forward(x[: min(batch_size, n_windows - start)])
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slide", type=Path, default=ROOT.parent / "shared/data/slides/CMU-1-Small-Region.svs")
    p.add_argument("--model", default="nuclei")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="Write the figures as JSON here.")
    args = p.parse_args()
    from gsd_wsi.slide import open_slide
    from gsd_wsi.stages.segment import segment_slide
    from gsd_wsi.stages.segment_config import SegmentConfig
    from gsd_wsi.stages.segment_model import ModelChoice

    if not args.slide.exists():
        sys.exit(f"{args.slide} not found (the real slides live in ../shared/data/slides)")
    with open_slide(args.slide) as slide:
        slide_mpp = slide.mpp
    rows = []
    print(f"{cpu_model()}, {torch.get_num_threads()} threads; {args.slide.name} at {slide_mpp:.3f} um/px")
    for tta in (False, True):
        config = SegmentConfig(batch_size=args.batch_size, tta=tta, device="cpu")
        model = ModelChoice(args.model, "cpu", tta).for_mpp(slide_mpp)
        ends, alones = [], []
        for _ in range(args.repeats):
            wait_for_idle(30)
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                result = segment_slide(args.slide, model, tmp, config, overwrite=True)
                ends.append(time.perf_counter() - started)
                summary = json.loads((Path(tmp) / result.slide_id / "summary.json").read_text())
            alones.append(network_alone(model, result.n_windows, args.batch_size))
        end, alone = statistics.median(ends), statistics.median(alones)
        tissue_mpx = summary["tissue_mm2"] * 1e6 / model.mpp**2 / 1e6
        row = {"tta": tta, "model": model.folder.name, "n_windows": result.n_windows, "tissue_mpx": round(tissue_mpx, 3),
               "nuclei": (summary.get("nuclei") or {}).get("count"), "segment_s": round(end, 2),
               "network_alone_s": round(alone, 2), "nuclei_mpx_per_s": round(tissue_mpx / end, 4),
               "windows_per_s": round(result.n_windows / end, 2),
               "network_share": round(alone / end, 3)}
        rows.append(row)
        print(f"tta={'on ' if tta else 'off'} {row['n_windows']} windows, {row['nuclei']} nuclei: segment {end:.1f} s "
              f"({row['nuclei_mpx_per_s']:.3f} nuclei-Mpx/s, {row['windows_per_s']:.1f} windows/s), network alone "
              f"{alone:.1f} s ({row['network_share']:.0%} of segment)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": cpu_model(), "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
