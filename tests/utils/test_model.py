"""maskrcnn.utils.model.model_device: the device a module's tensors live on."""
import pytest
import torch
from torch import nn

from maskrcnn.utils.model import model_device


class _BufferOnly(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.register_buffer("table", torch.zeros(2, device=device))


def test_first_parameter_decides():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")


def test_buffer_when_there_is_no_parameter():
    assert model_device(_BufferOnly("meta")) == torch.device("meta")
    assert model_device(nn.Sequential(_BufferOnly("meta"), nn.ReLU())) == torch.device("meta")


def test_cpu_when_the_module_holds_no_tensor():
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.Sequential()) == torch.device("cpu")


def test_parameters_win_over_buffers():
    m = nn.Module()
    m.register_buffer("b", torch.zeros(1, device="meta"))
    m.w = nn.Parameter(torch.zeros(1))
    assert model_device(m) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model():
    assert model_device(nn.Linear(2, 2).cuda()) == torch.device("cuda", torch.cuda.current_device())
