"""Bad inputs, one parametrized test per family: each ends in a usage error, a failed test or
a skip whose message names the thing to fix (file, line, key, option or name), never in a
traceback from deep inside a library.

Cases already covered elsewhere are not repeated here: tests/unit/test_gates.py (each gates
problem through ``GateBook.load``), test_plugin.py (unknown model/scheme/source options, an
incomplete ``--quantgate-path``), test_quality_store.py (missing/tampered golden images, stale
manifests), test_sources.py (missing files of a weights directory), test_lora_sources.py
(unreadable LoRA files, a LoRA for another model's layer names), test_nunchaku.py (checkpoint
names and metadata, precision/GPU gating), test_prompts.py (empty file, invalid UTF-8),
test_cli.py (``summary`` of a non-quantgate JSON).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from quantgate.cli import main
from quantgate.errors import ConfigFileError, SourceInvalid
from quantgate.models import get_model
from quantgate.models.sources import SourceContext, get_source
from quantgate.quality.golden import GoldenInvalid, GoldenMissing, load_golden, write_golden
from quantgate.results import SCHEMA_VERSION
from tests.conftest import REPO

CASE_TESTS = """
def test_case(case):
    assert case.model
"""
HISTORY = REPO / "tests" / "fixtures" / "history"


@pytest.fixture
def args(tiny_cache):
    return ["-p", "quantgate.plugin", "-p", "no:cacheprovider", f"--quantgate-cache-dir={tiny_cache}",
            f"--quantgate-gates={REPO / 'fixtures' / 'gates'}",
            f"--quantgate-prompts={REPO / 'fixtures' / 'prompts' / 'gate.txt'}"]


# -- unknown names --------------------------------------------------------------------------
# In options: tests/unit/test_plugin.py::test_bad_options_are_usage_errors. In CLI commands:


@pytest.mark.parametrize(("argv", "message"), [
    (["materialize", "sdxl", "--size", "tiny"], "unknown model 'sdxl'; valid models: flux-dev, flux-schnell, "
                                               "sd35-medium"),
    (["golden", "sdxl"], "unknown model 'sdxl'"),
    (["gptq", "calibrate", "sdxl", "--device", "cpu"], "unknown model 'sdxl'"),
    (["gptq", "calibrate", "flux-schnell", "--source", "civitai", "--device", "cpu"],
     "unknown source 'civitai'; valid sources: auto, hub, path, synthetic, tiny"),
    (["gptq", "quantize", "flux-schnell", "--scheme", "int3", "--source", "tiny", "--device", "cpu"],
     "unknown scheme 'int3'; valid schemes: "),
    (["eval", "flux-schnell", "--scheme", "int3", "--device", "cpu", "--captions", "c.txt", "--reference-dir",
      "ref", "--out", "out"], "unknown scheme 'int3'; valid schemes: "),
])
def test_an_unknown_name_given_to_the_cli_is_an_error_listing_valid_names(argv, message, tmp_path, capsys):
    code = _cli(argv, tmp_path)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err


def _cli(argv: list[str], tmp_path: Path) -> int:
    try:
        return main([*argv, "--cache-dir", str(tmp_path)] if argv[0] in ("materialize",) else argv)
    except SystemExit as exc:  # argparse rejects before quantgate sees the name
        return int(exc.code or 0)


# -- gates.toml, through a run ---------------------------------------------------------------

GATE = 'metric = "transformer_footprint_reduction"\n'


@pytest.mark.parametrize(("text", "expected"), [
    ('[[gate]]\nmetric = "transformer_footprint_reduction"\nmin = 1\nwhy = "x\n', ":4*not valid TOML"),
    ('[[gate]]\nmetric = "footprint_ratio"\nmin = 1\nwhy = "x"\n', ":1*unknown metric 'footprint_ratio'"),
    (f'[[gate]]\n{GATE}modle = "flux-dev"\nmin = 1\nwhy = "x"\n', ":1*unknown key 'modle'"),
    (f'[[gate]]\n{GATE}min = "3x"\nwhy = "x"\n', ":1*min must be a number"),
    (f'[[gate]]\n{GATE}batch = "1"\nmin = 1\nwhy = "x"\n', ":1*batch must be a int"),
    (f'[[gate]]\n{GATE}min = 4\nmax = 2\nwhy = "x"\n', ":1*no value can pass"),
    (f'[[gate]]\n{GATE}model = "flux-dev"\nmin = 3\nwhy = "a"\n\n[[gate]]\n{GATE}model = "flux-dev"\nmin = 2\n'
     'why = "b"\n', ":7*duplicates the gate at line 1"),
])
def test_a_malformed_gates_file_stops_the_run_naming_its_line(pytester, args, text, expected):
    pytester.makepyfile(CASE_TESTS)
    gates = pytester.path / "bad-gates.toml"
    gates.write_text(text)
    result = pytester.runpytest(*args, f"--quantgate-gates={gates}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{gates.name}{expected}*"])  # the path as the run names it
    assert "Traceback" not in result.stderr.str()


# -- golden images and their manifest --------------------------------------------------------

SETTINGS = {"num_inference_steps": 4, "weights": "seed 0"}
PAIRS = [("a red fox", 0), ("a blue car", 1)]


def _damage_golden(directory: Path, how: str) -> None:
    manifest = directory / "manifest.json"
    image = directory / "01-seed1.png"
    if how == "no directory":
        shutil.rmtree(directory)
    elif how == "manifest deleted":
        manifest.unlink()
    elif how == "manifest truncated":
        manifest.write_bytes(manifest.read_bytes()[:40])
    elif how == "manifest not an object":
        manifest.write_text("[]")
    elif how == "manifest of a future format":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": 99}))
    elif how == "image entry without a hash":
        data = json.loads(manifest.read_text())
        del data["images"][1]["sha256"]
        manifest.write_text(json.dumps(data))
    elif how == "image deleted":
        image.unlink()
    elif how == "image truncated":
        image.write_bytes(image.read_bytes()[:-20])
    elif how == "image replaced, same size":
        data = bytearray(image.read_bytes())
        data[-30] ^= 0xFF
        image.write_bytes(bytes(data))


@pytest.mark.parametrize(("how", "error", "message"), [
    ("no directory", GoldenMissing, "no golden images for flux-schnell/tiny in .*quantgate golden flux-schnell"),
    ("manifest deleted", GoldenMissing, "no golden images for flux-schnell/tiny"),
    ("manifest truncated", GoldenInvalid, "manifest.json is unreadable .*quantgate golden flux-schnell"),
    ("manifest not an object", GoldenInvalid, "manifest.json is not a golden manifest"),
    ("manifest of a future format", GoldenInvalid, "manifest.json has format 99, expected 1: create them"),
    ("image entry without a hash", GoldenInvalid, "malformed image entry \\(KeyError: 'sha256'\\)"),
    ("image deleted", GoldenInvalid, "01-seed1.png is listed in manifest.json but missing"),
    ("image truncated", GoldenInvalid, "01-seed1.png does not match the sha256 in manifest.json"),
    ("image replaced, same size", GoldenInvalid, "01-seed1.png does not match the sha256 in manifest.json"),
])
def test_a_missing_or_damaged_golden_set_is_refused_naming_the_file(tmp_path, how, error, message):
    images = np.random.default_rng(0).random((2, 16, 16, 3))
    entries = [(p, s, im) for (p, s), im in zip(PAIRS, images, strict=True)]
    write_golden(tmp_path, "flux-schnell", "tiny", SETTINGS, entries, {})
    _damage_golden(tmp_path / "flux-schnell" / "tiny", how)
    with pytest.raises(error, match=message):
        load_golden(tmp_path, "flux-schnell", "tiny", SETTINGS, PAIRS)


# -- weights directories -----------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _first(directory: Path, pattern: str) -> Path:
    return sorted(directory.glob(pattern))[0]


def _damage_weights(flux: Path, sd3: Path, how: str) -> None:
    index = flux / "model_index.json"
    if how == "pipeline class of the other family":
        index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusion3Pipeline"}))
    elif how == "component class of the other family":
        data = json.loads(index.read_text())
        index.write_text(json.dumps({**data, "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    elif how == "transformer config of the other family":
        (flux / "transformer" / "config.json").write_bytes((sd3 / "transformer" / "config.json").read_bytes())
    elif how == "scheduler config of another class":
        config = flux / "scheduler" / "scheduler_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "DDIMScheduler"}))
    elif how == "component directory missing":
        shutil.rmtree(flux / "vae")
    elif how == "safetensors missing":
        for f in (flux / "vae").glob("*.safetensors"):
            f.unlink()
    elif how == "only pickle weights":
        for f in (flux / "vae").glob("*.safetensors"):
            f.unlink()
        torch.save({"w": torch.zeros(1)}, flux / "vae" / "diffusion_pytorch_model.bin")
    elif how == "safetensors truncated":
        _truncate(_first(flux / "transformer", "*.safetensors"))
    elif how == "safetensors header cut":
        f = _first(flux / "text_encoder", "*.safetensors")
        f.write_bytes(f.read_bytes()[:20])
    elif how == "not a safetensors file":
        _first(flux / "vae", "*.safetensors").write_bytes(b"\x80\x04K\x01." + b"\0" * 64)


@pytest.mark.parametrize(("how", "message"), [
    ("pipeline class of the other family", "model_index.json names pipeline 'StableDiffusion3Pipeline', but "
                                           "flux-schnell is a FluxPipeline"),
    ("component class of the other family", "model_index.json makes transformer a SD3Transformer2DModel, but "
                                            "flux-schnell needs a FluxTransformer2DModel"),
    ("transformer config of the other family", "transformer/config.json is a SD3Transformer2DModel config, but "
                                               "transformer must be a FluxTransformer2DModel"),
    ("scheduler config of another class", "scheduler_config.json is a DDIMScheduler config"),
    ("component directory missing", "vae is missing"),
    ("safetensors missing", "vae has no \\*.safetensors weights"),
    ("only pickle weights", "holds only pickle weights \\(diffusion_pytorch_model.bin\\); quantgate loads "
                            "safetensors only"),
    ("safetensors truncated", "transformer/diffusion_pytorch_model.safetensors is truncated: \\d+ bytes, its "
                              "header describes \\d+"),
    ("safetensors header cut", "text_encoder/model.safetensors is not a safetensors file or is truncated"),
    ("not a safetensors file", "vae/diffusion_pytorch_model.safetensors is not a safetensors file"),
])
def test_a_broken_weights_directory_is_a_usage_error_naming_the_file(tmp_path, tiny_flux_dir, tiny_sd3_dir,
                                                                    how, message):
    flux = tmp_path / "flux"
    shutil.copytree(tiny_flux_dir, flux)
    _damage_weights(flux, tiny_sd3_dir, how)
    ctx = SourceContext(cache_dir=tmp_path / "qg", paths={"flux-schnell": flux})
    with pytest.raises(SourceInvalid, match=f"--quantgate-path flux-schnell={flux} is not a usable FluxPipeline "
                                            f"directory: .*{message}"):
        get_source("path").resolve(get_model("flux-schnell"), ctx, "cpu")


def test_the_other_familys_whole_directory_is_refused(tmp_path, tiny_sd3_dir):
    ctx = SourceContext(cache_dir=tmp_path, paths={"flux-schnell": tiny_sd3_dir})
    with pytest.raises(SourceInvalid, match="names pipeline 'StableDiffusion3Pipeline', but flux-schnell is a "
                                            "FluxPipeline"):
        get_source("path").resolve(get_model("flux-schnell"), ctx, "cpu")


def test_a_truncated_weights_file_stops_the_run_before_loading(pytester, args, tmp_path, tiny_flux_dir):
    flux = tmp_path / "flux"
    shutil.copytree(tiny_flux_dir, flux)
    _truncate(_first(flux / "transformer", "*.safetensors"))
    pytester.makepyfile(CASE_TESTS)
    result = pytester.runpytest(*args, "--quantgate-source=path", "--quantgate-models=flux-schnell",
                                f"--quantgate-path=flux-schnell={flux}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*transformer/diffusion_pytorch_model.safetensors is truncated*"])


# -- LoRA files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_adapters(tiny_flux_dir):
    from diffusers import FluxPipeline

    from quantgate.lora import Adapters
    from quantgate.schemes import get_scheme

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True, use_safetensors=True,
                                        dtype=torch.bfloat16)
    made = Adapters(pipe, "transformer", get_scheme("bf16"), "flux-schnell")
    yield made
    made.close()


def test_a_lora_made_for_the_other_model_family_is_a_mismatch(tmp_path, tiny_sd3_dir, flux_adapters):
    from quantgate.lora import LoraMismatch, SyntheticLoraRecipe, make_synthetic_lora

    sd3_lora = make_synthetic_lora(get_model("sd35-medium"), tiny_sd3_dir, tmp_path, SyntheticLoraRecipe(rank=4))
    with pytest.raises(LoraMismatch, match=f"LoRA {sd3_lora.path} .* (does not fit|holds no weights for) "
                                           "flux-schnell's transformer"):
        flux_adapters.load(sd3_lora)


def test_a_lora_whose_widths_differ_from_the_model_is_a_mismatch_naming_the_layer(tmp_path, tiny_flux_dir,
                                                                                   flux_adapters):
    from safetensors.torch import load_file, save_file

    from quantgate.lora import LoraMismatch, SyntheticLoraRecipe, make_synthetic_lora

    lora = make_synthetic_lora(get_model("flux-schnell"), tiny_flux_dir, tmp_path, SyntheticLoraRecipe(rank=4))
    tensors = load_file(str(lora.path))
    key = sorted(k for k in tensors if ".lora_A." in k)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8, dtype=tensors[key].dtype)
    save_file(tensors, str(lora.path))
    layer = key.split(".", 1)[1].split(".lora_A.")[0]
    with pytest.raises(LoraMismatch, match=f"{layer} takes \\d+ inputs, its lora_A has \\d+ columns"):
        flux_adapters.load(lora)


# -- nunchaku checkpoints -------------------------------------------------------------------------


def _nunchaku_file(directory: Path, name: str, dtype: str | None = None) -> Path:
    from safetensors.torch import save_file

    path = directory / name
    config = {"weight": {"dtype": dtype}} if dtype else None
    save_file({"x": torch.zeros(2)}, str(path),
              metadata={"quantization_config": json.dumps(config)} if config else None)
    return path


@pytest.mark.parametrize(("name", "dtype", "precision", "message"), [
    ("svdq-int4_r32-flux.1-dev.safetensors", None, "int4",
     "is a checkpoint of flux.1-dev, not of flux-schnell \\(flux.1-schnell\\): point it at "
     "svdq-int4_r<rank>-flux.1-schnell.safetensors"),
    ("svdq-fp4_r32-flux.1-schnell.safetensors", None, "int4", "is a nvfp4 checkpoint, not int4"),
    ("svdq-int4_r32-flux.1-schnell.safetensors", "fp4_e2m1_all", "int4",
     "holds weights of dtype 'fp4_e2m1_all' by its metadata, not int4"),
    ("transformer.safetensors", None, "int4", "is not named svdq-\\{int4\\|fp4\\}_r\\{rank\\}-\\{model\\}"),
])
def test_a_nunchaku_checkpoint_that_does_not_match_is_a_reason_not_a_load(tmp_path, monkeypatch, name, dtype,
                                                                         precision, message):
    from quantgate.schemes import nunchaku as nk

    path = _nunchaku_file(tmp_path, name, dtype)
    monkeypatch.setenv(nk.ENV_CHECKPOINT, str(path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    found = nk.locate(get_model("flux-schnell"), precision)
    assert isinstance(found, str)
    assert __import__("re").search(message, found), found


def test_a_configured_directory_whose_checkpoint_contradicts_its_name_is_a_reason(tmp_path, monkeypatch):
    from quantgate.schemes import nunchaku as nk

    _nunchaku_file(tmp_path, "svdq-int4_r32-flux.1-schnell.safetensors", "fp4_e2m1_all")
    monkeypatch.setenv(nk.ENV_CHECKPOINT, str(tmp_path))
    found = nk.locate(get_model("flux-schnell"), "int4")
    assert isinstance(found, str) and "by its metadata, not int4" in found


@pytest.mark.parametrize(("scheme", "gpu", "capability", "message"), [
    ("svdq-int4", "NVIDIA H200", (9, 0), "svdq-int4 needs compute capability sm_75, sm_80, sm_86 or sm_89; "
                                         "NVIDIA H200 is sm_90"),
    ("svdq-nvfp4", "NVIDIA A100-SXM4-80GB", (8, 0), "svdq-nvfp4 needs compute capability sm_120 or sm_121; "
                                                    "NVIDIA A100-SXM4-80GB is sm_80"),
])
def test_a_nunchaku_precision_the_gpu_cannot_run_is_a_skip_naming_both(scheme, gpu, capability, message):
    from quantgate.hardware import DeviceInfo
    from quantgate.schemes import get_scheme

    reason = get_scheme(scheme).requires.unmet(scheme, DeviceInfo("cuda", gpu, capability), "flux-schnell")
    assert reason is not None and reason.startswith(message)


# -- benchmark JSON from elsewhere ----------------------------------------------------------------


def _foreign_json(path: Path, how: str) -> Path:
    good = json.loads((HISTORY / "cpu-4-steps.json").read_text())
    if how == "empty file":
        path.write_bytes(b"")
    elif how == "not JSON":
        path.write_text("<html>benchmark</html>\n")
    elif how == "not UTF-8":
        path.write_bytes(b"\xff\xfe{\x00}\x00")
    elif how == "JSON of another tool":
        path.write_text(json.dumps([{"name": "resnet", "time": 1.0}]))
    elif how == "pytest-benchmark without quantgate":
        path.write_text(json.dumps({k: v for k, v in good.items() if k != "quantgate"}))
    elif how == "newer quantgate schema":
        path.write_text(json.dumps({**good, "quantgate": {**good["quantgate"], "schema": SCHEMA_VERSION + 1,
                                                          "version": "9.0.0"}}))
    return path


FOREIGN = [
    ("empty file", "is empty, not a benchmark JSON"),
    ("not JSON", ":1: not valid JSON (Expecting value)"),
    ("not UTF-8", "not a JSON file (not UTF-8 text"),
    ("JSON of another tool", "not a pytest-benchmark JSON (no 'benchmarks' list)"),
    ("pytest-benchmark without quantgate", "without a 'quantgate' section: not a benchmark JSON written by a "
                                           "quantgate run"),
    ("newer quantgate schema", f"written by quantgate 9.0.0 with result schema {SCHEMA_VERSION + 1}; this "
                               f"quantgate (0.1.0) reads schema {SCHEMA_VERSION} and older"),
]


@pytest.mark.parametrize("command", ["report", "summary", "compare", "merge"])
@pytest.mark.parametrize(("how", "message"), FOREIGN)
def test_a_benchmark_json_quantgate_cannot_read_is_refused_by_name(tmp_path, capsys, command, how, message):
    bad = _foreign_json(tmp_path / "other.json", how)
    good = str(HISTORY / "cpu-4-steps.json")
    argv = {"report": ["report", str(bad), "-o", str(tmp_path / "out")],
            "summary": ["summary", str(bad)],
            "compare": ["compare", good, str(bad)],
            "merge": ["merge", good, str(bad), "-o", str(tmp_path / "merged.json")]}[command]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"quantgate: error: {bad}" in err and message in err, err
    assert not (tmp_path / "merged.json").exists() and not (tmp_path / "out").exists()


def test_an_older_json_without_a_schema_field_still_reads():
    from quantgate.results import load_benchmark_json

    data = load_benchmark_json(HISTORY / "cpu-4-steps.json")
    assert "schema" not in data["quantgate"] and data["benchmarks"]


# -- prompt files ---------------------------------------------------------------------------------

PROMPT_TEST = """
def test_prompts(prompts):
    assert prompts.take(1)
