"""``paste_masks_grid_sample`` (TEST.MASK_PASTE_METHOD 'detectron2'): hand-computed values, and detectron2's own
pasted masks (tests/fixtures/detectron2/) from its own mask probabilities and boxes."""
import os

import numpy as np
import pytest
import torch

from maskrcnn.ops.grid_paste import paste_masks_grid_sample
from maskrcnn.ops.masks import paste_masks_in_image

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "detectron2")


def test_box_on_whole_pixels_reproduces_the_mask():
    # A box of M x M pixels: pixel centres fall on the mask's cell centres, so the pasted values are the mask's.
    mask = torch.rand(1, 4, 4)
    out = paste_masks_grid_sample(mask, torch.tensor([[2.0, 3.0, 6.0, 7.0]]), (10, 9))
    assert out.shape == (1, 1, 10, 9)
    torch.testing.assert_close(out[0, 0, 3:7, 2:6], mask[0], rtol=0, atol=1e-6)
    assert out[0, 0].sum() == pytest.approx(mask.sum().item(), abs=1e-5)  # zero around it (zero padding)


def test_bilinear_at_pixel_centres_hand_computed():
    # A 2 x 2 mask [[0, 1], [0, 1]] in the box [0, 0, 4, 4]: pixel x samples the mask at (x + 0.5) / 2 - 0.5 cells;
    # columns at -0.25, 0.25, 0.75, 1.25 cells: zero padding outside gives 0, 0.25, 0.75, 0.75 (then 1 * 0.75).
    mask = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    out = paste_masks_grid_sample(mask, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), (4, 4))[0, 0]
    row = torch.tensor([0.0, 0.25, 0.75, 0.75])
    edge = torch.tensor([0.75, 1.0, 1.0, 0.75])  # rows at -0.25 and 1.25 cells fade by the same factor
    torch.testing.assert_close(out, edge[:, None] * row[None, :], rtol=0, atol=1e-6)


def test_float_boxes_differ_from_torchvision_paste():
    # torchvision truncates the (padded) box to integers and resizes; detectron2 keeps the float box.
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., 7:21, 7:21] = 1.0
    box = torch.tensor([[10.6, 20.3, 47.9, 61.2]])
    ours = paste_masks_grid_sample(mask, box, (80, 70))[0, 0] >= 0.5
    tv = paste_masks_in_image(mask, box, (80, 70), padding=1)[0, 0] >= 0.5
    assert ours.any() and not torch.equal(ours, tv)
    ys, xs = torch.nonzero(ours, as_tuple=True)
    # The mask's middle half (cells 7..21 of 28, value 0.5 on their edges) covers x in [19.925, 38.575] and
    # y in [30.525, 50.975]: the pixels whose centres (x + 0.5) lie inside are on; pixel row 30 (30.5) is not.
    assert (xs.min().item(), xs.max().item(), ys.min().item(), ys.max().item()) == (20, 38, 31, 50)


@pytest.mark.parametrize("arch", ["R_50_FPN", "R_50_C4"])
def test_equals_detectron2_pasted_masks(arch):
    """detectron2's binary masks of its 5 best detections per photo, from its 28x28 / 14x14 probabilities (stored
    as float16) and its boxes: every pixel equal but where float16 rounding crosses the 0.5 threshold."""
    ref = np.load(os.path.join(FIXTURES, f"ref_{arch}.npz"))
    flips = total = 0
    for i in range(2):
        h, w = (int(v) for v in ref[f"im{i}_image_size"])
        expected = torch.from_numpy(np.unpackbits(ref[f"im{i}_masks_packed"], axis=-1)[..., :w].astype(bool))
        k = expected.shape[0]
        probs = torch.from_numpy(ref[f"im{i}_mask_probs"][:k].astype(np.float32))
        boxes = torch.from_numpy(ref[f"im{i}_boxes"][:k])
        pasted = paste_masks_grid_sample(probs, boxes, (h, w))[:, 0]
        differ = (pasted >= 0.5) != expected
        assert (pasted[differ] - 0.5).abs().le(2e-3).all()  # float16 rounding of the probabilities only
        flips += int(differ.sum())
        total += differ.numel()
    print(f"{arch}: detectron2's pasted masks from its own probabilities: {flips} of {total} pixels differ")
    assert flips <= 20


def test_empty_and_bad_inputs():
    assert paste_masks_grid_sample(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (5, 6)).shape == (0, 1, 5, 6)
    # a box entirely outside the image pastes nothing
    out = paste_masks_grid_sample(torch.ones(1, 1, 4, 4), torch.tensor([[50.0, 50, 60, 60]]), (10, 10))
    assert out.abs().sum() == 0
    with pytest.raises(ValueError, match="square"):
        paste_masks_grid_sample(torch.zeros(1, 1, 4, 5), torch.zeros(1, 4), (5, 5))
    with pytest.raises(ValueError, match="one per mask"):
        paste_masks_grid_sample(torch.zeros(2, 1, 4, 4), torch.zeros(1, 4), (5, 5))
    with pytest.raises(TypeError, match="floating"):
        paste_masks_grid_sample(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1, 4), (5, 5))


def test_box_of_zero_extent_pastes_nothing():
    # detectron2 would sample at NaN (0 / 0) inside the window; the binary mask is empty either way.
    out = paste_masks_grid_sample(torch.ones(2, 1, 4, 4), torch.tensor([[3.0, 2.0, 3.0, 8.0], [1.0, 5.0, 6.0, 5.0]]),
                                  (10, 10))
    assert not torch.isnan(out).any() and float(out.abs().sum()) == 0.0
