"""Convert labelme, CVAT (for images 1.1 XML) or YOLO segmentation annotations to a COCO instances json.

    python tools/convert_dataset.py --from labelme my_labelme_folder --out data/mine/instances.json
    python tools/convert_dataset.py --from cvat annotations.xml --out instances.json --images images/
    python tools/convert_dataset.py --from yolo my_yolo_dataset --out instances.json --val-fraction 0.2

Images are referenced, not copied: ``file_name`` entries are relative to --images (default: the labelme
folder; ``images/`` beside the CVAT file; the YOLO ``images/`` folder). With --val-fraction the images
are split at random (--seed) into ``<out>_train.json`` and ``<out>_val.json``.
"""

import argparse

from maskrcnn.cli import run
from maskrcnn.data.formats import READERS, to_coco, write_coco
from maskrcnn.fileio import read_class_names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="format", required=True, choices=sorted(READERS), help="source format")
    parser.add_argument("src", help="labelme folder, CVAT XML file or YOLO dataset folder")
    parser.add_argument("--out", required=True, help="COCO json to write")
    parser.add_argument("--images", help="image folder the COCO file names are relative to")
    parser.add_argument("--classes", help="text file, one class name per line (default: from the source)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="fraction of images for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    args = parser.parse_args(argv)
    class_names = read_class_names(args.classes) if args.classes else None
    records, names = READERS[args.format](args.src, image_dir=args.images, class_names=class_names)
    dataset = to_coco(records, names)
    files = write_coco(args.out, dataset, val_fraction=args.val_fraction, seed=args.seed)
    print(f"{len(dataset['images'])} images, {len(dataset['annotations'])} instances, {len(names)} classes "
          f"({', '.join(names)})")
    for split, path in files.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    run(main)
