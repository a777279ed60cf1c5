"""fixtures/gates/: validated with file, line and key; the most specific gate decides."""

import hashlib
import importlib
import math
import textwrap

import pytest

from quantgate.errors import ConfigFileError
from quantgate.gates import GateBook, gates_digest
from quantgate.hardware import HARDWARE_CLASSES
from quantgate.models import model_names
from quantgate.models.sources import SOURCES
from quantgate.schemes import scheme_names
from quantgate.variants import VARIANTS
from tests.conftest import REPO

VOCABULARY = {"model": model_names(), "family": ["flux", "sd3"], "scheme": scheme_names(), "source": list(SOURCES),
              "variant": list(VARIANTS), "hardware": HARDWARE_CLASSES}
ATTRS = {"model": "flux-schnell", "family": "flux", "source": "synthetic", "scheme": "bnb-nf4", "variant": "eager",
         "batch": 1, "hardware": "hopper"}
GATES_DIR = REPO / "fixtures" / "gates"
# The file of each scheme backend (quantgate.schemes._BACKENDS), named after its module.
BACKENDS = ("bf16", "bitsandbytes", "torchao", "sparse", "svdquant", "nunchaku", "gptq")


def _book(tmp_path, text):
    path = tmp_path / "gates.toml"
    path.write_text(textwrap.dedent(text))
    return GateBook.load(path, VOCABULARY)


def test_the_repository_gates_directory_is_valid():
    book = GateBook.load(GATES_DIR, VOCABULARY)
    assert [f.name for f in book.files] == sorted(f"{name}.toml" for name in (*BACKENDS, "harness", "shared"))
    assert len(book.gates) >= 118  # fixtures/gates.toml held 118 gates when it was split (issue 19)
    assert all(g.path.parent == GATES_DIR and g.line > 0 for g in book.gates)
    assert book.lookup("transformer_footprint_reduction", ATTRS).min == pytest.approx(3.45)
    tiny = book.lookup("transformer_footprint_reduction", {**ATTRS, "source": "tiny"})
    assert tiny.min == pytest.approx(2.5) and tiny.selectors["source"] == ("tiny",)


# Gates that resolved so from fixtures/gates.toml before the split (issue 19): metric, attributes
# over ATTRS, the file that holds the gate now, min, max and the start of its why.
KNOWN = [
    ("transformer_footprint_reduction", {"scheme": "bf16"}, "bf16", 1.0, 1.0, "the bf16 baseline must load"),
    ("transformer_footprint_reduction", {}, "bitsandbytes", 3.45, None, "analytic 3.553x for NF4 on FLUX.1"),
    ("transformer_footprint_reduction", {"model": "flux-dev", "scheme": "int4-wo"}, "torchao", 3.6, None,
     "analytic 3.762x"),
    # svdquant-ref-v1 keeps this gate since svdquant-ref's embedders stay 16-bit (issue 22)
    ("transformer_footprint_reduction", {"model": "sd35-medium", "family": "sd3", "scheme": "svdquant-ref-v1",
                                         "source": "tiny"}, "svdquant", 1.9, None, "measured 1.987x"),
    ("transformer_footprint_reduction", {"scheme": "svdq-nvfp4-fbcache"}, "nunchaku", 3.35, None, "NVFP4 keeps"),
    ("transformer_speedup_vs_bf16", {"scheme": "sparse24-int8-dq", "variant": "compile", "batch": 16}, "sparse",
     1.5, None, "TorchAO: 2:4 sparsity"),
    ("transformer_speedup_vs_bf16", {"scheme": "fp8-row", "variant": "compile"}, "torchao", 1.5, None,
     "TorchAO's primary FLUX target"),
    ("end_to_end_speedup_vs_bf16", {"model": "flux-dev", "scheme": "fp8-row", "variant": "compile"}, "torchao",
     1.8, None, "TorchAO publishes 2.17x"),
    ("transformer_speedup_vs_nf4", {"scheme": "svdq-int4", "hardware": "ada"}, "nunchaku", 2.5, None,
     "SVDQuant publishes 3.0x"),
    ("end_to_end_peak_allocated_bytes", {"scheme": "int8-wo"}, "shared", None, 25232932864, "a quantized FLUX.1"),
    ("end_to_end_peak_allocated_bytes", {"scheme": "svdquant-ref"}, "svdquant", None, 25232932864, "a 4-bit FLUX.1"),
    ("image_psnr_db_vs_reference", {"scheme": "svdquant-ref"}, "shared", 39.0, None, "measured 43.6 dB (fp8-row)"),
    ("image_psnr_db_vs_reference", {"model": "sd35-medium", "family": "sd3", "scheme": "gptq-w4a8",
                                    "source": "tiny"}, "gptq", 28.0, None, "run alone"),
    ("transformer_output_error_ratio_vs_rtn", {"scheme": "gptq-w4a8-g128"}, "gptq", None, 0.99, "the GPTQ paper"),
    ("image_ssim_vs_reference", {"scheme": "svdquant-ref", "source": "tiny"}, "harness", 0.97, None, "tiny tier"),
    ("timing_disagreement_same_rounds", {}, "harness", None, 0.01, "the suite's synchronized"),
    ("leaked_gpu_bytes", {"hardware": "cpu"}, "harness", None, 67108864, "after a pipeline is released"),
    ("lora_effect_cosine_vs_bf16", {"scheme": "svdq-int4"}, "harness", 0.9, None, "the LoRA changes"),
    ("lora_output_relative_error_vs_bf16", {"scheme": "svdquant-ref", "source": "tiny"}, "svdquant", None, 0.05,
     "svdquant-ref with the LoRA"),
    ("gpu_budget_fraction_used", {"scheme": "bf16", "variant": "group-offload", "budget": "16GiB"}, "bf16", None,
     1.0, "the offloaded bf16 baseline"),
    ("gpu_budget_fraction_used", {"scheme": "svdquant-ref", "budget": "16GiB"}, "shared", None, 1.0,
     "SVDQuant's plan"),
    ("end_to_end_speedup_vs_bf16_offload", {"scheme": "svdquant-ref", "variant": "encoder-offload",
                                            "budget": "16GiB"}, "svdquant", 2.3, None, "measured 3.12x"),
]


