import os

import pytest

from maskrcnn import config as mconfig
from maskrcnn.config import ConfigError, assert_and_infer_cfg, get_cfg
from maskrcnn.config import docs as config_docs
from maskrcnn.config.defaults import KEY_DOCS

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_get_cfg_returns_independent_copies():
    a, b = get_cfg(), get_cfg()
    a.SOLVER.BASE_LR = 0.5
    assert b.SOLVER.BASE_LR == 0.001


def test_every_key_documented_and_every_doc_a_key():
    c = get_cfg()
    leaves = []

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                leaves.append(prefix + k)

    walk(c, "")
    assert sorted(leaves) == sorted(KEY_DOCS)
    assert all(doc.strip() for doc in KEY_DOCS.values())


def test_docs_config_md_is_generated_from_defaults():
    with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as f:
        assert f.read() == config_docs.render(), "regenerate with: python -m maskrcnn.config.docs > docs/config.md"


def test_merge_from_file_with_base(tmp_path):
    _write(tmp_path / "base.yaml", "MODEL:\n  NUM_CLASSES: 5\nSOLVER:\n  BASE_LR: 0.01\n  STEPS: [0, 10]\n")
    child = _write(tmp_path / "child.yaml", "_BASE_: base.yaml\nSOLVER:\n  BASE_LR: 1\n")
    c = get_cfg()
    c.merge_from_file(child)
    assert c.MODEL.NUM_CLASSES == 5
    assert c.SOLVER.BASE_LR == 1.0 and isinstance(c.SOLVER.BASE_LR, float)  # int promoted to float
    assert c.SOLVER.STEPS == [0, 10]
    assert c.sources == [child]


def test_base_cycle_is_reported(tmp_path):
    _write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        get_cfg().merge_from_file(str(tmp_path / "a.yaml"))


def test_unknown_key_names_key_and_file(tmp_path):
    f = _write(tmp_path / "bad.yaml", "SOLVER:\n  BASE_LRR: 0.1\n")
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_file(f)
    msg = str(e.value)
    assert "SOLVER.BASE_LRR" in msg and f in msg and "SOLVER.BASE_LR" in msg  # suggestion


def test_wrong_type_names_key_value_and_file(tmp_path):
    f = _write(tmp_path / "bad.yaml", "TRAIN:\n  IMS_PER_BATCH: two\n")
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_file(f)
    msg = str(e.value)
    assert "TRAIN.IMS_PER_BATCH" in msg and "'two'" in msg and f in msg


def test_impossible_value_names_key_value_and_file(tmp_path):
    f = _write(tmp_path / "bad.yaml", "SOLVER:\n  BASE_LR: -0.1\n")
    c = get_cfg()
    c.merge_from_file(f)
    with pytest.raises(ConfigError) as e:
        assert_and_infer_cfg(c)
    msg = str(e.value)
    assert "SOLVER.BASE_LR" in msg and "-0.1" in msg and f in msg


@pytest.mark.parametrize("pairs,key", [
    (["FPN.ROI_MIN_LEVEL", "5", "FPN.ROI_MAX_LEVEL", "3", "MODEL.CONV_BODY", "FPN.fpn_ResNet50_conv5_body",
      "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head",
      "MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs"], "FPN.ROI_MIN_LEVEL"),
    (["MODEL.CONV_BODY", "ResNet.ResNet51_conv4_body"], "MODEL.CONV_BODY"),
    (["MODEL.NUM_CLASSES", "1"], "MODEL.NUM_CLASSES"),
    (["SOLVER.STEPS", "[0, 100, 50]"], "SOLVER.STEPS"),
    (["TRAIN.BG_THRESH_LO", "0.6"], "TRAIN.BG_THRESH_LO"),
    (["PIXEL_ORDER", "GRB"], "PIXEL_ORDER"),
    (["DATA_LOADER.MAX_IMAGE_SIDE", "-1"], "DATA_LOADER.MAX_IMAGE_SIDE"),
    (["MODEL.CONV_BODY", "FPN.fpn_ResNet50_conv5_body"], "ROI_BOX_HEAD"),
])
def test_impossible_values_fail_at_load(pairs, key):
    c = get_cfg()
    c.merge_from_list(pairs)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        assert_and_infer_cfg(c)


def test_merge_from_list_parses_python_literals():
    c = get_cfg()
    c.merge_from_list(["TRAIN.SCALES", "(800, 900)", "MODEL.MASK_ON", "False", "OUTPUT_DIR", "/tmp/x",
                       "TEST.SCALE", 500])
    assert c.TRAIN.SCALES == [800, 900] and c.MODEL.MASK_ON is False and c.OUTPUT_DIR == "/tmp/x"
    assert c.TEST.SCALE == 500
    with pytest.raises(ConfigError, match="odd length"):
        c.merge_from_list(["TEST.SCALE"])


def test_infer_fpn_and_basic_blocks():
    c = get_cfg()
    c.merge_from_list(["MODEL.CONV_BODY", "FPN.fpn_ResNet18_conv5_body",
                       "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head",
                       "MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs"])
    assert_and_infer_cfg(c)
    assert c.FPN.FPN_ON and c.RESNETS.TRANS_FUNC == "basic_transformation" and c.is_frozen()


def test_detectron_style_global_cfg(tmp_path):
    f = _write(tmp_path / "g.yaml", "MODEL:\n  NUM_CLASSES: 7\n")
    try:
        mconfig.cfg_from_file(f)
        mconfig.cfg_from_list(["TEST.NMS", "0.4"])
        assert mconfig.cfg.MODEL.NUM_CLASSES == 7 and mconfig.cfg.TEST.NMS == 0.4
        mconfig.assert_and_infer_cfg()
        assert mconfig.cfg.is_frozen()
    finally:
        mconfig.reset_global_cfg()
    assert mconfig.cfg.MODEL.NUM_CLASSES == 81 and not mconfig.cfg.is_frozen() and mconfig.cfg.sources == []


def test_all_shipped_configs_load_and_validate():
    cfg_dir = os.path.join(REPO, "configs")
    files = [os.path.join(d, f) for d, _, fs in os.walk(cfg_dir) for f in fs if f.endswith(".yaml")]
    assert len(files) >= 6
    for f in files:
        c = get_cfg()
        c.merge_from_file(f)
        assert_and_infer_cfg(c, make_immutable=False)


def test_dump_round_trips(tmp_path):
    c = get_cfg()
    c.merge_from_list(["MODEL.NUM_CLASSES", "3"])
    p = tmp_path / "dump.yaml"
    p.write_text(c.dump())
    d = get_cfg()
    d.merge_from_file(str(p))
    assert d == c
