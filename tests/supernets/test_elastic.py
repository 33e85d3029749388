"""Elastic primitives: band kernels of ElasticConv2d (InceptionNeXt's 1 x k and k x 1 branches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nas.supernets.elastic import ElasticConv2d, kernel_shape


@pytest.mark.parametrize("band", ["horizontal", "vertical"])
def test_band_kernel_is_the_centred_window_along_its_long_axis(band: str) -> None:
    conv = ElasticConv2d(6, 6, (3, 7, 11), depthwise=True, band=band)
    assert conv.weight.shape[-2:] == kernel_shape(11, band)
    x = torch.randn(2, 6, 7, 5)
    for kernel_size in (3, 7, 11):
        for channels in (4, 6):
            height, width = kernel_shape(kernel_size, band)
            top, left = (conv.weight.shape[-2] - height) // 2, (conv.weight.shape[-1] - width) // 2
            weight = conv.weight[:channels, :, top : top + height, left : left + width]
            expected = F.conv2d(x[:, :channels], weight, None, 1, (height // 2, width // 2), 1, channels)
            with torch.no_grad():
                out = conv(x[:, :channels], channels, channels, kernel_size)
                static = conv.export(channels, channels, kernel_size)(x[:, :channels])
            assert out.shape == x[:, :channels].shape
            torch.testing.assert_close(out, expected)
            torch.testing.assert_close(static, expected)


def test_band_refuses_an_unknown_shape_and_kernel_transforms() -> None:
    with pytest.raises(ValueError, match="band must be one of"):
        ElasticConv2d(4, 4, (3,), band="diagonal")
    with pytest.raises(ValueError, match="square kernels only"):
        ElasticConv2d(4, 4, (3, 5), depthwise=True, kernel_transform=True, band="vertical")
