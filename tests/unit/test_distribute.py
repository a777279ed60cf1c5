"""Several GPUs and runners: xdist workers pinned to their GPU, pipeline groups on one worker,
timings merged into one --benchmark-json, shards and their merge (CPU only, tiny tier)."""

import json
import os
import random
import re
import subprocess
import sys

import pytest

from quantgate.errors import ConfigFileError
from quantgate.gpus import gpus_for_workers, parse_gpus, visible_gpus
from quantgate.results import load_benchmark_json, merge_benchmark_json
from quantgate.results.merge import merge_worker_runs
from quantgate.scheduling import group_of_nodeid
from quantgate.sharding import assign_shards, parse_shard
from tests.conftest import REPO

# A timed test, and a probe that writes what the worker running it sees (its GPU pinning).
TESTS = """
import os
from pathlib import Path

import numpy as np

def test_e2e(case, pipeline, bench, prompts, gates):
    images = bench("end_to_end", lambda: pipeline.generate(case, prompts.take(case.batch)))
    assert np.isfinite(images).all()
    gates.require("transformer_footprint_reduction",
                  pipeline.denoiser_reference_bytes / pipeline.denoiser_footprint.total_bytes)

def test_probe(case):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    probe = Path(os.environ["QG_PROBE_DIR"]) / f"{case.id}.{worker}"
    probe.write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))

def test_speedup(case, speedup):
    assert speedup("end_to_end", "bf16") > 0
"""

CASE_TESTS = """
def test_first(case):
    assert case.model

def test_second(case):
    assert case.scheme
"""


@pytest.fixture
def args(tiny_cache):
    return ["-p", "quantgate.plugin", "-p", "no:cacheprovider", f"--quantgate-cache-dir={tiny_cache}",
            f"--quantgate-gates={REPO / 'fixtures' / 'gates'}",
            f"--quantgate-prompts={REPO / 'fixtures' / 'prompts' / 'gate.txt'}"]


def _selection(*schemes):
    return ["-m", "cpu", "--quantgate-models=flux-schnell", f"--quantgate-schemes={','.join(schemes)}",
            "--quantgate-rounds=2", "--quantgate-warmup=0"]


# -- pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0/3", "4/3", "1", "a/b", "1/0", "-1/2"])
def test_bad_shards_are_refused_with_the_expected_form(value):
    with pytest.raises(ValueError, match="--quantgate-shard"):
        parse_shard(value)


def test_shards_are_deterministic_disjoint_complete_and_balanced():
    rng = random.Random(0)
    groups = {f"cpu-model{i}-tiny-scheme{i % 5}-eager": rng.randint(1, 9) for i in range(40)}
    shuffled = dict(rng.sample(list(groups.items()), len(groups)))
    for count in (1, 2, 3, 7):
        shards = assign_shards(groups, count)
        assert shards == assign_shards(shuffled, count)  # order of collection does not matter
        assert set(shards) == set(groups) and set(shards.values()) <= set(range(1, count + 1))
        loads = [sum(n for g, n in groups.items() if shards[g] == s) for s in range(1, count + 1)]
        assert max(loads) - min(loads) <= max(groups.values())  # greedy largest-first bound


def test_a_nodeid_maps_to_its_case_pipeline_even_where_case_ids_share_a_prefix():
    groups = {"flux-schnell-hub-svdq-int4-eager-b1-cuda": "A", "flux-schnell-hub-svdq-int4-fbcache-eager-b1-cuda": "B",
              "flux-schnell-tiny-bf16-eager-b1-cpu": "C"}
    assert group_of_nodeid("t.py::test_x[flux-schnell-hub-svdq-int4-fbcache-eager-b1-cuda]", groups) == "B"
    assert group_of_nodeid("t.py::test_x[flux-schnell-hub-svdq-int4-eager-b1-cuda]", groups) == "A"
    assert group_of_nodeid("t.py::test_lora[flux-schnell-tiny-bf16-eager-b1-cpu-synthetic]", groups) == "C"
    assert group_of_nodeid("t.py::test_x[flux-schnell-tiny-bf16-eager-b1-cpu]@named", groups) == "C"  # pytest < 9.2
    assert group_of_nodeid("t.py::test_harness", groups) is None
    assert group_of_nodeid("t.py::test_x[flux-schnell-tiny-int8-wo-eager-b1-cpu]", groups) is None


