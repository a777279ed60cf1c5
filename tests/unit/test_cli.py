"""The quantgate command line."""

import json

import pytest

from quantgate.cli import main


def test_models_lists_each_model_with_its_defaults(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "flux-schnell" in out and "black-forest-labs/FLUX.1-schnell" in out and "steps=4" in out
    assert "sd35-medium" in out and "StableDiffusion3Pipeline" in out


def test_schemes_on_cpu_give_the_skip_reason(capsys):
    assert main(["schemes", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bnb-nf4 runs only on a CUDA GPU" in out and "int8-wo" in out


def test_materialize_builds_a_tiny_pipeline_and_prints_its_path(tmp_path, capsys, tiny_cache):
    assert main(["materialize", "sd35-medium", "--size", "tiny", "--cache-dir", str(tiny_cache)]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert path.startswith(str(tiny_cache))
    assert json.loads((tiny_cache / path / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"


def test_env_prints_machine_facts_as_json(capsys):
    assert main(["env"]) == 0
    assert "diffusers" in json.loads(capsys.readouterr().out)["libraries"]


def test_an_unknown_model_is_a_clear_error(capsys):
    assert main(["materialize", "flux-pro"]) == 2
    assert "unknown model 'flux-pro'; valid models: flux-dev, flux-schnell, sd35-medium" in capsys.readouterr().err


def test_help_describes_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("models", "schemes", "materialize", "env"):
        assert command in out


def test_summary_refuses_a_json_quantgate_did_not_write(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmarks": []}))
    assert main(["summary", str(other)]) == 2
    assert "not a benchmark JSON written by a quantgate run" in capsys.readouterr().err


def test_hints_name_flags_the_command_has(tmp_path, capsys):
    """A message that tells the user what to pass names a flag of the command that printed it."""
    from tests.conftest import REPO

    assert main(["regate", str(REPO / "tests" / "fixtures" / "history" / "cpu-4-steps.json"), "--gates",
                 str(tmp_path / "absent.toml")]) == 2
    assert "gates file not found (pass --gates FILE or DIRECTORY)" in capsys.readouterr().err

    # two runs from different machines: report and summary take the flag their refusal names
    a, b = REPO / "tests" / "fixtures" / "history" / "cpu-4-steps.json", \
        REPO / "tests" / "fixtures" / "history" / "h200-eager-run-a.json"
    assert main(["summary", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "--allow-mixed-machines" in err, err
    assert main(["summary", str(a), str(b), "--allow-mixed-machines"]) == 0


def test_comparing_a_run_with_itself_says_so_and_does_not_pass(capsys):
    from tests.conftest import REPO

    run = str(REPO / "tests" / "fixtures" / "history" / "cpu-4-steps.json")
    assert main(["compare", run, run]) == 2
    assert "are the same run" in capsys.readouterr().err


def test_an_unknown_plan_names_the_plans_there_are(capsys):
    assert main(["plan", "nosuch"]) == 2
    assert "unknown plan 'nosuch'; valid plans: budget-16g, merge, nightly" in capsys.readouterr().err


def test_report_summary_and_regate_work_outside_the_repository(tmp_path, monkeypatch, capsys):
    """The claims and gates they default to ship in the package (quantgate/data)."""
    from tests.conftest import REPO

    run = str(REPO / "tests" / "fixtures" / "history" / "cpu-4-steps.json")
    monkeypatch.chdir(tmp_path)
    assert main(["summary", run]) == 0
    assert main(["regate", run]) in (0, 1)  # a verdict, not a missing-file error
    assert "not found" not in capsys.readouterr().err


def test_the_cli_does_not_import_the_plugin(tmp_path):
    """The commands take what they share with the plugin from quantgate.settings: importing the
    CLI, building its parser and running a command leave quantgate.plugin unimported."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    # `cache list` reads the default cache directory, which it once took from the plugin
    code = ("import sys, contextlib, io; import quantgate.cli as cli; cli.build_parser(); "
            "contextlib.redirect_stdout(io.StringIO()).__enter__(); code = cli.main(['cache', 'list']); "
            "sys.stdout = sys.__stdout__; "
            "print(code, sorted(m for m in sys.modules if m == 'quantgate.plugin' or m.endswith('_plugin')))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "QUANTGATE_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0 []", out.stdout


def test_no_cli_module_imports_the_plugin_outside_a_pytest_hook():
    """Statically: quantgate.plugin appears in no import of src/quantgate/cli/, except inside a
    pytest_* hook (the plan command's collector, which runs inside the pytest session it starts,
    where the plugin is loaded already)."""
    import ast

    from tests.conftest import REPO

    found = []
    for path in sorted((REPO / "src" / "quantgate" / "cli").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        hooks = {id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name.startswith("pytest_")
                 for node in ast.walk(fn)}
        for node in ast.walk(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n == "quantgate.plugin" or n.startswith("quantgate.plugin.") for n in names) and id(node) not in hooks:
                found.append(f"{path.name}:{node.lineno}")
    assert not found, found
    assert not (REPO / "src" / "quantgate" / "cli.py").exists()  # the package replaces the module
