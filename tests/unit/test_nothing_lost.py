"""Nothing lost: each real writer of quantgate, killed (SIGKILL, SIGINT) in the middle of
replacing a file, leaves the previous version whole and loadable, and no partial file under
the real name.

The kill is deterministic: the child process replaces ``os.fsync`` (and, for eviction,
``shutil.rmtree``) with a function that creates an event file and blocks. quantgate's atomic
writers call ``fsync`` after writing the new content to a temporary name and before renaming it
into place, so the child is then inside the write; the parent waits for the event file, then
sends the signal. A writer that wrote straight to the real name would either never reach the
hook (the child finishes: the test fails saying so) or be caught with its new content under
the real name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO

HISTORY = REPO / "tests" / "fixtures" / "history"

CHILD = """
import os, shutil, signal, sys, time
from pathlib import Path

# Ctrl-C as a user's terminal delivers it, whatever the parent ignores: a shell's background
# job (cmd &) starts with SIGINT ignored, and the child would inherit that and never stop.
signal.signal(signal.SIGINT, signal.default_int_handler)

event = Path(sys.argv[1])

def block(*args, **kwargs):
    event.write_text(str(os.getpid()))  # we are inside the write
    while True:
        time.sleep(60)

os.fsync = block
if {block_rmtree}:
    shutil.rmtree = block
work = Path(sys.argv[2])
"""

def _spawn(body: str, work: Path, block_rmtree: bool = False) -> tuple[subprocess.Popen, Path]:
    event = work / "inside-the-write.event"
    code = CHILD.format(block_rmtree=block_rmtree) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code, str(event), str(work)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return child, event


def _kill_inside_the_write(body: str, work: Path, sig: int, block_rmtree: bool = False) -> None:
    child, event = _spawn(body, work, block_rmtree)
    deadline = time.monotonic() + 300  # a safety net for a broken child, not a timing guess
    while not event.exists():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"the writer finished (rc {child.returncode}) without reaching an atomic commit point: "
                        f"it does not write through quantgate.atomic\n{err.decode()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the writer never reached its write")
        time.sleep(0.05)
    child.send_signal(sig)
    child.communicate(timeout=60)
    assert child.returncode != 0  # it died inside the write, it did not finish it
    event.unlink()


def _visible(root: Path) -> set[str]:
    """Every path under ``root`` (relative) whose name is not a hidden temporary/trash name,
    nor an (empty) advisory lock file a writer takes before it builds an entry."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in [*dirnames, *filenames]:
            if not name.startswith(".") and not name.endswith(".lock"):
                found.add(str((Path(dirpath) / name).relative_to(root)))
    return found


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.name != ".lock")


SIGNALS = [pytest.param(signal.SIGKILL, id="SIGKILL"), pytest.param(signal.SIGINT, id="SIGINT")]


# -- one test per writer family, each parametrized over both signals -------------------------------


@pytest.mark.parametrize("sig", SIGNALS)
def test_calibration_cache_entry(tmp_path, sig):
    from quantgate.quant.calibration import StatsCache

    v1 = {"blocks.0.attn.to_q": {"absmax": torch.arange(64, dtype=torch.float32)}}
    StatsCache(tmp_path / "calibration").save("k", v1, {"version": 1})
    before = _visible(tmp_path)
    _kill_inside_the_write("""
        import torch
        from quantgate.quant.calibration import StatsCache
        v2 = {"blocks.0.attn.to_q": {"absmax": torch.zeros(1 << 20)}}
        StatsCache(work / "calibration").save("k", v2, {"version": 2})
    """, tmp_path, sig)
    loaded = StatsCache(tmp_path / "calibration").load("k")
    assert loaded is not None
    assert torch.equal(loaded["blocks.0.attn.to_q"]["absmax"], v1["blocks.0.attn.to_q"]["absmax"])
    assert json.loads((tmp_path / "calibration" / "k.json").read_text()) == {"version": 1}
    assert _visible(tmp_path) == before
    if sig == signal.SIGINT:  # the interrupted writer removed its temporary file
        assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", SIGNALS)
def test_synthetic_weights(tmp_path, sig):
    from quantgate.models import get_model
    from quantgate.models.sources import pipeline_dir_problems
    from quantgate.models.synthetic import materialize

    spec = get_model("flux-schnell")
    previous = materialize(spec, "tiny", tmp_path / "cache", seed=0, progress=False)
    before = _visible(tmp_path)
    _kill_inside_the_write("""
        from quantgate.models import get_model
        from quantgate.models.synthetic import materialize
        materialize(get_model("flux-schnell"), "tiny", work / "cache", seed=7, progress=False)
    """, tmp_path, sig)
    assert pipeline_dir_problems(previous, spec) == []
    assert materialize(spec, "tiny", tmp_path / "cache", seed=0, progress=False) == previous  # reused, not rebuilt
    assert _visible(tmp_path) == before  # the killed build left nothing under a real name
    if sig == signal.SIGINT:
        assert _leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("sig", SIGNALS)
