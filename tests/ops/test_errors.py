"""maskrcnn/ops/_errors.py: bad arguments raise what this package documents (ValueError) and what torchvision
raises for the same call, so that code (and test suites) written for either catches them."""
import pytest
import torch
import torchvision

from maskrcnn import ops
from maskrcnn.ops import OpArgumentError, RoIShapeError

NMS_CASES = [(torch.rand(4), torch.rand(3)), (torch.rand(3, 5), torch.rand(3)), (torch.rand(3, 4), torch.rand(3, 2)),
             (torch.rand(3, 4), torch.rand(4))]


def _torchvision_raises(fn):
    with pytest.raises(Exception) as e:
        fn()
    return type(e.value)


@pytest.mark.parametrize("backend", ["native", "torchvision"])
@pytest.mark.parametrize("case", range(len(NMS_CASES)))
def test_nms_shape_errors_are_what_torchvision_raises(backend, case):
    boxes, scores = NMS_CASES[case]
    expected = _torchvision_raises(lambda: torchvision.ops.nms(boxes, scores, 0.5))
    assert expected is RuntimeError
    with ops.use_backend(backend):
        for call in (lambda: ops.nms(boxes, scores, 0.5),
                     lambda: ops.batched_nms(boxes, scores, torch.zeros(len(scores), dtype=torch.int64), 0.5)):
            with pytest.raises(expected) as e:
                call()
            assert isinstance(e.value, ValueError) and isinstance(e.value, OpArgumentError)


@pytest.mark.parametrize("backend", ["native", "torchvision"])
@pytest.mark.parametrize("rois", [torch.tensor([[0, 0, 3, 3.0]]), [torch.tensor([[0, 0, 3.0]])]],
                         ids=["tensor_of_4", "list_of_3"])
def test_roi_shape_errors_are_what_torchvision_raises(backend, rois):
    x = torch.linspace(1, 64, 64).reshape(1, 1, 8, 8)
    for ours, theirs in ((ops.roi_align, torchvision.ops.roi_align), (ops.roi_pool, torchvision.ops.roi_pool)):
        expected = _torchvision_raises(lambda: theirs(x, rois, output_size=(2, 2)))
        assert expected is AssertionError
        with ops.use_backend(backend), pytest.raises(expected) as e:
            ours(x, rois, output_size=(2, 2))
        assert isinstance(e.value, ValueError) and isinstance(e.value, RoIShapeError)


def test_box_op_shape_errors_are_runtime_errors_too():
    for fn in (lambda: ops.box_area(torch.rand(3, 5)), lambda: ops.box_iou(torch.rand(3, 4), torch.rand(2, 3))):
        with pytest.raises(RuntimeError):
            fn()
        with pytest.raises(ValueError):
            fn()
