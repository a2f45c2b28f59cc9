"""The `gsd-wsi` command line: thin wrappers over the stage functions."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from gsd_wsi import __version__
from gsd_wsi.errors import GsdWsiError

app = typer.Typer(
    name="gsd-wsi",
    help="Whole-slide images to segmentation masks, with diffusion self-supervised pretraining.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
_STATUS_STYLE = {"ok": "green", "skipped": "cyan", "no_tissue": "yellow", "failed": "bold red"}


_LOGGING = {"verbose": 0, "quiet": False}


def _setup_logging(verbose: int, quiet: bool) -> None:
    _LOGGING.update(verbose=verbose, quiet=quiet)
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("gsd_wsi").setLevel(level)


MODEL_HELP = ("A built-in model (`gsd-wsi models`; nuclei picks the one for each slide's resolution) or a "
              "fine-tuned model: the `gsd-wsi finetune -o` run folder or its model/ folder")


def _fail(exc: GsdWsiError) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gsd-wsi {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    _setup_logging(verbose, quiet)


@app.command()
def tile(
    slides: Annotated[list[Path], typer.Argument(help="Slide files, folders of slides, or CSV manifests (column path; optional slide_id, mpp).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: OUT/<slide_id>/patches.zarr and tissue.png.")],
    mpp: Annotated[float, typer.Option(help="Target resolution of the patches, microns per pixel.")] = 0.5,
    tile_px: Annotated[int, typer.Option(help="Patch size in pixels.")] = 256,
    stride_px: Annotated[Optional[int], typer.Option(help="Stride in pixels (default: the patch size).")] = None,
    min_tissue: Annotated[float, typer.Option(help="Keep patches with at least this tissue fraction.")] = 0.5,
    stain: Annotated[str, typer.Option(help="Stain normalisation: macenko, reinhard, vahadane or none.")] = "macenko",
    stain_target: Annotated[Optional[Path], typer.Option(help="Image whose stains are the target (default: built-in reference).")] = None,
    slide_mpp: Annotated[Optional[float], typer.Option(help="Resolution for slides whose files state none, um/px.")] = None,
    thumb_mpp: Annotated[float, typer.Option(help="Resolution of the thumbnail for tissue detection, um/px.")] = 8.0,
    workers: Annotated[int, typer.Option(help="Processes; they share the tiles of each slide.")] = 1,
    backend: Annotated[str, typer.Option(help="Slide reader: auto, tifffile, openslide, image, tiatoolbox.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Redo slides whose stores exist with the same settings.")] = False,
) -> None:
    """Detect tissue, tile at a target resolution, normalise stains, write zarr patch stores."""
    from gsd_wsi.cli.progress import TileProgressBars
    from gsd_wsi.stages.tile_batch import SUMMARY_NAME, run_tile
    from gsd_wsi.stages.tile_config import TileConfig
    from gsd_wsi.tissue import TissueConfig

    try:
        config = TileConfig(
            mpp=mpp, tile_px=tile_px, stride_px=stride_px, min_tissue=min_tissue, stain=stain,  # type: ignore[arg-type]
            stain_target=stain_target, tissue=TissueConfig(thumb_mpp=thumb_mpp), backend=backend,
        )
        results = run_tile(list(slides), out, config, workers=workers, overwrite=overwrite,
                           slide_mpp=slide_mpp, progress=TileProgressBars(console))
    except GsdWsiError as exc:
        raise _fail(exc) from exc
    _print_results(results, out)
    console.print(f"summary: {out / SUMMARY_NAME}", highlight=False)
    _exit_if_failed(results)


_TABLE_ALL_ROWS_UP_TO = 20


def _print_results(results: list, out: Path, verb: str = "tile") -> None:
    """Every slide for small runs; for cohorts, the counts and only the slides needing a look."""
    shown = results if len(results) <= _TABLE_ALL_ROWS_UP_TO else [r for r in results if r.status in ("failed", "no_tissue")]
    if shown:
        table = Table(title=f"gsd-wsi {verb} -> {out}", title_justify="left")
        for column in ("slide", "status", "result", "seconds", "error"):
            table.add_column(column, overflow="fold")
        for r in shown:
            style = _STATUS_STYLE.get(r.status, "")
            table.add_row(r.slide_id, f"[{style}]{r.status}[/]", "" if r.status == "failed" else r.describe(),
                          f"{r.seconds:.1f}", r.error)
        console.print(table)
    counts = {status: sum(r.status == status for r in results) for status in _STATUS_STYLE}
    console.print(", ".join(f"[{_STATUS_STYLE[s]}]{s} {n}[/]" for s, n in counts.items() if n), highlight=False)


def _exit_if_failed(results: list) -> None:
    n_failed = sum(r.status == "failed" for r in results)
    if n_failed:
        console.print(f"[bold red]{n_failed} of {len(results)} slide(s) failed[/]")
        raise typer.Exit(1)


@app.command()
def run(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML (pipelines/demo.yaml, monuseg.yaml, cohort-segment.yaml).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-out"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: section.key=value (YAML value), e.g. finetune.epochs=5; repeatable.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Redo finished stages (training runs, slides) instead of keeping them.")] = False,
) -> None:
    """Run the stages of a pipeline file, in order (`make demo` runs pipelines/demo.yaml)."""
    from gsd_wsi.cli.progress import CohortProgressBar, TrainProgressBars
    from gsd_wsi.stages.pipeline import run_pipeline

    try:
        result = run_pipeline(pipeline, out, overrides=set_ or [], overwrite=overwrite,
                              progress=lambda: CohortProgressBar(console), train_progress=TrainProgressBars)
    except GsdWsiError as exc:
        raise _fail(exc) from exc
    lines = []
    for label, cohort_result in (("tiled", result.tile), ("segmented", result.segment)):
        if cohort_result is not None:
            counts = ", ".join(f"{s.replace('_', ' ')} {cohort_result.count(s)}" for s in
                               ("done", "skipped", "no_tissue", "failed") if cohort_result.count(s))
            lines.append(f"{label} {len(cohort_result.slides)} slide(s) ({counts}) in {cohort_result.wall_s:.0f} s: "
                         f"{result.cohort_dir}/<slide_id>/")
    if result.pretrain_dir is not None:
        lines.append(f"pretrained U-Net: {result.pretrain_dir / 'model'} (loss curve {result.pretrain_dir / 'loss.png'}, "
                     f"samples {result.pretrain_dir / 'samples'})")
    if result.labels_dir is not None:
        lines.append(f"labelled images: {result.labels_dir} (images/, masks/)")
    if result.finetune_dir is not None:
        lines.append(f"segmentation model: {result.finetune_dir / 'model'}")
    if result.evaluate is not None:
        lines.append(f"evaluation: {result.out_dir / 'evaluate' / 'metrics.json'}")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    if result.report_path is not None:
        console.print(f"[bold]report:[/] {result.report_path}  (open it in a browser)", highlight=False, soft_wrap=True)
    if result.n_failed:
        raise typer.Exit(1)


@app.command()
def finetune(
    data: Annotated[list[Path], typer.Argument(help="Labelled images (a folder: images/ + masks/, MoNuSeg .tif + .xml, or GlaS .bmp), or slides with QuPath annotations (files, folders, CSV manifests with an annotations column).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: model/, metrics, curves.")],
    pretrained: Annotated[str, typer.Option(help="A `gsd-wsi pretrain` run folder, a fine-tuned model (a folder, or a built-in such as nuclei: its head is kept when the outputs match), or none to train from scratch.")],
    classes: Annotated[int, typer.Option(help="Number of classes, background included.")] = 2,
    class_names: Annotated[Optional[str], typer.Option(help="Comma-separated class names, background first.")] = None,
    model: Annotated[Optional[str], typer.Option(help="U-Net size: tiny, small or base [the pretrained run's; base from scratch].")] = None,
    init: Annotated[str, typer.Option(help="Weight init from scratch: pytorch (the fix) or reference (faithful, N(0, 0.01); learns far slower).")] = "pytorch",
    label_fraction: Annotated[float, typer.Option(help="Train on this fraction of the labelled training images.")] = 1.0,
    epochs: Annotated[int, typer.Option(help="Epochs [150].")] = 150,
    batch_size: Annotated[int, typer.Option(help="Batch size [8].")] = 8,
    patch_px: Annotated[int, typer.Option(help="Training crop size; equal to the pretraining patch size.")] = 256,
    crops_per_image: Annotated[int, typer.Option(help="Random crops of each image per epoch.")] = 8,
    val_every: Annotated[int, typer.Option(help="Epochs between validations (the last epoch is always validated).")] = 1,
    val_fraction: Annotated[float, typer.Option(help="Fraction of the images held out for model selection.")] = 0.2,
    loss: Annotated[str, typer.Option(help="ss+focal (the method's) or dice+ce.")] = "ss+focal",
    ss_variant: Annotated[str, typer.Option(help="Structural-similarity loss: pixel (the fix) or reference.")] = "pixel",
    input_range: Annotated[str, typer.Option(help="minus_one_one (the fix) or zero_one (the reference's).")] = "minus_one_one",
    lr: Annotated[float, typer.Option(help="Adam learning rate [1e-4].")] = 1e-4,
    lr_schedule: Annotated[str, typer.Option(help="constant (the method's) or cosine (decays to 0 at the last step).")] = "constant",
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warm-up over this many steps [0].")] = 0,
    mpp: Annotated[Optional[float], typer.Option(help="Microns per pixel of the images (recorded for segment); with --train-mpp and no --mpp, read from their Aperio XML.")] = None,
    train_mpp: Annotated[Optional[float], typer.Option(help="Resample the images to this resolution (um/px, not finer than --mpp) and train there; the model's mpp.")] = None,
    stain: Annotated[str, typer.Option(help="Stain normalisation of every image: macenko, reinhard, vahadane or none (use the one the pretraining patches had).")] = "none",
    stain_target: Annotated[Optional[Path], typer.Option(help="Image whose stains are the target (default: built-in reference).")] = None,
    split_file: Annotated[Optional[Path], typer.Option(help="JSON/YAML split by image: test images are never trained on; a train list is all that trains, a val list is the validation set (else drawn by --seed).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    target: Annotated[str, typer.Option(help="semantic (the masks' classes), contour (background, interior, boundary from the instances: keeps touching nuclei apart) or distance (background/object plus a regressed distance-to-edge map whose peaks seed the split).")] = "semantic",
    boundary_um: Annotated[float, typer.Option(help="Width of the contour target's boundary band in micrometres [2.0: 8 px at 0.25 um/px].")] = 2.0,
    use_top_skip: Annotated[Optional[bool], typer.Option("--use-top-skip/--no-top-skip", help="Use the first level's skip [the pretrained run's; no from scratch].")] = None,
    body_lr_scale: Annotated[float, typer.Option(help="The pretrained body's learning rate as a fraction of --lr (the new head gets --lr) [1.0].")] = 1.0,
    freeze_body_epochs: Annotated[int, typer.Option(help="Train the new head alone for this many epochs before the whole network [0].")] = 0,
    annotations: Annotated[Optional[Path], typer.Option(help="Slides' QuPath GeoJSON: one file for one slide, or a folder of <slide>.geojson [a manifest's annotations column, else <slide>.geojson beside each slide].")] = None,
    roi_class: Annotated[str, typer.Option(help="Annotated slides: the class of areas labelled exhaustively (inside, what no object covers is background; outside every area, nothing is labelled).")] = "Region*",
    ignore_class: Annotated[str, typer.Option(help="Annotated slides: the class of areas left out of training.")] = "Ignore*",
    overwrite: Annotated[bool, typer.Option(help="Replace the run in OUT.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in OUT from its last checkpoint (the run's settings).")] = False,
) -> None:
    """Fine-tune the pretrained U-Net for segmentation (or train it from scratch: --pretrained none)."""
    from gsd_wsi.cli.progress import TrainProgressBars
    from gsd_wsi.stages.finetune import FinetuneConfig, run_finetune

    try:
        config = FinetuneConfig(
            classes=classes, class_names=tuple(class_names.split(",")) if class_names else None, model=model,  # type: ignore[arg-type]
            init=init, label_fraction=label_fraction, epochs=epochs, batch_size=batch_size, patch_px=patch_px,  # type: ignore[arg-type]
            crops_per_image=crops_per_image, val_every=val_every, val_fraction=val_fraction, loss=loss, ss_variant=ss_variant,  # type: ignore[arg-type]
            input_range=input_range, lr=lr, lr_schedule=lr_schedule, warmup_steps=warmup_steps, mpp=mpp,  # type: ignore[arg-type]
            train_mpp=train_mpp, stain=stain, stain_target=stain_target, split_file=split_file, seed=seed, num_workers=num_workers,  # type: ignore[arg-type]
            device=device, target=target, boundary_um=boundary_um, use_top_skip=use_top_skip,  # type: ignore[arg-type]
            body_lr_scale=body_lr_scale, freeze_body_epochs=freeze_body_epochs, roi_class=roi_class,
            ignore_class=ignore_class,
        )
        source = None if pretrained.lower() == "none" else Path(pretrained)
        model_dir = run_finetune(list(data), out, config, source, overwrite=overwrite, progress_factory=TrainProgressBars,
                                 resume=resume, annotations=annotations)
    except GsdWsiError as exc:
        raise _fail(exc) from exc
    console.print(f"segmentation model: {model_dir}   curves: {out / 'curves.png'}", highlight=False)


@app.command()
def synth(
    path: Annotated[Path, typer.Argument(help="Slide to write (.svs or .tiff).")],
    width_px: Annotated[int, typer.Option(help="Level-0 width.")] = 6144,
    height_px: Annotated[int, typer.Option(help="Level-0 height.")] = 4096,
    mpp: Annotated[float, typer.Option(help="Microns per pixel at level 0.")] = 0.5,
    pen_marks: Annotated[bool, typer.Option(help="Draw blue, green and black ink.")] = False,
    faint_region: Annotated[bool, typer.Option(help="Add a faintly stained piece.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same slide).")] = 0,
) -> None:
    """Write a synthetic H&E-like pyramidal slide with known tissue (for trials and tests)."""
    from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide

    fmt = "tiff" if path.suffix.lower() in (".tif", ".tiff") else "svs"
    try:
        spec = SyntheticSlideSpec(width_px=width_px, height_px=height_px, mpp=mpp, fmt=fmt, pen_marks=pen_marks,
                                  faint_region=faint_region, seed=seed)
        slide = write_synthetic_slide(path, spec)
    except GsdWsiError as exc:
        raise _fail(exc) from exc
    console.print(f"wrote {slide.path} ({width_px}x{height_px} px, {mpp} um/px, {len(slide.level_downsamples)} levels)")


@app.command()
def pretrain(
    stores: Annotated[list[Path], typer.Argument(help="patches.zarr stores, or folders containing them.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints, metrics, pictures, final model.")],
    config: Annotated[Optional[Path], typer.Option(help="YAML file with settings; flags override it.")] = None,
    model: Annotated[Optional[str], typer.Option(help="U-Net size: tiny, small or base (the reference, 31 M).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Training patch size in pixels [256].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size per process [8].")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs [100].")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Train this many steps instead of epochs.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate [1e-4].")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="Noise schedule: quadratic, linear or cosine [quadratic].")] = None,
    timesteps: Annotated[Optional[int], typer.Option(help="Diffusion steps T [1000].")] = None,
    p2_gamma: Annotated[Optional[float], typer.Option(help="P2 weighting gamma [1].")] = None,
    p2_k: Annotated[Optional[float], typer.Option(help="P2 weighting k [1].")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear learning-rate warm-up steps [0].")] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip the gradient norm to this [off].")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="EMA decay of the weights [0.999].")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Fraction of slides held out for validation [0.1].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed [0].")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="DataLoader workers per process [2].")] = None,
    sample_every: Annotated[Optional[int], typer.Option(help="Steps between sample pictures [500].")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints [500].")] = None,
    init: Annotated[Optional[str], typer.Option(help="Weight init: pytorch (the fix) or reference (faithful, N(0, 0.01); learns far slower) [pytorch].")] = None,
    use_top_skip: Annotated[Optional[bool], typer.Option("--use-top-skip/--no-top-skip", help="Use the first level's skip (the fix) [no].")] = None,
    loss_reduction: Annotated[Optional[str], typer.Option(help="Loss over the batch: mean (the fix) or sum (the reference).")] = None,
    val_every: Annotated[Optional[int], typer.Option(help="Steps between validation losses [200].")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 on GPU), fp32 or bf16 [auto].")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the network.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda [auto].")] = None,
    nproc: Annotated[int, typer.Option(help="Processes to start here (one per GPU); not with torchrun.")] = 1,
    resume: Annotated[bool, typer.Option(help="Continue the run in OUT from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in OUT.")] = False,
) -> None:
    """Self-supervised pretraining of the U-Net as a denoising diffusion model (GenSelfDiff-HIS)."""
    import functools

    from gsd_wsi.cli.progress import TrainProgressBars
    from gsd_wsi.stages.pretrain import run_pretrain
    from gsd_wsi.train.pretrain_config import PretrainConfig, load_yaml_settings

    flags = {
        "model": model, "image_size": image_size, "batch_size": batch_size, "epochs": epochs, "steps": steps,
        "lr": lr, "schedule": schedule, "timesteps": timesteps, "p2_gamma": p2_gamma, "p2_k": p2_k,
        "warmup_steps": warmup_steps, "grad_clip": grad_clip, "ema_decay": ema_decay, "val_fraction": val_fraction,
        "seed": seed, "num_workers": num_workers, "sample_every": sample_every, "checkpoint_every": checkpoint_every,
        "compile": compile, "device": device, "init": init, "use_top_skip": use_top_skip,
        "loss_reduction": loss_reduction, "val_every": val_every, "precision": precision,
    }
    try:
        settings = load_yaml_settings(config) if config is not None else {}
        settings.update({k: v for k, v in flags.items() if v is not None})
        pretrain_config = PretrainConfig.from_dict(settings, where=str(config or "options"))
        paths = run_pretrain(stores, out, pretrain_config, nproc=nproc, resume=resume, overwrite=overwrite,
                             progress_factory=TrainProgressBars,
                             log_setup=functools.partial(_setup_logging, _LOGGING["verbose"], _LOGGING["quiet"]))
    except GsdWsiError as exc:
        raise _fail(exc) from exc
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one report, not one per process
        console.print(f"pretrained model: {paths.model}", highlight=False)
        console.print(f"loss curve: {paths.root / 'loss.png'}   samples: {paths.samples}", highlight=False)


@app.command()
def evaluate(
    data: Annotated[list[Path], typer.Argument(help="Labelled images (a folder: images/ + masks/ or annotations/, MoNuSeg .tif + .xml, or GlaS .bmp + _anno.bmp), or slides with QuPath annotations (files, folders, CSV manifests with an annotations column).")],
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP + ".")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: metrics.json, per_image.csv, overlays/.")],
    protocol: Annotated[str, typer.Option(help="standard (whole images) or reference (per-patch averaging, for comparison only).")] = "standard",
    split_file: Annotated[Optional[Path], typer.Option(help="JSON or YAML split file: train, val and test lists of image stems.")] = None,
    subset: Annotated[str, typer.Option(help="With --split-file: all, train, val or test.")] = "all",
    overlap: Annotated[float, typer.Option(help="Overlap of the sliding windows (standard protocol).")] = 0.5,
    mpp: Annotated[Optional[float], typer.Option(help="Resolution of the images, um/px (default: the model's data_mpp, else its mpp); they are predicted at the model's mpp and scored at their own.")] = None,
    watershed: Annotated[bool, typer.Option("--watershed", hidden=True, help="Removed: refused with a pointer to --target contour.")] = False,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Average each window over its 8 flips and rotations (8x the network's work) [the model's default].")] = None,
    annotations: Annotated[Optional[Path], typer.Option(help="Slides' QuPath GeoJSON: one file for one slide, or a folder of <slide>.geojson [a manifest's annotations column, else <slide>.geojson beside each slide]; scored within the labelled areas only.")] = None,
    roi_class: Annotated[str, typer.Option(help="Annotated slides: the class of areas labelled exhaustively.")] = "Region*",
    ignore_class: Annotated[str, typer.Option(help="Annotated slides: the class of areas left out.")] = "Ignore*",
) -> None:
    """Score a fine-tuned segmentation model on labelled images or annotated slides: Dice, IoU, HD95, AJI, PQ, GlaS scores."""
    from gsd_wsi.cli.progress import ImageProgressBar
    from gsd_wsi.errors import ConfigError
    from gsd_wsi.stages.evaluate import EvaluateConfig, run_evaluate

    try:
        if watershed:
            raise ConfigError("--watershed was removed: its distance-transform split over-split nuclei (PQ and object "
                              "F1 fell). Fine-tune with `--target contour`: evaluate then splits touching nuclei "
                              "with the model's recorded post-processing, and still reports the connected "
                              "components as aji_cc, pq_cc, ...")
        config = EvaluateConfig(protocol=protocol, overlap=overlap, mpp=mpp,  # type: ignore[arg-type]
                                split_file=split_file, subset=subset, batch_size=batch_size, tta=tta,  # type: ignore[arg-type]
                                roi_class=roi_class, ignore_class=ignore_class)
        with ImageProgressBar(console) as bar:
            result = run_evaluate(list(data), model, out, config, progress=bar, annotations=annotations)
    except GsdWsiError as exc:
        raise _fail(exc) from exc
    table = Table(title=f"gsd-wsi evaluate: {result['protocol']}, {result['n_images']} image(s)", title_justify="left")
    for column in ("metric", "mean ± std", "n"):
        table.add_column(column)
    for name, stats in result["summary"].items():
        if name in ("n_true", "n_pred", "n_pred_cc", "n_patches") or stats["mean"] is None:
            continue
        table.add_row(name, f"{stats['mean']:.4f} ± {stats['std']:.4f}", str(stats["n"]))
    console.print(table)
    if result["problems"]:
        console.print(f"[yellow]{len(result['problems'])} problem(s)[/], listed in metrics.json", highlight=False)
    console.print(f"metrics: {out / 'metrics.json'}   per image: {out / 'per_image.csv'}"
                  + ("" if protocol == "reference" else f"   overlays: {out / 'overlays'}"), highlight=False)


@app.command()
def cohort(
    slides: Annotated[list[Path], typer.Argument(help="CSV manifests (column path; optional slide_id, mpp, tissue-detection overrides), slide files or folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: OUT/<slide_id>/{status.json,tile/,segment/}, cohort_summary.csv, report.html.")],
    model: Annotated[Optional[str], typer.Option("--model", help="segment: " + MODEL_HELP + " [nuclei].")] = None,
    stages: Annotated[str, typer.Option(help="Stages to run per slide, in order: tile, segment or tile,segment.")] = "tile,segment",
    scheduler: Annotated[str, typer.Option(help="'local' (a LocalCluster of --workers processes) or a dask scheduler address, e.g. tcp://head:8786.")] = "local",
    workers: Annotated[int, typer.Option(help="Local worker processes (slides in parallel).")] = 2,
    threads_per_worker: Annotated[int, typer.Option(help="Slides at once in each local worker process.")] = 1,
    retries: Annotated[int, typer.Option(help="Extra tries for transient errors (I/O) and for a worker that dies mid-slide.")] = 1,
    timeout_per_slide: Annotated[Optional[float], typer.Option(help="Stop a slide's stage after this many seconds and record it failed.")] = None,
    gpu_resource: Annotated[bool, typer.Option(help="Segment tasks ask for resources={'GPU': 1} (workers started with --resources GPU=1).")] = False,
    stale_lock_s: Annotated[float, typer.Option(help="A slide's lock older than this (seconds) is taken for abandoned, on any host; a dead process's lock on this host is recovered at once.")] = 6 * 3600.0,
    tile_mpp: Annotated[float, typer.Option(help="tile: resolution of the patches, um/px.")] = 0.5,
    tile_px: Annotated[int, typer.Option(help="tile: patch size in pixels.")] = 256,
    min_tissue: Annotated[float, typer.Option(help="tile: keep patches with at least this tissue fraction.")] = 0.5,
    stain: Annotated[str, typer.Option(help="tile: stain normalisation: macenko, reinhard, vahadane or none.")] = "macenko",
    overlap: Annotated[float, typer.Option(help="segment: overlap of neighbouring windows, a fraction of the window.")] = 0.25,
    batch_size: Annotated[int, typer.Option(help="segment: windows per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="segment: auto, cpu or cuda.")] = "auto",
    probabilities: Annotated[bool, typer.Option("--probabilities/--no-probabilities", help="segment: also write class probabilities.")] = False,
    min_area_um2: Annotated[float, typer.Option(help="segment: leave regions smaller than this (um^2) out of the GeoJSON.")] = 0.0,
    slide_mpp: Annotated[Optional[float], typer.Option(help="Resolution for slides whose files and manifest state none, um/px.")] = None,
    thumb_mpp: Annotated[float, typer.Option(help="Resolution of the thumbnail for tissue detection, um/px.")] = 8.0,
    backend: Annotated[str, typer.Option(help="Slide reader: auto, tifffile, openslide, image, tiatoolbox.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Redo finished slides, also those made with another model or settings.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write OUT/report.html.")] = True,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="segment: average each window over its 8 flips and rotations [the model's default].")] = None,
) -> None:
    """Many slides through tile and segment on dask.distributed: resumable, failures isolated, with a report."""
    from gsd_wsi.cli.progress import CohortProgressBar
    from gsd_wsi.stages.cohort import CohortConfig, run_cohort
    from gsd_wsi.stages.segment_config import SegmentConfig
    from gsd_wsi.stages.tile_config import TileConfig
    from gsd_wsi.tissue import TissueConfig

    try:
        tissue = TissueConfig(thumb_mpp=thumb_mpp)
        config = CohortConfig(
            stages=tuple(s.strip() for s in stages.split(",") if s.strip()), scheduler=scheduler, workers=workers,
            threads_per_worker=threads_per_worker, retries=retries, timeout_per_slide_s=timeout_per_slide,
            overwrite=overwrite, gpu_resource=gpu_resource, report=report, stale_lock_s=stale_lock_s,
            tile=TileConfig(mpp=tile_mpp, tile_px=tile_px, min_tissue=min_tissue, stain=stain, tissue=tissue,  # type: ignore[arg-type]
                            backend=backend),
            segment=SegmentConfig(overlap=overlap, batch_size=batch_size, device=device, probabilities=probabilities,  # type: ignore[arg-type]
                                  min_area_um2=min_area_um2, tissue=tissue, backend=backend, tta=tta),
        )
        result = run_cohort(list(slides), out, model, config, slide_mpp=slide_mpp, progress=CohortProgressBar(console))
    except GsdWsiError as exc:
        raise _fail(exc) from exc
    n = len(result.slides)
    console.print(
        f"{n} slide(s): [green]done {result.count('done')}[/], [cyan]skipped {result.count('skipped')}[/], "
        f"[yellow]no tissue {result.count('no_tissue')}[/], [bold red]failed {result.count('failed')}[/] in "
        f"{result.wall_s:.1f} s ({result.slides_per_hour:,.0f} slides/h)", highlight=False)
    console.print(f"summary: {result.summary_path}", highlight=False)
    if result.report_path is not None:
        console.print(f"report: {result.report_path}", highlight=False)
    if result.count("failed"):
        raise typer.Exit(1)


@app.command()
def segment(
    slides: Annotated[list[Path], typer.Argument(help="Slide files, folders of slides, or CSV manifests (column path; optional slide_id, mpp).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: OUT/<slide_id>/mask.ome.zarr, mask.tiff, mask.geojson, overlay.png, summary.json.")],
    overlap: Annotated[float, typer.Option(help="Overlap of neighbouring windows, a fraction of the window.")] = 0.25,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    workers: Annotated[int, typer.Option(help="Reader threads; each opens the slide once and reads ahead of the network.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (bf16 autocast on CUDA).")] = "auto",
    probabilities: Annotated[bool, typer.Option("--probabilities/--no-probabilities", help="Also write class probabilities (uint8) into mask.ome.zarr.")] = False,
    min_area_um2: Annotated[float, typer.Option(help="Leave regions smaller than this (um^2) out of the GeoJSON.")] = 0.0,
    slide_mpp: Annotated[Optional[float], typer.Option(help="Resolution for slides whose files state none, um/px.")] = None,
    thumb_mpp: Annotated[float, typer.Option(help="Resolution of the thumbnail for tissue detection, um/px.")] = 8.0,
    backend: Annotated[str, typer.Option(help="Slide reader: auto, tifffile, openslide, image, tiatoolbox.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace outputs made before (also with another model or settings).")] = False,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Average each window over its 8 flips and rotations (8x the network's work) [the model's default].")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP + " [nuclei].")] = None,
) -> None:
    """Segment whole slides with a fine-tuned model: seamless mask pyramids (OME-Zarr, TIFF) and GeoJSON."""
    from gsd_wsi.cli.progress import TileProgressBars
    from gsd_wsi.stages.segment import run_segment
    from gsd_wsi.stages.segment_config import SegmentConfig
    from gsd_wsi.tissue import TissueConfig

    try:
        config = SegmentConfig(overlap=overlap, batch_size=batch_size, workers=workers, device=device,  # type: ignore[arg-type]
                               probabilities=probabilities, min_area_um2=min_area_um2,
                               tissue=TissueConfig(thumb_mpp=thumb_mpp), backend=backend, tta=tta)
        results = run_segment(list(slides), out, model, config, overwrite=overwrite, slide_mpp=slide_mpp,
                              progress=TileProgressBars(console, unit="windows"))
    except GsdWsiError as exc:
        raise _fail(exc) from exc
    _print_results(results, out, "segment")
    console.print(f"summary: {out / 'segment_summary.csv'}   per slide: {out}/<slide_id>/", highlight=False)
    _exit_if_failed(results)


@app.command()
def models() -> None:
    """List the built-in models: name, resolution, classes, target, size, licence, validation scores."""
    from gsd_wsi.zoo import builtin_models

    found = builtin_models()
    if not found:
        console.print("no built-in model is installed", highlight=False)
        return
    out = Console(width=max(120, Console().width))  # a table, also when piped: never squeezed to 80 columns
    table = Table(title="built-in models: --model NAME, or the family name (nuclei) for the member that fits "
                        "each slide's resolution", title_justify="left")
    for column in ("name", "um/px", "classes", "target", "size", "licence", "validation (Dice / AJI / PQ)"):
        table.add_column(column, no_wrap=True)
    for model in found:
        scores = " / ".join(f"{model.validation[k]:.3f}" if isinstance(model.validation.get(k), (int, float)) else "-"
                            for k in ("dice", "aji", "pq"))
        table.add_row(model.name, f"{model.mpp:g}", ", ".join(model.classes[1:2]), model.target,
                      f"{model.size_bytes / 1e6:.1f} MB", model.licence, scores)
    out.print(table)
    out.print("The weights' licence is their own, apart from the code's Apache-2.0; the model card is "
              "docs/models.md.", highlight=False)
