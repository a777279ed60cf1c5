"""The planted regression (tests/planted_regression.py) adds exactly the work it declares and
nothing else: the FLOPs of its matmuls, the same outputs, no new tensor on the model.

Whether ``quantgate compare`` flags a slower run is decided from rounds
(tests/unit/test_compare.py, on recorded rounds); the planted run itself is timed on a GPU only
(fixtures/plans/timing-ab.toml), as the CPU tier times nothing it gates.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.planted_regression import plant


class _Toy(torch.nn.Module):
    """Two ModuleLists named like FLUX.1's blocks, and one that is not a block list."""

    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.single_transformer_blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(8)])

    def forward(self, x):
        for block in [*self.transformer_blocks, *self.single_transformer_blocks, *self.norms]:
            x = block(x)
        return x


def _flops(model, x):
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_planting_adds_the_declared_matmuls_and_leaves_outputs_and_tensors_alone():
    torch.manual_seed(0)
    model, x = _Toy(), torch.randn(4, 8)
    before, flops_before = model(x), _flops(model, x)
    tensors = {name: t.data_ptr() for name, t in model.state_dict(keep_vars=True).items()}

    notes = plant(model, size=16, matmuls=3)["planted_regression"]

    assert notes == {"size": 16, "matmuls_per_block": 3, "blocks": 5, "flop_per_forward": 2 * 16 ** 3 * 3 * 5}
    assert _flops(model, x) - flops_before == notes["flop_per_forward"]
    assert torch.equal(model(x), before)
    assert {name: t.data_ptr() for name, t in model.state_dict(keep_vars=True).items()} == tensors
