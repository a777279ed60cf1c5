"""xdist scheduling that keeps the tests of one pipeline on one worker.

xdist's own ``loadgroup`` learns each test's ``xdist_group`` from a suffix its workers append
to the nodeid; from pytest 9.2 that assignment no longer takes effect and the groups are
silently split (pytest-xdist issue #1386). The controller does not collect, but it knows the
selection, hence every case id and its pipeline; a case id is always one of the ``-``-joined
parameter ids of a test, so the group is found from the nodeid alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def group_of_nodeid(nodeid: str, groups: Mapping[str, str]) -> str | None:
    """The group of the case parametrizing ``nodeid`` (``groups``: case id -> group), else None.

    xdist's ``@group`` suffix (pytest before 9.2) is set aside: it names the pipeline, and the
    unit may be larger. The longest run of ``-``-separated id parts that is a case id wins, so
    no case id that is a prefix of another (``svdq-int4`` / ``svdq-int4-fbcache``) is taken for it.
    """
    if nodeid.rfind("@") > nodeid.rfind("]"):
        nodeid = nodeid.rsplit("@", 1)[0]
    start = nodeid.find("[")
    if start < 0 or not nodeid.endswith("]"):
        return None
    parts = nodeid[start + 1:-1].split("-")
    for length in range(len(parts), 0, -1):
        for first in range(len(parts) - length + 1):
            group = groups.get("-".join(parts[first:first + length]))
            if group is not None:
                return group
    return None


def pipeline_scheduler(config: Any, log: Any, group_of: Callable[[str], str | None]) -> Any:
    """An xdist scheduler sending each pipeline group to one worker as a whole; tests without a
    case are scheduled one by one (as ``--dist load``)."""
    from xdist.scheduler import LoadScopeScheduling

    class PipelineGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = group_of(nodeid)
            return nodeid if group is None else f"quantgate-group:{group}"

        def remove_node(self, node: Any) -> str | None:
            # As LoadScopeScheduling's, except that the test running when the worker died is not
            # queued again with the rest of its group: xdist reports it as failed, and a test
            # that kills its worker (hung past its time budget, a crash in a kernel) would
            # otherwise kill every replacement worker in turn, up to --max-worker-restart.
            workload = self.assigned_work.pop(node)
            if not self._pending_of(workload):
                return None
            crashitem = next(nodeid for unit in workload.values() for nodeid, done in unit.items() if not done)
            for unit in workload.values():
                if crashitem in unit:
                    unit[crashitem] = True
            self.workqueue.update({scope: unit for scope, unit in workload.items() if not all(unit.values())})
            for other in self.assigned_work:
                self._reschedule(other)
            return crashitem

    return PipelineGroupScheduling(config, log)
