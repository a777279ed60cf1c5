"""Letting go of what an exception's traceback holds (pipelines, modules, activations) while
the exception itself (type, message, already rendered traceback text) stays."""

from __future__ import annotations

from types import TracebackType


def clear_traceback(tb: TracebackType | None) -> None:
    """Clear the locals of every finished frame of ``tb``; frames still executing are skipped."""
    while tb is not None:
        frame = tb.tb_frame
        try:
            frame.clear()
        except RuntimeError:  # still executing (an enclosing frame of the code that caught it)
            pass
        else:
            # Python <= 3.12 keeps a snapshot dict of a frame's locals once anything read
            # f_locals (pytest does, rendering the traceback); clear() leaves that dict full.
            # Reading f_locals again syncs it with the cleared frame: the dict empties.
            frame.f_locals  # noqa: B018
        tb = tb.tb_next


def clear_exception_frames(exc: BaseException | None, detach: bool = True) -> None:
    """Clear the traceback of ``exc`` and of its chain (``__cause__``, ``__context__``), and
    (``detach``) take each traceback off its exception once nothing needs to render it.

    Clearing locals is not enough for whoever keeps the exception: a frame keeps the function
    it executes (a closure such as torch's ``Module._call_impl.inner`` keeps the module) and
    its caller (``f_back``, up to pytest's frames holding the ``CallInfo``). Without its
    traceback the exception reaches none of them.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        clear_traceback(exc.__traceback__)
        if detach:
            exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
