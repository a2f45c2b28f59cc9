"""`gsd-wsi finetune`: the pretrained U-Net fine-tuned for segmentation (docs/method.md section 3).

Run folder::

    RUN/config.json      settings, data split (image names), where the weights came from
    RUN/metrics.jsonl    per epoch: step, epoch, loss, val_dice, lr, img/s
    RUN/curves.png       training loss and validation Dice
    RUN/model/           the best network by validation Dice (safetensors + model.json with the
                         classes, patch size, mpp and data_mpp, input range and stain normalisation)
    RUN/last/            the network after the last epoch
    RUN/checkpoint/      after every epoch: weights, optimizer, epoch/step and best Dice (state.pt),
                         what ``resume`` continues from; replaced atomically, so only the last is kept

Training images are cut into random crops every epoch; validation predicts whole images by
sliding window, as evaluation does, and keeps the best model by foreground Dice.

With ``train_mpp`` the network learns at that resolution, not the images' own (``mpp``, or
the one their Aperio XML records): every image is stain-normalised at its own resolution,
as in `evaluate`, then training images and masks are resampled to ``train_mpp`` (area
averaging; masks nearest) before cropping, so a ``patch_px`` crop covers ``patch_px *
train_mpp`` um. Validation goes the way of `evaluate`: the image is brought to ``train_mpp``,
predicted, and the probabilities brought back, so its Dice is against the original mask at
the images' own resolution. model.json records ``mpp`` = ``train_mpp`` and ``data_mpp``.

``target`` (model.json ``"target"``; a model.json without it is semantic): ``semantic`` learns
the masks' classes; ``contour`` learns three classes from the images' *instances*
(gsd_wsi/targets.py): background, object interior and a boundary band ``boundary_um`` wide,
so that touching nuclei stay apart; classes ``[background, <object>, "boundary"]``. Its
validation Dice is that of the object (interior + boundary). Instances come from Aperio XML,
a GlaS instance image or a mask's instance ids, else a binary mask's connected components
(touching objects then stay merged; logged). ``distance`` learns background and object
(softmax) plus a regressed map of each pixel's distance to its instance's edge, normalised per
instance to [0, 1] (sigmoid; gsd_wsi/targets.py), whose maxima seed the watershed; outputs
``[background, <object>, "distance"]``.

With a pretrained start the new head always learns at ``lr``; ``body_lr_scale`` < 1 slows the
pretrained body (its features are kept more), and ``freeze_body_epochs`` trains the head alone
for that many epochs first, so that the random head's first gradients do not disturb them.

``resume`` continues an interrupted run from RUN/checkpoint/ with the run's settings (those
of config.json; only ``device`` may differ). Every epoch draws its crops, augmentation and
shuffle from generators seeded by (``seed``, epoch), so the resumed epochs see the data an
uninterrupted run would; metric lines past the checkpoint are dropped before appending.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsd_wsi import __version__
from gsd_wsi.datasets import (DatasetError, LabelledImage, discover, label_subset, load_example,
                              load_instance_example, read_split_file, recorded_mpp, resample_example, split_from_file)
from gsd_wsi.errors import ConfigError, RunFolderError, StainError
from gsd_wsi.imageops import predict_at_mpp
from gsd_wsi.instances import tune_postprocess
from gsd_wsi.metrics import semantic_scores
from gsd_wsi.nn.inference import predict_probabilities
from gsd_wsi.nn.losses import DistanceTargetLoss, SegmentationLoss
from gsd_wsi.nn.unet import unet_config
from gsd_wsi.slide.image_backend import read_plain_image
from gsd_wsi.stain import StainNormalizer, make_normalizer, normalise_image
from gsd_wsi.stages.slide_items import AreaItem, SlideData, is_slide_input, load_slide_data, slide_splits
from gsd_wsi.stages.labelled_slides import normalise_areas
from gsd_wsi.targets import (DISTANCE_LEVELS, IGNORE, background_where, contour_target, distance_label,
                             pixel_probabilities, with_ignored)
from gsd_wsi.train import checkpoint as ckpt
from gsd_wsi.train.augment import training_augmentation
from gsd_wsi.train.ddp import resolve_device
from gsd_wsi.train.estimate import log_cpu_training_time
from gsd_wsi.train.finetune_config import DATA_MPP_SPREAD, INPUT_RANGES, FinetuneConfig
from gsd_wsi.train.lr_schedule import lr_factor
from gsd_wsi.train.monitor import plot_curves, truncate_metrics
from gsd_wsi.train.pretrain_loop import TrainProgress
from gsd_wsi.train.transfer import (pretrained_folder, pretrained_unet_config, segmentation_model_json,
                                    segmentation_unet)

logger = logging.getLogger(__name__)

class CropDataset(torch.utils.data.Dataset):
    """Random ``patch_px`` crops of whole labelled images, augmented; images padded if smaller.

    An example whose label holds :data:`IGNORE` pixels (an annotated slide's area) is cropped
    around a labelled pixel drawn at random, so that no crop is all unlabelled. ``weights``
    (default 1 each) is how many images' worth of crops an example gives per epoch.
    """

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], config: FinetuneConfig,
                 weights: list[int] | None = None) -> None:
        size = config.patch_px
        self.examples = [_pad_to(image, label, size) for image, label in examples]
        self.centres = [_labelled_centres(label) for _, label in self.examples]
        self.order = np.repeat(np.arange(len(self.examples)), weights if weights is not None else 1)
        self.size, self.crops = size, config.crops_per_image
        self.low, self.high = INPUT_RANGES[config.input_range]
        self.augment = training_augmentation(size, seed=config.seed)
        self.rng = np.random.default_rng(config.seed)

    def __len__(self) -> int:
        return len(self.order) * self.crops

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        which = int(self.order[index % len(self.order)])
        image, label = self.examples[which]
        centres = self.centres[which]
        if centres is None:
            y0 = int(self.rng.integers(0, image.shape[0] - self.size + 1))
            x0 = int(self.rng.integers(0, image.shape[1] - self.size + 1))
        else:
            cy, cx = divmod(int(centres[self.rng.integers(len(centres))]), image.shape[1])
            y0 = min(max(cy - self.size // 2, 0), image.shape[0] - self.size)
            x0 = min(max(cx - self.size // 2, 0), image.shape[1] - self.size)
        crop = {"image": torch.from_numpy(image[y0:y0 + self.size, x0:x0 + self.size].transpose(2, 0, 1) / 255.0).float(),
                "label": torch.from_numpy(label[None, y0:y0 + self.size, x0:x0 + self.size].copy())}
        out = self.augment(crop)
        x = torch.as_tensor(out["image"]).float() * (self.high - self.low) + self.low
        return x, torch.as_tensor(out["label"])[0].long()


MAX_CENTRES = 1_000_000  # labelled pixels kept as crop centres per example (evenly spaced)


def _pad_to(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reflected up to ``size``; a label with ignored pixels is padded with more of them."""
    pad_y, pad_x = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    if pad_y or pad_x:
        image = np.pad(image, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect")
        if (label == IGNORE).any():
            label = np.pad(label, ((0, pad_y), (0, pad_x)), constant_values=IGNORE)
        else:
            label = np.pad(label, ((0, pad_y), (0, pad_x)), mode="reflect")
    return image, label


def _labelled_centres(label: np.ndarray) -> np.ndarray | None:
    """Flat indices of the labelled pixels (at most ``MAX_CENTRES``), or None when all are labelled."""
    labelled = label.ravel() != IGNORE
    if labelled.all():
        return None
    centres = np.flatnonzero(labelled)
    if len(centres) == 0:
        raise DatasetError("a training area has no labelled pixel")
    return centres[:: max(1, -(-len(centres) // MAX_CENTRES))]


AREA_UNIT_PX = 1_000_000  # an annotated area gives one image's crops per this many labelled pixels


def area_weights(items: list[Any]) -> list[int] | None:
    """Crops per epoch of each item, in images' worth: one per ``AREA_UNIT_PX`` labelled pixels
    (a 40x MoNuSeg image) and at least one for an annotated area; None when all are images."""
    if not any(isinstance(item, AreaItem) for item in items):
        return None
    return [max(1, round(int(item.area.labelled.sum()) / AREA_UNIT_PX)) if isinstance(item, AreaItem) else 1
            for item in items]


def _ignoring(target: np.ndarray, ignored: np.ndarray | None) -> np.ndarray:
    return target if ignored is None else with_ignored(target, ignored)


def _worker_seed(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    dataset: CropDataset = info.dataset  # type: ignore[assignment]
    dataset.rng = np.random.default_rng(info.seed % 2**32)
    dataset.augment.set_random_state(seed=info.seed % 2**32)


def _splits(data_dir: Path, config: FinetuneConfig) -> tuple[dict[str, list[LabelledImage]], list[str]]:
    items, problems = discover(data_dir)
    listed: dict[str, list[str]] = {}
    if config.split_file is not None:
        listed = read_split_file(config.split_file, known_names=[i.name for i in items])
    splits = split_from_file(items, listed, config.val_fraction, config.seed)
    left_out = len(items) - sum(len(v) for v in splits.values())
    if left_out:
        logger.info("%d image(s) of %s are in none of %s's lists: not used", left_out, data_dir, config.split_file)
    if config.label_fraction < 1:
        splits["train"] = label_subset(splits["train"], config.label_fraction, config.seed)
    return splits, problems


def stain_normaliser(config: FinetuneConfig) -> StainNormalizer | None:
    """The normaliser every training and validation image goes through (its source fitted per image)."""
    if config.stain == "none":
        return None
    target_rgb = read_plain_image(config.stain_target)[0] if config.stain_target is not None else None
    return make_normalizer(config.stain, target_rgb)


def with_data_mpp(config: FinetuneConfig, items: list[LabelledImage]) -> tuple[FinetuneConfig, str | None]:
    """``config`` with ``mpp`` set to the images' resolution where ``train_mpp`` needs it, and its source.

    An explicit ``mpp`` wins; else every image must record one (Aperio XML ``MicronsPerPixel``),
    all within 5 % of each other (MoNuSeg's span 2.9 %), and their median is taken.
    """
    if config.mpp is not None:
        return config, "--mpp"
    if config.train_mpp is None and config.target == "semantic":
        return config, None
    recorded = {item.name: recorded_mpp(item) for item in items}
    missing = sorted(name for name, mpp in recorded.items() if mpp is None)
    if missing:
        needs = (f"--train-mpp {config.train_mpp}" if config.train_mpp is not None
                 else f"--target {config.target} (--boundary-um {config.boundary_um})")
        raise ConfigError(f"{needs} needs the resolution of the training images, and "
                          f"{len(missing)} of {len(recorded)} record none (e.g. {missing[0]}); give it with --mpp "
                          "(MoNuSeg's 40x images: --mpp 0.2527)")
    low, high = min(recorded.values()), max(recorded.values())  # type: ignore[type-var]
    if high / low - 1 > DATA_MPP_SPREAD:
        raise ConfigError(f"the training images record resolutions from {low} to {high} um/px; give the one to "
                          "train from with --mpp, or train on images of one resolution")
    mpp = float(np.median(list(recorded.values())))
    logger.info("training images at %.4g um/px (median of the %d recorded, %.4g-%.4g)", mpp, len(recorded), low, high)
    return dataclasses.replace(config, mpp=mpp), f"recorded in the annotations (median of {low}-{high})"


Example = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # image, label, ignored pixels (None: none)


def _load(items: list[Any], config: FinetuneConfig, normaliser: StainNormalizer | None,
          to_mpp: float | None = None) -> list[Example]:
    """Images and semantic masks (instance maps for an instance target), normalised at their own
    resolution, then brought to ``to_mpp`` if given, with the pixels that carry no label. Areas
    of annotated slides come at the model's resolution, normalised per slide already."""
    examples: list[Example] = []
    sources: Counter[str] = Counter()
    for item in items:
        if isinstance(item, AreaItem):
            area = item.area
            ignored = ~area.labelled
            examples.append((area.image, area.classes if config.target == "semantic" else area.instances,
                             ignored if ignored.any() else None))
            continue
        if config.target == "semantic":
            image, label = load_example(item, config.classes)[:2]
        else:
            image, label, source = load_instance_example(item)
            sources[source] += 1
        if normaliser is not None:
            try:  # per image, as `evaluate` does
                image = normalise_image(normaliser, image)
            except StainError as exc:
                raise StainError(f"{item.image_path}: {exc}") from exc
        if to_mpp is not None:
            assert config.mpp is not None, "with_data_mpp sets mpp wherever train_mpp is set"
            image, label, _ = resample_example((image, label, None), config.mpp, to_mpp)
        examples.append((image, label, None))
    if sources["mask connected components"]:
        logger.warning("%d of %d images have only a binary mask: their instances are its connected components, so "
                       "touching objects stay merged in the %s target (Aperio XML or instance ids keep them apart)",
                       sources["mask connected components"], len(items), config.target)
    elif sources:
        logger.info("instances from %s", ", ".join(f"{k} ({v})" for k, v in sorted(sources.items())))
    return examples


def predict_image(model: torch.nn.Module, image: np.ndarray, config: FinetuneConfig, device: torch.device) -> np.ndarray:
    """(C, H, W) probabilities of a whole image at ``config.mpp``, predicted at ``config.model_mpp``."""
    model.eval()

    def predict(window: np.ndarray) -> np.ndarray:
        return predict_probabilities(model, window, config.patch_px, 0.5, INPUT_RANGES[config.input_range],
                                     config.batch_size, device, target=config.target)

    return predict_at_mpp(predict, image, config.mpp, config.model_mpp)


def tuned_postprocess(model: torch.nn.Module, examples: list[Example], config: FinetuneConfig,
                      device: torch.device) -> tuple[dict[str, Any], dict[str, float]] | None:
    """model.json ``"postprocess"``, the instance post-processing tuned on ``examples`` (validation
    images and their true instances, :func:`tuning_examples`), and their mean AJI and PQ with it; None
    without examples, for a multi-class target, or without the images' resolution (the areas
    are in um^2; a contour target always has it)."""
    if not examples or (config.target == "semantic" and config.classes != 2) or config.mpp is None:
        return None
    pairs = [(background_where(predict_image(model, image, config, device), ignored), instances)
             for image, instances, ignored in examples]
    tuned, scores = tune_postprocess(pairs, kind=config.target, mpp=config.mpp)  # validation images at mpp
    return tuned.to_dict(), scores


def tuning_examples(items: list[Any], config: FinetuneConfig, normaliser: StainNormalizer | None) -> list[Example]:
    """(image, instances) of the validation images whose instances are true ones (Aperio XML, an
    instance image or instance ids), at their own resolution, normalised as in training.

    Connected components of a binary mask keep touching nuclei merged: thresholds tuned on
    them would learn to merge too. Only when no image has true instances are they used (logged).
    Annotated areas give their instances (objects are drawn one by one) and their unlabelled pixels.
    """
    if not items or (config.target == "semantic" and config.classes != 2):
        return []
    if isinstance(items[0], AreaItem):
        return [(i.area.image, np.where(i.area.labelled, i.area.instances, 0), None if i.area.labelled.all()
                 else ~i.area.labelled) for i in items]
    loaded = [load_instance_example(item) for item in items]
    true = [(image, instances) for image, instances, source in loaded if source != "mask connected components"]
    if not true:
        logger.warning("no validation image has true instances (Aperio XML, instance ids): the post-processing is "
                       "tuned on mask components, in which touching objects are merged")
        true = [(image, instances) for image, instances, _ in loaded]
    elif len(true) < len(loaded):
        logger.info("post-processing tuned on the %d of %d validation images with true instances", len(true),
                    len(loaded))
    if normaliser is not None:
        true = [(normalise_image(normaliser, image), instances) for image, instances in true]
    return [(image, instances, None) for image, instances in true]


def validation_dice(model: torch.nn.Module, examples: list[Example], config: FinetuneConfig,
                    device: torch.device) -> float:
    """Mean over images of the foreground-mean Dice of whole-image sliding-window predictions.

    The images are at ``config.mpp``; each is predicted at ``config.model_mpp`` and scored at
    its own resolution, as `evaluate` does. For an instance target the labels are instance maps
    and the Dice is that of the object (contour: interior + boundary) against the instances' union.
    Ignored pixels are background in both, so they add nothing to any foreground class.
    """
    scores = []
    for image, label, ignored in examples:
        probabilities = predict_image(model, image, config, device)
        if config.target != "semantic":
            probabilities, label = pixel_probabilities(probabilities, config.target), (label > 0).astype(np.int64)
        pred = probabilities.argmax(0)
        if ignored is not None:
            pred, label = np.where(ignored, 0, pred), np.where(ignored, 0, label)
        scores.append(semantic_scores(pred, label, config.classes)["foreground_mean"]["dice"])
    defined = [score for score in scores if not math.isnan(score)]  # NaN: no foreground in image or prediction
    return float(np.mean(defined)) if defined else math.nan


CHECKPOINT = "checkpoint"
RESUME_FREE = ("device",)  # settings a resumed run may change


def body_and_head(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The network's parameters: the body (what pretraining gives) and the head (always new)."""
    head_names = set(model.head_parameter_names())  # type: ignore[operator]
    body = [p for name, p in model.named_parameters() if name not in head_names]
    head = [p for name, p in model.named_parameters() if name in head_names]
    return body, head


def _seed_epoch(config: FinetuneConfig, epoch: int, dataset: CropDataset) -> None:
    """Seed the shuffle, crops and augmentation of ``epoch`` (0-based) from ``config.seed``."""
    torch.manual_seed(config.seed * 100_003 + epoch)
    dataset.rng = np.random.default_rng([config.seed, epoch])
    dataset.augment.set_random_state(seed=(config.seed * 100_003 + epoch) % 2**32)


def _check_resume(run_dir: Path, config: FinetuneConfig) -> Path:
    """The checkpoint to resume from, after checking the run's settings are ``config``'s."""
    saved_path = run_dir / "config.json"
    try:
        saved = json.loads(saved_path.read_text())["finetune"]
    except (KeyError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{saved_path} is unreadable ({exc}); use --overwrite to start afresh") from exc
    now = json.loads(json.dumps(config.to_dict()))  # tuples as lists, as config.json holds them
    defaults = json.loads(json.dumps(FinetuneConfig().to_dict()))  # a setting newer than the run: its default
    differences = {k: (saved.get(k, defaults[k]), v) for k, v in now.items()
                   if k not in RESUME_FREE and saved.get(k, defaults[k]) != v}
    if differences:
        listed = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in differences.items())
        raise RunFolderError(f"--resume: the settings differ from the run's ({listed}); use the run's settings "
                             "or --overwrite")
    folder = run_dir / CHECKPOINT
    if not (folder / ckpt.STATE).is_file():
        raise RunFolderError(f"--resume: {run_dir} has no checkpoint ({folder.name}/) to resume from; "
                             "start afresh with --overwrite")
    ckpt.load_train_state(folder)  # fail here, before loading the data, on a corrupt checkpoint
    return folder




def _slide_data(sources: list[str | Path], annotations: Path | None, config: FinetuneConfig,
                run_dir: Path) -> tuple[FinetuneConfig, SlideData, dict[str, list[Any]]]:
    """The run's settings completed by the annotated slides (resolution, classes), their areas
    stain-normalised per slide, and their split."""
    if config.mpp is not None:
        raise ConfigError("--mpp gives the resolution of labelled images; slides record theirs (a manifest's mpp "
                          "column where one does not): give the model's resolution with --train-mpp")
    data = load_slide_data(sources, annotations, run_dir / LABELLED, model_mpp=config.train_mpp,
                           class_names=config.class_names, min_px=max(256, config.patch_px),
                           roi_class=config.roi_class, ignore_class=config.ignore_class)
    if config.target != "semantic" and len(data.class_names) != 2:
        raise ConfigError(f"--target {config.target} learns one object class, and the annotations name "
                          f"{len(data.class_names) - 1}: {', '.join(data.class_names[1:])}; give --class-names "
                          "background,<class> with the one class, or --target semantic")
    config = dataclasses.replace(config, mpp=data.model_mpp, classes=len(data.class_names),
                                 class_names=tuple(data.class_names))
    normaliser = stain_normaliser(config)
    by_slide: dict[str, list[AreaItem]] = {}
    for item in data.items:
        by_slide.setdefault(item.slide_id, []).append(item)
    items = [AreaItem(area.name, area.slide_id, area) for group in by_slide.values()
             for area in normalise_areas([i.area for i in group], normaliser)]
    listed: dict[str, list[str]] = {}
    if config.split_file is not None:
        listed = read_split_file(config.split_file, known_names=[i.name for i in items] + list(by_slide))
    splits = slide_splits(items, listed, config.val_fraction, config.seed)
    if config.label_fraction < 1:
        splits["train"] = label_subset(splits["train"], config.label_fraction, config.seed)  # type: ignore[arg-type]
    return config, data, splits


LABELLED = "labelled"  # RUN/labelled/<slide_id>.zarr: the annotated slides' areas, read once


def run_finetune(data_dir: str | Path | list[str | Path], run_dir: str | Path, config: FinetuneConfig,
                 pretrained: Path | str | None, overwrite: bool = False,
                 progress_factory: Callable[[], TrainProgress] | None = None, resume: bool = False,
                 annotations: str | Path | None = None) -> Path:
    """Fine-tune (or, with ``pretrained=None``, train from scratch); returns ``RUN/model``.

    ``data_dir``: a folder of labelled images, or slides (files, folders, CSV manifests; one
    or a list) with QuPath annotations: ``annotations`` (one GeoJSON for one slide, or a folder
    of ``<slide>.geojson``), a manifest's ``annotations`` column, or ``<slide>.geojson`` beside
    each slide. ``resume`` continues the run in ``run_dir`` from its last checkpoint (same settings).
    """
    sources = [Path(p) for p in data_dir] if isinstance(data_dir, (list, tuple)) else [Path(data_dir)]
    annotations = Path(annotations) if annotations is not None else None
    run_dir = Path(run_dir)
    slides = is_slide_input(sources, annotations)
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in the folder and --overwrite replaces it; give one")
    if resume and not (run_dir / "config.json").exists():
        raise RunFolderError(f"--resume: {run_dir} holds no run to resume; start one without --resume")
    if (run_dir / "config.json").exists() and not (overwrite or resume):
        raise RunFolderError(f"{run_dir} holds a run; continue it with --resume, choose another -o or use --overwrite")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if slides:
        config, slide_data, splits = _slide_data(sources, annotations, config, run_dir)
        problems, data_mpp_source = slide_data.problems, f"slides read at {config.mpp:g} um/px"
        data_record: Any = slide_data.record
    else:
        splits, problems = _splits(sources[0], config)
        config, data_mpp_source = with_data_mpp(config, splits["train"] + splits["val"])
        data_record = str(sources[0])
    if pretrained is not None:  # a built-in model by name: the folder of the member for the model's mpp
        pretrained = pretrained_folder(pretrained, config.model_mpp)
    if pretrained is None and (config.body_lr_scale != 1.0 or config.freeze_body_epochs):
        raise ConfigError("--body-lr-scale and --freeze-body-epochs treat pretrained weights apart from the new "
                          "head; from scratch (--pretrained none) there are none: leave them at 1 and 0")
    if config.model is None and pretrained is not None:
        base = dataclasses.replace(pretrained_unet_config(pretrained), init=config.init)
    else:
        base = unet_config(config.model or "base", init=config.init)
    if config.use_top_skip is not None:
        base = dataclasses.replace(base, use_top_skip=config.use_top_skip)
    model, provenance = segmentation_unet(pretrained, config.out_classes, base, config.patch_px)
    # channels_last: 1.11x a training step of tiny on a 2-core AVX2 CPU (benchmarks/bench_precision.py)
    model = model.to(device, memory_format=torch.channels_last)
    resume_from = _check_resume(run_dir, config) if resume else None
    # areas of slides come normalised per slide; images are normalised one by one
    normaliser = None if slides else stain_normaliser(config)
    # training crops at the model's resolution; validation images at their own, scored as `evaluate` does
    loaded, val = _load(splits["train"], config, normaliser, config.train_mpp), _load(splits["val"], config, normaliser)
    if config.target == "contour":  # the band is drawn at the training resolution; validation keeps instances
        train = [(image, _ignoring(contour_target(labels, config.boundary_px), ignored)) for image, labels, ignored in loaded]
    elif config.target == "distance":  # the distance is per instance, so it is drawn before cropping
        train = [(image, _ignoring(distance_label(labels), ignored)) for image, labels, ignored in loaded]
    else:
        train = [(image, labels) for image, labels, _ in loaded]
    # what `evaluate` and `segment` reproduce: the method, its settings and target, no source
    stain_record = {"method": "none"} if normaliser is None else {**normaliser.params, "source": None}
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)  # an overwritten run's
        ckpt.write_json(run_dir / "config.json", {
            "finetune": config.to_dict(), "data": data_record, "data_mpp_source": data_mpp_source,
            "pretrained": provenance, "problems": problems,
            "split": {k: [i.name for i in v] for k, v in splits.items()}, "gsd_wsi_version": __version__})
        (run_dir / "metrics.jsonl").write_text("")
    dataset = CropDataset(train, config, area_weights(splits["train"]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                         drop_last=len(dataset) >= config.batch_size,
                                         num_workers=config.num_workers, worker_init_fn=_worker_seed)
    body, head = body_and_head(model)
    # two groups always (the body's may be scaled), so a checkpoint's optimizer state fits any run
    optimizer = torch.optim.Adam([{"params": body, "lr": config.lr * config.body_lr_scale}, {"params": head}],
                                 lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))
    base_lrs = [config.lr * config.body_lr_scale, config.lr]  # scaled every step by the schedule (train/lr_schedule.py)
    loss_fn: torch.nn.Module = SegmentationLoss(config.loss, config.ss_variant)
    if config.target == "distance":
        loss_fn = DistanceTargetLoss(loss_fn, DISTANCE_LEVELS)
    model_json = segmentation_model_json(model, config.names, config.patch_px, config.model_mpp,
                                         INPUT_RANGES[config.input_range], stain_record,
                                         {"finetune": config.to_dict(), "pretrained": provenance,
                                          "target": config.target_record}, data_mpp=config.mpp)
    logger.info("fine-tuning on %d images (%d validation, %d test held out), %s", len(train), len(val),
                len(splits["test"]), f"from {provenance['pretrained']}" if pretrained else "from scratch")
    total = config.epochs * len(loader)
    log_cpu_training_time(model, config.batch_size, config.patch_px, total, device)  # before a silent hour
    step, best, first_epoch = 0, -math.inf, 0
    if resume_from is not None:
        state = ckpt.load_train_state(resume_from)
        model.load_state_dict(ckpt.load_weights(resume_from, ema=False))
        optimizer.load_state_dict(state["optimizer"])
        step, first_epoch, best = int(state["step"]), int(state["epoch"]), float(state["best_val_dice"])
        truncate_metrics(run_dir / "metrics.jsonl", step)
        logger.info("resumed from %s at epoch %d of %d (step %d)", resume_from, first_epoch, config.epochs, step)
    progress = progress_factory() if progress_factory else None
    if progress:
        progress.start(total, step)
    for epoch in range(first_epoch, config.epochs):
        _seed_epoch(config, epoch, dataset)
        for parameter in body:  # a frozen warm-up trains the new head alone
            parameter.requires_grad_(epoch >= config.freeze_body_epochs)
        model.train()
        started, losses = time.perf_counter(), []
        for x, y in loader:
            factor = lr_factor(step, total, config.lr_schedule, config.warmup_steps)
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * factor
            t = torch.zeros(x.shape[0], dtype=torch.long, device=device)
            loss = loss_fn(model(x.to(device, memory_format=torch.channels_last), t), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if progress:
                progress.update(step, float(np.mean(losses)), len(losses) * config.batch_size / (time.perf_counter() - started))
        row: dict[str, Any] = {"step": step, "epoch": epoch + 1, "loss": float(np.mean(losses)),
                               "lr": optimizer.param_groups[-1]["lr"],
                               "img_per_s": round(len(losses) * config.batch_size / (time.perf_counter() - started), 3)}
        last_epoch = epoch + 1 == config.epochs
        if val and ((epoch + 1) % config.val_every == 0 or last_epoch):
            row["val_dice"] = validation_dice(model, val, config, device)
        with (run_dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        # The best validation Dice is kept; without validation images (or before any Dice is
        # finite) the latest epoch is, so RUN/model always exists after the first epoch.
        score = row.get("val_dice", math.nan) if val else math.inf
        if not (run_dir / "model").exists() or score >= best or (math.isnan(best) and not math.isnan(score)):
            best = score
            ckpt.save_checkpoint(run_dir / "model", model.state_dict(), None,
                                 model_json | {"epoch": epoch + 1, "step": step, "val_dice": row.get("val_dice")}, None)
        # after RUN/model: a checkpoint never claims a best that is not on disk
        ckpt.save_checkpoint(run_dir / CHECKPOINT, model.state_dict(), None, model_json | {"epoch": epoch + 1, "step": step},
                             {"epoch": epoch + 1, "step": step, "best_val_dice": float(best),
                              "optimizer": optimizer.state_dict()})
    ckpt.save_checkpoint(run_dir / "last", model.state_dict(), None, model_json | {"epoch": config.epochs, "step": step}, None)
    if val:  # post-processing tuned on the kept (best) model
        model.load_state_dict(ckpt.load_weights(run_dir / "model", ema=False))
    tuning = tuning_examples(splits["val"], config, normaliser)  # areas: normalised already
    tuned = tuned_postprocess(model, tuning, config, device)
    if tuned is not None:
        postprocess, scores = tuned
        ckpt.write_json(run_dir / "model" / ckpt.MODEL_JSON, ckpt.load_model_json(run_dir / "model")
                        | {"postprocess": postprocess, "val_instance_images": len(tuning),
                           **{f"val_{k}": None if math.isnan(v) else v for k, v in scores.items()}})
    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", "gsd-wsi finetune",
                [("loss", f"{config.loss} loss", True), ("val_dice", "validation Dice (foreground)", False)])
    if progress:
        progress.finish()
    return run_dir / "model"
