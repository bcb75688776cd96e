"""Convert a torchvision Mask R-CNN (v1) ``.pth`` into a maskrcnn checkpoint.

    python tools/convert_torchvision.py maskrcnn_resnet50_fpn_coco.pth output/torchvision_coco.pth
    python tools/convert_torchvision.py my_tv_model.pth output/converted.pth --class-names names.txt

The ResNet depth and the class count are read from the state dict. ``--class-names`` is a text file
with one name per line, for labels 1..K in order; without it a 90-class model gets torchvision's COCO
names and any other model ``class_1 .. class_K``.
"""

import argparse
from pathlib import Path

from maskrcnn.cli import run
from maskrcnn.convert import convert_torchvision_checkpoint
from maskrcnn.fileio import read_class_names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="torchvision state dict (.pth), or a dict holding it under 'model'")
    parser.add_argument("dst", type=Path, help="maskrcnn checkpoint to write")
    parser.add_argument("--class-names", type=Path, help="text file, one class name per line for labels 1..K")
    args = parser.parse_args(argv)

    class_names = read_class_names(args.class_names) if args.class_names else None
    cfg = convert_torchvision_checkpoint(args.src, args.dst, class_names=class_names)
    print(f"ResNet-{cfg.model.backbone.depth}, {cfg.model.roi_heads.num_classes} classes; written to {args.dst}")


if __name__ == "__main__":
    run(main)
