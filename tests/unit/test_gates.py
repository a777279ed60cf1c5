"""gates.toml: validated with file, line and key; the most specific gate decides."""

import math
import textwrap

import pytest

from quantgate.errors import ConfigFileError
from quantgate.gates import GateBook
from quantgate.hardware import HARDWARE_CLASSES
from quantgate.models import model_names
from quantgate.models.sources import SOURCES
from quantgate.schemes import scheme_names
from quantgate.variants import VARIANTS
from tests.conftest import REPO

VOCABULARY = {"model": model_names(), "scheme": scheme_names(), "source": list(SOURCES), "variant": list(VARIANTS),
              "hardware": HARDWARE_CLASSES}
ATTRS = {"model": "flux-schnell", "source": "synthetic", "scheme": "bnb-nf4", "variant": "eager", "batch": 1,
         "hardware": "hopper"}


def _book(tmp_path, text):
    path = tmp_path / "gates.toml"
    path.write_text(textwrap.dedent(text))
    return GateBook.load(path, VOCABULARY)


def test_the_repository_gates_file_is_valid():
    book = GateBook.load(REPO / "fixtures" / "gates.toml", VOCABULARY)
    assert book.lookup("transformer_footprint_reduction", ATTRS).min == pytest.approx(3.45)
    tiny = book.lookup("transformer_footprint_reduction", {**ATTRS, "source": "tiny"})
    assert tiny.min == pytest.approx(2.5) and tiny.selectors["source"] == ("tiny",)


GATES = """
    [[gate]]
    metric = "transformer_footprint_reduction"
    scheme = "bnb-nf4"
    min = 3.0
    why = "generic"

    [[gate]]
    metric = "transformer_footprint_reduction"
    scheme = "bnb-nf4"
    hardware = "hopper"
    min = 3.4
    why = "hopper override"
"""


def test_the_most_specific_gate_wins(tmp_path):
    book = _book(tmp_path, GATES)
    assert book.lookup("transformer_footprint_reduction", ATTRS).why == "hopper override"
    assert book.lookup("transformer_footprint_reduction", {**ATTRS, "hardware": "ada"}).why == "generic"
    assert book.lookup("transformer_footprint_reduction", {**ATTRS, "scheme": "bf16"}) is None


def test_a_failure_says_measured_required_where_and_why(tmp_path):
    gate = _book(tmp_path, GATES).lookup("transformer_footprint_reduction", ATTRS)
    verdict = gate.check(3.1, subject="flux-schnell-synthetic-bnb-nf4-eager-b1-cuda")
    assert not verdict.passed
    assert verdict.message == (
        "transformer_footprint_reduction of flux-schnell-synthetic-bnb-nf4-eager-b1-cuda: measured 3.100x, "
        f"required >= 3.400x [{tmp_path / 'gates.toml'}:8: hopper override]")
    assert gate.check(3.4).passed


def test_nan_never_passes(tmp_path):
    gate = _book(tmp_path, GATES).lookup("transformer_footprint_reduction", ATTRS)
    assert not gate.check(math.nan).passed


def test_equally_specific_matches_are_an_error_naming_both_lines(tmp_path):
    book = _book(tmp_path, """
        [[gate]]
        metric = "transformer_footprint_reduction"
        scheme = "bnb-nf4"
        min = 3.0
        why = "by scheme"

        [[gate]]
        metric = "transformer_footprint_reduction"
        model = "flux-schnell"
        min = 2.0
        why = "by model"
    """)
    with pytest.raises(ConfigFileError, match="gates at lines 2, 8 match the same case equally well"):
        book.lookup("transformer_footprint_reduction", ATTRS)


def test_bytes_are_reported_in_gib(tmp_path):
    gate = _book(tmp_path, """
        [[gate]]
        metric = "leaked_gpu_bytes"
        max = 67108864
        why = "workspaces"
    """).lookup("leaked_gpu_bytes", ATTRS)
    assert "measured 0.125 GiB (134217728 bytes), required <= 0.062 GiB (67108864 bytes)" in gate.check(2**27).message


