"""`gsd-wsi evaluate`: score a fine-tuned segmentation model on labelled images (docs/method.md section 4).

Standard protocol: every whole image is predicted by sliding window with Gaussian blending
(:func:`gsd_wsi.nn.inference.predict_probabilities`), after the stain normalisation the
model was trained with (target recorded in the model, source fitted on the image itself).
Per image: semantic scores per class and their foreground mean (Dice, IoU, precision,
recall, HD95 in px and um); with instance labels (MoNuSeg XML, GlaS ``_anno``) AJI, PQ and
object F1 on predicted instances; for GlaS items also the challenge's object F1, object Dice
and object Hausdorff.

The target the model learnt (model.json ``"target"``, absent = semantic) decides the instances.
A semantic model's are the connected components of ``pred == 1`` for two-class models and of
``pred != 0`` (all foreground) otherwise. A ``contour`` (background, interior, boundary) or
``distance`` model's come from :func:`gsd_wsi.instances.instances_from_probabilities` with
the post-processing model.json records (``"postprocess"``, tuned on the validation images by
`finetune`; absent = the defaults of :class:`gsd_wsi.instances.PostprocessConfig`), and its
pixel scores are those of the object (interior + boundary) against the object's truth, on the
classes ``[background, <object>]``. Every instance metric is also reported on the connected
components of the predicted object, suffixed ``_cc`` (``aji_cc``, ``pq_cc``, ...), for
comparison; for a semantic model both are the same.

Resolution: the images are at ``--mpp``, else at the resolution their Aperio XML records
(``MicronsPerPixel``), else at the model's ``data_mpp`` (the resolution
of the images it was fine-tuned from), else at the model's ``mpp``. When that differs from the
model's ``mpp`` by more than 2 % (a `finetune --train-mpp` model), each image is normalised at
its own resolution, resized (area averaging) to the model's mpp and predicted, and the
probabilities are resized back (bilinear) before the argmax, so every score, HD95 in um and
overlay is at the image's own resolution against its original labels. The reference protocol
instead resamples image and mask to the model's mpp and cuts its patches there, as the
reference script would on images at that resolution.

Reference protocol: what the reference code's MoNuSeg test script does, for comparison with
published numbers only. Each image is cut into overlapping patches of the model's size at a
quarter-patch stride (256 px at stride 64 there; the remainder at the right and bottom is
dropped), each patch is predicted alone, and per patch and class Dice (F1), IoU, precision
and recall are computed with a class absent from truth and prediction scoring 1 (sklearn's
``zero_division=1``); they are averaged over all patches, and ``dice`` is the mean over
classes *including background*, the number the reference prints. ``dice_foreground`` leaves
background out.

Outputs in ``out_dir``: ``metrics.json`` (its settings record the images' mpp ``mpp_used``, its
source, the model's mpp and whether the images were ``resampled``), ``per_image.csv``,
``overlays/<name>.png``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from gsd_wsi import __version__
from gsd_wsi.atomic import atomic_write_csv, atomic_write_text
from gsd_wsi.datasets import (
    DatasetError,
    LabelledImage,
    discover,
    load_example,
    load_instance_example,
    read_split_file,
    recorded_mpp,
    resample_example,
)
from gsd_wsi.errors import ConfigError, GsdWsiError
from gsd_wsi.imageops import predict_at_mpp, same_mpp
from gsd_wsi.instances import instances_from_probabilities, recorded_postprocess
from gsd_wsi.metrics import (
    aji,
    confusion,
    glas_object_dice,
    glas_object_f1,
    glas_object_hausdorff,
    label_instances,
    object_f1,
    panoptic_quality,
    semantic_scores,
)
from gsd_wsi.nn.inference import predict_probabilities
from gsd_wsi.qc import save_png
from gsd_wsi.stain import normalise_image, recorded_normaliser
from gsd_wsi.datasets.slide_labels import IGNORE_CLASS, ROI_CLASS
from gsd_wsi.stages.slide_items import AreaItem, is_slide_input, load_slide_data, slides_mpp
from gsd_wsi.stages.labelled_slides import normalise_areas
from gsd_wsi.targets import background_where, pixel_probabilities
from gsd_wsi.zoo import builtin_or_path
from gsd_wsi.train.finetune_config import DATA_MPP_SPREAD
from gsd_wsi.train.transfer import load_segmentation_network

log = logging.getLogger(__name__)

PROTOCOL_LABELS = {
    "standard": "standard (whole images, sliding window with Gaussian blending)",
    "reference": "reference (per-patch averaging, for comparison with published numbers only)",
}
SEMANTIC_KEYS = ("dice", "iou", "precision", "recall", "hd95_px", "hd95_um")
OVERLAY_MAX_PX = 2048
REFERENCE_STRIDE_DIVISOR = 4  # the reference cuts its MoNuSeg test images into 256-px patches at stride 64
PRED_RGB, TRUE_RGB = (255, 0, 255), (0, 255, 255)  # predicted outline magenta, true outline cyan
ROI_RGB = (255, 220, 0)  # an annotated area's edge, yellow
OVERLAY_LEGEND = "magenta: predicted, cyan: true, yellow: the labelled area's edge (annotated slides)"
CC_KEYS = ("aji", "pq", "dq", "sq", "object_precision", "object_recall", "object_f1", "n_pred")


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of `gsd-wsi evaluate`; written into metrics.json."""

    protocol: Literal["standard", "reference"] = "standard"
    overlap: float = 0.5
    mpp: float | None = None  # of the images; None: the model's data_mpp, else its mpp; none known -> hd95_um None
    split_file: Path | None = None
    subset: Literal["all", "train", "val", "test"] = "all"  # with split_file: which images to score
    batch_size: int = 4
    tta: bool | None = None  # mean over the 8 flips and rotations; None: the model's default (model.json "tta")
    roi_class: str = ROI_CLASS        # annotated slides: the class of exhaustively labelled areas
    ignore_class: str = IGNORE_CLASS  # annotated slides: the class of areas left out

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOL_LABELS:
            raise ConfigError(f"protocol={self.protocol!r}; expected one of {sorted(PROTOCOL_LABELS)}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap={self.overlap!r}; expected a fraction in [0, 1)")
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ConfigError(f"mpp={self.mpp!r}; expected a positive resolution in um/px")
        if self.subset not in ("all", "train", "val", "test"):
            raise ConfigError(f"subset={self.subset!r}; expected all, train, val or test")
        if self.subset != "all" and self.split_file is None:
            raise ConfigError(f"subset={self.subset!r} needs a split file (--split-file)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r}; expected >= 1")


