"""quantgate.settings: what the plugin and the CLI build the same way (cache dir, device,
resolution, calibration settings, golden settings)."""

from pathlib import Path

import pytest

from quantgate.errors import ConfigFileError, OptionValueError, QuantgateError
from quantgate.settings import (
    cache_dir,
    calibration_counts,
    calibration_settings,
    default_cache_dir,
    default_device,
    golden_settings,
    parse_resolution,
)

# -- resolution -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("512", (512, 512)), ("16", (16, 16)), ("768x1024", (768, 1024)), ("768X1024", (768, 1024)),
    (" 512 ", (512, 512)),  # int() strips blanks
])
def test_resolution_is_n_or_hxw(value, expected):
    assert parse_resolution(value) == expected


@pytest.mark.parametrize("value", ["", "x", "abc", "500", "0", "-16", "512x", "x512", "512x512x512", "512*512",
                                   "512.0", "512x500", "1e3"])
def test_a_bad_resolution_names_the_option_and_the_value(value):
    with pytest.raises(OptionValueError) as info:
        parse_resolution(value)
    assert str(info.value) == f"--quantgate-resolution must be N or HxW with multiples of 16, got {value!r}"
    assert isinstance(info.value, QuantgateError) and isinstance(info.value, ValueError)


def test_the_cli_names_its_own_flag():
    with pytest.raises(OptionValueError, match=r"^--resolution must be N or HxW with multiples of 16, got '100'$"):
        parse_resolution("100", "--resolution")


@pytest.mark.parametrize("value", [None, "512", "768x1024", "500", "abc", "512x512x512", "0"])
def test_resolution_matches_the_plugin_s_own_parser(value):
    """The plugin's option reader wraps this parser: same result, same message as a usage error."""
    from quantgate.plugin import options as plugin

    theirs = plugin._resolution
    try:
        expected = theirs(value)
    except pytest.UsageError as exc:
        with pytest.raises(OptionValueError) as info:
            parse_resolution(value)
        assert str(info.value) == str(exc)
    else:
        assert parse_resolution(value) == expected


# -- cache directory --------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTGATE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_cache_dir_defaults_to_the_home_cache(home):
    assert default_cache_dir() == home / ".cache" / "quantgate"


