"""The order of the tests that share a loaded pipeline: readers first, whoever changes it last.

Within one pipeline group (the consecutive tests of one loaded pipeline) each test has a role:

0. reads first: marked ``runs_first`` (the footprint, the transformer forward timing): a compile
   variant then compiles on the transformer test's inputs, before prompt to image uses them;
   then the other readers: measure or compare without changing the pipeline (end to end,
   quality);
1. mutates: changes the pipeline and restores it (loads and unloads a LoRA, sets strengths,
   switches a branch off for one timing): every test using the ``lora_adapters`` fixture, and
   tests marked ``mutates_pipeline``;
2. compares: marked ``after_timings``, reads what the others recorded (timings, output errors);
3. alters: may change the weights for good (``alters_pipeline``: fusing a LoRA re-quantizes
   them); each gets a pipeline no other test changed, and the pipeline is reloaded after it.

Tests marked ``compares_cases`` (a speedup over bf16 or NF4, GPTQ against round-to-nearest)
read what tests of *other* cases record and load no pipeline: they run after every pipeline
group, so a case's comparison never runs before its baseline's timing. A test marked
``times(scope)`` records the timing such a comparison reads; a comparison whose baseline case
times nothing in the session is not generated (``quantgate.plugin`` says so).

Tests keep their collection order within a role. The fingerprint after each test
(``quantgate.fingerprint``) proves the readers and mutators left the pipeline as loaded.
"""

from __future__ import annotations

from typing import Any

ROLE_MARKERS = {
    "runs_first": "reads the loaded pipeline before any other test of its group does (footprint, forward timing)",
    "mutates_pipeline": "changes the loaded pipeline and restores it (runs after the tests that only read it)",
    "after_timings": "compares what other tests of the same pipeline record (timings, output errors); runs after "
                     "them",
    "compares_cases": "compares what tests of other cases record (compares_cases(timing=SCOPE): the baseline "
                      "case's SCOPE timing); runs after every pipeline group",
    "times": "times(SCOPE): records the SCOPE timing (transformer, end_to_end) that comparisons read",
    "alters_pipeline": "may change the loaded pipeline's weights for good; runs last in its group, on a pipeline "
                       "no other test changed, which is reloaded afterwards",
}
MUTATING_FIXTURES = frozenset({"lora_adapters"})


def role(item: Any) -> float:
    """0 reads (-0.5 first), 1 mutates and restores, 2 compares timings, 3 alters (the module docstring)."""
    if item.get_closest_marker("alters_pipeline") is not None:
        return 3
    if item.get_closest_marker("after_timings") is not None:
        return 2
    if item.get_closest_marker("mutates_pipeline") is not None or MUTATING_FIXTURES & set(item.fixturenames):
        return 1
    return -0.5 if item.get_closest_marker("runs_first") is not None else 0


def compares_cases(item: Any) -> bool:
    """Whether ``item`` compares other cases' records and so runs after every pipeline group."""
    return item.get_closest_marker("compares_cases") is not None


def alters(item: Any) -> bool:
    """Whether ``item`` may change its pipeline for good (``alters_pipeline``)."""
    return item is not None and item.get_closest_marker("alters_pipeline") is not None