@pytest.mark.parametrize(("metric", "attrs", "file", "low", "high", "why"), KNOWN)
def test_known_gates_resolve_as_before_the_split(metric, attrs, file, low, high, why):
    gate = GateBook.load(GATES_DIR, VOCABULARY).lookup(metric, {**ATTRS, **attrs})
    assert gate is not None and gate.path == GATES_DIR / f"{file}.toml"
    assert (gate.min, gate.max) == (low, high) and gate.why.startswith(why)
    assert str(gate.path) in gate.check(0.0).message and f":{gate.line}:" in gate.check(0.0).message


def test_each_backend_file_gates_only_that_backends_schemes():
    """A scheme's claims sit in its backend's file; harness.toml names no scheme and shared.toml
    only gates that name schemes of several backends."""
    book = GateBook.load(GATES_DIR, VOCABULARY)
    backend_of = {scheme.name: module for module in BACKENDS
                  for scheme in importlib.import_module(f"quantgate.schemes.{module}").SCHEMES}
    assert set(backend_of) == set(scheme_names())
    for gate in book.gates:
        backends = {backend_of[s] for s in gate.selectors.get("scheme", ())}
        name = gate.path.stem
        if name == "harness":
            assert not backends, gate.where
        elif name == "shared":
            assert len(backends) > 1, gate.where
        else:
            assert backends == {name}, gate.where


def test_no_file_lists_every_model_of_a_family_instead_of_the_family():
    book = GateBook.load(GATES_DIR, VOCABULARY)
    flux = {m for m in model_names() if m.startswith("flux")}
    assert not [g.where for g in book.gates if set(g.selectors.get("model", ())) == flux]
    assert [g for g in book.gates if g.selectors.get("family") == ("flux",)]


def _dir(tmp_path, files):
    directory = tmp_path / "gates"
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


ONE = """
    [[gate]]
    metric = "transformer_footprint_reduction"
    scheme = "bnb-nf4"
    min = 3.0
    why = "{why}"
"""


def test_a_directory_reads_every_toml_file_in_sorted_order_keeping_each_gates_file_and_line(tmp_path):
    directory = _dir(tmp_path, {"b.toml": ONE.replace('"bnb-nf4"', '"bf16"').format(why="b"), "a.toml": "\n\n" + GATES,
                                "notes.md": "not read", "c.toml.orig": "[[gate]]\nnot read"})
    book = GateBook.load(directory, VOCABULARY)
    assert [f.name for f in book.files] == ["a.toml", "b.toml"] and book.path == directory
    assert [(g.path.name, g.line, g.why) for g in book.gates] == [
        ("a.toml", 4, "generic"), ("a.toml", 10, "hopper override"), ("b.toml", 2, "b")]
    assert f"[{directory / 'a.toml'}:10: hopper override]" in book.lookup(
        "transformer_footprint_reduction", ATTRS).check(1.0).message