def _select(items: list[Any], config: EvaluateConfig) -> list[Any]:
    """The items of the split file's ``subset`` (all listed ones for ``all``); an annotated slide's
    areas are listed by their names or, all together, by the slide's id."""
    if config.split_file is None:
        return items
    slide_ids = sorted({item.slide_id for item in items if isinstance(item, AreaItem)})
    splits = read_split_file(config.split_file, [item.name for item in items] + slide_ids)
    if config.subset == "all":
        wanted = {n for names in splits.values() for n in names}
    else:
        wanted = set(splits[config.subset])
    chosen = [item for item in items if item.name in wanted or getattr(item, "slide_id", None) in wanted]
    if not chosen:
        raise ConfigError(f"{config.split_file}: no image in subset {config.subset!r}")
    return chosen


def recorded_resolution(items: list[LabelledImage]) -> float | None:
    """The resolution the images record themselves (Aperio XML ``MicronsPerPixel``): their median
    when every image that records one is within 5 % of it (MoNuSeg's XML say 0.2456 to 0.2527
    for one "40x"), else None (logged)."""
    values = [mpp for mpp in (recorded_mpp(item) for item in items) if mpp is not None]
    if not values:
        return None
    median = float(np.median(values))
    if not all(abs(value - median) <= DATA_MPP_SPREAD * median for value in values):
        log.warning("the images record different resolutions (%.4g to %.4g um/px); give --mpp", min(values), max(values))
        return None
    return median


