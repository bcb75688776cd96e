"""Point head (PointRend): point sampling, the training points and labels, adaptive subdivision, and the
head wired into the model (training, inference, export)."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from test_deploy import CLASS_NAMES, IMAGES, match, small_config
from test_model_inputs import LOSS_NAMES, empty_target, images_of, rectangle_target, tiny_model_config
from maskrcnn.config import Config
from maskrcnn.deploy.export import OPSET, OUTPUT_NAMES, export_onnx, read_metadata
from maskrcnn.deploy.runtime import ExportedPredictor, network_inputs
from maskrcnn.inference import to_image_tensor
from maskrcnn.modeling.mask_head import mask_targets
from maskrcnn.modeling.maskrcnn import build_model
from maskrcnn.modeling.paste import paste_masks_in_image
from maskrcnn.modeling.point_head import (PointHead, point_labels, point_sample, point_sample_indexed,
                                          training_points, uncertain_cells, uncertainty)
from maskrcnn.reference import our_model_from, well_conditioned_torchvision_model
from maskrcnn.structures import BitMasks, PolygonMasks


def make_head(in_channels=6, num_classes=3, fc_dim=8, num_fcs=2, stride=4, steps=2, points=784, seed=0):
    torch.manual_seed(seed)
    head = PointHead(in_channels=in_channels, num_classes=num_classes, fc_dim=fc_dim, num_fcs=num_fcs, stride=stride,
                     num_points_train=196, oversample_ratio=3, importance_ratio=0.75, subdivision_steps=steps,
                     subdivision_points=points)
    nn.init.normal_(head.predictor.weight, std=0.5)  # point logits of a spread comparable to the coarse ones
    nn.init.normal_(head.predictor.bias, std=0.5)
    return head


def at_a_point(maps, index, xy):
    """Oracle: torchvision's RoIAlign of a zero-size box at each point (aligned, one sample): the bilinear value
    at pixel coordinate ``xy`` (pixel i covering [i, i + 1)). maps (N, C, H, W), index (R,), xy (R, P, 2) ->
    (R, C, P). Its edge rule differs from zero padding within half a pixel of the border."""
    rows, count = xy.shape[:2]
    flat = xy.reshape(-1, 2)
    rois = torch.cat([index.repeat_interleave(count)[:, None].float(), flat, flat], dim=1)
    values = roi_align(maps, rois, (1, 1), 1.0, sampling_ratio=1, aligned=True)[:, :, 0, 0]  # (R*P, C)
    return values.reshape(rows, count, -1).transpose(1, 2)


def test_point_sample_is_bilinear_at_the_point():
    torch.manual_seed(0)
    maps = torch.randn(3, 5, 20, 30)
    index = torch.tensor([2, 0, 1, 2, 0])
    points = torch.rand(5, 40, 2)
    xy = points * torch.tensor([30.0, 20.0])
    inside = ((xy >= 0.5) & (xy <= torch.tensor([29.5, 19.5]))).all(-1)  # where RoIAlign's edge rule is bilinear
    assert inside.float().mean() > 0.8
    expected = at_a_point(maps, index, xy).transpose(1, 2)  # (R, C, P) -> (R, P, C)
    got = point_sample_indexed(maps, index, points)
    assert got.shape == (5, 40, 5)
    torch.testing.assert_close(got[inside], expected[inside], rtol=0, atol=1e-5)
    torch.testing.assert_close(point_sample(maps[index], points), got, rtol=0, atol=0)


def grid_sample_oracle(maps, index, points):
    """``F.grid_sample`` of each row's own map, zero padding, ``align_corners=False``: (R, P, C)."""
    grid = 2 * points[:, :, None, :] - 1  # (R, P, 2) -> (R, P, 1, 2) in [-1, 1]
    return F.grid_sample(maps[index], grid, align_corners=False, padding_mode="zeros")[..., 0].transpose(1, 2)


