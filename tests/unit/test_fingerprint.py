"""The pipeline fingerprint sees each kind of change a test could leave behind, and not reads."""

from __future__ import annotations

import torch
from torch import nn

from quantgate import fingerprint


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _after(change) -> list[str]:
    model = _model()
    before = fingerprint.take(model)
    change(model)
    return fingerprint.differences(before, fingerprint.take(model))


def test_reading_the_model_changes_nothing() -> None:
    def read(model):
        with torch.no_grad():
            model(torch.randn(3, 4))
        _ = model.state_dict()
    assert _after(read) == []


def test_an_in_place_write_of_the_same_storage_is_not_a_change() -> None:
    # by design: fusing into the weights is declared with alters_pipeline instead
    assert _after(lambda m: m[0].weight.data.mul_(2)) == []


def test_a_recreated_weight_names_its_storage() -> None:
    found = _after(lambda m: setattr(m[0], "weight", nn.Parameter(m[0].weight.detach().clone())))
    assert found == ["1 tensors changed (module.0.weight: storage (re-created or re-quantized))"]


def test_a_dtype_or_device_change_names_both_values() -> None:
    found = _after(lambda m: m[2].to(torch.float16))
    assert any("module.2.weight: dtype torch.float32 -> torch.float16" in line for line in found), found


def test_a_replaced_module_names_its_classes() -> None:
    found = _after(lambda m: m.__setitem__(1, nn.GELU()))
    assert found == ["1 modules changed (module.1: ReLU -> GELU)"]


def test_a_wrapped_layer_shows_as_added_modules_and_tensors() -> None:
    def wrap(model):
        model[0].lora_A = nn.Linear(4, 1, bias=False)
    found = _after(wrap)
    assert "1 modules added (module.0.lora_A)" in found
    assert "1 tensors added (module.0.lora_A.weight)" in found


def test_a_forgotten_forward_hook_is_named() -> None:
    found = _after(lambda m: m[2].register_forward_hook(lambda *a: None))
    assert found == ["1 modules' hooks changed (module.2: forward hooks 0 -> 1)"]


def test_a_global_module_hook_is_seen() -> None:
    handle = None

    def register(model):
        nonlocal handle
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        found = _after(register)
    finally:
        handle.remove()
    assert len(found) == 1 and found[0].startswith("torch's global module hooks")


def test_a_peft_config_left_on_a_component_is_named() -> None:
    found = _after(lambda m: setattr(m, "peft_config", {"default": object()}))
    assert found == ["peft adapters of module: {} -> {'default': 'object'}"]


def test_compiling_a_module_is_a_change() -> None:
    found = _after(lambda m: m[0].compile())
    assert found == ["torch.compile state: compiled now: module.0"]


def test_pipelines_are_read_component_by_component() -> None:
    class Pipe:
        def __init__(self):
            self.components = {"transformer": _model(), "scheduler": object(), "vae": nn.Linear(2, 2)}
    pipe = Pipe()
    assert set(fingerprint.components(pipe)) == {"transformer", "vae"}
    before = fingerprint.take(pipe)
    pipe.components["vae"].bias = None
    assert fingerprint.differences(before, fingerprint.take(pipe)) == ["1 tensors removed (vae.bias)"]


def test_many_changes_are_summarised_not_listed() -> None:
    def recreate_all(model):
        for layer in (model[0], model[2]):
            layer.weight = nn.Parameter(layer.weight.detach().clone())
            layer.bias = nn.Parameter(layer.bias.detach().clone())
    (line,) = _after(recreate_all)
    assert line.startswith("4 tensors changed") and line.endswith("and 1 more)")