def image_resolution(config: EvaluateConfig, info: dict[str, Any],
                     recorded: float | None = None) -> tuple[float | None, str | None]:
    """The images' mpp and where it came from: --mpp, else what the images record (their XML),
    else the model's data_mpp, else the model's mpp."""
    for value, source in ((config.mpp, "--mpp"), (recorded, "the images' XML"), (info.get("data_mpp"), "model data_mpp"),
                          (info.get("mpp"), "model mpp")):
        if value is not None:
            return float(value), source
    return None, None


def _instance_scores(pred_inst: np.ndarray, true_inst: np.ndarray, glas: bool) -> dict[str, float]:
    pq = panoptic_quality(pred_inst, true_inst)
    f1 = object_f1(pred_inst, true_inst)
    row = {"aji": aji(pred_inst, true_inst), "pq": pq["pq"], "dq": pq["dq"], "sq": pq["sq"],
           "object_precision": f1["precision"], "object_recall": f1["recall"], "object_f1": f1["f1"],
           "n_true": int(true_inst.max()), "n_pred": int(pred_inst.max())}
    if glas:
        g = glas_object_f1(pred_inst, true_inst)
        row |= {"glas_f1": g["f1"], "glas_object_dice": glas_object_dice(pred_inst, true_inst),
                "glas_object_hausdorff": glas_object_hausdorff(pred_inst, true_inst)}
    return row


def score_image(pred: np.ndarray, truth: np.ndarray, true_inst: np.ndarray | None, classes: list[str],
                mpp: float | None, glas: bool = False,
                pred_inst: np.ndarray | None = None) -> tuple[dict, np.ndarray | None]:
    """One image's scalar metrics (flat dict) and its predicted instances (None without true ones).

    ``pred_inst``: the instances of the model's post-processing; None (a semantic model) scores
    the connected components of the predicted foreground. The ``_cc`` keys always hold the
    scores of those connected components.
    """
    scores = semantic_scores(pred, truth, len(classes), mpp)
    row: dict[str, Any] = {key: scores["foreground_mean"][key] for key in SEMANTIC_KEYS}
    for name, per_class in zip(classes, scores["per_class"]):
        row |= {f"{key}_{name}": per_class[key] for key in SEMANTIC_KEYS}
    if true_inst is None:
        return row, None
    foreground = pred == 1 if len(classes) == 2 else pred != 0
    cc_inst = label_instances(foreground)
    cc_row = _instance_scores(cc_inst, true_inst, glas and pred_inst is None)
    if pred_inst is None:
        pred_inst, primary = cc_inst, cc_row
    else:
        primary = _instance_scores(pred_inst, true_inst, glas)
    return row | primary | {f"{key}_cc": cc_row[key] for key in CC_KEYS}, pred_inst


