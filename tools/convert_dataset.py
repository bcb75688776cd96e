"""Convert labelme, CVAT (for images 1.1 XML) or YOLO segmentation annotations to a COCO instances json.

    python tools/convert_dataset.py --from labelme my_labelme_folder --out data/mine/instances.json
    python tools/convert_dataset.py --from cvat annotations.xml --out instances.json --images images/
    python tools/convert_dataset.py --from yolo my_yolo_dataset --out instances.json
    python tools/convert_dataset.py --from label-studio export.json --out instances.json --images images/

Images are referenced, not copied: ``file_name`` entries are relative to --images (default: the labelme
folder; ``images/`` beside the CVAT file; the YOLO dataset root, or its ``images/`` folder when data.yaml
names no subsets). A source that splits its images (a CVAT project's subsets, YOLO's train / val) gives
one ``<out>_<subset>.json`` per subset; otherwise --val-fraction splits the images at random (--seed) into
``<out>_train.json`` and ``<out>_val.json``. Shapes without area are skipped with one line per kind
(--strict: an error). See docs/annotation-tools.md.
"""

import argparse

from maskrcnn.cli import run
from maskrcnn.data.formats import READERS, write_conversion
from maskrcnn.fileio import read_class_names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="format", required=True, choices=sorted(READERS), help="source format")
    parser.add_argument("src", help="labelme folder, CVAT XML file, or YOLO dataset folder or data.yaml")
    parser.add_argument("--out", required=True, help="COCO json to write")
    parser.add_argument("--images", help="image folder the COCO file names are relative to")
    parser.add_argument("--classes", help="text file, one class name per line (default: from the source)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="fraction of images for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--strict", action="store_true", help="shapes without area are errors, not skipped")
    args = parser.parse_args(argv)
    class_names = read_class_names(args.classes) if args.classes else None
    conversion = READERS[args.format](args.src, image_dir=args.images, class_names=class_names, strict=args.strict)
    files = write_conversion(args.out, conversion, val_fraction=args.val_fraction, seed=args.seed)
    for line in conversion.skipped.lines():
        print(line)
    names = conversion.class_names
    instances = sum(not i.ignore for r in conversion.records for i in r.instances)
    ignored = sum(i.ignore for r in conversion.records for i in r.instances)
    embedded = sum(r.embedded is not None for r in conversion.records)
    if embedded:
        print(f"{embedded} images written beside their labelme files from the imageData they embed")
    print(f"{len(conversion.records)} images, {instances} instances, {ignored} ignore regions, {len(names)} classes "
          f"({', '.join(names)})")
    for split, path in files.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    run(main)