def test_a_duplicate_in_another_file_is_an_error_naming_both_files_and_lines(tmp_path):
    directory = _dir(tmp_path, {"a.toml": ONE.format(why="a"), "b.toml": "\n" + ONE.format(why="b")})
    with pytest.raises(ConfigFileError) as info:
        GateBook.load(directory, VOCABULARY)
    assert str(info.value).startswith(f"{directory / 'b.toml'}:3")
    assert f"duplicates the gate at {directory / 'a.toml'}:2" in str(info.value)


def test_equally_specific_matches_in_two_files_name_both(tmp_path):
    directory = _dir(tmp_path, {"a.toml": ONE.format(why="a"),
                                "b.toml": ONE.replace('scheme = "bnb-nf4"', 'model = "flux-schnell"').format(why="b")})
    with pytest.raises(ConfigFileError, match=f"gates at lines {directory / 'a.toml'}:2, {directory / 'b.toml'}:2"):
        GateBook.load(directory, VOCABULARY).lookup("transformer_footprint_reduction", ATTRS)


def test_a_malformed_file_of_a_directory_is_named_with_its_line(tmp_path):
    directory = _dir(tmp_path, {"a.toml": ONE.format(why="a"), "b.toml": "\n[[gate]]\nmetric = \"speed\"\n"})
    with pytest.raises(ConfigFileError, match="unknown metric 'speed'") as info:
        GateBook.load(directory, VOCABULARY)
    assert (info.value.path, info.value.line) == (directory / "b.toml", 2)


def test_an_empty_directory_is_refused(tmp_path):
    with pytest.raises(ConfigFileError, match="holds no [*].toml file"):
        GateBook.load(_dir(tmp_path, {"README.md": "no gates"}), VOCABULARY)


def test_the_digest_of_a_file_is_its_sha256_and_of_a_directory_covers_names_and_bytes(tmp_path):
    directory = _dir(tmp_path, {"a.toml": ONE.format(why="a"), "b.toml": ONE.format(why="b"), "x.md": "notes"})
    assert gates_digest(directory / "a.toml") == hashlib.sha256((directory / "a.toml").read_bytes()).hexdigest()
    expected = hashlib.sha256()
    for name in ("a.toml", "b.toml"):
        data = (directory / name).read_bytes()
        expected.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    before = gates_digest(directory)
    assert before == expected.hexdigest()
    (directory / "x.md").write_text("other notes")
    assert gates_digest(directory) == before  # only the files the book reads count
    (directory / "b.toml").rename(directory / "c.toml")
    assert gates_digest(directory) != before  # a renamed file is another book's file
    assert gates_digest(tmp_path / "absent") == hashlib.sha256(b"").hexdigest()


FAMILY = """
    [[gate]]
    metric = "transformer_footprint_reduction"
    family = "flux"
    min = 3.0
    why = "flux family"

    [[gate]]
    metric = "transformer_footprint_reduction"
    model = "flux-dev"
    family = "flux"
    min = 3.5
    why = "flux-dev"
"""


def test_a_family_gate_matches_every_model_of_the_family(tmp_path):
    book = _book(tmp_path, FAMILY)
    assert book.lookup("transformer_footprint_reduction", ATTRS).why == "flux family"
    assert book.lookup("transformer_footprint_reduction", {**ATTRS, "model": "flux-dev"}).why == "flux-dev"
    assert book.lookup("transformer_footprint_reduction", {**ATTRS, "model": "sd35-medium", "family": "sd3"}) is None
    # records without a family (runs before the selector) take their model's from the registry
    without = {k: v for k, v in ATTRS.items() if k != "family"}
    assert book.lookup("transformer_footprint_reduction", without).why == "flux family"
    assert book.lookup("transformer_footprint_reduction", {**without, "model": "sd35-medium"}) is None


def test_an_unknown_family_names_the_valid_ones(tmp_path):
    with pytest.raises(ConfigFileError, match=r"unknown family 'sdxl' \(valid: flux, sd3\)"):
        _book(tmp_path, FAMILY.replace('"flux"', '"sdxl"', 1))


def test_a_case_passes_its_model_family_to_the_gates():
    from quantgate.cases import Case, selector_vocabulary

    case = Case("sd35-medium", "tiny", "bf16", "eager", 1, "cpu", 2, 4.5, 64, 64, 32)
    assert case.gate_attrs("cpu")["family"] == "sd3"
    assert selector_vocabulary()["family"] == ["flux", "sd3"]


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
    book = GateBook.load(GATES_DIR, VOCABULARY)
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