def overlay(image: np.ndarray, pred_labels: np.ndarray, true_labels: np.ndarray,
            labelled: np.ndarray | None = None) -> np.ndarray:
    """The image with predicted outlines in magenta and true ones in cyan, legend top left; with
    ``labelled`` (an annotated area), what lies outside it is dimmed and its edge drawn in yellow."""
    step = max(1, math.ceil(max(image.shape[:2]) / OVERLAY_MAX_PX))
    out = np.array(image[::step, ::step], dtype=np.uint8)
    if labelled is not None:
        inside = labelled[::step, ::step]
        out[~inside] = out[~inside] // 3 + 100
        out[find_boundaries(inside, mode="inner")] = ROI_RGB
    out[find_boundaries(true_labels[::step, ::step], mode="inner")] = TRUE_RGB
    out[find_boundaries(pred_labels[::step, ::step], mode="inner")] = PRED_RGB
    if min(out.shape[:2]) >= 32:
        picture = Image.fromarray(out)
        draw = ImageDraw.Draw(picture)
        font = ImageFont.load_default(size=max(10, out.shape[1] // 80))
        x = 4
        for text, colour in (("predicted", PRED_RGB), ("true", TRUE_RGB)):
            _, _, right, bottom = draw.textbbox((x, 3), text, font=font)
            if right + 4 > out.shape[1]:
                break
            draw.rectangle((x - 4, 0, right + 4, bottom + 3), fill=(0, 0, 0))
            draw.text((x, 3), text, fill=colour, font=font)
            x = right + 12
        out = np.asarray(picture).copy()
    return out


def _load(item: LabelledImage | AreaItem, n_classes: int, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(image, semantic, instances or None)``. For an instance target (one object class) a mask
    holding several ids is read as instances, as `finetune` reads it; a binary mask's connected
    components are not taken as true instances (touching nuclei would merge in the truth too).
    An annotated area's truth is background wherever it carries no label (see :func:`run_evaluate`)."""
    if isinstance(item, AreaItem):
        labelled = item.area.labelled
        instances = np.where(labelled, item.area.instances, 0)
        semantic = np.where(labelled, item.area.classes, 0).astype(np.int64)
        if kind == "semantic":
            return item.area.image, semantic, (instances if n_classes == 2 else None)
        return item.area.image, (instances > 0).astype(np.int64), instances
    if kind == "semantic":
        return load_example(item, n_classes)
    image, instances, source = load_instance_example(item)
    truth = (instances > 0).astype(np.int64)
    return image, truth, (None if source == "mask connected components" else instances)


def _file_name(name: str) -> str:
    """An item's name as a file name: an area's ``slide#k`` and any path separator made safe."""
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in name)


def _patch_scores(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[str, list[float]]:
    """Per class Dice, IoU, precision and recall of one patch; an undefined ratio (class absent
    from truth and prediction, or nothing predicted) scores 1, as sklearn's zero_division=1."""
    cm = confusion(pred, truth, n_classes).astype(np.float64)

    def ratio(num: float, den: float) -> float:
        return num / den if den else 1.0

    scores: dict[str, list[float]] = {"dice": [], "iou": [], "precision": [], "recall": []}
    for c in range(n_classes):
        tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c, :].sum() - cm[c, c]
        scores["dice"].append(ratio(2 * tp, 2 * tp + fp + fn))
        scores["iou"].append(ratio(tp, tp + fp + fn))
        scores["precision"].append(ratio(tp, tp + fp))
        scores["recall"].append(ratio(tp, tp + fn))
    return scores


def _stats(values: list[Any]) -> dict[str, float | int | None]:
    """NaN-aware mean and (population) std over images; None/NaN skipped, inf kept (mean inf)."""
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    used = arr[~np.isnan(arr)]
    if not used.size:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(used)), "std": float(np.std(used)), "n": int(used.size)}


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value



