"""Two gloo processes on the CPU train like one process with the same global batch.

Exact agreement needs losses that are means of per-image terms, so that the mean over ranks of the
per-rank gradients is the gradient of the whole batch: :class:`PerImageModel` (a small deterministic model
with the MaskRCNN training contract) gives that. Mask R-CNN's own losses are normalised by sampled counts
over the batch and sample anchors and RoIs at random, so for it the test checks what DDP guarantees: the
two processes, started from different initial weights, end with identical weights, and identical weight
averages (``solver.ema_decay``), which rank 0 saves as the checkpoint's ``model``.
"""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from maskrcnn.data.shapes import generate_shapes
from maskrcnn.engine import trainer as trainer_module
from maskrcnn.engine.trainer import train
from maskrcnn.modeling.maskrcnn import build_model
from maskrcnn.structures import BitMasks
from test_trainer import one_thread, read_jsonl, tiny_config  # noqa: F401 (one_thread: autouse fixture)

WORLD_SIZE = 2


class PerImageModel(nn.Module):
    """Losses that are means over images of per-image terms (classification of each instance from pooled
    features, box regression in 0-1 image coordinates, foreground mask of the whole image)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = nn.Linear(8, num_classes + 1)
        self.box = nn.Linear(8, 4)
        self.mask = nn.Conv2d(8, 1, 1)

    def forward(self, images, targets):
        terms = {"loss_classifier": [], "loss_box_reg": [], "loss_mask": []}
        for image, target in zip(images, targets):
            features = F.relu(self.conv(image[None]))  # (1, 8, H, W)
            pooled = features.mean((2, 3))  # (1, 8)
            labels = target["labels"]
            terms["loss_classifier"].append(F.cross_entropy(self.classifier(pooled).expand(len(labels), -1), labels))
            scale = torch.tensor([image.shape[2], image.shape[1]] * 2, dtype=torch.float32)
            terms["loss_box_reg"].append(F.smooth_l1_loss(self.box(pooled).expand(len(labels), -1),
                                                          target["boxes"] / scale))
            masks = target["masks"]
            bits = masks.tensor if isinstance(masks, BitMasks) else masks.to_bitmasks().tensor
            terms["loss_mask"].append(F.binary_cross_entropy_with_logits(self.mask(features)[0, 0],
                                                                         bits.any(0).float()))
        return {name: torch.stack(values).mean() for name, values in terms.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, data: str, out: str, ports) -> None:
    """One torchrun-like process: environment variables, then two training runs; saves this process's final
    Mask R-CNN weights and weight average."""
    torch.set_num_threads(1)
    averages = []
    build_ema = trainer_module.build_ema

    def recording_build_ema(*args, **kwargs):
        averages.append(build_ema(*args, **kwargs))
        return averages[-1]

    trainer_module.build_ema = recording_build_ema  # in this spawned process only
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(ports[0])
    torch.manual_seed(0)
    train(_per_image_config(Path(data), Path(out) / "per_image_ddp"), model=PerImageModel(3))

    os.environ["MASTER_PORT"] = str(ports[1])
    cfg = _maskrcnn_config(Path(data), Path(out) / "maskrcnn_ddp")
    torch.manual_seed(100 + rank)  # different initial weights on each rank
    model = build_model(cfg.model)
    train(cfg, model=model)
    torch.save(model.state_dict(), Path(out) / f"maskrcnn_rank{rank}.pth")
    torch.save(averages[-1].module.state_dict(), Path(out) / f"maskrcnn_ema_rank{rank}.pth")


def _per_image_config(data: Path, out: Path):
    return tiny_config(data, out, "solver.max_iter=4", "solver.lr=0.1", "solver.warmup_iters=0",
                       "data.aspect_ratio_grouping=false", "solver.ema_decay=0.5")


def _maskrcnn_config(data: Path, out: Path):
    return tiny_config(data, out, "solver.max_iter=2", "solver.ims_per_batch=4", "solver.ema_decay=0.9")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("shapes")
    generate_shapes(data, num_train=8, num_val=1, seed=0, min_size=64, max_size=96)
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(data), str(out), (_free_port(), _free_port())), nprocs=WORLD_SIZE,
                       start_method="spawn")
    return data, out


def test_two_processes_match_one_process_with_the_same_global_batch(ddp_run, tmp_path):
    data, out = ddp_run
    torch.manual_seed(0)
    train(_per_image_config(data, tmp_path), model=PerImageModel(3))
    single = torch.load(tmp_path / "model_final.pth", weights_only=True)
    ddp = torch.load(out / "per_image_ddp" / "model_final.pth", weights_only=True)
    initial = PerImageModel(3).state_dict()
    for key in ("raw_model", "model"):  # the trained weights, their average
        assert set(ddp[key]) == set(single[key])
        for name, value in single[key].items():
            assert not torch.allclose(value, initial[name])
            torch.testing.assert_close(ddp[key][name], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(single["model"]["conv.weight"], single["raw_model"]["conv.weight"])
    single_log, ddp_log = read_jsonl(tmp_path / "metrics.jsonl"), read_jsonl(out / "per_image_ddp" / "metrics.jsonl")
    assert len(ddp_log) == len(single_log) == 4
    for a, b in zip(single_log, ddp_log):
        assert b["total_loss"] == pytest.approx(a["total_loss"], rel=1e-5)


def test_maskrcnn_processes_stay_in_sync(ddp_run):
    _, out = ddp_run
    saved = torch.load(out / "maskrcnn_ddp" / "model_final.pth", weights_only=True)
    assert saved["iteration"] == 2 and "rng_by_rank" in saved and len(saved["rng_by_rank"]) == WORLD_SIZE
    for kind, key in (("maskrcnn", "raw_model"), ("maskrcnn_ema", "model")):  # trained weights, their average
        rank0 = torch.load(out / f"{kind}_rank0.pth", weights_only=True)
        rank1 = torch.load(out / f"{kind}_rank1.pth", weights_only=True)
        assert rank0.keys() == rank1.keys() == saved[key].keys()
        for name, value in rank0.items():
            assert torch.equal(value, rank1[name]), name
            assert torch.equal(value, saved[key][name]), name
        assert not any(name.startswith("module.") for name in saved[key])
    trained = "roi_heads.box_predictor.cls_score.weight"
    assert saved["ema_updates"] == 2 and not torch.equal(saved["model"][trained], saved["raw_model"][trained])
    records = read_jsonl(out / "maskrcnn_ddp" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2]
    assert json.loads((out / "maskrcnn_ddp" / "train_summary.json").read_text())["iteration"] == 2