@pytest.mark.parametrize(("text", "line", "message"), [
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nmin = 3\n", 1, "where its number comes from"),
    ("[[gate]]\nmetric = \"footprint\"\nmin = 3\nwhy = \"x\"\n", 1, "unknown metric 'footprint'"),
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nwhy = \"x\"\n", 1, "needs min, max or both"),
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nmin = 3\nmax = 2\nwhy = \"x\"\n", 1, "no value can pass"),
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nmin = \"3\"\nwhy = \"x\"\n", 1, "min must be a number"),
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nmin = true\nwhy = \"x\"\n", 1, "min must be a number"),
    ("\n\n[[gate]]\nmetric = \"transformer_footprint_reduction\"\nmni = 3\nwhy = \"x\"\n", 3, "unknown key 'mni'"),
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nscheme = \"nf5\"\nmin = 1\nwhy = \"x\"\n", 1,
     "unknown scheme 'nf5'"),
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nbatch = \"1\"\nmin = 1\nwhy = \"x\"\n", 1,
     "batch must be a int"),
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nhardware = \"h100\"\nmin = 1\nwhy = \"x\"\n", 1,
     "unknown hardware 'h100'"),
    ("[gates]\nx = 1\n", 1, "unknown top-level key 'gates'"),
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nmin = 1\nwhy = \"a\"\n[[gate]]\n"
     "metric = \"transformer_footprint_reduction\"\nmin = 2\nwhy = \"b\"\n", 5, "duplicates the gate at line 1"),
    ("[[gate]\n", 1, "not valid TOML"),
    # bounds that cannot fail (or cannot pass) are refused, not accepted as a gate
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nmin = -1.7\nwhy = \"x\"\n", 1,
     "min -1.7 can never fail: transformer_footprint_reduction is never below 0"),
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nmin = -inf\nwhy = \"x\"\n", 1,
     "min must be a finite number"),
    ("[[gate]]\nmetric = \"transformer_footprint_reduction\"\nmin = nan\nwhy = \"x\"\n", 1,
     "NaN fails every value"),
    ("[[gate]]\nmetric = \"leaked_gpu_bytes\"\nmax = -1\nwhy = \"x\"\n", 1, "max -1 can never pass"),
    ("[[gate]]\nmetric = \"lora_effect_cosine_vs_bf16\"\nmin = -1\nwhy = \"x\"\n", 1,
     "never below -1"),
])
def test_a_malformed_gates_file_names_file_line_and_key(tmp_path, text, line, message):
    path = tmp_path / "gates.toml"
    path.write_text(text)
    with pytest.raises(ConfigFileError, match=message) as info:
        GateBook.load(path, VOCABULARY)
    assert info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}")


def test_a_missing_gates_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(ConfigFileError, match="--quantgate-gates"):
        GateBook.load(tmp_path / "absent.toml")


def test_lookup_of_an_unknown_metric_is_a_programming_error(tmp_path):
    with pytest.raises(KeyError, match="unknown metric"):
        _book(tmp_path, GATES).lookup("speed", ATTRS)


def test_speed_is_never_gated_on_the_cpu_tier():
    book = GateBook.load(REPO / "fixtures" / "gates.toml", VOCABULARY)
    timed = [g for g in book.gates if "speedup" in g.metric or "timing" in g.metric]
    assert timed and all("hardware" in g.selectors and "cpu" not in g.selectors["hardware"] for g in timed)


SPEEDUP_GATE = """
    [[gate]]
    metric = "transformer_speedup_vs_bf16"
    min = 1.3
    why = "a test gate"
"""


@pytest.mark.parametrize("value, ci95, passed", [
    (1.5, None, True),
    (1.5, (1.35, 1.62), True),
    (1.5, (1.25, 1.62), False),  # the median passes, the interval's lower end does not
])
def test_a_speedup_with_an_interval_passes_on_its_lower_end(tmp_path, value, ci95, passed):
    gate = _book(tmp_path, SPEEDUP_GATE).lookup("transformer_speedup_vs_bf16", ATTRS)
    verdict = gate.check(value, subject="case", ci95=ci95)
    assert verdict.passed is passed
    assert verdict.as_dict()["ci95"] == (None if ci95 is None else list(ci95))
    if ci95 is not None:
        assert f"95% interval {ci95[0]:.3f}x to {ci95[1]:.3f}x" in verdict.message
        assert "gated on its lower end" in verdict.message
