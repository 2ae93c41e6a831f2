"""Detectron-style configuration (yacs) with checked merges and ``_BASE_`` inheritance."""
from .config import (  # noqa: F401
    CfgNode, ConfigError, assert_and_infer_cfg, cfg, cfg_from_file, cfg_from_list, get_cfg,
    load_yaml_with_base, merge_cfg_from_cfg, reset_global_cfg,
)
from .paths import list_packaged_configs, resolve_config_path  # noqa: F401
from .defaults import KEY_DOCS, SECTION_DOCS  # noqa: F401
