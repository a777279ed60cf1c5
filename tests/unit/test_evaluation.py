"""Evaluation mode: captions, batch generation with a manifest, resume, metric skips, the CLI.

Images come from the tiny SD3.5 Medium pipeline (seeded random weights, 2 steps, 64 px): they
check the mechanics (what is generated, recorded, reused, regenerated), not image quality.
The CLIP score in the CLI test comes from a tiny CLIP made here with random weights: it checks
the plumbing, and such a number is never a CLIP score of a real run.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from quantgate.cases import Selection, make_case
from quantgate.cli import main
from quantgate.errors import ConfigFileError, QuantgateError
from quantgate.evaluation import (
    MANIFEST,
    Caption,
    clip_metric,
    eval_settings,
    generate_images,
    load_captions,
    merge_into_benchmark,
    pipeline_generator,
    reference_images,
)
from quantgate.models import get_model
from quantgate.models.sources import SourceContext, get_source
from quantgate.pipeline import weights_identity
from quantgate.quality import fid
from quantgate.report.build import build_report
from quantgate.report.claims import load_claims
from quantgate.report.document import to_markdown
from quantgate.results import load_runs, merge_benchmark_json
from tests.conftest import REPO
from tests.unit.test_perceptual import _tiny_clip

CAPTIONS = [Caption(t) for t in ("a red fox in the snow", "a lighthouse in a storm", "a bowl of ramen",
                                 "a cat on a windowsill", "a city street at night")]


def _case(steps: int = 2):
    spec = get_model("sd35-medium")
    return make_case(spec, "tiny", "bf16", "eager", 1, "cpu",
                     Selection(models=[spec.name], schemes=["bf16"], steps=steps))


class _Counting:
    """The tiny pipeline as an ImageGenerator, loaded once per module, counting calls and prompts."""

    def __init__(self, cache: Path):
        case = _case()
        self.ctx = SourceContext(cache_dir=cache)
        self.identity = weights_identity(get_model(case.model),
                                         get_source("tiny").resolve(get_model(case.model), self.ctx, "cpu"))
        make, self.release = pipeline_generator(case, self.ctx)
        self.generate = make()
        self.loads = 0
        self.calls: list[list[str]] = []

    def make(self):
        self.loads += 1
        return self._generate

    def _generate(self, prompts, seeds):
        self.calls.append(list(prompts))
        return self.generate(prompts, seeds)

    def settings(self, steps: int = 2):
        return eval_settings(_case(steps), self.identity, seed=0)


@pytest.fixture(scope="module")
def tiny_generator(tiny_cache):
    counting = _Counting(tiny_cache)
    yield counting
    counting.release()


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def test_captions_from_text_and_coco_annotations(tmp_path):
    text = tmp_path / "captions.txt"
    text.write_text("a red fox\n\n  a lighthouse  \n")
    assert load_captions(text) == [Caption("a red fox"), Caption("a lighthouse")]
    coco = tmp_path / "captions_val2017.json"
    coco.write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 139, "id": 1, "caption": "A woman stands in the dining area.\n"},
        {"image_id": 285, "id": 2, "caption": "A big  burly grizzly bear."},
        {"image_id": 139, "id": 3, "caption": "A second caption of image 139."}]}))
    assert load_captions(coco) == [Caption("A woman stands in the dining area.", 139),
                                   Caption("A big burly grizzly bear.", 285)]
    coco.write_text(json.dumps({"images": []}))
    with pytest.raises(ConfigFileError, match="not COCO caption annotations"):
        load_captions(coco)
    text.write_text("\n\n")
    with pytest.raises(ConfigFileError, match="holds no captions"):
        load_captions(text)
    with pytest.raises(QuantgateError, match="holds no images"):
        reference_images(tmp_path)


def test_generation_writes_a_manifest_and_resumes(tmp_path, tiny_generator):
    out = tmp_path / "out"
    settings = tiny_generator.settings()
    calls_before = len(tiny_generator.calls)
    first = generate_images(CAPTIONS[:2], out, settings, tiny_generator.make, batch=2, progress=False)
    assert (first.reused, first.generated, first.regenerated) == (0, 2, 0)
    manifest = _manifest(out)
    assert manifest["settings"] == settings and set(manifest["images"]) == {"00000.png", "00001.png"}
    entry = manifest["images"]["00001.png"]
    assert entry["caption"] == CAPTIONS[1].text and entry["seed"] == 1
    assert entry["sha256"] == hashlib.sha256((out / "00001.png").read_bytes()).hexdigest()
    assert np.asarray(Image.open(out / "00000.png")).shape == (64, 64, 3)
    before = {name: (out / name).stat().st_mtime_ns for name in manifest["images"]}

    second = generate_images(CAPTIONS[:4], out, settings, tiny_generator.make, batch=2, progress=False)
    assert (second.reused, second.generated, second.regenerated) == (2, 2, 0)
    # One pipeline call per batch, and only the two new captions went through the pipeline.
    assert tiny_generator.calls[calls_before:] == [[c.text for c in CAPTIONS[:2]], [c.text for c in CAPTIONS[2:4]]]
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before  # reused files untouched
    assert set(_manifest(out)["images"]) == {f"{i:05d}.png" for i in range(4)}

    loads = tiny_generator.loads
    done = generate_images(CAPTIONS[:4], out, settings, tiny_generator.make, batch=2, progress=False)
    assert (done.reused, done.generated) == (4, 0) and tiny_generator.loads == loads  # pipeline not even loaded


def test_damaged_or_mismatched_images_are_regenerated(tmp_path, tiny_generator):
    out = tmp_path / "out"
    settings = tiny_generator.settings()
    generate_images(CAPTIONS[:3], out, settings, tiny_generator.make, batch=3, progress=False)
    original = (out / "00001.png").read_bytes()
    (out / "00001.png").write_bytes(b"truncated")  # damaged file
    (out / "00002.png").unlink()  # lost file
    captions = [Caption("a different first caption"), *CAPTIONS[1:3]]  # the caption file changed
    calls = len(tiny_generator.calls)
    summary = generate_images(captions, out, settings, tiny_generator.make, batch=4, progress=False)
    assert (summary.reused, summary.generated, summary.regenerated) == (0, 3, 3)
    assert tiny_generator.calls[calls:] == [[c.text for c in captions]]
    images = _manifest(out)["images"]
    assert images["00000.png"]["caption"] == "a different first caption"
    # Seeded per image: the regenerated image equals the lost one up to bf16 batch numerics.
    regenerated = np.asarray(Image.open(out / "00001.png"), dtype=np.int16)
    assert np.abs(regenerated - np.asarray(Image.open(io.BytesIO(original)), dtype=np.int16)).max() <= 8
    for name, entry in images.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]


def test_a_manifest_of_other_settings_is_an_error(tmp_path, tiny_generator):
    out = tmp_path / "out"
    generate_images(CAPTIONS[:1], out, tiny_generator.settings(), tiny_generator.make, batch=1, progress=False)
    with pytest.raises(QuantgateError, match=r"another evaluation \(num_inference_steps: 2 there, 3 now\)"):
        generate_images(CAPTIONS[:1], out, tiny_generator.settings(steps=3), tiny_generator.make, progress=False)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(ConfigFileError, match="unreadable evaluation manifest"):
        generate_images(CAPTIONS[:1], out, tiny_generator.settings(), tiny_generator.make, progress=False)


def _reference_dir(path: Path) -> Path:
    path.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(48, 64), (64, 48), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path / f"{i:012d}.jpg")
    return path


def test_cli_eval_end_to_end_with_a_tiny_clip_and_no_fid_weights(tmp_path, tiny_cache, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(fid.FID_WEIGHTS_ENV, raising=False)
    clip = tmp_path / "clip"
    _tiny_clip(clip)
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(c.text for c in CAPTIONS) + "\n")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"benchmarks": [], "machine_info": {"gpu": None}, "quantgate": {"gates": []}}))
    out = tmp_path / "eval"
    argv = ["eval", "sd35-medium", "--source", "tiny", "--device", "cpu", "--cache-dir", str(tiny_cache),
            "--steps", "2", "--captions", str(captions), "--reference-dir", str(_reference_dir(tmp_path / "ref")),
            "--out", str(out), "--batch", "2", "--clip-model", str(clip), "--no-progress",
            "--benchmark-json", str(bench)]
    assert main([*argv, "--limit", "3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 3 and results["generation"]["generated"] == 3
    assert results["settings"]["num_inference_steps"] == 2 and results["settings"]["height"] == 64
    assert results["settings"]["guidance_scale"] == 4.5  # the model card's
    assert "random weights" in results["note"]
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert f"{fid.INCEPTION_FILE} in {checkpoints}" in results["metrics"]["fid"]["skipped"]
    assert "value" not in results["metrics"]["fid"]
    score = results["metrics"]["clip_score"]
    assert score["images"] == 3 and -1 <= score["min"] <= score["value"] <= score["max"] <= 1
    assert score["directory"] == str(clip)
    merged = json.loads(bench.read_text())
    assert merged["quantgate"]["gates"] == [] and merged["quantgate"]["evaluation"] == [results]
    assert json.loads(capsys.readouterr().out)["metrics"] == results["metrics"]

    # Rerun with more captions: only the new ones are generated; the benchmark entry is replaced.
    assert main([*argv, "--limit", "4"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["generation"]["reused"] == 3 and again["generation"]["generated"] == 1
    assert json.loads(bench.read_text())["quantgate"]["evaluation"] == [again]

    # The report shows it, and `quantgate merge` keeps it.
    text = to_markdown(build_report(load_runs([bench]), load_claims(REPO / "fixtures" / "claims.toml"), "eval"))
    section = text.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    assert (f"| sd35-medium-tiny-bf16-eager-b1-cpu | 2 steps, guidance 4.5, 64x64 | 4 | skipped | "
            f"{again['metrics']['clip_score']['value']:.4f} | 1 new, 3 reused |") in section
    assert f"sd35-medium-tiny-bf16-eager-b1-cpu FID | {again['metrics']['fid']['skipped']}" in section
    merged = merge_benchmark_json([bench, bench])["quantgate"]["evaluation"]
    assert [e["part"] for e in merged] == [0, 1] and merged[1]["metrics"] == again["metrics"]


def test_cli_eval_usage_errors(tmp_path, capsys):
    assert main(["eval", "sd35-medium", "--scheme", "bnb-nf4", "--device", "cpu", "--source", "tiny",
                 "--captions", "c.txt", "--reference-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "bnb-nf4 runs only on a CUDA GPU" in capsys.readouterr().err
    assert main(["eval", "sd35-medium", "--source", "path", "--path", str(tmp_path), "--device", "cpu",
                 "--captions", "c.txt", "--reference-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path}/model_index.json is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "--fid-weights" in help_text and "--limit" in help_text and "resumable" in help_text


def test_merge_creates_a_report_readable_file_when_there_is_none(tmp_path):
    target = tmp_path / "new" / "evaluation.json"
    merge_into_benchmark(target, {"id": "a", "metrics": {}})
    merge_into_benchmark(target, {"id": "b", "metrics": {}})
    merge_into_benchmark(target, {"id": "a", "metrics": {"replaced": True}})
    runs = load_runs([target])
    assert runs.results == [] and runs.machine["hardware_class"]
    assert [e["id"] for e in runs.data["quantgate"]["evaluation"]] == ["b", "a"]
    assert runs.data["quantgate"]["evaluation"][1]["metrics"] == {"replaced": True}


def test_merge_refuses_a_file_quantgate_did_not_write(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ConfigFileError, match="not a benchmark JSON written by a quantgate run"):
        merge_into_benchmark(other, {"id": "x"})


def test_clip_skip_names_the_checkpoint_files_and_the_cli_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    entry = clip_metric([], [], "openai/clip-vit-large-patch14")
    assert list(entry) == ["skipped"]
    reason = entry["skipped"]
    assert "'openai/clip-vit-large-patch14'" in reason and "not in the Hugging Face cache" in reason
    assert "--clip-model DIR" in reason and "--quantgate-clip-model" not in reason
    assert "model.safetensors or pytorch_model.bin" in reason and "vocab.json" in reason
