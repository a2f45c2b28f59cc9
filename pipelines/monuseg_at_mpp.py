"""MoNuSeg-style images (name.tif beside name.xml) brought to another resolution, XML included.

    python pipelines/monuseg_at_mpp.py ../shared/data/monuseg-train -o monuseg-20x --mpp 0.5054 \
        --split-file pipelines/monuseg_split.json --subset test

How a 40x model is checked on 20x slides without 20x labels: every image is area-averaged to
``--mpp`` (gsd_wsi.imageops.resize_rgb, as `segment` reads a finer level), every nucleus
polygon's vertices are scaled by the same factor, and the XML's ``MicronsPerPixel`` says the
new resolution, so that `gsd-wsi evaluate OUT --model nuclei` picks the model for it and
scores at it. Images without XML are skipped (their instances are not known).
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile

from gsd_wsi.datasets import discover, read_split_file
from gsd_wsi.datasets.monuseg_xml import read_aperio_mpp
from gsd_wsi.imageops import resize_rgb, size_at_mpp
from gsd_wsi.slide.image_backend import read_plain_image


def scaled_xml(xml_path: Path, factor: float, mpp: float) -> bytes:
    """The Aperio XML with every vertex multiplied by ``factor`` and ``MicronsPerPixel`` = ``mpp``."""
    tree = ET.parse(xml_path)
    root = tree.getroot()
    root.set("MicronsPerPixel", f"{mpp:.6f}")
    for vertex in root.iter("Vertex"):
        for axis in ("X", "Y"):
            vertex.set(axis, f"{float(vertex.get(axis, '0')) * factor:.3f}")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="MoNuSeg folder (images/ + annotations/, or name.tif + name.xml).")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--mpp", type=float, required=True, help="Target resolution, um/px (coarser than the images').")
    p.add_argument("--split-file", type=Path, default=None)
    p.add_argument("--subset", default="test", help="With --split-file: which list to write.")
    p.add_argument("--images-mpp", type=float, default=0.2527,
                   help="Resolution of images whose XML records none (MoNuSeg's stated 40x).")
    args = p.parse_args()
    items, _ = discover(args.data)
    if args.split_file is not None:
        wanted = set(read_split_file(args.split_file, [i.name for i in items])[args.subset])
        items = [item for item in items if item.name in wanted]
    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    for item in items:
        if item.xml_path is None:
            continue
        mpp = read_aperio_mpp(item.xml_path) or args.images_mpp
        if args.mpp < mpp:
            sys.exit(f"--mpp {args.mpp} is finer than {item.name}'s {mpp}: this only brings images down")
        image, _ = read_plain_image(item.image_path)
        size = size_at_mpp(image.shape, mpp, args.mpp)
        small = resize_rgb(image, size)
        factor = small.shape[1] / image.shape[1]
        tifffile.imwrite(args.out / f"{item.name}.tif", np.ascontiguousarray(small))
        (args.out / f"{item.name}.xml").write_bytes(scaled_xml(item.xml_path, factor, mpp / factor))
        written += 1
    print(f"wrote {written} image(s) at {args.mpp} um/px to {args.out}")


if __name__ == "__main__":
    main()
