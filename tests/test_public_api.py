"""The public face: every package declares ``__all__``, every listed name exists, imports are acyclic and light."""

import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import maskrcnn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(REPO, "maskrcnn")


def _packages():
    """Dotted names of maskrcnn and every subpackage, found on disk (so that none is missed)."""
    names = []
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        if "__init__.py" in files:
            names.append(os.path.relpath(root, REPO).replace(os.sep, "."))
    return names


PACKAGES = _packages()

# Names the issue asks for by name; each must be listed in its package's __all__ and importable from it.
REQUIRED = {
    "maskrcnn": ["get_cfg", "Generalized_RCNN", "build_model", "load_ckpt", "__version__"]
    # The predictor lives in its own module; once it exists, the top level must export it.
    + (["Predictor"] if importlib.util.find_spec("maskrcnn.predictor") is not None else []),
    "maskrcnn.ops": [
        "nms", "batched_nms", "roi_align", "RoIAlign", "roi_pool", "RoIPool", "MultiLevelRoIAlign", "box_iou",
        "box_area", "clip_boxes_to_image", "remove_small_boxes", "BoxCoder", "Matcher", "paste_masks_in_image",
    ],
    "maskrcnn.modeling": [
        "Generalized_RCNN", "build_model", "build_conv_body", "RPN", "build_box_head", "FastRCNNOutputs",
        "build_mask_head", "MaskRCNNOutputs",
    ],
    "maskrcnn.config": ["get_cfg", "CfgNode"],
}


def test_the_package_list_covers_the_core_subpackages():
    for name in ["maskrcnn", "maskrcnn.config", "maskrcnn.ops", "maskrcnn.modeling", "maskrcnn.modeling.rpn",
                 "maskrcnn.data.datasets", "maskrcnn.utils.weights"]:
        assert name in PACKAGES


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_exists(package):
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    assert isinstance(names, (list, tuple)) and names, f"{package}/__init__.py must define a non-empty __all__"
    assert all(isinstance(n, str) for n in names)
    assert len(set(names)) == len(names), f"{package}.__all__ lists a name twice"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{package}.__all__ lists names that do not exist: {missing}"
    namespace = {}
    exec(f"from {package} import *", namespace)  # noqa: S102 - star import is what __all__ governs
    assert set(names) <= set(namespace)


@pytest.mark.parametrize("package", sorted(REQUIRED))
def test_required_names_are_exported(package):
    module = importlib.import_module(package)
    absent = [n for n in REQUIRED[package] if n not in module.__all__ or getattr(module, n, None) is None]
    assert not absent, f"{package} must export {absent}"


def test_top_level_names_are_the_real_objects():
    from maskrcnn.config import get_cfg
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.utils.checkpoint import load_ckpt

    assert maskrcnn.get_cfg is get_cfg
    assert maskrcnn.Generalized_RCNN is Generalized_RCNN
    assert maskrcnn.load_ckpt is load_ckpt
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", maskrcnn.__version__)
    from maskrcnn.version import __version__

    assert maskrcnn.__version__ == __version__
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        maskrcnn.not_a_name  # noqa: B018


def test_build_model_builds_the_configured_model():
    cfg = maskrcnn.get_cfg()
    model = maskrcnn.build_model(cfg)
    assert type(model) is maskrcnn.Generalized_RCNN
    assert hasattr(model, "Conv_Body") and hasattr(model, "RPN")


def _fresh_python(code):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_first_in_a_fresh_interpreter(package):
    # An import cycle shows only when its package is the first one imported; each gets its own interpreter.
    code = (
        f"import {package} as m\n"
        "missing = [n for n in m.__all__ if not hasattr(m, n)]\n"
        "assert not missing, missing\n"
    )
    result = _fresh_python(code)
    assert result.returncode == 0, f"`import {package}` failed in a fresh interpreter:\n{result.stderr[-3000:]}"


def test_imports_stay_light():
    code = (
        "import sys\n"
        "import maskrcnn\n"
        "assert 'torch' not in sys.modules, 'import maskrcnn loaded torch'\n"
        "import maskrcnn.ops, maskrcnn.modeling, maskrcnn.config\n"
        "heavy = sorted(m for m in ('cv2', 'pycocotools', 'matplotlib') if m in sys.modules)\n"
        "assert not heavy, f'the model and ops imported {heavy}'\n"
    )
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
