"""Build shim for what pyproject.toml cannot say statically: the package list.

Project metadata lives in pyproject.toml. The top-level ``configs/`` folder (what users pass as ``--cfg configs/...``
from a checkout) is shipped inside the wheel as ``maskrcnn/configs/`` through a package-dir mapping, one package per
subfolder, so that git holds one copy and a new ``configs/`` subfolder needs no edit here.
"""
from setuptools import find_namespace_packages, find_packages, setup

CONFIG_PACKAGES = ["maskrcnn.configs"] + [f"maskrcnn.configs.{p}" for p in find_namespace_packages(where="configs")]

setup(
    packages=find_packages(include=["maskrcnn", "maskrcnn.*"]) + CONFIG_PACKAGES,
    package_dir={"maskrcnn.configs": "configs"},
    package_data={p: ["*.yaml"] for p in CONFIG_PACKAGES},
)
