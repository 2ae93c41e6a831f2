"""Detectron-style configuration (yacs) with checked merges and ``_BASE_`` inheritance."""
from .config import (
    CfgNode, ConfigError, assert_and_infer_cfg, cfg, cfg_from_file, cfg_from_list, get_cfg,
    load_yaml_with_base, merge_cfg_from_cfg, reset_global_cfg,
)
from .defaults import KEY_DOCS, SECTION_DOCS
from .paths import list_packaged_configs, resolve_config_path
from .validate import validate_cfg

__all__ = [
    "CfgNode",
    "ConfigError",
    "KEY_DOCS",
    "SECTION_DOCS",
    "assert_and_infer_cfg",
    "cfg",
    "cfg_from_file",
    "cfg_from_list",
    "get_cfg",
    "list_packaged_configs",
    "load_yaml_with_base",
    "merge_cfg_from_cfg",
    "reset_global_cfg",
    "resolve_config_path",
    "validate_cfg",
]
