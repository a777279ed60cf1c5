"""A failed test cannot keep its pipeline alive through its traceback (loaded by ``quantgate.plugin``).

When a test body fails (a CUDA out-of-memory in a forward, a gate's assertion), the
exception's traceback holds every frame between the test and the raise, and each frame its
locals (the test's ``denoiser = pipeline.denoiser``, a module's ``self``, activations), its
function (closures over modules) and its callers. pytest keeps the exception in
``sys.last_*`` until the next test's call phase (quantgate's release drops those too), and
any plugin may keep the exception. Once the report's text is built, quantgate clears those
frames and detaches the traceback from the exception (``quantgate.frames``), so the memory
goes back when the pipeline is released. The report (``longrepr``) is rendered text by then
and keeps everything a reader sees.

Not covered: a plugin that keeps pytest's ``ExceptionInfo`` object itself keeps its own
traceback entries; their locals are cleared, but an executing closure's captured module is not.
Under ``--pdb`` / ``--trace`` nothing is cleared: post-mortem debugging needs the frames.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from quantgate.frames import clear_exception_frames


def _debugging(config: pytest.Config) -> bool:
    return bool(config.getoption("usepdb", False) or config.getoption("trace", False))


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: after every other wrapper is done
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, object]:
    report = yield  # the report (and its rendered traceback) is complete here
    if call.excinfo is not None and not _debugging(item.config):
        clear_exception_frames(call.excinfo.value)
    return report
