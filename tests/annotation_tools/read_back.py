"""Read pre-annotations back with the annotation tools' own code; run by .venv/annotation-tools/bin/python.

    read_back.py labelme FOLDER      every *.json of FOLDER through labelme's LabelFile
    read_back.py cvat FOLDER         the CVAT for images 1.1 XML in FOLDER (images in FOLDER/images) through datumaro
    read_back.py brush TASKS_JSON    the brush regions of every prediction through label-studio-sdk's decoder

Prints JSON: what each tool read, each shape's pixels as the tool rasterises or decodes them (COCO RLE with
string counts), so that the tests compare them with the detections in the project's own environment.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils


def rle(mask) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def read_labelme(folder: Path) -> dict:
    from labelme._label_file import LabelFile
    from labelme.utils import img_data_to_pil, shapes_to_label

    files = {}
    for path in sorted(folder.glob("*.json")):
        label_file = LabelFile(str(path))  # reads the image imagePath names and checks its size
        width, height = img_data_to_pil(label_file.image_data).size
        shapes = []
        for shape in label_file.shapes:
            drawn = shapes_to_label((height, width), [shape], {shape["label"]: 1})[0] > 0
            shapes.append({key: shape[key] for key in ("label", "shape_type", "group_id", "description", "points")}
                          | {"rle": rle(drawn)})
        files[path.name] = {"image_path": label_file.image_path, "height": height, "width": width, "shapes": shapes}
    return files


def read_cvat(folder: Path) -> dict:
    from datumaro.components.annotation import AnnotationType, Mask, Polygon
    from datumaro.components.dataset import Dataset
    from datumaro.util.mask_tools import rles_to_mask

    dataset = Dataset.import_from(str(folder), "cvat")
    names = dataset.categories()[AnnotationType.label]
    items = {}
    for item in dataset:
        height, width = item.media.size
        annotations = []
        for annotation in item.annotations:
            if isinstance(annotation, Polygon):
                drawn = rles_to_mask([annotation.points], width, height)
            elif isinstance(annotation, Mask):
                drawn = annotation.image
            else:
                raise SystemExit(f"{item.id}: unexpected {type(annotation).__name__}")
            annotations.append({"type": type(annotation).__name__, "label": names[annotation.label].name,
                                "group": annotation.group, "rle": rle(drawn)})
        items[item.id] = {"height": height, "width": width, "annotations": annotations}
    return {"labels": [label.name for label in names], "items": items}


def read_brush(tasks_json: Path) -> list:
    from label_studio_sdk.converter.brush import decode_rle

    tasks = []
    for task in json.loads(tasks_json.read_text()):
        regions = []
        for prediction in task["predictions"]:
            for region in prediction["result"]:
                if region["type"] == "brushlabels":
                    pixels = decode_rle(region["value"]["rle"])
                    alpha = pixels.reshape(region["original_height"], region["original_width"], 4)[:, :, 3]
                    regions.append({"id": region["id"], "label": region["value"]["brushlabels"][0],
                                    "rle": rle(alpha > 0)})
        tasks.append(regions)
    return tasks


if __name__ == "__main__":
    command, path = sys.argv[1], Path(sys.argv[2])
    reader = {"labelme": read_labelme, "cvat": read_cvat, "brush": read_brush}[command]
    json.dump(reader(path), sys.stdout)
