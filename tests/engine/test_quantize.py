"""int8 (``TEST.QUANTIZE``, maskrcnn/engine/quantize.py): the cases in ``quantize_cases.py`` run in their own
pytest process. PyTorch's FX quantization (prepare_fx / convert_fx) leaves process-wide state behind that makes a
later ``torch.export`` of the FPN model in the same process emit a ``math.trunc`` node its serializer rejects
(tests/export/test_torch_export.py fails after them, passes alone), so they are kept out of the main process."""
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def test_quantize_cases_in_their_own_process():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(HERE, "quantize_cases.py")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    print(proc.stdout[-2000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\b9 passed\b", proc.stdout), proc.stdout[-2000:]


def test_calibration_images_are_the_first_of_the_dataset():
    # Runs here: it needs no FX quantization (the cases above run in their own process).
    import pytest
    import torch

    from maskrcnn.config import ConfigError
    from maskrcnn.engine.quantize import calibration_images, is_quantized

    data = [(torch.full((3, 4, 5), float(i)), {}) for i in range(5)]
    got = calibration_images(data, 3)
    assert [int(im[0, 0, 0]) for im in got] == [0, 1, 2]
    assert len(calibration_images(data, 8)) == 5  # at most the dataset
    with pytest.raises(ConfigError, match="TEST.QUANTIZE_CALIB_IMAGES > 0"):
        calibration_images(data, 0)
    assert not is_quantized(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))


def test_quantized_engine_is_onednn_only_with_amx(monkeypatch):
    """int8 layers are packed for oneDNN on a CPU with AMX (its int8 matmul runs the quantized Linear layers
    there), for the ``x86`` engine elsewhere."""
    import torch

    from maskrcnn.engine.quantize import quantized_engine

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert quantized_engine() == ("onednn" if "onednn" in torch.backends.quantized.supported_engines else "x86")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert quantized_engine() == "x86"
