"""Fault-injection schemes for the reliability tests, registered only inside those tests.

``FAULTS_CONFTEST`` is the conftest of a pytester session: it adds the ``fault-*`` schemes to
the registry of that session (never to the shipped one). Each is bf16 plus a ballast buffer
on the transformer (``QUANTGATE_BALLAST_MIB``, so a pipeline kept alive shows as a leak well
over the ``leaked_gpu_bytes`` gate) and a fault:

- ``fault-oom-load``: out of memory while quantizing (in ``post_load``);
- ``fault-oom-call``: out of memory inside the transformer's forward (a test body's inference);
- ``fault-leak``: loads fine, and a module-level list keeps the ballast (a real leak);
- ``fault-slow-load``: quantizing takes ``QUANTGATE_SLOW_LOAD_S`` (30 s), past a short budget;
- ``fault-ballast``: no fault of its own, for tests that change or keep the pipeline themselves.

On CUDA the out-of-memory is real (an allocation of twice the card's memory); on the CPU the
same ``torch.OutOfMemoryError`` is raised. ``QUANTGATE_FAKE_ALLOCATOR=1`` makes the pipeline
cache's allocator readings count the live ballast bytes (through weak references), so the
CPU tier measures leaks the way the GPU tier does. Each release (after its garbage
collection) appends the fault schemes whose transformer is still alive (weak references) to
``alive.jsonl``.
"""

FAULTS_CONFTEST = '''
import json
import os
import time
import weakref

import torch

from quantgate import pipeline as pipeline_module
from quantgate import schemes
from quantgate.schemes.base import Scheme

BALLAST_BYTES = int(os.environ.get("QUANTGATE_BALLAST_MIB", "128")) * 2**20
BALLAST = weakref.WeakSet()  # every ballast tensor still alive
PIPES = {}  # scheme -> weak reference to its last pipeline's transformer
KEPT = []  # fault-leak's real leak


def _oom(device, where):
    if torch.device(device).type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.empty(2 * total, dtype=torch.uint8, device=device)  # raises a real OutOfMemoryError
    raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 160.00 GiB ({where}, simulated on the CPU)")


def _ballast(pipe, request, name):
    ballast = torch.ones(BALLAST_BYTES, dtype=torch.uint8, device=request.device)
    pipe.transformer.register_buffer("quantgate_ballast", ballast, persistent=False)
    BALLAST.add(ballast)
    PIPES[name] = weakref.ref(pipe.transformer)
    return ballast


def _oom_load(pipe, request):
    _ballast(pipe, request, "fault-oom-load")
    _oom(request.device, "while quantizing")


def _oom_call(pipe, request):
    _ballast(pipe, request, "fault-oom-call")
    pipe.transformer.register_forward_pre_hook(lambda module, args: _oom(request.device, "during inference"))
    return {}


def _leak(pipe, request):
    KEPT.append(_ballast(pipe, request, "fault-leak"))
    return {}


def _ballast_only(pipe, request):
    _ballast(pipe, request, "fault-ballast")
    return {}


def _slow_load(pipe, request):
    _ballast(pipe, request, "fault-slow-load")
    time.sleep(float(os.environ.get("QUANTGATE_SLOW_LOAD_S", "30")))  # a quantization that overruns its budget
    return {}


FAULTS = {"fault-oom-load": _oom_load, "fault-oom-call": _oom_call, "fault-leak": _leak,
          "fault-slow-load": _slow_load, "fault-ballast": _ballast_only}
for _name, _fault in FAULTS.items():
    schemes.SCHEMES[_name] = Scheme(name=_name, summary="bf16 with an injected fault (test only)",
                                    backend="none", post_load=_fault)

_release_memory = pipeline_module.release_memory


def _release(device):
    _release_memory(device)  # gc.collect() (and, on CUDA, empty_cache) as every release does
    alive = sorted(name for name, ref in PIPES.items() if ref() is not None)
    with open("alive.jsonl", "a") as f:
        f.write(json.dumps(alive) + "\\n")


pipeline_module.release_memory = _release
if os.environ.get("QUANTGATE_FAKE_ALLOCATOR"):
    def _allocated(device):
        return sum(t.numel() * t.element_size() for t in list(BALLAST))

    pipeline_module.allocated_bytes = _allocated
'''

# A plugin that keeps every failed call's exception, as one collecting failures for its own
# summary would: the isolation plugin must free pipelines even then.
KEEPS_EXCEPTIONS = '''
import pytest

KEPT_EXCEPTIONS = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        KEPT_EXCEPTIONS.append(call.excinfo.value)
'''

CASE_TESTS = '''
import torch


def test_forward(case, pipeline):
    denoiser = pipeline.denoiser  # a local holding the model, as gate tests do
    out = pipeline.denoiser_forward(pipeline.denoiser_inputs(case))
    assert torch.isfinite(out.float()).all() and denoiser is not None


def test_footprint(case, pipeline):
    assert pipeline.denoiser_footprint.total_bytes > 0


def test_timed(case, pipeline, bench):
    inputs = pipeline.denoiser_inputs(case)
    out = bench("transformer", lambda: pipeline.denoiser_forward(inputs))
    assert torch.isfinite(out.float()).all()
'''