def test_golden_set(tmp_path, sig):
    from quantgate.quality.golden import load_golden, write_golden

    settings, pairs = {"num_inference_steps": 4}, [("a red fox", 0), ("a blue car", 1)]
    images = np.random.default_rng(0).random((2, 16, 16, 3))
    write_golden(tmp_path, "flux-schnell", "tiny", settings,
                 [(p, s, im) for (p, s), im in zip(pairs, images, strict=True)], {"v": 1})
    before = _visible(tmp_path)
    _kill_inside_the_write("""
        import numpy as np
        from quantgate.quality.golden import write_golden
        images = np.random.default_rng(1).random((2, 16, 16, 3))
        write_golden(work, "flux-schnell", "tiny", {"num_inference_steps": 4},
                     [("a red fox", 0, images[0]), ("a blue car", 1, images[1])], {"v": 2})
    """, tmp_path, sig)
    golden = load_golden(tmp_path, "flux-schnell", "tiny", settings, pairs)  # verifies every sha256
    assert golden.manifest["v"] == 1
    assert np.abs(golden.array(1) - images[1]).max() <= 0.5 / 255 + 1e-6
    assert _visible(tmp_path) == before


@pytest.mark.parametrize("sig", SIGNALS)
def test_report(tmp_path, sig):
    from quantgate.cli import main

    run = HISTORY / "cpu-4-steps.json"
    assert main(["report", str(run), "-o", str(tmp_path / "out"), "--title", "version one",
                 "--claims", str(REPO / "fixtures" / "claims.toml")]) == 0
    previous = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    _kill_inside_the_write(f"""
        from quantgate.cli import main
        main(["report", {str(run)!r}, "-o", str(work / "out"), "--title", "version two",
              "--claims", {str(REPO / "fixtures" / "claims.toml")!r}])
    """, tmp_path, sig)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")} == previous
    assert b"version one" in previous["report.html"]


@pytest.mark.parametrize("sig", SIGNALS)
def test_merged_benchmark_json(tmp_path, sig):
    from quantgate.cli import main
    from quantgate.results import load_benchmark_json

    a, b = HISTORY / "cpu-4-steps.json", HISTORY / "cpu-48-steps.json"
    out = tmp_path / "merged.json"
    assert main(["merge", str(a), str(b), "-o", str(out), "--allow-mixed-machines"]) == 0
    previous = out.read_bytes()
    _kill_inside_the_write(f"""
        from quantgate.cli import main
        main(["merge", {str(b)!r}, {str(a)!r}, "-o", str(work / "merged.json"), "--allow-mixed-machines"])
    """, tmp_path, sig)
    assert out.read_bytes() == previous
    assert load_benchmark_json(out)["quantgate"]["parts"][0]["file"] == a.name
    assert _visible(tmp_path) == {"merged.json"}


BENCH_TEST = """
def test_timed(benchmark):
    benchmark(sum, range(10))
"""


@pytest.mark.parametrize("how", ["--benchmark-json", "--benchmark-save"])
@pytest.mark.parametrize("sig", SIGNALS)
def test_pytest_benchmark_files_through_quantgate(tmp_path, sig, how):
    """pytest-benchmark writes its files in place; with quantgate loaded the writes are atomic."""
    (tmp_path / "test_timed.py").write_text(BENCH_TEST)
    out, storage = tmp_path / "bench.json", tmp_path / "storage"
    out.write_text('{"previous": true}\n')
    from pytest_benchmark.utils import get_machine_id

    saved = storage / get_machine_id() / "0001_previous.json"
    saved.parent.mkdir(parents=True)
    saved.write_text('{"previous": true}\n')
    target = [how, str(out)] if how == "--benchmark-json" else [how, "next", "--benchmark-storage", str(storage)]
    _kill_inside_the_write(f"""
        import pytest
        sys.exit(pytest.main([{str(tmp_path / "test_timed.py")!r}, "-q", "-p", "no:cacheprovider", "-p",
                              "quantgate.plugin.benchmark_files", *{target!r}, "--rootdir", str(work)]))
    """, tmp_path, sig)
    assert json.loads(out.read_text()) == {"previous": True}
    assert json.loads(saved.read_text()) == {"previous": True}
    assert {p for p in _visible(tmp_path) if not p.startswith("__pycache__")} == {
        "test_timed.py", "bench.json", "storage", str(saved.parent.relative_to(tmp_path)),
        str(saved.relative_to(tmp_path))}


@pytest.mark.parametrize("sig", SIGNALS)
def test_synthetic_nunchaku_lora(tmp_path, sig):
    from safetensors.torch import load_file

    from quantgate.nunchaku_lora import write_synthetic_lora
    from tests.unit.test_nunchaku import _tiny_config

    path = write_synthetic_lora(tmp_path / "lora.safetensors", _tiny_config(), rank=4, seed=0)
    previous = load_file(path)
    _kill_inside_the_write("""
        from quantgate.nunchaku_lora import write_synthetic_lora
        from tests.unit.test_nunchaku import _tiny_config
        write_synthetic_lora(work / "lora.safetensors", _tiny_config(), rank=64, seed=1)
    """, tmp_path, sig)
    again = load_file(path)
    assert again.keys() == previous.keys() and all(torch.equal(again[k], previous[k]) for k in again)
    assert _visible(tmp_path) == {"lora.safetensors"}