"""


@pytest.mark.parametrize(("content", "message"), [
    (b"", "holds no prompts (one per line; '#' lines are comments)"),
    (b"# only\n  # comments\n\n", "holds no prompts (one per line; '#' lines are comments)"),
    (b"a red fox\n\xff\xfe broken\n", ":2: not valid UTF-8 (invalid start byte at byte 10)"),
])
@pytest.mark.parametrize("option", ["prompts", "calibration-prompts"])
def test_a_prompt_file_without_usable_prompts_stops_the_run_naming_it(pytester, args, content, message, option):
    pytester.makepyfile(PROMPT_TEST)
    path = pytester.path / "prompts.txt"
    path.write_bytes(content)
    result = pytester.runpytest(*args, f"--quantgate-{option}={path}")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, output
    assert f"{path}{message}" in output or f"{path}: {message}" in output, output
    assert "Traceback" not in output


def test_a_missing_prompt_file_says_which_option_to_pass(tmp_path):
    from quantgate.prompts import PromptSet

    with pytest.raises(ConfigFileError, match="prompt file not found \\(pass --quantgate-prompts FILE\\)"):
        PromptSet.load(tmp_path / "absent.txt")


# -- mistakes found before the first test, not after the last -------------------------------------

def test_a_golden_update_without_its_bf16_cases_is_a_usage_error(pytester, args):
    pytester.makepyfile(CASE_TESTS)
    result = pytester.runpytest(*args, "-m", "cpu or not (cpu or gpu)", "--quantgate-models=flux-schnell",
                                "--quantgate-schemes=int8-wo", "--quantgate-update-golden")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--quantgate-update-golden writes the golden images from the bf16 eager cases*"])


@pytest.mark.parametrize(("target", "message"), [
    ("a-directory", "is a directory; give a file name, e.g. "),
    ("missing/out.json", "does not exist; create it first (mkdir -p "),
])
def test_a_benchmark_json_that_cannot_be_written_stops_the_run_before_the_first_test(pytester, args, target, message):
    pytester.makepyfile(CASE_TESTS)
    (pytester.path / "a-directory").mkdir()
    result = pytester.runpytest(*args, "-m", "cpu or not (cpu or gpu)", "--quantgate-models=flux-schnell",
                                "--quantgate-schemes=bf16", f"--benchmark-json={pytester.path / target}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--benchmark-json: *{message}*"])
    result.stdout.no_fnmatch_line("*passed*")
