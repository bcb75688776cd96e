import pytest
import torch
import torchvision

from maskrcnn.modeling.roi_align import roi_align


def _features(n=3, c=6, h=13, w=17, seed=0):
    return torch.randn((n, c, h, w), generator=torch.Generator().manual_seed(seed))


def _rois(count, num_images, feature_size, spatial_scale, seed=0):
    """(count, 5) RoIs in input pixels: tiny to half-map sized, many crossing or beyond the map border."""
    generator = torch.Generator().manual_seed(seed)
    extent = torch.tensor([feature_size[1], feature_size[0]]) / spatial_scale
    centers = torch.rand((count, 2), generator=generator) * extent * 1.5 - extent * 0.25
    sizes = torch.rand((count, 2), generator=generator) * extent * 0.6
    sizes[: count // 4] *= 0.02  # sub-pixel on the feature map
    batch = torch.randint(0, num_images, (count, 1), generator=generator).float()
    return torch.cat([batch, centers - sizes / 2, centers + sizes / 2], dim=1)


def _values_and_feature_grads(fn, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    features = features.clone().requires_grad_()
    out = fn(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * weights).sum().backward()
    return out.detach(), features.grad


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25, 1 / 16])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_values_and_gradients_match_torchvision(aligned, spatial_scale, sampling_ratio):
    features = _features()
    rois = _rois(48, 3, (13, 17), spatial_scale)
    args = (features, rois, (7, 5), spatial_scale, sampling_ratio, aligned)
    out, grad = _values_and_feature_grads(roi_align, *args)
    expected_out, expected_grad = _values_and_feature_grads(torchvision.ops.roi_align, *args)
    assert out.shape == expected_out.shape == (48, 6, 7, 5)
    assert (out - expected_out).abs().max().item() < 1e-5
    assert (grad - expected_grad).abs().max().item() < 1e-5


def test_samples_on_and_beyond_the_one_pixel_border_follow_torchvision():
    features = _features()  # (3, 6, 13, 17)
    # One bin, one sample at the RoI centre: x = -1, 17 (kept, clamped) and -1.5, 17.5 (dropped).
    rois = torch.tensor(
        [
            [0, -2.0, 4, 0, 6],
            [1, 16, 4, 18, 6],
            [2, 4, -2, 6, 0],
            [0, 4, 12, 6, 14],
            [1, -2.5, 4, -0.5, 6],
            [2, 16.5, 4, 18.5, 6],
        ]
    )
    out = roi_align(features, rois, 1, 1.0, 1)
    expected = torchvision.ops.roi_align(features, rois, 1, 1.0, 1)
    assert torch.allclose(out, expected)
    assert out[:4].abs().sum() > 0 and not out[4:].any()


def test_square_int_output_size_and_roi_chunks_give_the_same_result():
    features, rois = _features(), _rois(40, 3, (13, 17), 0.5)
    whole = roi_align(features, rois, 4, 0.5, 2)
    chunked = roi_align(features, rois, (4, 4), 0.5, 2, chunk_rois=7)
    assert whole.shape == (40, 6, 4, 4)
    assert torch.equal(whole, chunked)


def test_adaptive_sampling_ratio_matches_torchvision():
    features, rois = _features(), _rois(20, 3, (13, 17), 0.5)
    expected = torchvision.ops.roi_align(features, rois, 3, 0.5, -1, True)
    assert torch.allclose(roi_align(features, rois, 3, 0.5, -1, aligned=True), expected)


def test_no_rois_give_an_empty_output_that_backpropagates():
    features = _features().requires_grad_()
    out = roi_align(features, torch.zeros((0, 5)), (7, 7), 0.25, 2)
    assert out.shape == (0, 6, 7, 7)
    out.sum().backward()
    assert features.grad is not None and not features.grad.any()


def test_bfloat16_features_give_bfloat16_output_close_to_float32():
    features, rois = _features(), _rois(40, 3, (13, 17), 0.25)
    reference = roi_align(features, rois, (7, 7), 0.25, 2)
    half = features.bfloat16().requires_grad_()
    out = roi_align(half, rois, (7, 7), 0.25, 2)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max().item() < 0.05
    out.float().sum().backward()
    assert half.grad.dtype == torch.bfloat16


def test_autocast_keeps_the_feature_dtype():
    features, rois = _features(), _rois(10, 3, (13, 17), 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert roi_align(features, rois, 7, 0.25, 2).dtype == torch.float32
        assert roi_align(features.bfloat16(), rois, 7, 0.25, 2).dtype == torch.bfloat16


def test_rejects_rois_without_a_batch_index():
    with pytest.raises(ValueError, match="rois"):
        roi_align(_features(), torch.zeros((4, 4)), 7, 1.0, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("aligned", [False, True])
def test_cuda_values_and_gradients_match_torchvision(aligned):
    features = _features().cuda()
    rois = _rois(48, 3, (13, 17), 0.25).cuda()
    args = (features, rois, (7, 7), 0.25, 2, aligned)
    out, grad = _values_and_feature_grads(roi_align, *args)
    expected_out, expected_grad = _values_and_feature_grads(torchvision.ops.roi_align, *args)
    assert out.is_cuda
    assert (out - expected_out).abs().max().item() < 1e-5
    # Both CUDA backwards sum in a thread-dependent order: compare relative to the gradient's size.
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