@pytest.mark.parametrize("sig", SIGNALS)
def test_cache_eviction(tmp_path, sig):
    """Deleting an entry renames it away first: a killed eviction never leaves half an entry."""
    entry = tmp_path / "pipelines" / "flux-schnell-tiny-abc"
    (entry / "transformer").mkdir(parents=True)
    (entry / "transformer" / "weights.safetensors").write_bytes(b"\0" * 1024)
    (entry / "model_index.json").write_text("{}")
    _kill_inside_the_write("""
        from quantgate.atomic import remove_tree
        remove_tree(work / "pipelines" / "flux-schnell-tiny-abc")
    """, tmp_path, sig, block_rmtree=True)
    assert not entry.exists()  # gone as a whole under its name
    trash = [p.name for p in (tmp_path / "pipelines").iterdir()]
    assert len(trash) == 1 and trash[0].startswith(".trash-flux-schnell-tiny-abc-")  # `quantgate cache clear` takes it


QUANTIZE = """
import types
import torch
from quantgate.quant.w4a8_model import W4A8Method, quantize_denoiser

def quantize(cache, model_seed):
    torch.manual_seed(model_seed)
    block = torch.nn.Module()
    block.ff = torch.nn.Linear(64, 64, dtype=torch.bfloat16)
    denoiser = torch.nn.Module()
    denoiser.transformer_blocks = torch.nn.ModuleList([block])
    pipe = types.SimpleNamespace(transformer=denoiser)
    return quantize_denoiser(pipe, "transformer", W4A8Method("rtn"), identity={"weights": model_seed},
                             cache_dir=cache, settings=None, progress=False)
"""


@pytest.mark.parametrize("sig", SIGNALS)
def test_quantized_checkpoint(tmp_path, sig):
    from quantgate.quant.w4a8 import load_layers

    namespace: dict = {}
    exec(QUANTIZE, namespace)  # the same helper the child runs
    facts = namespace["quantize"](tmp_path / "cache", 0)
    previous = Path(facts["checkpoint_path"])
    before = _visible(tmp_path)
    _kill_inside_the_write(QUANTIZE + """
quantize(work / "cache", 1)
""", tmp_path, sig)
    layers, config = load_layers(previous)
    assert set(layers) == {"transformer_blocks.0.ff"} and config["identity"] == {"weights": 0}
    assert namespace["quantize"](tmp_path / "cache", 0)["checkpoint"] == "hit"
    assert _visible(tmp_path) == before


@pytest.mark.parametrize("sig", SIGNALS)
def test_synthetic_diffusers_lora(tmp_path, tiny_flux_dir, sig):
    from safetensors.torch import load_file

    from quantgate.lora import SyntheticLoraRecipe, make_synthetic_lora
    from quantgate.models import get_model

    spec = get_model("flux-schnell")
    previous = make_synthetic_lora(spec, tiny_flux_dir, tmp_path, SyntheticLoraRecipe(seed=0, rank=4))
    tensors = load_file(previous.path)
    before = _visible(tmp_path)
    _kill_inside_the_write(f"""
        from quantgate.lora import SyntheticLoraRecipe, make_synthetic_lora
        from quantgate.models import get_model
        make_synthetic_lora(get_model("flux-schnell"), {str(tiny_flux_dir)!r}, work,
                            SyntheticLoraRecipe(seed=1, rank=4))
    """, tmp_path, sig)
    again = make_synthetic_lora(spec, tiny_flux_dir, tmp_path, SyntheticLoraRecipe(seed=0, rank=4))
    assert again.path == previous.path and load_file(again.path).keys() == tensors.keys()
    assert all(torch.equal(load_file(again.path)[k], tensors[k]) for k in tensors)
    assert _visible(tmp_path) == before


def test_pytest_benchmark_52s_open_json_file_is_written_whole_through_its_name(tmp_path):
    """pytest-benchmark 5.2 hands over --benchmark-json as a file it opened (and emptied)."""
    import logging
    import types

    from quantgate.plugin.benchmark_files import make_atomic

    target = tmp_path / "out.json"
    logger = types.SimpleNamespace(info=lambda *a, **k: logging.getLogger("t").info(a[0]))
    session = types.SimpleNamespace(json=open(target, "wb"), logger=logger,  # noqa: SIM115 - pytest-benchmark owns it storage=None,
                                    save_json=lambda output_json: None)
    assert make_atomic(session)
    session.save_json({"benchmarks": [], "version": "5.2.3"})
    assert json.loads(target.read_text()) == {"benchmarks": [], "version": "5.2.3"}
    assert session.json.closed