def test_indexed_sampling_pads_each_map_with_zeros_as_grid_sample_does():
    """Values and the gradient to the maps equal grid_sample's, also on and beyond the edges, where a point reads
    zeros and no other map (channels-last maps, as the model's levels are, and the default layout alike)."""
    torch.manual_seed(0)
    maps = torch.randn(3, 4, 10, 12) + 5  # far from 0, so that a neighbour's cells would show
    index = torch.tensor([1, 0, 2, 1])
    points = torch.rand(4, 30, 2)
    points[:, :4, 1] = torch.tensor([0.0, 1.0, -0.02, 1.02])  # the edges and a fifth of a row outside
    points[:, 4:8, 0] = torch.tensor([0.0, 1.0, -0.03, 1.04])
    upstream = torch.randn(4, 30, 4)
    for layout in (torch.contiguous_format, torch.channels_last):
        ours = maps.clone().contiguous(memory_format=layout).requires_grad_()
        theirs = maps.clone().requires_grad_()
        got, expected = point_sample_indexed(ours, index, points), grid_sample_oracle(theirs, index, points)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        (got * upstream).sum().backward()
        (expected * upstream).sum().backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-5)


def test_indexed_sampling_of_bfloat16_maps_stays_within_their_rounding():
    torch.manual_seed(0)
    maps, index, points = torch.randn(2, 8, 16, 16), torch.tensor([1, 0, 1]), torch.rand(3, 50, 2)
    got = point_sample_indexed(maps.bfloat16(), index, points)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), grid_sample_oracle(maps, index, points), rtol=0, atol=0.05)


def test_training_points_are_the_most_uncertain_candidates_then_uniform_ones():
    coarse = torch.randn(4, 28, 28) * 3
    torch.manual_seed(7)
    points = training_points(coarse, 196, 3, 0.75)
    torch.manual_seed(7)  # the documented draws, in order: candidates, then the uniform points
    candidates, uniform = torch.rand(4, 588, 2), torch.rand(4, 49, 2)
    assert points.shape == (4, 196, 2)
    torch.testing.assert_close(points[:, 147:], uniform, rtol=0, atol=0)
    scores = uncertainty(point_sample(coarse[:, None], candidates)[..., 0])  # (4, 588)
    for roi in range(4):
        chosen = (points[roi, :147, None, :] == candidates[roi, None]).all(-1)  # (147, 588)
        assert (chosen.sum(1) == 1).all(), "a chosen point is not one of the candidates"
        taken = chosen.any(0)
        assert taken.sum() == 147
        assert scores[roi, taken].min() >= scores[roi, ~taken].max()


