"""load_ckpt detects model-zoo formats and converts them; unsafe files are refused through it too."""
import os
import pickle

import pytest
import torch
import torchvision

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.utils.checkpoint import CheckpointError, load_ckpt

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_torchvision_state_dict_file_loads_directly(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "torchvision", "e2e_mask_rcnn_R-50-FPN.yaml"))
    model = Generalized_RCNN(cfg).eval()
    report = load_ckpt(model, str(path))
    assert report["skipped"] == []
    sd = model.state_dict()
    torch.testing.assert_close(sd["Box_Outs.cls_score.weight"], tv.roi_heads.box_predictor.cls_score.weight)
    torch.testing.assert_close(sd["RPN.head.RPN_conv.weight"], tv.rpn.head.conv[0][0].weight)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        ours = model.Conv_Body(x)
        ref = list(tv.backbone(x).values())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["EVIL_SENTINEL"],))


def test_malicious_pkl_through_load_ckpt_runs_nothing(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_SENTINEL", str(sentinel))
    path = tmp_path / "model.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": _Evil()}}, f, protocol=2)
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.CONV_BODY", "ResNet.ResNet18_conv4_body", "MODEL.MASK_ON", "False"])
    model = Generalized_RCNN(cfg)
    with pytest.raises(CheckpointError, match="model.pkl") as e:
        load_ckpt(model, str(path))
    assert not sentinel.exists()
    # docs/model_zoo.md names UnsafeWeightsError: the error is that too.
    from maskrcnn.utils.weights.safe_pickle import UnsafeWeightsError
    assert isinstance(e.value, UnsafeWeightsError) and "system" in str(e.value)
