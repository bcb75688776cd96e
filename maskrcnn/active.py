"""Which unlabelled images to label next: the ones whose labels would teach the model most.

    pool = score_pool(predictor, paths)                       # one model pass per image
    chosen = select_images(informativeness(pool), embeddings(pool), budget=100)
    write_selection(output, pool, chosen, settings={...})     # selected.txt, selection.json

Shorthand: P pool images, D detections of one image, S the side of the mask head's output (28), C the channels
of the image embedding (the FPN's). Uncertainties are binary entropies in bits, each in 0-1.

Per detection the model gives a score p and S x S mask probabilities m. Its *score uncertainty* is H(p), how
much in doubt it is that the object is there (and of that class); its *mask uncertainty* is the mean of H(m)
over the S x S cells, how much in doubt its outline is. An image sums them over its detections:

- score uncertainty: the sum of H(p). Every detection in doubt is one decision a labeller settles, so an image
  with several such objects teaches more than one with a single one; a confident detection (p near 1) and a
  clear background proposal (p near the low score threshold the pool is run at, H(0.05) = 0.29) add little.
- mask uncertainty: the sum of p * mean H(m). An outline matters as much as the object is likely to be real:
  the masks of the many low-score proposals would otherwise outweigh the few objects present.

*Informativeness* is their sum. An image with no detection at all (above the low threshold) is either empty
or one on which the model misses everything, and the model cannot say which: it gets the pool's median
informativeness (of the images with detections), neither favoured nor left out, and diversity decides.

*Diversity*: each image is embedded as its P5 feature map averaged over the pixels, L2-normalised (C,). The
selection is greedy (k-centre style): each step picks the image with the largest informativeness x distance
to the nearest image already chosen (Euclidean, 0-2; before the first pick every distance counts as 1), so a
near-duplicate of a chosen image scores near 0 and waits until every distinct image has gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from maskrcnn.errors import InputError
from maskrcnn.fileio import atomic_write, save_json
from maskrcnn.inference import to_image_tensor
from maskrcnn.precision import autocast
from maskrcnn.predictor import Predictor

LIST_FILE, SCORES_FILE = "selected.txt", "selection.json"


def binary_entropy(p: Tensor) -> Tensor:
    """Elementwise binary entropy in bits (0 at p = 0 or 1, 1 at p = 0.5) of probabilities ``p`` (any shape)."""
    p = p.float().clamp(1e-7, 1 - 1e-7)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


def image_uncertainty(scores: Tensor, mask_probs: Tensor) -> Tuple[float, float]:
    """One image's (mask uncertainty, score uncertainty), floats in bits, from its detections' ``scores``
    (D,) in 0-1 and ``mask_probs`` (D, S, S) in 0-1; see the module doc. (0.0, 0.0) when D = 0."""
    mask = (scores.float() * binary_entropy(mask_probs).flatten(1).mean(1)).sum()  # (D, S, S) -> (D,) -> ()
    return float(mask), float(binary_entropy(scores).sum())


@dataclass(frozen=True)
class PoolImage:
    """What the model says about one unlabelled image."""

    path: Path
    detections: int  # D, at the pool's score threshold
    mask_uncertainty: float  # bits, summed over detections (score-weighted)
    score_uncertainty: float  # bits, summed over detections
    embedding: np.ndarray  # (C,) float32, unit L2 norm


@torch.inference_mode()
def score_image(predictor: Predictor, path) -> PoolImage:
    """Run ``predictor``'s model on the image file ``path`` with the masks left unpasted (S x S probabilities)
    and read its P5 features on the way; the predictor's score threshold decides which detections count."""
    model = predictor.inference_model
    image = to_image_tensor(path).to(predictor.device)
    levels = []
    hook = model.fpn.register_forward_hook(lambda module, inputs, output: levels.append(output))
    try:
        with autocast(predictor.precision, predictor.device):
            output = model([image], mask_format="probs")[0]
    finally:
        hook.remove()
    p5 = levels[0][-2][0].float()  # [P2..P6] -> P5 of the one image, (C, H5, W5), padding included
    embedding = torch.nn.functional.normalize(p5.mean(dim=(1, 2)), dim=0)  # (C, H5, W5) -> (C,)
    mask, score = image_uncertainty(output["scores"].float().cpu(), output["mask_probs"].float().cpu())
    return PoolImage(Path(path), len(output["scores"]), mask, score, embedding.cpu().numpy())


