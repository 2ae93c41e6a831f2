"""The renaming engine of the weight converters, and round trips through the inverse converters no other test uses."""
import pytest
import torch
import torchvision

from maskrcnn.utils.weights.common import WeightsConversionError, affine_channels_to_bn, bn_to_affine_channels
from maskrcnn.utils.weights.detectron import canonical_to_detectron, detectron_to_canonical
from maskrcnn.utils.weights.detectron2 import canonical_to_detectron2, detectron2_to_canonical
from maskrcnn.utils.weights.detectron_pytorch import canonical_to_detectron_pytorch, detectron_pytorch_to_canonical
from maskrcnn.utils.weights.rules import Rule, RuleTable, plus
from maskrcnn.utils.weights.torchvision import torchvision_to_canonical

TABLE = RuleTable("this test file", "the test names", [
    Rule(r".*_momentum", None),
    Rule(r"layer(?P<s>[1-4])\.(?P<rest>.+)", "res{s}.{rest}", {"s": plus(1)}),
    Rule(r"fc(?P<i>\d)\.(?P<p>weight|bias)", "box.fc{i}.{p}", {"i": {"1": "6", "2": "7"}}),
    Rule(r"head(?P<sub>\.0)?\.(?P<p>weight|bias)", "{prefix}head{sub}.{p}"),
], hint="Only the test layers are supported.")


def test_rules_rename_drop_and_translate_in_order():
    named = {"layer1.0.conv1.weight": 1, "w_momentum": 2, "fc2.bias": 3, "head.weight": 4, "head.0.bias": 5}
    out, dropped = TABLE.apply(named, {"prefix": "x."})
    assert list(out.items()) == [("res2.0.conv1.weight", 1), ("box.fc7.bias", 3), ("x.head.weight", 4),
                                 ("x.head.0.bias", 5)]
    assert dropped == ["w_momentum"]
    out, _ = TABLE.apply({"fc1.weight": torch.ones(2, dtype=torch.float64)}, convert=lambda v, name: v.float())
    assert out["box.fc6.weight"].dtype == torch.float32


def test_rules_list_every_unmapped_name_and_refuse_two_names_for_one():
    # fc3 matches the pattern but not the translation table; layer5 and a non-string key match nothing.
    with pytest.raises(WeightsConversionError, match=r"3 tensor\(s\) of this test file have no counterpart in the "
                                                     r"test names: 7, fc3\.weight, layer5\.0\.weight\. Only the test"):
        TABLE.apply({"fc3.weight": 0, "layer5.0.weight": 0, 7: 0, "fc1.bias": 0}, {"prefix": ""})
    twice = RuleTable("this file", "canonical names", [Rule(r"rpn(?:_fpn\d)?_w", "rpn.weight")])
    with pytest.raises(WeightsConversionError, match=r"'rpn_fpn2_w' and 'rpn_fpn3_w' both map to 'rpn\.weight'"):
        twice.apply({"rpn_fpn2_w": 0, "rpn_fpn3_w": 1})


def test_affine_channel_pairs_become_batch_norms_and_fold_back():
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    bn = affine_channels_to_bn({"stem.conv1.weight": torch.ones(4, 3, 1, 1), "stem.bn1.scale": scale,
                                "stem.bn1.shift": shift}, "Test")
    assert list(bn) == ["stem.conv1.weight", "stem.bn1.weight", "stem.bn1.bias", "stem.bn1.running_mean",
                        "stem.bn1.running_var"]
    back = bn_to_affine_channels(bn)
    assert list(back) == ["stem.conv1.weight", "stem.bn1.weight", "stem.bn1.bias"]
    torch.testing.assert_close(back["stem.bn1.weight"], scale)
    torch.testing.assert_close(back["stem.bn1.bias"], shift)
    with pytest.raises(WeightsConversionError, match=r"Test norm 'res2\.0\.bn1' has only its scale"):
        affine_channels_to_bn({"res2.0.bn1.scale": scale}, "Test")


@pytest.fixture(scope="module")
def canonical_sets():
    """Canonical weights of torchvision's FPN Mask R-CNN (random init) and of a C4 variant (res5 in the box head,
    no fc6/fc7), both with AffineChannel-exact norms so that Detectron-style round trips are lossless."""
    torch.manual_seed(0)
    sd = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    fpn, _ = torchvision_to_canonical(sd)
    fpn, _ = detectron_to_canonical(canonical_to_detectron(fpn))
    c4 = {k: v for k, v in fpn.items() if not k.startswith(("fpn.", "box.fc", "mask.fcn"))}
    c4["rpn.cls_logits.weight"], c4["rpn.cls_logits.bias"] = torch.randn(15, 256, 1, 1), torch.randn(15)
    c4["rpn.bbox_pred.weight"], c4["rpn.bbox_pred.bias"] = torch.randn(60, 256, 1, 1), torch.randn(60)
    return {"fpn": fpn, "c4": c4}


@pytest.mark.parametrize("layout", ["fpn", "c4"])
def test_detectron2_inverse_round_trips(canonical_sets, layout):
    canonical = canonical_sets[layout]
    grid = (5, 3) if layout == "c4" else None
    d2 = canonical_to_detectron2(canonical, anchor_grid=grid)
    assert ("roi_heads.res5.0.conv1.weight" in d2) == (layout == "c4")
    assert d2["roi_heads.box_predictor.cls_score.weight"].shape[0] == canonical["box.cls_score.weight"].shape[0]
    back, notes = detectron2_to_canonical({"model": d2, "__author__": "test"}, anchor_grid=grid)
    # detectron2 stores no background deltas or mask channel: they come back as zeros.
    expected = dict(canonical)
    for key, rows in (("box.bbox_pred.weight", 4), ("box.bbox_pred.bias", 4), ("mask.logits.weight", 1),
                      ("mask.logits.bias", 1)):
        expected[key] = torch.cat([torch.zeros_like(canonical[key][:rows]), canonical[key][rows:]])
    assert back.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(back[k], expected[k], msg=k)
    assert any("background row moved" in n for n in notes)


@pytest.mark.parametrize("layout", ["fpn", "c4"])
@pytest.mark.parametrize("shared", [True, False])
def test_detectron_pytorch_inverse_round_trips(canonical_sets, layout, shared):
    canonical = canonical_sets[layout]
    dp = canonical_to_detectron_pytorch(canonical, mask_head_shares_res5=shared)
    assert ("Mask_Head.res5.0.conv1.weight" in dp) == (layout == "c4" and shared)
    back, _ = detectron_pytorch_to_canonical({"model": dp, "step": 1})
    assert back.keys() == canonical.keys()
    for k in canonical:
        torch.testing.assert_close(back[k], canonical[k], msg=k)
