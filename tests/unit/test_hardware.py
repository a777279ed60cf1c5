"""Hardware facts: capability classes, CPU description, the no-GPU reason."""

import pytest
import torch

from quantgate.hardware import device_info, hardware_class, machine_facts, no_cuda_reason


@pytest.mark.parametrize(("capability", "cls"), [
    (None, "cpu"), ((7, 5), "turing"), ((8, 0), "ampere"), ((8, 6), "ampere"), ((8, 9), "ada"), ((9, 0), "hopper"),
    ((10, 0), "blackwell"), ((12, 0), "blackwell"), ((6, 1), "other-gpu"),
])
def test_capability_maps_to_a_hardware_class(capability, cls):
    assert hardware_class(capability) == cls


def test_cpu_device_info():
    info = device_info("cpu")
    assert info.type == "cpu" and info.hardware_class == "cpu" and info.sm is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is visible")
def test_asking_for_cuda_without_a_gpu_says_what_to_do():
    with pytest.raises(RuntimeError, match="run on a GPU runner, or select the CPU tier with -m cpu"):
        device_info("cuda")
    assert torch.__version__ in no_cuda_reason()


def test_machine_facts_record_library_versions():
    facts = machine_facts()
    assert facts["libraries"]["torch"] == torch.__version__.split("+")[0] or facts["libraries"]["torch"] == torch.__version__
    assert facts["hardware_class"] == ("cpu" if not torch.cuda.is_available() else facts["gpus"][0]["hardware_class"])
    assert set(facts) >= {"gpus", "gpu", "cuda_runtime", "nvidia_driver", "libraries", "quantgate"}