def score_pool(predictor: Predictor, paths: Iterable) -> List[PoolImage]:
    """:func:`score_image` of every path, in order (``paths`` may be a progress bar over them)."""
    return [score_image(predictor, path) for path in paths]


def informativeness(pool: Sequence[PoolImage]) -> np.ndarray:
    """(P,) float64: each image's mask + score uncertainty in bits; the median of the images with detections
    for those without (0 when no image has any); see the module doc."""
    values = np.array([image.mask_uncertainty + image.score_uncertainty for image in pool], dtype=np.float64)
    detected = np.array([image.detections > 0 for image in pool], dtype=bool)
    values[~detected] = float(np.median(values[detected])) if detected.any() else 0.0
    return values


def embeddings(pool: Sequence[PoolImage]) -> np.ndarray:
    """(P, C) float32: the images' embeddings, stacked."""
    return np.stack([image.embedding for image in pool]).astype(np.float32)


class Selection(NamedTuple):
    """The chosen images, best first: their ``index`` (B,) int into the pool, the ``distance`` (B,) to the
    nearest image chosen before each (1 for the first, see the module doc) and its ``gain`` (B,),
    informativeness x distance, the value it was chosen for."""

    index: np.ndarray
    distance: np.ndarray
    gain: np.ndarray


def select_images(informativeness: np.ndarray, embeddings: np.ndarray, budget: int) -> Selection:
    """Greedy choice of ``budget`` images of a pool of P: each step the largest informativeness x distance
    to the nearest image chosen so far; ties go to the lower index (deterministic).

    informativeness: (P,) non-negative; embeddings: (P, C) float, unit L2 norm; budget: 1..P.
    """
    informativeness = np.asarray(informativeness, dtype=np.float64)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    count = len(informativeness)
    if embeddings.shape[0] != count:
        raise InputError(f"got {count} informativeness values and {embeddings.shape[0]} embeddings")
    if not 1 <= budget <= count:
        raise InputError(f"the budget must be between 1 and the pool's size, {count} images; got {budget}")
    if (informativeness < 0).any() or not np.isfinite(informativeness).all():
        raise InputError("informativeness must be finite and non-negative")
    nearest = np.full(count, np.inf)  # distance to the nearest image chosen so far
    available = np.ones(count, dtype=bool)
    index, distance, gain = [], [], []
    for step in range(budget):
        reach = nearest if step else np.ones(count)
        gains = np.where(available, informativeness * reach, -np.inf)
        best = int(np.argmax(gains))  # the first of equal maxima: the lower index
        index.append(best)
        distance.append(reach[best])
        gain.append(gains[best])
        available[best] = False
        nearest = np.minimum(nearest, np.linalg.norm(embeddings - embeddings[best], axis=1))  # (P, C) -> (P,)
    return Selection(np.array(index), np.array(distance), np.array(gain))


def read_exclude(path) -> set:
    """The file names listed in ``path`` (one path a line, blank lines ignored): the images to leave out of a
    pool, e.g. those labelled already or a previous run's ``selected.txt``. Matched by file name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exclude list not found: {path}")
    return {Path(line.strip()).name for line in path.read_text().splitlines() if line.strip()}


def write_selection(folder, pool: Sequence[PoolImage], selection: Selection, *, settings: dict,
                    values: Optional[np.ndarray] = None) -> List[Path]:
    """Write ``folder/selected.txt`` (the chosen images' paths, best first, one a line) and
    ``folder/selection.json`` (``settings``, the pool's size and per chosen image, best first: its path, rank,
    informativeness, mask and score uncertainty in bits, detections, distance and gain); returns both paths.
    values: (P,) the pool's informativeness as :func:`informativeness` gives it (computed when None)."""
    folder = Path(folder)
    values = informativeness(pool) if values is None else values
    chosen = [{"path": str(pool[i].path), "rank": rank, "informativeness": float(values[i]),
               "mask_uncertainty": pool[i].mask_uncertainty, "score_uncertainty": pool[i].score_uncertainty,
               "detections": pool[i].detections, "distance": float(distance), "gain": float(gain)}
              for rank, (i, distance, gain) in enumerate(zip(selection.index, selection.distance, selection.gain), 1)]
    listed = "".join(f"{entry['path']}\n" for entry in chosen).encode("utf-8")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / LIST_FILE, lambda f: f.write(listed))
    save_json(folder / SCORES_FILE, {"settings": settings, "pool": len(pool), "chosen": chosen})
    return [folder / LIST_FILE, folder / SCORES_FILE]
