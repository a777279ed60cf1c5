"""Evaluation mode: generate one image per caption, then FID against reference images and CLIP score.

    captions (text or COCO annotations) -> batches through the quantized pipeline -> PNGs + manifest
    -> FID (generated vs the reference folder) and CLIP score (each image vs its caption)
    -> results.json in the output directory (and, optionally, the benchmark JSON's quantgate section)

Resuming: image ``i`` gets seed ``seed + i`` (its own generator, so it does not depend on the
images batched with it beyond kernel numerics), is written as ``NNNNN.png`` and recorded in
``manifest.json`` (caption, seed, sha256) after its batch. A rerun with the same settings
reuses every image whose file matches its manifest entry and whose caption and seed are
unchanged; a missing, damaged or mismatched image is generated again. A manifest written with
other settings (model, scheme, source weights, steps, guidance, resolution, device, seed) is an
error: those images belong to another evaluation.

Metrics follow the local-weights rule of ``quality.perceptual``: each runs only with its real
pretrained weights found on this machine, otherwise its entry records the exact file to provide.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.atomic import atomic_write_bytes, atomic_write_json
from quantgate.cases import Case
from quantgate.errors import ConfigFileError, QuantgateError

MANIFEST = "manifest.json"
RESULTS = "results.json"
MANIFEST_FORMAT = 1
RANDOM_WEIGHT_SOURCES = frozenset({"synthetic", "tiny"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

# prompts, per-image seeds -> images (N, H, W, 3) in [0, 1]
ImageGenerator = Callable[[list[str], list[int]], np.ndarray]


@dataclass(frozen=True)
class Caption:
    """One caption, with the COCO image it describes when known."""

    text: str
    image_id: int | None = None


def load_captions(path: str | Path) -> list[Caption]:
    """Captions from a text file (one per line, blank lines skipped) or COCO annotations JSON.

    From COCO's ``captions_val2017.json`` (five captions per image) the first caption of each
    image is kept, in annotation order: one generated image per reference image.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(path, f"cannot read captions: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            annotations = json.loads(text)["annotations"]
            seen: dict[int, Caption] = {}
            for entry in annotations:
                seen.setdefault(int(entry["image_id"]), Caption(" ".join(entry["caption"].split()),
                                                               int(entry["image_id"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigFileError(path, f"not COCO caption annotations ({{'annotations': [{{'image_id', "
                                  f"'caption'}}]}}): {type(exc).__name__}: {exc}") from None
        captions = list(seen.values())
    else:
        captions = [Caption(line.strip()) for line in text.splitlines() if line.strip()]
    if not captions:
        raise ConfigFileError(path, "holds no captions")
    return captions


def reference_images(directory: str | Path) -> list[Path]:
    """The image files directly in ``directory``, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise QuantgateError(f"reference image folder {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise QuantgateError(f"reference image folder {directory} holds no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def image_name(index: int) -> str:
    """The file name of generated image ``index``."""
    return f"{index:05d}.png"


def eval_settings(case: Case, identity: dict[str, Any], seed: int) -> dict[str, Any]:
    """What decides the generated images: a manifest written with other settings is not resumed."""
    return {"model": case.model, "source": case.source, "scheme": case.scheme, "variant": case.variant,
            "device": case.device, **case.call_kwargs(), "seed": seed, "weights": identity}


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass
class Manifest:
    """``manifest.json`` of an output directory: the settings and one entry per written image."""

    directory: Path
    settings: dict[str, Any]
    images: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: Path, settings: dict[str, Any]) -> Manifest:
        """The directory's manifest, or a new one; an existing one with other settings is an error."""
        path = directory / MANIFEST
        if not path.exists():
            return cls(directory, settings)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            stored, images = data["settings"], dict(data["images"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigFileError(path, f"unreadable evaluation manifest ({type(exc).__name__}: {exc}); "
                                  "remove it (its images are then generated again) or use another --out") from None
        if stored != settings:
            keys = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            diffs = ", ".join(f"{k}: {stored.get(k)!r} there, {settings.get(k)!r} now" for k in keys)
            raise QuantgateError(f"{directory} holds images of another evaluation ({diffs}); use another --out "
                                 "directory, or rerun with the settings it was made with")
        return cls(directory, settings, images)

    def verified(self, index: int, caption: Caption, seed: int) -> bool:
        """Whether image ``index`` is on disk, intact, and was made from ``caption`` with ``seed``."""
        entry = self.images.get(image_name(index))
        if not entry or entry.get("caption") != caption.text or entry.get("seed") != seed:
            return False
        return _sha256(self.directory / image_name(index)) == entry.get("sha256")

    def record(self, index: int, caption: Caption, seed: int, png: bytes) -> None:
        """Write image ``index`` and its entry (the manifest itself is saved by ``save``)."""
        atomic_write_bytes(self.directory / image_name(index), png)
        self.images[image_name(index)] = {"index": index, "caption": caption.text, "image_id": caption.image_id,
                                          "seed": seed, "sha256": hashlib.sha256(png).hexdigest()}

    def save(self) -> None:
        """Write the manifest atomically."""
        atomic_write_json(self.directory / MANIFEST, {"format": MANIFEST_FORMAT, "settings": self.settings,
                                                      "images": self.images})


@dataclass(frozen=True)
class GenerationSummary:
    """What one run of ``generate_images`` did."""

    total: int
    reused: int
    generated: int
    regenerated: int  # of ``generated``: images whose file or manifest entry did not match
    seconds: float  # generating and writing, without loading the pipeline
    load_seconds: float


def generate_images(captions: Sequence[Caption], out_dir: Path, settings: dict[str, Any],
                    make_generator: Callable[[], ImageGenerator], batch: int = 4,
                    progress: bool = True) -> GenerationSummary:
    """One PNG per caption in ``out_dir``, resuming from its manifest.

    ``make_generator`` is called only if some image has to be made (so a finished directory is
    scored without loading the pipeline). The manifest is saved after every batch.
    """
    from tqdm import tqdm

    if batch < 1:
        raise QuantgateError(f"--batch must be at least 1, got {batch}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(out_dir, settings)
    base_seed = int(settings["seed"])
    todo = [i for i, c in enumerate(captions) if not manifest.verified(i, c, base_seed + i)]
    regenerated = sum(1 for i in todo if image_name(i) in manifest.images or (out_dir / image_name(i)).exists())
    load_seconds = 0.0
    start = time.perf_counter()
    if todo:
        generate = make_generator()
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        bar = tqdm(total=len(captions), initial=len(captions) - len(todo), unit="image", desc="generating",
                   disable=not progress, file=sys.stderr)
        with bar:
            for first in range(0, len(todo), batch):
                chunk = todo[first:first + batch]
                seeds = [base_seed + i for i in chunk]
                images = generate([captions[i].text for i in chunk], seeds)
                if len(images) != len(chunk):
                    raise RuntimeError(f"the pipeline returned {len(images)} images for {len(chunk)} prompts")
                for i, seed, image in zip(chunk, seeds, images, strict=True):
                    manifest.record(i, captions[i], seed, _png_bytes(image))
                manifest.save()
                bar.update(len(chunk))
    return GenerationSummary(len(captions), len(captions) - len(todo), len(todo), regenerated,
                             time.perf_counter() - start, load_seconds)


def _read_images(paths: Sequence[Path]) -> np.ndarray:
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return np.stack(arrays)


def clip_metric(images: Sequence[Path], captions: Sequence[Caption], model: str, device: str = "cpu",
                batch: int = 16) -> dict[str, Any]:
    """CLIP score entry: mean cosine of each image with its caption, or the reason it was skipped."""
    from quantgate.quality.perceptual import ClipScorer, clip_problem

    problem = clip_problem(model)
    if problem:  # perceptual names the pytest option; here the same setting is a CLI flag
        return {"skipped": problem.replace("--quantgate-clip-model", "--clip-model")}
    scorer = ClipScorer(model, device)
    values: list[float] = []
    for first in range(0, len(images), batch):
        chunk = slice(first, first + batch)
        values += scorer.cosines(_read_images(images[chunk]), [c.text for c in captions[chunk]])
    return {"value": sum(values) / len(values), "min": min(values), "max": max(values), "images": len(values),
            "model": model, "directory": str(scorer.checkpoint.directory),
            "definition": "mean cosine of CLIP image and caption embeddings (torchmetrics' CLIPScore is 100x this, "
                          "clipped at 0)"}


def fid_metric(generated: Sequence[Path], reference: Sequence[Path], weights: str | None = None,
               device: str = "cpu", feature: Any = None) -> dict[str, Any]:
    """FID entry (generated vs reference), or the reason it was skipped.

    ``feature`` is torchmetrics' custom feature extractor hook, for the harness's tests only: the
    entry it gives is labelled ``feature_extractor: custom`` and has no ``value`` key.
    """
    from quantgate.quality.fid import FID_PREPROCESSING, FidAccumulator, fid_problem

    problem = fid_problem(weights) if feature is None else None
    if problem:
        return {"skipped": problem}
    if len(generated) < 2 or len(reference) < 2:
        return {"skipped": f"FID needs at least 2 generated and 2 reference images, got {len(generated)} and "
                           f"{len(reference)}"}
    fid = FidAccumulator(weights, device, feature=feature)
    counts = {"generated": fid.update_files(generated, real=False), "reference": fid.update_files(reference, real=True)}
    entry: dict[str, Any] = {**counts, "preprocessing": FID_PREPROCESSING}
    if feature is not None:
        return {**entry, "feature_extractor": "custom", "custom_distance": fid.compute()}
    entry.update(value=fid.compute(), feature_extractor="torch-fidelity InceptionV3 pool3 (2048)",
                 weights=str(fid.weights))
    if min(counts.values()) < 2048:
        entry["note"] = ("fewer images than the 2048 Inception features: the covariance estimate is rank "
                         "deficient and FID is biased upwards; compare only runs of equal image counts")
    return entry


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation run."""

    case: Case
    captions_file: Path
    reference_dir: Path
    out_dir: Path
    limit: int | None = None
    batch: int = 4
    seed: int = 0
    clip_model: str = "openai/clip-vit-large-patch14"
    fid_weights: str | None = None
    progress: bool = True


def run_evaluation(request: EvalRequest, identity: dict[str, Any], make_generator: Callable[[], ImageGenerator],
                   release: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Generate (resuming), score, write ``results.json`` in the output directory; return the results.

    ``release`` is called after generation so that the pipeline's memory is free for the metrics.
    """
    captions = load_captions(request.captions_file)
    if request.limit is not None:
        if request.limit < 1:
            raise QuantgateError(f"--limit must be at least 1, got {request.limit}")
        captions = captions[:request.limit]
    references = reference_images(request.reference_dir)
    settings = eval_settings(request.case, identity, request.seed)
    summary = generate_images(captions, request.out_dir, settings, make_generator, request.batch, request.progress)
    release()
    generated = [request.out_dir / image_name(i) for i in range(len(captions))]
    device = request.case.device
    results = {
        "id": f"{request.case.id}:{request.out_dir.name}",
        "case": request.case.as_dict(),
        "settings": settings,
        "captions_file": str(request.captions_file),
        "reference_dir": str(request.reference_dir),
        "out_dir": str(request.out_dir),
        "images": len(captions),
        "generation": {"reused": summary.reused, "generated": summary.generated,
                       "regenerated": summary.regenerated, "seconds": round(summary.seconds, 3),
                       "load_seconds": round(summary.load_seconds, 3),
                       "batch": request.batch},
        "metrics": {
            "fid": fid_metric(generated, references, request.fid_weights, device),
            "clip_score": clip_metric(generated, captions, request.clip_model, device),
        },
    }
    if request.case.source in RANDOM_WEIGHT_SOURCES:
        results["note"] = (f"source {request.case.source!r} has seeded random weights: the images are noise-like and "
                           "the metrics exercise the harness, they say nothing about the model or the scheme")
    atomic_write_json(request.out_dir / RESULTS, results)
    return results


def merge_into_benchmark(path: str | Path, results: dict[str, Any]) -> None:
    """Add ``results`` to the ``quantgate.evaluation`` list of a quantgate benchmark JSON (same id replaced).

    A file that does not exist yet is created holding only this machine's facts and the
    evaluation, so ``quantgate report`` and ``quantgate merge`` read it like a pytest run's.
    """
    from datetime import datetime, timezone

    from quantgate.hardware import machine_facts
    from quantgate.results import load_benchmark_json

    path = Path(path)
    if path.exists():
        data = load_benchmark_json(path)
    else:
        data = {"machine_info": machine_facts(), "commit_info": {}, "benchmarks": [],
                "datetime": datetime.now(timezone.utc).isoformat(), "quantgate": {}}
    entries = [e for e in data["quantgate"].get("evaluation", []) if e.get("id") != results["id"]]
    data["quantgate"]["evaluation"] = [*entries, results]
    atomic_write_json(path, data)


def pipeline_generator(case: Case, ctx: Any, calibration: Any = None) -> tuple[Callable[[], ImageGenerator],
                                                                              Callable[[], None]]:
    """A lazy loader of ``case``'s pipeline as an ``ImageGenerator`` (one generator per image), and its release."""
    import torch

    from quantgate.measure.memory import release_memory
    from quantgate.pipeline import load_pipeline

    held: dict[str, Any] = {}

    def make() -> ImageGenerator:
        held["loaded"] = loaded = load_pipeline(case, ctx, calibration)

        def generate(prompts: list[str], seeds: list[int]) -> np.ndarray:
            generators = [torch.Generator(device=case.device).manual_seed(s) for s in seeds]
            with torch.inference_mode():
                out = loaded.pipe(prompt=prompts, generator=generators, output_type="np", **case.call_kwargs())
            return out.images

        return generate

    def release() -> None:
        loaded = held.pop("loaded", None)
        if loaded is not None:
            loaded.pipe = None  # the generator closure may outlive this call; the weights must not
            release_memory(case.device)

    return make, release

