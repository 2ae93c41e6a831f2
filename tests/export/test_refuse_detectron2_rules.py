"""Export reproduces torchvision's pre/post-processing and proposal rules only (and both mask pastes): a model
configured with any other of detectron2's (configs/detectron2/) is refused with a message naming the keys, instead
of exporting a graph that computes differently from the model."""
import os

import pytest

from maskrcnn.export.wrapper import ExportableMaskRCNN
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN

from export_models import REPO, fpn_cfg


@pytest.mark.parametrize("key, value, named", [
    ("RESIZE_METHOD", "detectron2", "RESIZE_METHOD = 'detectron2'"),
    ("SIZE_DIVISIBILITY", 0, "SIZE_DIVISIBILITY = 0"),
    ("RPN.MIN_SIZE_STRICT", True, "RPN.MIN_SIZE_STRICT = True"),
    ("RPN.NMS_ON_LOGITS", True, "RPN.NMS_ON_LOGITS = True"),
    ("TEST.DETECTOR_POSTPROCESS", "detectron2", "TEST.DETECTOR_POSTPROCESS = 'detectron2'"),
])
def test_each_detectron2_rule_is_refused(key, value, named):
    cfg = fpn_cfg()
    cfg.merge_from_list([key, value])
    with pytest.raises(NotImplementedError, match="torchvision's pre/post-processing") as e:
        ExportableMaskRCNN(Generalized_RCNN(cfg).eval())
    assert named in str(e.value) and "defaults" in str(e.value)


def test_detectron2_config_is_refused_with_every_key_named():
    from maskrcnn.config import get_cfg
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "detectron2", "mask_rcnn_R_50_C4_3x.yaml"))
    with pytest.raises(NotImplementedError) as e:
        ExportableMaskRCNN(Generalized_RCNN(cfg).eval())
    for key in ("RESIZE_METHOD", "TEST.DETECTOR_POSTPROCESS", "RPN.MIN_SIZE_STRICT", "RPN.NMS_ON_LOGITS",
                "SIZE_DIVISIBILITY"):
        assert key in str(e.value)
    # detectron2's mask paste is not refused: the graph pastes that way (tests/export/test_paste_methods.py).
    assert "MASK_PASTE" not in str(e.value)
    # Unrounded anchors are not a pre/post-processing rule: the graph computes them as the model does.
    cfg = fpn_cfg()
    cfg.merge_from_list(["RPN.ROUND_ANCHORS", False])
    ExportableMaskRCNN(Generalized_RCNN(cfg).eval())