def test_xdg_cache_home_comes_before_home(home, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "quantgate"


def test_quantgate_cache_dir_comes_first_and_is_taken_as_is(home, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", "~/qg")
    assert default_cache_dir() == home / "qg"  # no "quantgate" appended; ~ expanded


def test_empty_variables_count_as_unset(home, monkeypatch):
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert default_cache_dir() == home / ".cache" / "quantgate"


def test_an_option_wins_over_the_environment(home, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir(str(tmp_path / "given")) == tmp_path / "given"
    assert cache_dir("~/given") == home / "given"
    assert cache_dir(None) == cache_dir("") == tmp_path / "env"


def test_cache_dir_matches_the_plugin_s(home, tmp_path, monkeypatch):
    from quantgate import plugin

    for env in ({}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {"QUANTGATE_CACHE_DIR": str(tmp_path / "q")}):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert default_cache_dir() == plugin.default_cache_dir()


# -- device -----------------------------------------------------------------------------------


def test_a_given_device_is_kept(monkeypatch):
    monkeypatch.setattr("quantgate.hardware.cuda_available", lambda: False)
    assert default_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize(("cuda", "expected"), [(True, "cuda"), (False, "cpu")])
def test_the_default_device_is_cuda_where_there_is_one(monkeypatch, cuda, expected):
    monkeypatch.setattr("quantgate.hardware.cuda_available", lambda: cuda)
    assert default_device(None) == default_device("") == expected


# -- calibration ------------------------------------------------------------------------------


@pytest.mark.parametrize(("samples", "gpu", "given", "expected"), [
    (None, None, True, {}),  # the defaults: 256 on a GPU, 16 on the CPU
    (8, None, True, {"samples": 8, "cpu_samples": 8}),  # --samples / --quantgate-calibration-samples: both tiers
    (8, None, False, {"samples": 8, "cpu_samples": 8}),  # a plan's count alone sets both too
    (None, 64, True, {"samples": 64}),  # --quantgate-gpu-calibration-samples: the GPU only
    (8, 64, True, {"samples": 8, "cpu_samples": 8}),  # the user's count wins over a plan's GPU count
    (8, 64, False, {"samples": 64, "cpu_samples": 8}),  # both from the plan: each keeps its tier
])
def test_calibration_counts(samples, gpu, given, expected):
    assert calibration_counts(samples, gpu, samples_given=given) == expected


def test_calibration_settings_read_the_prompts_and_apply_the_counts(tmp_path):
    prompts = tmp_path / "calibration.txt"
    prompts.write_text("# a comment\na red cube\n\na blue sphere\n")
    settings = calibration_settings(prompts, seed=3, samples=5)
    assert settings.prompts == ("a red cube", "a blue sphere")
    assert (settings.samples, settings.cpu_samples, settings.seed) == (5, 5, 3)
    assert settings.prompts_file == str(prompts)
    assert settings.for_device("cpu", {}).sample_prompts() == ["a red cube", "a blue sphere"] * 2 + ["a red cube"]


def test_calibration_settings_default_counts(tmp_path):
    from quantgate.quant.calibration import CalibrationSettings

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    settings = calibration_settings(prompts)
    default = CalibrationSettings(("a",))
    assert (settings.samples, settings.cpu_samples, settings.seed) == (default.samples, default.cpu_samples, 0)


def test_a_required_prompt_file_that_is_missing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigFileError, match="prompt file not found"):
        calibration_settings(tmp_path / "absent.txt")


def test_an_optional_prompt_file_that_is_missing_gives_no_prompts(tmp_path):
    settings = calibration_settings(tmp_path / "absent.txt", required=False)
    assert settings.prompts == ()
    with pytest.raises(ValueError, match="calibration needs at least one prompt"):
        settings.sample_prompts()


@pytest.mark.parametrize("given", [
    {},
    {"calibration_samples": "7", "seed": "2"},
    {"gpu_calibration_samples": "64"},
    {"gpu_calibration_samples": "64", "calibration_samples": "7"},
])
def test_calibration_settings_match_the_plugin_s(pytestconfig, monkeypatch, tmp_path, given):
    """The plugin's own _calibration, on this session's config (and its plan, whose GPU count
    applies where no option overrides it) with these options, gives equal settings: equal cache keys."""
    from quantgate import options
    from quantgate.plugin import options as plugin

    prompts = tmp_path / "calibration.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    monkeypatch.setattr(pytestconfig.option, "quantgate_calibration_prompts", str(prompts))
    for name in ("calibration_samples", "gpu_calibration_samples", "seed"):
        monkeypatch.setattr(pytestconfig.option, f"quantgate_{name}", given.get(name))

    def number(name):
        value = options.value(pytestconfig, name)
        return None if value is None else int(value)

    ours = calibration_settings(prompts, seed=number("seed") or 0, samples=number("calibration-samples"),
                                gpu_samples=number("gpu-calibration-samples"),
                                samples_given=options.given(pytestconfig, "calibration-samples") is not None)
    assert ours == plugin._calibration(pytestconfig)


# -- golden settings --------------------------------------------------------------------------


def test_golden_settings_are_bf16_the_call_arguments_and_the_weights():
    from quantgate.cases import Selection, make_case
    from quantgate.models import get_model

    spec = get_model("sd35-medium")
    case = make_case(spec, "tiny", "int8-wo", "eager", 1, "cpu", Selection(models=[spec.name], schemes=["int8-wo"]))
    settings = golden_settings(case, "tiny:abc123")
    assert settings == {"scheme": "bf16", **case.call_kwargs(), "weights": "tiny:abc123"}
    assert list(settings)[0] == "scheme" and list(settings)[-1] == "weights"


def test_settings_imports_neither_torch_nor_the_plugin():
    import subprocess
    import sys

    code = ("import sys, quantgate.settings; "
            "print(sorted(m for m in ('torch', 'pytest', 'quantgate.plugin') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")})
    assert out.stdout.strip() == "[]", out.stderr
