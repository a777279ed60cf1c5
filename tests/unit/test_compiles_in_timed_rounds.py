"""A graph torch.compile builds during a timed round is counted (it timed the compiler)."""

import torch

from quantgate.measure.timing import CompilesInTimedRounds


def _calls(shapes, warmup_rounds):
    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    shapes = iter(shapes)
    counted = CompilesInTimedRounds(lambda: double(torch.ones(next(shapes))), warmup_rounds=warmup_rounds)
    for _ in range(4):
        counted()
    return counted.count


def test_compiles_in_the_warm_up_are_not_counted_and_recompiles_in_timed_rounds_are():
    assert _calls([3, 3, 3, 3], warmup_rounds=1) == 0  # compiled once, in the first (warm-up) call
    assert _calls([3, 4, 3, 3], warmup_rounds=2) == 0  # the second graph was built during the warm-up
    assert _calls([3, 3, 4, 5], warmup_rounds=1) == 2  # a new shape in two timed rounds: two graphs


def test_the_graph_counter_counts_a_first_compile_and_not_a_cached_graph():
    """What ``dynamo_graphs_in_first_call`` reads: one graph for a first call, none for a repeat."""
    from quantgate.measure.timing import compiled_graphs

    torch._dynamo.reset()
    triple = torch.compile(lambda x: x * 3, backend="eager", dynamic=False)
    before = compiled_graphs()
    triple(torch.ones(3))
    after_first = compiled_graphs()
    triple(torch.ones(3))
    assert (after_first - before, compiled_graphs() - after_first) == (1, 0)
