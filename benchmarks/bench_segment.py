"""`gsd-wsi segment` on synthetic slides: memory against slide size, speed against the
network's own forward pass, and against MONAI's sliding_window_inference, in one run.

    python benchmarks/bench_segment.py --out bench-out/segment [--sizes 20000 80000] [--device cpu]

(a) Memory: the whole `gsd-wsi segment` command on synthetic slides of each size, peak RSS of
    its process tree sampled every 50 ms (the same model, so only the slide grows).
(b) Limit: on each slide, in process, `segment_slide` end to end against the network alone
    on the same number of random windows (same batch, same device).
(c) MONAI: the largest all-tissue square of the largest slide, and the same mirror-tiled
    4x4 (an all-tissue image 16x larger), each written as its own slide; our segment (every output written) against MONAI's sliding_window_inference
    (Gaussian, same overlap, batch and model) on the region read into memory, each in a
    fresh process with its peak RSS.
Slides are drawn at 0.25 um/px (40x). The model is a tiny U-Net fine-tuned for glands at
2.0 um/px on crops of another synthetic slide: a coarse resolution keeps the 80k run short
(at 0.5 um/px there would be 16x more windows); windows are read from the 1.0 um/px level
and resized once, as for a real 40x slide.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL_MPP = 2.0
PATCH_PX = 64
SLIDE_MPP = 0.25  # "40x": an 80k-px slide is then 20 mm across, a large real scan


def _tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` and every descendant (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_measured(args: list[str], log: Path) -> dict[str, float]:
    """Run a command; its wall time and the peak RSS of its process tree."""
    started = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_bytes(proc.pid))
            time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}); see {log}")
    return {"wall_s": time.perf_counter() - started, "peak_rss_mb": peak / 2**20}


def make_slide(path: Path, size_px: int, seed: int):
    from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide

    n_regions = max(3, min(32, size_px // 8000))
    spec = SyntheticSlideSpec(width_px=size_px, height_px=size_px, mpp=SLIDE_MPP, n_tissue_regions=n_regions, seed=seed)
    if path.exists():
        return None
    return write_synthetic_slide(path, spec)


def make_model(out: Path) -> Path:
    """A tiny U-Net fine-tuned for a few epochs on gland crops of a training slide (cached)."""
    model = out / "model-glands"
    if (model / "model" / "model.json").exists():
        return model
    from gsd_wsi.stages.finetune import FinetuneConfig, run_finetune
    from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide
    from gsd_wsi.synthetic_labels import write_labelled_crops

    slide = write_synthetic_slide(out / "train.svs", SyntheticSlideSpec(width_px=16384, height_px=16384, mpp=0.5,
                                                                       n_tissue_regions=6, seed=21))
    write_labelled_crops(slide, out / "glands-data", mpp=MODEL_MPP, crop_px=128, n_crops=40)
    config = FinetuneConfig(classes=2, class_names=("background", "gland"), model="tiny", init="pytorch",
                            epochs=30, batch_size=16, patch_px=PATCH_PX, crops_per_image=8, loss="dice+ce", lr=1e-3,
                            mpp=MODEL_MPP, val_every=5)
    run_finetune(out / "glands-data", model, config, None, overwrite=True)
    return model


def network_alone(model_dir: Path, n_windows: int, batch_size: int, device: str) -> float:
    """Seconds for the network's forward pass (with softmax) on n random windows."""
    import torch

    from gsd_wsi.stages.segment_model import load_segmentation_model

    model = load_segmentation_model(model_dir, device=device)
    x = torch.rand(batch_size, 3, model.patch_px, model.patch_px, device=model.device) * 2 - 1
    model.forward(x)  # warm-up
    started = time.perf_counter()
    for start in range(0, n_windows, batch_size):
        model.forward(x[: min(batch_size, n_windows - start)])
    return time.perf_counter() - started


