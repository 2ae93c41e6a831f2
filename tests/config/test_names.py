"""maskrcnn.config.names: the one parser of MODEL.CONV_BODY names and the one registry look-up."""
import pytest

from maskrcnn.config import ConfigError, assert_and_infer_cfg, get_cfg
from maskrcnn.config.defaults import CONV_BODIES
from maskrcnn.config.names import (
    ConvBodyName, find_in_registry, parse_conv_body_name, registry_lookup, strip_module_prefix,
)


@pytest.mark.parametrize("name,expected", [
    ("ResNet.ResNet50_conv4_body", ("resnet", 50, 4)),
    ("ResNet50_conv4_body", ("resnet", 50, 4)),
    ("ResNet.ResNet101_conv5_body", ("resnet", 101, 5)),
    ("ResNet18_conv5_body", ("resnet", 18, 5)),
    ("FPN.fpn_ResNet152_conv5_body", ("fpn", 152, 5)),
    ("fpn_ResNet34_conv5_body", ("fpn", 34, 5)),
])
def test_parse_conv_body_name(name, expected):
    parsed = parse_conv_body_name(name)
    assert parsed == expected and isinstance(parsed, ConvBodyName)
    assert (parsed.kind, parsed.depth, parsed.stage) == expected


@pytest.mark.parametrize("name", ["FPN.fpn_ResNet50_conv4_body", "ResNet50_conv3_body", "ResNet.ResNet_conv4_body",
                                  "MyBody", "FPN.my_pyramid", "resnet50_conv4_body", "ResNet50_conv4_body_extra"])
def test_parse_rejects_names_that_are_not_built_in_bodies(name):
    with pytest.raises(ConfigError, match=r"MODEL\.CONV_BODY = '.*' is not a ResNet or FPN body name"):
        parse_conv_body_name(name)


def test_every_built_in_body_parses_to_its_own_kind():
    for name in CONV_BODIES:
        kind, depth, stage = parse_conv_body_name(name)
        assert kind == ("fpn" if name.startswith("FPN.") else "resnet")
        assert f"ResNet{depth}_conv{stage}_body" in name


def test_strip_module_prefix():
    assert strip_module_prefix("fast_rcnn_heads.roi_2mlp_head") == "roi_2mlp_head"
    assert strip_module_prefix("roi_2mlp_head") == "roi_2mlp_head"
    assert strip_module_prefix("a.b.c") == "b.c"  # only the module part goes


def test_find_in_registry_with_or_without_the_prefix():
    prefixed = {"ResNet.ResNet50_conv4_body": 1, "FPN.fpn_ResNet50_conv5_body": 2}
    bare = {"roi_2mlp_head": 3}
    assert find_in_registry(prefixed, "ResNet.ResNet50_conv4_body") == "ResNet.ResNet50_conv4_body"
    assert find_in_registry(prefixed, "ResNet50_conv4_body") == "ResNet.ResNet50_conv4_body"
    assert find_in_registry(prefixed, "Other.ResNet50_conv4_body") == "ResNet.ResNet50_conv4_body"
    assert find_in_registry(bare, "fast_rcnn_heads.roi_2mlp_head") == "roi_2mlp_head"
    assert find_in_registry(bare, "roi_2mlp_head") == "roi_2mlp_head"
    assert find_in_registry(bare, "roi_3mlp_head") is None
    clash = {"A.body": 1, "B.body": 2}
    assert find_in_registry(clash, "body") is None and find_in_registry(clash, "B.body") == "B.body"


def test_registry_lookup_returns_the_value_or_names_key_value_and_choices():
    reg = {"roi_2mlp_head": "mlp", "ResNet_roi_conv5_head": "res5"}
    assert registry_lookup(reg, "fast_rcnn_heads.roi_2mlp_head", key="FAST_RCNN.ROI_BOX_HEAD", what="box head") \
        == "mlp"
    with pytest.raises(ConfigError) as e:
        registry_lookup(reg, "roi_4mlp_head", key="FAST_RCNN.ROI_BOX_HEAD", what="box head")
    msg = str(e.value)
    assert "FAST_RCNN.ROI_BOX_HEAD = 'roi_4mlp_head'" in msg and "not a registered box head" in msg
    assert "known: ResNet_roi_conv5_head, roi_2mlp_head" in msg
    with pytest.raises(ConfigError, match=r"'body' is ambiguous: it could be any of A\.body, B\.body"):
        registry_lookup({"A.body": 1, "B.body": 2}, "body", key="MODEL.CONV_BODY", what="conv body")
    assert issubclass(ConfigError, ValueError)  # callers that caught ValueError keep working


def test_assert_and_infer_cfg_uses_the_parser():
    c = get_cfg()
    c.merge_from_list(["MODEL.CONV_BODY", "fpn_ResNet34_conv5_body",
                       "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head",
                       "MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs"])
    assert not c.FPN.FPN_ON
    assert_and_infer_cfg(c, make_immutable=False)
    assert c.FPN.FPN_ON and c.RESNETS.TRANS_FUNC == "basic_transformation"
    c = get_cfg()
    c.MODEL.CONV_BODY = "ResNet101_conv4_body"
    assert_and_infer_cfg(c, make_immutable=False)
    assert not c.FPN.FPN_ON and c.RESNETS.TRANS_FUNC == "bottleneck_transformation"


def test_custom_registered_body_validates_with_or_without_its_prefix():
    from maskrcnn.modeling.backbone.conv_body import CONV_BODY_REGISTRY

    CONV_BODY_REGISTRY["Custom.custom_body"] = lambda cfg: None
    try:
        for name in ("Custom.custom_body", "custom_body"):
            c = get_cfg()
            c.merge_from_list(["MODEL.CONV_BODY", name, "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head",
                               "MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs"])
            assert_and_infer_cfg(c, make_immutable=False)  # no inference from a custom name: nothing changes
            assert not c.FPN.FPN_ON and c.RESNETS.TRANS_FUNC == "bottleneck_transformation"
    finally:
        del CONV_BODY_REGISTRY["Custom.custom_body"]
    with pytest.raises(ConfigError, match=r"MODEL\.CONV_BODY = 'custom_body' is not allowed"):
        assert_and_infer_cfg(c, make_immutable=False)
