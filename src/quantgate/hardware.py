"""Facts about the machine a run happens on: device, compute capability, driver, versions."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass

import torch

import quantgate

# Compute capability -> the hardware class that the gates (fixtures/gates/) select on. Speed thresholds
# differ per class (an RTX 4090 and an H100 do not share them), memory ones rarely.
_CAPABILITY_CLASSES: dict[tuple[int, int], str] = {
    (7, 5): "turing",
    (8, 0): "ampere",
    (8, 6): "ampere",
    (8, 7): "ampere",
    (8, 9): "ada",
    (9, 0): "hopper",
    (10, 0): "blackwell",
    (10, 3): "blackwell",
    (12, 0): "blackwell",
    (12, 1): "blackwell",
}
HARDWARE_CLASSES: tuple[str, ...] = ("cpu", "turing", "ampere", "ada", "hopper", "blackwell", "other-gpu")

# Distributions whose versions decide results; recorded in every benchmark JSON.
TRACKED_LIBRARIES: tuple[str, ...] = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "torchao",
    "bitsandbytes",
    "nunchaku",
    "pytest-benchmark",
)


def hardware_class(capability: tuple[int, int] | None) -> str:
    """The gates' hardware class of a CUDA compute capability (``None`` means CPU)."""
    if capability is None:
        return "cpu"
    return _CAPABILITY_CLASSES.get(tuple(capability), "other-gpu")  # type: ignore[arg-type]


@dataclass(frozen=True)
class DeviceInfo:
    """What quantgate knows about the device a case runs on."""

    type: str  # "cuda" or "cpu"
    name: str
    capability: tuple[int, int] | None = None
    total_memory_bytes: int | None = None

    @property
    def hardware_class(self) -> str:
        return hardware_class(self.capability)

    @property
    def sm(self) -> str | None:
        """``sm_90`` style name of the compute capability."""
        return None if self.capability is None else f"sm_{self.capability[0]}{self.capability[1]}"


def cuda_available() -> bool:
    """True when torch sees at least one CUDA device."""
    return torch.cuda.is_available()


def device_info(device: str) -> DeviceInfo:
    """Describe ``device`` ("cpu", "cuda" or "cuda:N"); raises if CUDA is asked for and absent."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return DeviceInfo(type="cpu", name=platform.processor() or platform.machine())
    if dev.type != "cuda":
        raise ValueError(f"quantgate runs on 'cpu' or 'cuda', not {device!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(no_cuda_reason())
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(
        type="cuda",
        name=props.name,
        capability=(props.major, props.minor),
        total_memory_bytes=int(props.total_memory),
    )


def no_cuda_reason() -> str:
    """Why torch sees no GPU, in words that say what would make GPU tests run."""
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    return (
        f"no CUDA GPU visible to torch {torch.__version__} ({build} build; "
        "torch.cuda.is_available() is False): run on a GPU runner, or select the CPU tier with -m cpu"
    )


def library_version(distribution: str) -> str | None:
    """Installed version of a distribution, or ``None``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version through NVML, else ``nvidia-smi``, else ``None``."""
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # NVML absent or unusable: fall through to nvidia-smi
        pass
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def machine_facts() -> dict:
    """GPUs, driver, CUDA and library versions: what a benchmark JSON's machine_info needs."""
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            info = device_info(f"cuda:{index}")
            gpus.append({**asdict(info), "sm": info.sm, "hardware_class": info.hardware_class})
    return {
        "gpus": gpus,
        "gpu": gpus[0]["name"] if gpus else None,
        "hardware_class": gpus[0]["hardware_class"] if gpus else "cpu",
        "cuda_runtime": torch.version.cuda,
        "nvidia_driver": nvidia_driver_version() if gpus else None,
        "libraries": {name: library_version(name) for name in TRACKED_LIBRARIES},
        "quantgate": quantgate.__version__,
    }