def all_tissue_region(slide_path: Path, side_px: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The largest all-tissue square (up to ``side_px`` px at the model's mpp) of a slide, read
    and brought to the model's mpp, and its level-0 top-left."""
    from scipy import ndimage

    from gsd_wsi.imageops import resize_rgb
    from gsd_wsi.slide import open_slide
    from gsd_wsi.tissue import detect_tissue

    with open_slide(slide_path) as slide:
        thumb, scale = slide.thumbnail(8.0)
        tissue = detect_tissue(thumb, slide.mpp * scale[0])
        depth = ndimage.distance_transform_cdt(tissue, metric="chessboard")
        cy, cx = np.unravel_index(np.argmax(depth), depth.shape)
        d = MODEL_MPP / slide.mpp
        half_l0 = min(side_px * d / 2, (depth[cy, cx] - 1) * scale[0])
        x0, y0 = int(cx * scale[0] - half_l0), int(cy * scale[1] - half_l0)
        level = slide.best_level_for_mpp(MODEL_MPP)
        ds = slide.levels[level].downsample
        read_px = int(2 * half_l0 / ds)
        side = int(2 * half_l0 / d) // 16 * 16  # at the model's mpp
        rgb = slide.read_level_region(level, (int(x0 / ds), int(y0 / ds)), (read_px, read_px))
        return resize_rgb(rgb, (side, side)), (x0, y0)


def mirror_tiled(rgb: np.ndarray, tiles: int) -> np.ndarray:
    """``rgb`` repeated ``tiles`` x ``tiles`` times, every other copy mirrored (no seams of tissue
    against glass): a larger all-tissue image made of the slide's own tissue."""
    if tiles == 1:
        return rgb
    pair = np.concatenate([rgb, rgb[:, ::-1]], axis=1)
    block = np.concatenate([pair, pair[::-1]], axis=0)
    reps = -(-tiles // 2)
    big = np.tile(block, (reps, reps, 1))
    side = rgb.shape[0] * tiles
    return np.ascontiguousarray(big[:side, :side])


def write_region_slide(rgb: np.ndarray, path: Path) -> None:
    """A generic tiled JPEG TIFF at the model's mpp (one level), so our reader path is the usual one."""
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(256, 256), compression="jpeg", photometric="rgb",
                  resolution=(1e4 / MODEL_MPP, 1e4 / MODEL_MPP), resolutionunit="CENTIMETER")


def monai_child(region_tiff: str, model_dir: str, batch_size: int, overlap: float, device: str) -> None:
    """Run in a fresh process: read the region, MONAI sliding window, argmax; print JSON."""
    import torch
    from monai.inferers import sliding_window_inference

    from gsd_wsi.slide import open_slide
    from gsd_wsi.stages.segment_model import load_segmentation_model

    model = load_segmentation_model(model_dir, device=device)
    started = time.perf_counter()
    with open_slide(Path(region_tiff)) as slide:
        rgb = slide.read_level_region(0, (0, 0), slide.dimensions)
    x = model.to_input(rgb[None])

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(windows.shape[0], dtype=torch.long, device=windows.device)
        with torch.inference_mode(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.on_gpu):
            return torch.softmax(model.network(windows, t).float(), dim=1)

    with torch.inference_mode():
        probabilities = sliding_window_inference(x, (model.patch_px, model.patch_px), batch_size, predictor,
                                                 overlap=overlap, mode="gaussian")
        mask = probabilities[0].argmax(0).to(torch.uint8).cpu().numpy()
    print(json.dumps({"seconds": time.perf_counter() - started, "mask_px": int(mask.size),
                      "foreground": float((mask == 1).mean())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out/segment"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the limit measurement")
    parser.add_argument("--parts", default="memory,limit,monai", help="which of memory, limit, monai to run")
    parser.add_argument("--region-px", type=int, default=2048, help="side of the all-tissue square (mask px), at most")
    parser.add_argument("--region-tiles", type=int, default=4, help="the larger region: the square mirror-tiled NxN")
    parser.add_argument("--monai-child", nargs=2, metavar=("REGION_TIFF", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.monai_child:
        monai_child(*args.monai_child, args.batch_size, args.overlap, args.device)
        return

    import torch

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = make_model(out)
    cli = [sys.executable, "-m", "gsd_wsi", "-q", "segment"]
    common = ["--model", str(model), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
              "--overlap", str(args.overlap), "--device", args.device, "--overwrite"]
    parts = set(args.parts.split(","))
    json_path = out / "bench_segment.json"
    result: dict = json.loads(json_path.read_text()) if json_path.exists() else {}  # parts run apart merge
    result |= {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "device": args.device},
               "model": {"path": str(model), "mpp": MODEL_MPP, "patch_px": PATCH_PX}}
    for i, size in enumerate(sorted(args.sizes)):
        make_slide(out / f"synthetic-{size}.svs", size, seed=100 + i)

    # (a) memory against slide size
    if "memory" in parts:
        result["memory"] = []
    for size in sorted(args.sizes) if "memory" in parts else []:
        slide = out / f"synthetic-{size}.svs"
        seg_out = out / f"seg-{size}"
        measured = run_measured([*cli, str(slide), "-o", str(seg_out), *common], out / f"seg-{size}.log")
        summary = json.loads((seg_out / slide.stem / "summary.json").read_text())
        row = {"size_px": size, **measured,
               "n_windows": summary["n_windows"], "tissue_mm2": summary["tissue_mm2"],
               "mask_px": summary["mask"]["width_px"] * summary["mask"]["height_px"],
               "windows_per_s": summary["windows_per_s"], "timing_s": summary["timing_s"]}
        result["memory"].append(row)
        print(json.dumps(row), flush=True)
    if "memory" in parts:
        rss = [r["peak_rss_mb"] for r in result["memory"]]
        result["memory_ratio_largest_to_smallest"] = rss[-1] / rss[0]

    # (b) against the network alone, in process, on every slide
    from gsd_wsi.stages.segment import segment_slide
    from gsd_wsi.stages.segment_config import SegmentConfig
    from gsd_wsi.stages.segment_model import load_segmentation_model

    loaded = load_segmentation_model(model, device=args.device)
    config = SegmentConfig(overlap=args.overlap, batch_size=args.batch_size, workers=args.workers, device=args.device)
    if "limit" in parts:
        result["limit"] = []
    for size in sorted(args.sizes) if "limit" in parts else []:
        slide = out / f"synthetic-{size}.svs"
        ours, alone = [], []
        for _ in range(args.repeats):  # interleaved, best of each: these machines' speed drifts
            t0 = time.perf_counter()
            res = segment_slide(slide, loaded, out / "seg-inprocess", config, overwrite=True)
            ours.append(time.perf_counter() - t0)
            alone.append(network_alone(model, res.n_windows, args.batch_size, args.device))
        summary = json.loads((out / "seg-inprocess" / slide.stem / "summary.json").read_text())
        ours_s, net_s = min(ours), min(alone)
        row = {"slide": slide.name, "n_windows": res.n_windows, "segment_s": ours, "network_alone_s": alone,
               "ratio_end_to_end": net_s / ours_s, "network_share_of_last_run": summary["timing_s"]["network_s"] / summary["seconds"],
               "tissue_mpx_per_s_last_run": summary["tissue_mpx_per_s"], "timing_s_last_run": summary["timing_s"]}
        result["limit"].append(row)
        print(json.dumps(row), flush=True)

    # (c) against MONAI on all-tissue regions read from the largest slide (two sizes: MONAI's
    # memory grows with the region, ours does not)
    largest = out / f"synthetic-{max(args.sizes)}.svs"
    if "monai" in parts:
        result["monai"] = []
        square, l0_xy = all_tissue_region(largest, args.region_px)
    for tiles in (1, args.region_tiles) if "monai" in parts else ():
        rgb = mirror_tiled(square, tiles)
        side = rgb.shape[0]
        region = out / f"region-{side}.tiff"
        write_region_slide(rgb, region)
        runs: dict[str, list] = {"ours": [], "monai": []}
        for _ in range(args.repeats):  # interleaved, fresh processes
            ours = run_measured([*cli, str(region), "-o", str(out / "seg-region"), *common], out / f"seg-{region.stem}.log")
            region_summary = json.loads((out / "seg-region" / region.stem / "summary.json").read_text())
            runs["ours"].append(ours | {"segment_s": region_summary["seconds"],
                                        "inference_s": region_summary["timing_s"]["inference_s"]})
            log = out / f"monai-{side}.log"
            theirs = run_measured([sys.executable, __file__, "--monai-child", str(region), str(model), "--batch-size",
                                   str(args.batch_size), "--overlap", str(args.overlap), "--device", args.device], log)
            runs["monai"].append(theirs | {"inference_s": json.loads(log.read_text().strip().splitlines()[-1])["seconds"]})
        ours_s = min(r["segment_s"] for r in runs["ours"])
        monai_s = min(r["inference_s"] for r in runs["monai"])
        row = {"region_px": list(rgb.shape[:2]), "region_l0_xy": list(l0_xy), "mirror_tiles": tiles,
               "ours_windows": region_summary["n_windows"], "runs": runs,
               "ours_segment_s": ours_s, "monai_inference_s": monai_s,
               "ours_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["ours"]),
               "monai_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["monai"]),
               "speed_ratio_ours_to_monai": monai_s / ours_s}
        result["monai"].append(row)
        print(json.dumps(row), flush=True)
    json_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
