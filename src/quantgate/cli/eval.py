"""``quantgate eval``: SD3.5 (or any registered model) evaluation mode, FID and CLIP score.

    quantgate eval sd35-medium --scheme int8-wo --captions captions_val2017.json \\
        --reference-dir val2017/ --out eval/int8-wo --limit 5000

Generates one image per caption (resumable: rerun the same command after an interruption),
then scores FID against the reference folder and CLIP score against the captions, each only
with its pretrained weights found locally. Results: OUT/results.json (and, with
--benchmark-json, the ``quantgate.evaluation`` list of that file).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from quantgate.settings import CACHE_DIR_HELP, RESOLUTION_HELP, default_device


def _eval(args: argparse.Namespace) -> int:
    from quantgate.cli.gptq import _Context
    from quantgate.errors import QuantgateError
    from quantgate.evaluation import EvalRequest, merge_into_benchmark, pipeline_generator, run_evaluation
    from quantgate.hardware import device_info
    from quantgate.models.sources import get_source
    from quantgate.pipeline import weights_identity
    from quantgate.schemes import get_scheme

    args.device = default_device(args.device)
    context = _Context(args)  # the same model/source/steps/resolution handling as `quantgate gptq`
    if args.path:  # --source path: the user's diffusers directory
        context.ctx = replace(context.ctx, paths={context.spec.name: Path(args.path).expanduser()})
    reason = get_scheme(args.scheme).requires.unmet(args.scheme, device_info(context.device), context.spec.name)
    if reason:
        raise QuantgateError(reason)
    case = context.case(args.scheme)
    if args.guidance is not None:
        case = replace(case, guidance_scale=args.guidance)
    calibration = context.calibration() if Path(args.calibration_prompts).is_file() else None
    source = get_source(case.source).resolve(context.spec, context.ctx, case.device)
    make, release = pipeline_generator(case, context.ctx, calibration)
    request = EvalRequest(case, Path(args.captions), Path(args.reference_dir), Path(args.out), limit=args.limit,
                          batch=args.batch, seed=args.seed, clip_model=args.clip_model, fid_weights=args.fid_weights,
                          progress=not args.no_progress)
    results = run_evaluation(request, weights_identity(context.spec, source), make, release)
    if args.benchmark_json:
        merge_into_benchmark(args.benchmark_json, results)
    print(json.dumps({"out_dir": results["out_dir"], "images": results["images"],
                      "generation": results["generation"], "metrics": results["metrics"]}, indent=2))
    return 0


def register(sub: Any) -> None:
    """Register ``quantgate eval`` on the CLI's subparsers."""
    from quantgate.quality.fid import FID_WEIGHTS_ENV, INCEPTION_FILE
    from quantgate.quality.perceptual import DEFAULT_CLIP_MODEL

    p = sub.add_parser("eval", help="generate images for a caption set, score FID and CLIP score (resumable)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a registered model (quantgate models), e.g. sd35-medium")
    p.add_argument("--scheme", default="bf16", help="quantization scheme (quantgate schemes; default: bf16)")
    p.add_argument("--captions", required=True,
                   help="captions: a text file, one per line, or COCO annotations (captions_val2017.json: the "
                        "first caption of each image)")
    p.add_argument("--reference-dir", required=True, help="folder of reference images for FID (e.g. COCO val2017/)")
    p.add_argument("--out", required=True, help="output folder: NNNNN.png, manifest.json, results.json")
    p.add_argument("--limit", type=int, help="use the first N captions (default: all)")
    p.add_argument("--batch", type=int, default=4, help="prompts per pipeline call (default: 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="image i uses seed SEED+i; also the seed of synthetic weights (default: 0)")
    p.add_argument("--source", default="auto",
                   help="auto, hub, synthetic, tiny (default: auto: hub if cached, else synthetic, on a GPU; "
                        "tiny on the CPU), path (with --path). Only real weights (hub, path) make FID and CLIP "
                        "score meaningful")
    p.add_argument("--path", help="a diffusers directory of the model, for --source path")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    p.add_argument("--steps", type=int, help="denoising steps (default: the model card's, 40 for sd35-medium)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model card's, 4.5 for sd35-medium)")
    p.add_argument("--resolution", help=f"{RESOLUTION_HELP} (default: the model card's, 1024 for sd35-medium)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                   help=f"CLIP checkpoint: a directory or a hub repo id in the offline HF cache (default: "
                        f"{DEFAULT_CLIP_MODEL})")
    p.add_argument("--fid-weights",
                   help=f"torch-fidelity's Inception weights file (default: ${FID_WEIGHTS_ENV}, else "
                        f"$TORCH_HOME/hub/checkpoints/{INCEPTION_FILE})")
    p.add_argument("--benchmark-json", help="also add the results to this quantgate benchmark JSON "
                                            "(its quantgate.evaluation list)")
    p.add_argument("--calibration-prompts", default="fixtures/prompts/calibration.txt",
                   help="for schemes that calibrate (default: fixtures/prompts/calibration.txt, if present)")
    p.add_argument("--samples", type=int, help="calibration samples for schemes that calibrate")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)