@pytest.mark.parametrize("stride", [4, 8])
def test_point_logits_read_the_fine_level_at_the_points_image_pixels(stride):
    """A head without hidden layers whose predictor row k copies fine channel k: its point logits are the fine
    features at each point's image pixels (the RoIAlign oracle at spatial scale 1 / stride), in each RoI's image."""
    head = make_head(in_channels=3, num_classes=3, num_fcs=0, stride=stride)
    with torch.no_grad():
        head.predictor.weight.zero_()
        head.predictor.weight[:, :3] = torch.eye(3)
        head.predictor.bias.zero_()
    torch.manual_seed(1)
    fine = torch.randn(2, 3, 96 // stride, 128 // stride)
    # Boxes half a cell or more inside the level, where the oracle's edge rule is bilinear too.
    rois = torch.tensor([[1, 10.0, 12.5, 90.3, 70.0], [0, 40.0, 8.0, 100.0, 88.0], [1, 5.0, 50.0, 30.0, 60.0]])
    classes = torch.tensor([2, 3, 1])
    points = torch.rand(3, 50, 2)
    got = head.point_logits([fine], rois, torch.randn(3, 28, 28), points, classes)
    corner, size = rois[:, None, 1:3], rois[:, None, 3:] - rois[:, None, 1:3]
    xy = (corner + points * size) / stride
    expected = at_a_point(fine, rois[:, 0].long(), xy)[torch.arange(3), classes - 1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_head_is_pointrends_mlp_with_the_coarse_logit_appended_to_every_layer():
    """forward against PointRend's formulation written out: each layer a 1x1 convolution over the points of
    [previous output; coarse logit], ReLU after the hidden ones."""
    head = make_head()
    fine, coarse = torch.randn(5, 30, 6), torch.randn(5, 30)
    x, c = fine.transpose(1, 2), coarse[:, None]  # (R, C, P), (R, 1, P)
    for fc in head.fcs:
        x = F.relu(F.conv1d(torch.cat([x, c], 1), fc.weight[:, :, None], fc.bias))
    expected = F.conv1d(torch.cat([x, c], 1), head.predictor.weight[:, :, None], head.predictor.bias)  # (R, K, P)
    with torch.no_grad():
        torch.testing.assert_close(head(fine, coarse), expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_class_logits_are_the_forward_channel_of_each_class():
    head = make_head()
    fine, coarse = torch.randn(5, 30, 6), torch.randn(5, 30)
    classes = torch.tensor([1, 3, 2, 3, 1])
    with torch.no_grad():
        expected = head(fine, coarse)[torch.arange(5), :, classes - 1]
        torch.testing.assert_close(head.class_logits(fine, coarse, classes), expected, rtol=1e-5, atol=1e-5)



def test_point_logits_in_chunks_of_rois_equal_all_at_once():
    head = make_head()
    torch.manual_seed(2)
    features = [torch.randn(2, 6, 24, 32)]
    rois = torch.cat([torch.randint(0, 2, (7, 1)).float(), torch.tensor([[5.0, 6.0, 60.0, 50.0]]).expand(7, 4)
                      + torch.rand(7, 4) * 20], dim=1)
    coarse, points, classes = torch.randn(7, 28, 28), torch.rand(7, 30, 2), torch.randint(1, 4, (7,))
    with torch.no_grad():
        whole = head.point_logits(features, rois, coarse, points, classes)
        chunked = head.point_logits(features, rois, coarse, points, classes, chunk_points=70)  # 2 RoIs a chunk
        empty = head.point_logits(features, rois[:0], coarse[:0], points[:0], classes[:0], chunk_points=70)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert empty.shape == (0, 30)


def test_the_head_computes_in_the_dtype_of_the_features():
    """bfloat16 features (a bfloat16 autocast's levels): bfloat16 layers, within their rounding of float32."""
    head = make_head(in_channels=16, fc_dim=32)
    fine, coarse, classes = torch.randn(4, 50, 16), torch.randn(4, 50), torch.tensor([1, 2, 3, 1])
    with torch.no_grad():
        expected = head.class_logits(fine, coarse, classes)
        got = head.class_logits(fine.bfloat16(), coarse, classes)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())

def random_masks(count, height, width, seed):
    """(count, H, W) bool blobs: thresholded smooth noise, so that every mask has boundaries everywhere."""
    g = torch.Generator().manual_seed(seed)
    noise = F.interpolate(torch.randn(count, 1, height // 8, width // 8, generator=g), size=(height, width),
                          mode="bilinear", align_corners=False)
    return noise[:, 0] > 0


def test_point_labels_are_the_bitmap_at_the_points_thresholded_at_a_half():
    """Per image and per matched instance: the 0/1 bitmap's bilinear value (RoIAlign oracle) at each point > 0.5."""
    bits = [random_masks(3, 60, 80, 0), random_masks(2, 50, 40, 1)]
    boxes = [torch.tensor([[5.0, 4.5, 70.2, 50.0], [20.0, 10.0, 40.0, 55.0]]), torch.tensor([[2.0, 3.0, 35.0, 44.0]])]
    matched = [torch.tensor([2, 0]), torch.tensor([1])]
    torch.manual_seed(0)
    points = torch.rand(3, 100, 2)
    got = point_labels([BitMasks(b) for b in bits], boxes, matched, points)
    expected = []
    for image_bits, image_boxes, idx, pts in zip(bits, boxes, matched, points.split([2, 1])):
        xy = image_boxes[:, None, :2] + pts * (image_boxes[:, None, 2:] - image_boxes[:, None, :2])
        expected.append(at_a_point(image_bits[:, None].float(), idx, xy)[:, 0] > 0.5)
    assert torch.equal(got, torch.cat(expected).float())
    assert 0.2 < got.mean() < 0.8


def test_point_labels_at_the_cell_centres_are_the_mask_targets():
    """For boxes under 28 pixels, where each 28 x 28 target cell of a bitmap is one bilinear sample at its centre,
    the labels at the cell centres are the mask head's targets; polygons are labelled as their bitmaps."""
    quad = np.array([8.3, 6.1, 21.7, 9.0, 19.2, 22.4, 7.5, 17.0])
    triangle = np.array([5.2, 26.5, 24.8, 25.0, 12.1, 8.6])
    polygons = PolygonMasks([[quad], [triangle]], (32, 32))
    bits = polygons.to_bitmasks()
    boxes = [torch.tensor([[6.2, 5.3, 23.9, 24.1], [4.0, 7.7, 25.5, 27.0]])]
    matched = [torch.tensor([1, 0])]
    cells = (torch.arange(28) + 0.5) / 28
    centres = torch.stack(torch.meshgrid(cells, cells, indexing="xy"), dim=-1).reshape(1, 784, 2).expand(2, -1, -1)
    targets = mask_targets([bits], boxes, matched, 28)
    assert 0.2 < targets.mean() < 0.8
    for masks in (bits, polygons):
        assert torch.equal(point_labels([masks], boxes, matched, centres).view(2, 28, 28), targets)


def test_a_point_on_an_object_edge_is_labelled_as_the_target_cell_there():
    """A box offset by half a pixel puts the centres of its 32 x 32 target cells on pixel edges: on the object's
    edge the bilinear value is exactly 0.5, and the label decides it as the target does."""
    bits = torch.zeros(1, 64, 64, dtype=torch.bool)
    bits[0, :, :10] = True  # columns 0..9: the edge at x = 10
    boxes, matched = [torch.tensor([[0.5, 0.5, 32.5, 32.5]])], [torch.tensor([0])]
    cells = (torch.arange(32) + 0.5) / 32  # centres at pixel edges x = 1, 2, ..., 32
    centres = torch.stack(torch.meshgrid(cells, cells, indexing="xy"), dim=-1).reshape(1, 1024, 2)
    targets = mask_targets([BitMasks(bits)], boxes, matched, 32)
    assert targets[0, 0, :9].eq(1).all() and targets[0, 0, 10:].eq(0).all()  # cell 9 sits on the edge
    assert torch.equal(point_labels([BitMasks(bits)], boxes, matched, centres).view(1, 32, 32), targets)


def test_uncertain_cells_are_the_topk_of_uncertainty_with_their_centres():
    logits = torch.randn(2, 6, 8)
    index, points = uncertain_cells(logits, 10)
    expected = (-logits.abs()).flatten(1).topk(10, dim=1).indices
    assert torch.equal(index, expected)
    row, col = index // 8, index % 8
    torch.testing.assert_close(points, torch.stack([(col + 0.5) / 8, (row + 0.5) / 6], -1), rtol=0, atol=0)
    assert uncertain_cells(logits, 1000)[0].shape == (2, 48)


def test_one_subdivision_step_changes_only_the_chosen_cells():
    """One step: plain 2x bilinear upsampling everywhere but the least certain cells, which hold the point head's
    logits at their centres (coarse logits read from the 28 x 28 input)."""
    head = make_head(steps=1, points=300)
    features = [torch.randn(2, 6, 24, 32)]
    rois = torch.tensor([[0, 10.0, 12.0, 80.0, 60.0], [1, 30.0, 5.0, 120.0, 90.0], [0, 0.0, 0.0, 40.0, 90.0]])
    coarse, classes = torch.randn(3, 28, 28) * 2, torch.tensor([3, 1, 2])
    with torch.no_grad():
        refined = head.refine(features, rois, coarse, classes)
        upsampled = F.interpolate(coarse[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
        index, points = uncertain_cells(upsampled, 300)
        point_logits = head.point_logits(features, rois, coarse, points, classes)
    assert refined.shape == (3, 56, 56)
    chosen = torch.zeros(3, 56 * 56, dtype=torch.bool).scatter_(1, index, True).view(3, 56, 56)
    assert torch.equal(refined[~chosen], upsampled[~chosen])
    torch.testing.assert_close(refined.flatten(1).gather(1, index), point_logits, rtol=0, atol=0)
    assert (refined[chosen] != upsampled[chosen]).float().mean() > 0.99


def test_each_further_step_upsamples_the_last_and_recomputes_at_most_its_points():
    head, one_step = make_head(steps=2, points=200), make_head(steps=1, points=200)
    features = [torch.randn(1, 6, 24, 32)]
    rois = torch.tensor([[0, 10.0, 12.0, 80.0, 60.0], [0, 30.0, 5.0, 120.0, 90.0]])
    coarse, classes = torch.randn(2, 28, 28) * 2, torch.tensor([3, 1])
    with torch.no_grad():
        refined, first = head.refine(features, rois, coarse, classes), one_step.refine(features, rois, coarse, classes)
    upsampled = F.interpolate(first[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    assert refined.shape == (2, 112, 112) and head.refined_side(28) == 112
    changed = (refined != upsampled).flatten(1).sum(1)
    assert (changed <= 200).all() and (changed > 150).all()



def test_a_step_refines_only_the_detections_longer_than_its_grid_each_as_alone():
    """A box whose longer side (input pixels) is no longer than the grid a step starts from keeps the bilinear
    upsampling at that step; the detections refined in a batch get the values they get alone."""
    head, one_step = make_head(steps=2, points=200), make_head(steps=1, points=200)  # the same weights
    features = [torch.randn(1, 6, 40, 40)]
    rois = torch.tensor([[0, 10.0, 10.0, 130.0, 100.0],  # 120 px: both steps
                         [0, 20.0, 30.0, 60.0, 50.0],  # 40 px: the first step (grid 28) only
                         [0, 5.0, 5.0, 30.0, 25.0],  # 25 px: neither
                         [0, 50.0, 40.0, 106.0, 80.0]])  # 56 px: not longer than the second step's grid of 56
    coarse, classes = torch.randn(4, 28, 28) * 2, torch.tensor([1, 2, 3, 1])
    with torch.no_grad():
        refined, first = head.refine(features, rois, coarse, classes), one_step.refine(features, rois, coarse, classes)
        alone = head.refine(features, rois[:1], coarse[:1], classes[:1])
    upsampled = F.interpolate(coarse[:, None], scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.equal(refined[2], F.interpolate(upsampled, scale_factor=2, mode="bilinear", align_corners=False)[2, 0])
    assert not torch.equal(first[[1, 3]], upsampled[[1, 3], 0])  # the first step refined them
    after_first = F.interpolate(first[[1, 3], None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(refined[[1, 3]], after_first)
    torch.testing.assert_close(refined[:1], alone, rtol=0, atol=1e-5)


# The head in the model: built from model.roi_heads.mask_refine, trained, and refining inference and the export.


def refined_config(cfg):
    """``cfg`` (a ModelConfig) with the point head on, narrow enough for tests."""
    cfg = copy.deepcopy(cfg)
    cfg.roi_heads.mask_refine = True
    cfg.roi_heads.point_head_dim = 16
    return cfg


def test_the_head_is_off_by_default_and_adds_only_its_own_parameters():
    plain = build_model(Config().model).state_dict()
    assert not any("point_head" in key for key in plain)
    torch.manual_seed(0)
    refined = build_model(refined_config(tiny_model_config()))
    torch.manual_seed(0)
    tiny = build_model(tiny_model_config())
    added = set(refined.state_dict()) - set(tiny.state_dict())
    assert set(tiny.state_dict()) <= set(refined.state_dict())
    assert added == {f"roi_heads.point_head.{name}" for name, _ in refined.roi_heads.point_head.named_parameters()}
    assert {n for n, p in tiny.state_dict().items() if not torch.equal(p, refined.state_dict()[n])} == set()


def test_without_subdivision_steps_the_refined_model_infers_the_plain_models_masks():
    """The point head is the only change: with no subdivision step its masks are the mask head's."""
    cfg = tiny_model_config()
    cfg.roi_heads.score_thresh = 0.0
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    refined_cfg = refined_config(cfg)
    refined_cfg.roi_heads.point_subdivision_steps = 0
    refined = build_model(refined_cfg).eval()
    refined.load_state_dict(plain.state_dict(), strict=False)
    images = images_of((50, 70), (80, 40), seed=1)
    with torch.no_grad():
        expected, got = plain(images, mask_format="probs"), refined(images, mask_format="probs")
    for e, g in zip(expected, got):
        assert len(e["boxes"]) > 0 and all(torch.equal(e[k], g[k]) for k in e)


def point_head_batch():
    images = images_of((64, 96), (72, 80))
    targets = [rectangle_target((64, 96), [[10, 8, 50, 40], [55, 20, 90, 60]], [1, 3]),
               rectangle_target((72, 80), [[5, 5, 40, 70]], [2], polygons=True)]
    return images, targets


def test_a_refined_model_trains_and_the_point_loss_reaches_every_point_head_parameter():
    torch.manual_seed(0)
    model = build_model(refined_config(tiny_model_config())).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = point_head_batch()
    for step in range(3):
        optimizer.zero_grad()
        losses = model(images, targets)
        assert set(losses) == {*LOSS_NAMES, "loss_mask_point"}, step
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values()), (step, losses)
        if step == 0:
            losses["loss_mask_point"].backward(retain_graph=True)
            head = model.roi_heads.point_head
            for name, p in head.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            for p in (head.predictor.weight, head.predictor.bias):  # the rows of classes 1..3, all in the batch
                assert p.grad.flatten(1 if p.dim() > 1 else 0).abs().sum(-1).min() > 0
            optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()


def test_a_batch_without_objects_keeps_the_point_head_in_the_graph():
    torch.manual_seed(0)
    model = build_model(refined_config(tiny_model_config())).train()
    losses = model(images_of((64, 96), (70, 60)), [empty_target((64, 96)), empty_target((70, 60))])
    assert losses["loss_mask_point"].item() == 0.0 and losses["loss_mask_point"].requires_grad
    sum(losses.values()).backward()
    grads = [p.grad for p in model.roi_heads.point_head.parameters()]
    assert all(g is not None and g.abs().sum() == 0 for g in grads)


def test_inference_returns_refined_masks_that_paste_at_the_original_resolution():
    cfg = refined_config(tiny_model_config())
    cfg.roi_heads.score_thresh = 0.0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = images_of((50, 70), (33, 120), seed=1)
    with torch.no_grad():
        probs, pasted = model(images, mask_format="probs"), model(images)
    for image, p, r in zip(images, probs, pasted):
        assert p["mask_probs"].shape == (len(p["boxes"]), 112, 112) and len(p["boxes"]) > 0
        masks = paste_masks_in_image(p["mask_probs"], p["boxes"], tuple(image.shape[-2:]))
        assert torch.equal(masks, r["masks"])


@pytest.mark.slow
def test_the_export_refines_masks_as_the_eager_model_does(tmp_path):
    """The traced subdivision (topk, gather, scatter) in onnxruntime on a mixed batch: the same detections, and
    each refined 112 x 112 mask, pasted, with IoU >= 0.99 against eager's. The model is the well-conditioned
    one of the deploy tests (detections decided by wide margins) with a point head of spread-out logits."""
    cfg = small_config(0.05).model
    plain = our_model_from(well_conditioned_torchvision_model(cfg), cfg)
    model = build_model(refined_config(cfg))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("roi_heads.point_head.") for key in missing)
    with torch.no_grad():
        model.roi_heads.point_head.predictor.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    model.eval()
    path = export_onnx(model, tmp_path / "refined.onnx", class_names=CLASS_NAMES)
    metadata = read_metadata(path)
    assert metadata["mask_side"] == 112
    images = [to_image_tensor(IMAGES[name]) for name in ("rgb 120x200", "rgb 90x61", "strip 17x600")]
    batch, inputs = network_inputs(images, metadata)
    with torch.no_grad():
        expected = dict(zip(OUTPUT_NAMES, model.infer(torch.from_numpy(inputs[0]), torch.from_numpy(inputs[1]))))
    got = {name: torch.from_numpy(value) for name, value in
           zip(OUTPUT_NAMES, ExportedPredictor(path, runtime="onnxruntime", precision="fp32").run_network(*inputs))}
    assert got["mask_probs"].shape[1:] == (112, 112)
    for i, size in enumerate(batch.image_sizes):
        e, g = ({name: out[name][out["image_index"] == i] for name in OUTPUT_NAMES} for out in (expected, got))
        index = match(e["boxes"], e["labels"], g["boxes"], g["labels"], f"image {i}")
        assert len(index) >= 10
        a = paste_masks_in_image(e["mask_probs"], e["boxes"], size).flatten(1)
        b = paste_masks_in_image(g["mask_probs"][index], e["boxes"], size).flatten(1)
        union = (a | b).sum(1)
        iou = torch.where(union > 0, (a & b).sum(1) / union.clamp(min=1), 1.0)  # two empty masks agree
        assert iou.min() >= 0.99, f"image {i}: mask IoU {iou.min():.4f}"
        assert (union > 0).float().mean() > 0.5


def test_the_traced_subdivision_holds_for_any_number_of_detections_zero_included(tmp_path):
    """:meth:`PointHead.refine` alone, traced on 4 detections in 2 images (boxes that take both steps, one and
    none) and run in onnxruntime on other counts of images and detections: the eager values, and an empty result
    for no detection."""
    import onnxruntime

    class Refine(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, fine, rois, coarse, classes):
            return self.head.refine([fine], rois, coarse, classes)

    network = Refine(make_head()).eval()
    torch.manual_seed(0)
    # Boxes of 70, 90, 20 and 40 pixels: two steps, two steps, none and one.
    rois = torch.tensor([[0, 10.0, 12.0, 80.0, 60.0], [1, 30.0, 5.0, 120.0, 90.0], [0, 3.0, 4.0, 23.0, 20.0],
                         [1, 0.0, 50.0, 40.0, 90.0]])
    coarse, classes = torch.randn(4, 28, 28) * 2, torch.tensor([3, 1, 2, 2])
    names = ["fine", "rois", "coarse", "classes"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(network, (torch.randn(2, 6, 24, 32), rois, coarse, classes), tmp_path / "refine.onnx",
                          dynamo=False, opset_version=OPSET, input_names=names, output_names=["logits"],
                          dynamic_axes={"fine": {0: "N", 2: "H", 3: "W"}, "rois": {0: "R"}, "coarse": {0: "R"},
                                        "classes": {0: "R"}, "logits": {0: "R"}})
    session = onnxruntime.InferenceSession(str(tmp_path / "refine.onnx"), providers=["CPUExecutionProvider"])
    for images, count in [(3, 2), (1, 0), (2, 3), (2, 4)]:
        fine = torch.randn(images, 6, 20, 36)
        inputs = (fine, rois[:count].clone().index_fill_(1, torch.tensor([0]), images - 1), coarse[:count],
                  classes[:count])
        with torch.no_grad():
            expected = network(*inputs)
        got = session.run(None, {name: value.numpy() for name, value in zip(names, inputs)})[0]
        assert got.shape == (count, 112, 112)
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-4)
