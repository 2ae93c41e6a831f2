"""Config files by path or by packaged name (maskrcnn.config.paths), as every tool's ``--cfg`` takes them."""
import os

import pytest

from maskrcnn.config import ConfigError, get_cfg, list_packaged_configs, resolve_config_path
from maskrcnn.config.paths import find_packaged_config, packaged_configs_dir

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SMOKE_NAME = "quick_schedules/e2e_mask_rcnn_R-18-FPN_smoke"
SMOKE_FILE = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")


def test_packaged_configs_are_the_checkouts_configs_folder():
    # Run from a checkout (PYTHONPATH or editable install), the packaged configs are configs/ itself: one copy.
    assert os.path.samefile(packaged_configs_dir(), os.path.join(REPO, "configs"))
    on_disk = sorted(
        os.path.relpath(os.path.join(d, f), os.path.join(REPO, "configs"))[: -len(".yaml")].replace(os.sep, "/")
        for d, _, files in os.walk(os.path.join(REPO, "configs")) for f in files if f.endswith(".yaml"))
    assert list_packaged_configs() == on_disk
    assert SMOKE_NAME in on_disk and "baselines/e2e_mask_rcnn_R-50-FPN_1x" in on_disk


@pytest.mark.parametrize("name", [SMOKE_NAME, SMOKE_NAME + ".yaml", "configs/" + SMOKE_NAME + ".yaml",
                                  "./configs/" + SMOKE_NAME])
def test_a_packaged_name_resolves_with_or_without_yaml_and_configs_prefix(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not from the checkout: "configs/..." is no file path here
    assert os.path.samefile(resolve_config_path(name), SMOKE_FILE)


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quick_schedules").mkdir()
    own = tmp_path / "quick_schedules" / "e2e_mask_rcnn_R-18-FPN_smoke.yaml"
    own.write_text("MODEL:\n  NUM_CLASSES: 9\n")
    assert resolve_config_path(SMOKE_NAME + ".yaml") == SMOKE_NAME + ".yaml"  # the local file, as given
    cfg = get_cfg()
    cfg.merge_from_file(SMOKE_NAME + ".yaml")
    assert cfg.MODEL.NUM_CLASSES == 9
    cfg = get_cfg()
    cfg.merge_from_file(SMOKE_NAME)  # no such file here without .yaml: the packaged config
    assert cfg.MODEL.NUM_CLASSES == 4


def test_merge_from_file_by_name_follows_the_packaged_base():
    # The smoke config inherits e2e_mask_rcnn_R-18-FPN_synthetic_cpu.yaml through a relative _BASE_.
    cfg = get_cfg()
    cfg.merge_from_file(SMOKE_NAME)
    assert cfg.SOLVER.MAX_ITER == 2 and cfg.FPN.DIM == 32  # the smoke file's own values
    assert cfg.MODEL.CONV_BODY == "FPN.fpn_ResNet18_conv5_body" and cfg.MODEL.NUM_CLASSES == 4  # from its _BASE_


def test_a_users_config_may_inherit_a_packaged_config_by_name(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("_BASE_: quick_schedules/e2e_mask_rcnn_R-18-FPN_smoke\nSOLVER:\n  MAX_ITER: 5\n")
    cfg = get_cfg()
    cfg.merge_from_file(str(mine))
    assert cfg.SOLVER.MAX_ITER == 5 and cfg.FPN.DIM == 32 and cfg.MODEL.NUM_CLASSES == 4
    # A _BASE_ next to the file still comes first.
    (tmp_path / "quick_schedules").mkdir()
    (tmp_path / "quick_schedules" / "e2e_mask_rcnn_R-18-FPN_smoke").write_text("FPN:\n  DIM: 48\n")
    cfg = get_cfg()
    cfg.merge_from_file(str(mine))
    assert cfg.FPN.DIM == 48 and cfg.MODEL.NUM_CLASSES == 81


def test_unknown_name_lists_the_closest_packaged_configs():
    with pytest.raises(ConfigError) as e:
        resolve_config_path("baselines/e2e_mask_rcnn_R50-FPN_1x")
    msg = str(e.value)
    assert msg.startswith("config file not found: baselines/e2e_mask_rcnn_R50-FPN_1x")
    assert "baselines/e2e_mask_rcnn_R-50-FPN_1x" in msg
    with pytest.raises(ConfigError, match="closest packaged configs: quick_schedules/e2e_mask_rcnn_R-18-FPN_smoke"):
        get_cfg().merge_from_file("smoke")


def test_nothing_close_lists_every_packaged_config():
    with pytest.raises(ConfigError) as e:
        resolve_config_path("zzz")
    assert "packaged configs: " + ", ".join(list_packaged_configs()) in str(e.value)


def test_absolute_and_escaping_names_are_not_packaged_configs(tmp_path):
    assert find_packaged_config(str(tmp_path / "baselines" / "e2e_mask_rcnn_R-50-FPN_1x")) is None
    assert find_packaged_config("../configs/" + SMOKE_NAME) is None
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config_path(str(tmp_path / "missing.yaml"))