def run_evaluate(data_dir: Path | list[Path], model_dir: Path | str, out_dir: Path,
                 config: EvaluateConfig = EvaluateConfig(), progress: Callable[[int, int, str], None] | None = None,
                 annotations: Path | None = None) -> dict[str, Any]:
    """Score the model in ``model_dir`` on labelled images; returns metrics.json's content.

    ``data_dir``: a folder of labelled images, or slides (files, folders, CSV manifests) with QuPath
    annotations (``annotations``, a manifest column, or ``<slide>.geojson`` beside each slide).
    On slides each labelled area is one item, read at the model's resolution, and scored within
    its labels only: prediction and truth are background wherever the area carries no label
    (outside every ROI, and in ``Ignore*`` areas), so nothing there counts; metrics.json adds the
    summary per slide. ``progress(done, total, name)`` is called after each image when given.
    """
    sources = [Path(p) for p in data_dir] if isinstance(data_dir, (list, tuple)) else [Path(data_dir)]
    out_dir = Path(out_dir)
    slides = is_slide_input(sources, annotations)
    if slides and (config.protocol == "reference" or config.mpp is not None):
        raise ConfigError("on annotated slides, evaluate reads each area at the model's resolution with the "
                          "standard protocol: leave out --protocol reference and --mpp")
    items: list[Any]
    if slides:
        recorded = slides_mpp(sources)
    else:
        items, problems = discover(sources[0])
        items = _select(items, config)
        recorded = recorded_resolution(items)
    # a built-in family (``nuclei``) is the member for the images' resolution
    model_dir = builtin_or_path(model_dir, config.mpp if config.mpp is not None else recorded)
    model, info = load_segmentation_network(model_dir)
    kind, postprocess = recorded_postprocess(info)
    data_record: Any = str(sources[0])
    if slides:
        data = load_slide_data(sources, annotations, out_dir / "labelled", model_mpp=float(info["mpp"]),
                               class_names=[str(c) for c in info["classes"]][: 2 if kind != "semantic" else None],
                               model_classes=True, min_px=int(info["patch_px"]), roi_class=config.roi_class,
                               ignore_class=config.ignore_class)
        normalised = recorded_normaliser(info.get("stain"))
        by_slide: dict[str, list[AreaItem]] = {}
        for area_item in data.items:
            by_slide.setdefault(area_item.slide_id, []).append(area_item)
        items = _select([AreaItem(a.name, a.slide_id, a) for group in by_slide.values()
                         for a in normalise_areas([i.area for i in group], normalised)], config)
        problems, recorded, data_record = data.problems, data.model_mpp, data.record
    classes = [str(c) for c in info["classes"]]
    if kind != "semantic":  # scored as background / object; the object is interior + boundary (contour)
        classes = classes[:2]
    patch_px, input_range = int(info["patch_px"]), tuple(float(v) for v in info["input_range"])
    normaliser = recorded_normaliser(info.get("stain"))
    model_mpp = info.get("mpp")
    tta = bool(info.get("tta", False)) if config.tta is None else config.tta
    mpp, mpp_source = image_resolution(config, info, recorded)  # the images'
    if slides:
        mpp_source = "the slides, read at the model's resolution"
    resampled = mpp is not None and model_mpp is not None and not same_mpp(mpp, model_mpp)
    if kind != "semantic" and config.protocol == "standard" and mpp is None:
        raise ConfigError(f"the {kind} model's post-processing needs the images' resolution for its areas "
                          "in um^2; give --mpp")
    if resampled:
        log.info("images at %.4g um/px (%s) are predicted at the model's %.4g um/px", mpp, mpp_source, model_mpp)
        if mpp > model_mpp:
            log.warning("the images (%.4g um/px) are coarser than the model's %.4g um/px: they are upsampled, "
                        "which `segment` refuses", mpp, model_mpp)
    label = PROTOCOL_LABELS[config.protocol]
    log.info("evaluating %s on %d image(s) of %s, protocol %s", model_dir, len(items), data_record, label)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.protocol == "standard":
        (out_dir / "overlays").mkdir(exist_ok=True)

    def probabilities(image: np.ndarray, overlap: float, image_mpp: float | None) -> np.ndarray:
        """(C, H, W) probabilities at the image's size, predicted at the model's mpp."""
        return predict_at_mpp(lambda rgb: predict_probabilities(model, rgb, patch_px, overlap, input_range,
                                                                config.batch_size, target=kind, tta=tta),
                              image, image_mpp, model_mpp)

    def predict(image: np.ndarray, overlap: float, image_mpp: float | None) -> np.ndarray:
        """Class indices of ``classes`` at the image's size."""
        return np.argmax(pixel_probabilities(probabilities(image, overlap, image_mpp), kind), axis=0)

    rows: list[dict[str, Any]] = []
    patch_scores: list[dict[str, list[float]]] = []
    for index, item in enumerate(items):
        ignored = None if not isinstance(item, AreaItem) or item.area.labelled.all() else ~item.area.labelled
        try:
            image, truth, true_inst = _load(item, len(classes), kind)
            if normaliser is not None and not isinstance(item, AreaItem):  # areas: normalised per slide
                image = normalise_image(normaliser, image)
        except GsdWsiError as exc:
            problems.append(f"{item.name}: {exc}")
            log.warning("skipped %s: %s", item.name, exc)
            continue
        if config.protocol == "reference":
            if resampled:  # patches are cut at the model's resolution
                image, truth, _ = resample_example((image, truth, None), mpp, model_mpp)
            stride = max(1, patch_px // REFERENCE_STRIDE_DIVISOR)
            corners = [(y, x) for y in range(0, image.shape[0] - patch_px + 1, stride)
                       for x in range(0, image.shape[1] - patch_px + 1, stride)]
            for y, x in corners:
                window = np.s_[y:y + patch_px, x:x + patch_px]
                patch_scores.append(_patch_scores(predict(image[window], 0.0, None), truth[window], len(classes)))
            rows.append({"name": item.name, "n_patches": len(corners)})
            log.info("%s: %d patch(es) of %d px at stride %d", item.name, len(corners), patch_px, stride)
        else:
            probs = background_where(probabilities(image, config.overlap, mpp), ignored)
            pred = np.argmax(pixel_probabilities(probs, kind), axis=0)
            post_inst = None
            if postprocess is not None and true_inst is not None and mpp is not None:
                post_inst = instances_from_probabilities(probs, postprocess, mpp)
            row, pred_inst = score_image(pred, truth, true_inst, classes, mpp,
                                         glas=getattr(item, "instance_path", None) is not None, pred_inst=post_inst)
            rows.append({"name": item.name} | ({"slide_id": item.slide_id} if slides else {}) | row)
            shown_true = true_inst if true_inst is not None else truth
            shown_pred = pred_inst if pred_inst is not None else pred
            save_png(out_dir / "overlays" / f"{_file_name(item.name)}.png",
                     overlay(image, shown_pred, shown_true, None if ignored is None else ~ignored),
                     {"Software": f"gsd-wsi {__version__}", "Legend": OVERLAY_LEGEND})
            extra = f", AJI {row['aji']:.3f}, PQ {row['pq']:.3f}" if "aji" in row else ""
            log.info("%s: Dice %.3f, IoU %.3f%s", item.name, row["dice"], row["iou"], extra)
        if progress is not None:
            progress(index + 1, len(items), item.name)

    if config.protocol == "reference":
        keys = ("dice", "iou", "precision", "recall")
        summary = {}
        for key in keys:
            summary[key] = _stats([float(np.mean(p[key])) for p in patch_scores])
            summary[f"{key}_foreground"] = _stats([float(np.mean(p[key][1:])) for p in patch_scores])
        per_class: dict[str, Any] = {name: {key: _stats([p[key][c] for p in patch_scores]) for key in keys}
                                     for c, name in enumerate(classes)}
    else:
        scalar = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("name", "slide_id")]
        per_keys = {f"{key}_{name}" for key in SEMANTIC_KEYS for name in classes}
        summary = {k: _stats([r.get(k) for r in rows]) for k in scalar if k not in per_keys}
        per_class = {name: {key: _stats([r.get(f"{key}_{name}") for r in rows]) for key in SEMANTIC_KEYS}
                     for name in classes}
    by_slide_summary = None
    if slides and config.protocol == "standard":
        by_slide_summary = {slide_id: {k: _stats([r.get(k) for r in rows if r["slide_id"] == slide_id])
                                       for k in scalar if k not in per_keys}
                            for slide_id in dict.fromkeys(r["slide_id"] for r in rows)}
    result = {
        "protocol": label, "model": str(model_dir), "data": data_record, "n_images": len(rows),
        **({"per_slide": by_slide_summary} if by_slide_summary is not None else {}),
        "classes": classes, "summary": summary, "per_class": per_class, "problems": problems,
        "gsd_wsi_version": __version__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
        | {"mpp_used": mpp, "mpp_source": mpp_source, "model_mpp": model_mpp, "resampled": resampled, "tta_used": tta,
           "patch_px": patch_px, "stain": (info.get("stain") or {}).get("method", "none"),
           "target": kind, "postprocess": postprocess.to_dict() if postprocess is not None else None},
    }
    result = _json_safe(result)
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    atomic_write_csv(out_dir / "per_image.csv", rows)
    if not rows:
        raise DatasetError(f"{data_record}: no image could be scored; problems (also in {out_dir / 'metrics.json'}): "
                           + "; ".join(problems[:3]))
    log.info("%s: %d image(s) scored, %d problem(s); wrote %s", label, len(rows), len(problems), out_dir)
    return result
