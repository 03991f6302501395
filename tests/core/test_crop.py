"""mDPO's corrupted image: a crop of the processed pixels, resized back."""

import torch

from tinyml_cli.core.batching import crop_resized


def test_crop_resized_keeps_the_shape_and_shows_only_the_box():
    # channel 0 grows left to right: a crop of the left quarter holds only small values
    x = torch.linspace(-1, 1, 32).expand(1, 3, 32, 32).clone()
    out = crop_resized(x, [(0.0, 0.0, 0.25, 0.25)])
    assert out.shape == x.shape and out.max() <= x[0, 0, 0, 7] + 1e-6 and out.min() >= -1 - 1e-6
    # the whole image as the box is the image itself; a constant image stays constant whatever the box
    assert torch.allclose(crop_resized(x, [(0.0, 0.0, 1.0, 1.0)]), x, atol=1e-6)
    c = torch.full((2, 3, 32, 32), 0.3)
    assert torch.allclose(crop_resized(c, [(0.5, 0.5, 0.2, 0.1), (0.9, 0.9, 0.5, 0.5)]), c)