def test_visible_gpus_come_from_the_environment_or_nvidia_smi_without_cuda(tmp_path):
    smi = tmp_path / "nvidia-smi"  # a simulated machine with three GPUs
    smi.write_text("#!/bin/sh\n[ \"$1\" = -L ] || exit 2\n"
                   "for i in 0 1 2; do echo \"GPU $i: NVIDIA H200 (UUID: GPU-$i)\"; done\n")
    smi.chmod(0o755)
    assert visible_gpus({}, smi=str(smi)) == ["0", "1", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,GPU-abc"}, smi=str(smi)) == ["3", "GPU-abc"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, smi=str(smi)) == []
    assert visible_gpus({}, smi=str(tmp_path / "absent")) == []
    assert gpus_for_workers(["0", "1", "2"], 2, given=False) == ["0", "1"]
    assert gpus_for_workers([], 2, given=False) == [None, None]  # no GPU here: nothing to pin
    with pytest.raises(ValueError, match="3 xdist workers but 2 --quantgate-gpus: 0,1; use -n 2"):
        gpus_for_workers(parse_gpus("0,1"), 3, given=True)
    with pytest.raises(ValueError, match="lists a GPU twice"):
        parse_gpus("0,0")


def test_each_worker_gets_its_gpu_and_a_replacement_takes_over_a_crashed_workers():
    from types import SimpleNamespace

    from quantgate.plugin import distribute

    state = distribute.Distribution()
    state.worker_gpus = ["2", "3"]
    config = SimpleNamespace(stash={distribute._STATE: state}, getoption=lambda name, default=None: "loadgroup")

    def node(worker):
        return SimpleNamespace(config=config, gateway=SimpleNamespace(id=worker), workerinput={}, workeroutput={})

    gw0, gw1 = node("gw0"), node("gw1")
    for n in (gw0, gw1):
        distribute.pytest_configure_node(n)
    assert [n.workerinput["quantgate_gpu"] for n in (gw0, gw1)] == ["2", "3"]
    assert gw0.workerinput["quantgate_loadgroup"] is True
    distribute.pytest_testnodedown(gw1, error="crashed")  # xdist then starts gw2 in its place
    gw2 = node("gw2")
    distribute.pytest_configure_node(gw2)
    assert gw2.workerinput["quantgate_gpu"] == "3"
    with pytest.raises(pytest.UsageError, match="'gw3' has no GPU of its own"):
        distribute.pytest_configure_node(node("gw3"))


def _part(index, count, nodes, digest="d"):
    return {"machine_info": {"gpu": "x"}, "benchmarks": [], "datetime": "t", "commit_info": {"id": "c"},
            "quantgate": {"version": "0", "selection": {}, "outcomes": {n: {"outcome": "passed"} for n in nodes},
                          "shard": {"index": index, "count": count, "selection_sha256": digest}}}


def test_merging_shards_refuses_overlap_repeats_other_selections_and_gaps(tmp_path):
    def files(*parts):
        paths = []
        for i, part in enumerate(parts):
            paths.append(tmp_path / f"p{i}.json")
            paths[-1].write_text(json.dumps(part))
        return paths

    complete = merge_benchmark_json(files(_part(1, 2, ["a"]), _part(2, 2, ["b"])))
    assert complete["quantgate"]["shards"]["missing"] == [] and set(complete["quantgate"]["outcomes"]) == {"a", "b"}
    with pytest.raises(ConfigFileError, match="a also ran in .*shards overlap"):
        merge_benchmark_json(files(_part(1, 2, ["a"]), _part(2, 2, ["a"])))
    with pytest.raises(ConfigFileError, match="shard 1/2 is also"):
        merge_benchmark_json(files(_part(1, 2, ["a"]), _part(1, 2, ["b"])))
    with pytest.raises(ConfigFileError, match="of another selection"):
        merge_benchmark_json(files(_part(1, 2, ["a"]), _part(2, 2, ["b"], digest="other")))
    with pytest.raises(ConfigFileError, match="shards 2/3, 3/3 are missing"):
        merge_benchmark_json(files(_part(1, 3, ["a"])))
    partial = merge_benchmark_json(files(_part(1, 3, ["a"])), allow_missing_shards=True)
    assert partial["quantgate"]["shards"]["missing"] == [2, 3]


def test_workers_on_different_machines_are_not_merged():
    one, two = _part(1, 1, ["a"]), _part(1, 1, ["b"])
    two["machine_info"]["gpu"] = "y"
    with pytest.raises(ValueError, match="gw1 ran on another machine than gw0"):
        merge_worker_runs({"gw0": one, "gw1": two})


# -- pytest runs ---------------------------------------------------------------------------


def test_shards_split_the_collected_selection_by_pipeline_group(pytester, args):
    pytester.makepyfile(CASE_TESTS)
    selection = ["--collect-only", "-q", "-m", "cpu", "--quantgate-models=flux-schnell,sd35-medium",
                 "--quantgate-schemes=bf16,int8-wo,int8-dq",
                 "--quantgate-batch=1,2"]

    def ids(*extra):
        return [line for line in pytester.runpytest(*args, *selection, *extra).outlines if "::" in line]

    full = ids()
    shards = [ids(f"--quantgate-shard={i}/3") for i in (1, 2, 3)]
    assert len(full) == 2 * 3 * 2 * 2  # models x schemes x batches x tests
    assert sorted(sum(shards, [])) == sorted(full) and all(shards)
    assert shards == [ids(f"--quantgate-shard={i}/3") for i in (1, 2, 3)]  # deterministic
    def pipeline(line):  # the case id without its batch: what one loaded pipeline serves
        return re.sub(r"-b\d+-", "-", line.split("[")[1])

    owners = {}
    for index, shard in enumerate(shards):
        for line in shard:
            owners.setdefault(pipeline(line), set()).add(index)
    assert len(owners) == 2 * 3 and all(len(o) == 1 for o in owners.values())  # whole pipelines per shard
    by_model = [ids(f"--quantgate-shard={i}/2", "--quantgate-spread-by=model") for i in (1, 2)]
    assert sorted(sum(by_model, [])) == sorted(full)
    assert [{line.split("[")[1].split("-tiny-")[0] for line in shard} for shard in by_model] in (
        [{"flux-schnell"}, {"sd35-medium"}], [{"sd35-medium"}, {"flux-schnell"}])  # whole models
    bad = pytester.runpytest(*args, *selection, "--quantgate-shard=3/2")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--quantgate-shard 3/2: need 1 <= i <= N*"])


def test_a_dist_mode_that_splits_pipelines_or_too_many_workers_is_a_usage_error(pytester, args):
    pytester.makepyfile(CASE_TESTS)
    split = pytester.runpytest_subprocess(*args, "-n", "2", "--dist", "loadfile")
    assert split.ret == pytest.ExitCode.USAGE_ERROR
    split.stderr.fnmatch_lines(["*--dist loadfile would split the tests of one pipeline*--dist loadgroup*"])
    crowded = pytester.runpytest_subprocess(*args, "-n", "3", "--quantgate-gpus=0,1")
    assert crowded.ret == pytest.ExitCode.USAGE_ERROR
    crowded.stderr.fnmatch_lines(["*3 xdist workers but 2 --quantgate-gpus: 0,1; use -n 2*"])


@pytest.fixture(scope="module")
def spread_runs(tmp_path_factory, tiny_cache):
    """One selection run three ways, each in its own process (torchao's operator registrations
    cannot be imported twice into one): two xdist workers on two simulated GPUs, and shards
    1/2 and 2/2 as on two runners (each a plain single-process run)."""
    root = tmp_path_factory.mktemp("spread")
    (root / "test_spread.py").write_text(TESTS)
    probes = root / "probes"
    probes.mkdir()
    common = [sys.executable, "-m", "pytest", "-p", "quantgate.plugin", "-p", "no:cacheprovider",
              f"--quantgate-cache-dir={tiny_cache}", f"--quantgate-gates={REPO / 'fixtures' / 'gates'}",
              f"--quantgate-prompts={REPO / 'fixtures' / 'prompts' / 'gate.txt'}",
              *_selection("bf16", "int8-wo")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    runs = {}
    for name, extra in (("xdist", ["-n", "2", "--quantgate-gpus=0,1"]), ("shard1", ["--quantgate-shard=1/2"]),
                        ("shard2", ["--quantgate-shard=2/2"]),
                        ("by_model", ["-n", "2", "--quantgate-spread-by=model"])):
        out = root / f"{name}.json"
        (probes / name).mkdir()
        done = subprocess.run([*common, *extra, f"--benchmark-json={out}"], cwd=root,
                              env={**env, "QG_PROBE_DIR": str(probes / name)}, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[name] = (out, done.stdout + done.stderr)
    return root, probes, runs


def test_two_workers_keep_each_pipeline_on_one_worker_pinned_to_its_gpu(spread_runs):
    _, probes, runs = spread_runs
    out, output = runs["xdist"]
    assert "4 passed, 2 skipped" in output and "automatically disabled" not in output
    q = load_benchmark_json(out)["quantgate"]
    workers = {}
    for node, outcome in q["outcomes"].items():
        assert "@" not in node and outcome["outcome"] == ("skipped" if outcome["test"] == "test_speedup" else "passed")
        workers.setdefault(outcome["case"], set()).add((outcome["worker"], outcome["gpu"]))
    assert len(workers) == 2 and all(len(w) == 1 for w in workers.values())  # one worker per pipeline
    assigned = {"gw0": "0", "gw1": "1"}  # --quantgate-gpus 0,1, in worker order
    for case, ((worker, gpu),) in workers.items():
        assert assigned[worker] == gpu
        assert (probes / "xdist" / f"{case}.{worker}").read_text() == gpu  # what CUDA would have seen there
    assert sorted(w["worker"] for w in q["xdist"]["workers"]) == ["gw0", "gw1"]
    # A comparison with a case held by the other worker says so, instead of a bare "not in this session".
    (reason,) = [o["reason"] for o in q["outcomes"].values() if o["test"] == "test_speedup" and o["scheme"] != "bf16"]
    assert "no bf16 eager end_to_end timing" in reason and "spread over xdist worker gw" in reason


def test_spreading_by_model_keeps_the_comparisons_of_a_model_in_one_worker(spread_runs):
    _, _, runs = spread_runs
    q = load_benchmark_json(runs["by_model"][0])["quantgate"]
    assert q["spread_by"] == "model" and len({o["worker"] for o in q["outcomes"].values()}) == 1
    speedups = {o["scheme"]: o for o in q["outcomes"].values() if o["test"] == "test_speedup"}
    assert speedups["int8-wo"]["outcome"] == "passed"  # bf16 was timed in the same worker
    assert "is the bf16 eager baseline itself" in speedups["bf16"]["reason"]


def test_worker_timings_land_in_one_json_that_pytest_benchmark_reads(spread_runs):
    root, _, runs = spread_runs
    out, output = runs["xdist"]
    assert f"quantgate: 2 benchmarks from 2 xdist workers merged into {out}" in output
    data = load_benchmark_json(out)
    assert sorted(b["extra_info"]["scheme"] for b in data["benchmarks"]) == ["bf16", "int8-wo"]
    ran_on = {o["case"]: (o["worker"], o["gpu"]) for o in data["quantgate"]["outcomes"].values()}
    for bench in data["benchmarks"]:  # real statistics, each from the worker that held the pipeline
        assert bench["stats"]["rounds"] == 2 and len(bench["stats"]["data"]) == 2 and bench["stats"]["median"] > 0
        assert "@" not in bench["fullname"]
        extra = bench["extra_info"]
        assert (extra["quantgate_worker"], extra["quantgate_gpu"]) == ran_on[extra["id"]]
    assert [v["passed"] for v in data["quantgate"]["verdicts"]] == [True, True]
    listing = subprocess.run([sys.executable, "-c", "from pytest_benchmark.cli import main; main()", "compare",
                              str(out), "--group-by=name"], capture_output=True, text=True, cwd=root)
    assert listing.returncode == 0, listing.stderr
    assert "test_e2e[flux-schnell-tiny-int8-wo-eager-b1-cpu]" in listing.stdout
    from quantgate.results import load_runs

    assert sorted(r.scheme for r in load_runs([out]).results) == ["bf16", "int8-wo"]  # quantgate's reader too


def test_shards_merge_into_one_run_with_the_results_of_the_distributed_run(spread_runs, capsys):
    from quantgate.cli import main

    root, _, runs = spread_runs
    shards = [str(runs["shard1"][0]), str(runs["shard2"][0])]
    merged_path = root / "merged.json"
    assert main(["merge", *shards, "-o", str(merged_path)]) == 0
    assert "shards of one selection: 2 of 2" in capsys.readouterr().out
    merged = load_benchmark_json(merged_path)
    assert merged["quantgate"]["shards"]["missing"] == []
    per_shard = [set(load_benchmark_json(p)["quantgate"]["outcomes"]) for p in shards]
    assert all(per_shard) and not per_shard[0] & per_shard[1]  # each shard ran a part, no test twice
    distributed = load_benchmark_json(runs["xdist"][0])
    # The shards (single processes) and the two workers ran the same tests with the same outcomes.
    assert {n: o["outcome"] for n, o in merged["quantgate"]["outcomes"].items()} == {
        n: o["outcome"] for n, o in distributed["quantgate"]["outcomes"].items()}
    names = sorted(b["fullname"] for b in merged["benchmarks"])
    assert names == sorted(b["fullname"] for b in distributed["benchmarks"])
    from quantgate.history.spread import compare_spread

    check = compare_spread(merged_path, runs["xdist"][0], single_wall_s=30.0, spread_wall_s=16.0)
    assert check["same_results"] and check["tests"] == 6 and len(check["medians"]) == 2
    assert check["scaling"] == 1.875 and not check["only_single"] and not check["benchmarks_only_spread"]
    partial = compare_spread(shards[0], runs["xdist"][0])  # half the selection: not the same results
    assert not partial["same_results"] and len(partial["only_spread"]) == 3 and len(partial["medians"]) == 1
    assert main(["merge", shards[0], "-o", str(merged_path)]) == 2
    assert "shards 2/2 are missing" in capsys.readouterr().err


def test_a_shard_whose_tests_all_skip_still_writes_its_json(pytester, args):
    pytester.makepyfile(TESTS + SKIPPING)
    out = pytester.path / "shard.json"
    # Every test skips, so pytest-benchmark alone would write nothing.
    result = pytester.runpytest_subprocess(*args, "-m", "cpu", "--quantgate-models=flux-schnell", "-k", "skips",
                                           "--quantgate-schemes=bf16", "--quantgate-shard=1/1",
                                           f"--benchmark-json={out}")
    result.assert_outcomes(skipped=1)
    q = load_benchmark_json(out)["quantgate"]
    assert q["shard"]["index"] == 1 and q["shard"]["count"] == 1 and q["shard"]["tests"] == 1
    (outcome,) = q["outcomes"].values()
    assert outcome["outcome"] == "skipped" and outcome["reason"] == "nothing to measure here"


SKIPPING = """

def test_skips(case):
    import pytest
    pytest.skip("nothing to measure here")
"""


class _Options:
    def __init__(self, **values):
        self.values = values

    def getoption(self, name, default=None):
        return self.values.get(name, default)


@pytest.mark.parametrize(("options", "worker", "expected"), [
    ({"dist": "loadgroup"}, "", True),  # controller under -n: pytest-benchmark disabled itself for xdist
    ({"dist": "no"}, "gw1", True),  # a worker (5.2 has no xdist_warning to read: the rule decides)
    ({"dist": "no"}, "", False),  # no xdist at all
    ({"dist": "loadgroup", "benchmark_skip": True}, "", False),  # the user skipped benchmarks
    ({"dist": "loadgroup", "benchmark_disable": True}, "gw0", False),  # the user disabled them
    ({"dist": "loadgroup", "benchmark_disable": True, "benchmark_enable": True}, "gw0", True),
])
def test_xdist_disabling_is_recognised_by_pytest_benchmarks_own_rule(options, worker, expected, monkeypatch):
    from quantgate.plugin.distribute import disabled_only_by_xdist

    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    assert disabled_only_by_xdist(_Options(**options)) is expected


def test_the_benchmark_json_target_is_a_path_under_both_pytest_benchmark_versions(tmp_path):
    from quantgate.plugin.benchmark_files import benchmark_json_path

    target = tmp_path / "out.json"
    assert benchmark_json_path(str(target)) == str(target)  # 5.3: the path as given
    assert benchmark_json_path(target) == target
    with open(target, "wb") as handle:  # 5.2: argparse.FileType("wb") hands over an open file
        assert benchmark_json_path(handle) == str(target)
