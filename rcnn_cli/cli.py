"""The ``rcnn`` command: one thin function per subcommand.

Each command resolves its settings (defaults < --config file < flags), calls one library
function, prints results on stdout and a summary on stderr, and exits 0, 1 (some images
failed, or a missing file) or 2 (bad usage).
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from rcnn_cli import __version__
from rcnn_cli import config as cfgmod

log = logging.getLogger("rcnn_cli")


# ------------------------------------------------------------------ shared options
def _setup_logging(verbose: int, quiet: int) -> None:
    level = logging.INFO - 10 * verbose + 10 * quiet
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.captureWarnings(True)


def common_options(f):
    """--config, -v/-q, --workers, --device, --overwrite: defined once, used by every command."""
    @click.option("--config", "config_file", type=click.Path(dir_okay=False),
                  help="TOML file of settings (overrides the defaults; flags override it).")
    @click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
    @click.option("-q", "--quiet", count=True, help="Less log output (repeatable).")
    @click.option("--workers", type=click.IntRange(min=1), default=None,
                  help="Processes for the CPU stages (default 1).")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                  help="Where the CNN runs: auto picks cuda when present.")
    @click.option("--overwrite", is_flag=True,
                  help="Recompute outputs made with other settings and replace files we wrote.")
    @functools.wraps(f)
    def wrapper(*args, config_file, verbose, quiet, workers, device, overwrite, **kw):
        _setup_logging(verbose, quiet)
        common = {"workers": workers, "device": device}
        return f(*args, config_file=config_file, common=common, overwrite=overwrite, **kw)
    return wrapper


def load_config(config_file, **sections):
    """Resolve settings or exit 2 with the config error (the key is named)."""
    try:
        return cfgmod.load(config_file, sections)
    except cfgmod.ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--config") from None


def finish(report, what="images") -> None:
    """Print the batch summary to stderr and exit 1 if any image failed."""
    for path, reason in report.failures:
        click.echo(f"error: {path}: {reason}", err=True)
    click.echo(report.summary(what), err=True)
    if report.exit_code:
        sys.exit(report.exit_code)


def _not_implemented(name: str):
    raise click.UsageError(f"`rcnn {name}` is not implemented yet")


# ------------------------------------------------------------------ the group
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rcnn")
def cli():
    """R-CNN-style object detection from the command line.

    The stages, in order: propose (selective search boxes), extract (CNN features of each
    box), finetune (adapt the CNN to your classes), train-svm (per-class SVMs and box
    regressors = the model), detect (the whole chain on new images) and evaluate (VOC and
    COCO metrics). `rcnn demo` runs all of them on a small built-in dataset.

    Example: rcnn demo -o runs/demo
    """


def main():  # console-script entry point
    cli(prog_name="rcnn")


# ------------------------------------------------------------------ propose
@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: one <image stem>.npz per image.")
@click.option("--split", type=click.Path(exists=True, dir_okay=False),
              help="File of image stems: only these images are processed.")
@click.option("--method", type=click.Choice(["selective_search", "opencv", "sliding"]),
              help="Proposal method (default selective_search, ours).")
@click.option("--strategy", type=click.Choice(["single", "fast", "quality"]),
              help="Selective search strategy (default fast, R-CNN's choice).")
@click.option("--max-side", type=click.IntRange(min=32), help="Resize longer side to this first.")
@click.option("--min-size", type=click.IntRange(min=0), help="Drop boxes smaller than this.")
@click.option("--top-k", type=click.IntRange(min=1), help="Keep at most this many boxes.")
@click.option("--seed", type=int, help="Ranking seed (default 0).")
@common_options
def propose(images, out, split, method, strategy, max_side, min_size, top_k, seed,
            config_file, common, overwrite):
    """Compute candidate boxes for every image in IMAGES (folders, files or list files).

    Writes OUT/<relative path>.npz with `boxes` (float32, N x 4, x1 y1 x2 y2 in original
    pixels, best first) and `scores` (float32, higher is better); readable with numpy.load.

    Example: rcnn propose data/images -o runs/props --strategy fast --workers 2
    """
    from rcnn_cli.stages import propose_folder

    cfg = load_config(config_file, common=common, propose=dict(
        method=method, strategy=strategy, max_side=max_side, min_size=min_size,
        top_k=top_k, seed=seed))
    report = propose_folder(list(images), out, cfg, split=split, overwrite=overwrite)
    click.echo(str(Path(out)))
    finish(report)


# ------------------------------------------------------------------ extract
@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--proposals", "proposals_dir", required=True, type=click.Path(exists=True,
              file_okay=False), help="Output folder of `rcnn propose` for these images.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: one <image stem>.npz of features per image.")
@click.option("--annotations", type=click.Path(exists=True),
              help="Ground truth (VOC folder, COCO .json or .csv): its boxes are added as "
                   "positives for training.")
@click.option("--split", type=click.Path(exists=True, dir_okay=False),
              help="File of image stems: only these images are processed.")
@click.option("--backbone", help="mobilenet_v2 (default), alexnet, vgg16, resnet18, resnet50.")
@click.option("--tap", help="Feature tap (e.g. pool5, fc7 for alexnet/vgg16; pool).")
@click.option("--weights", help="Backbone weights: .safetensors / .pth path, or 'random'.")
@click.option("--mode", type=click.Choice(["auto", "warp", "shared"]),
              help="warp = R-CNN crops; shared = one conv pass + RoIAlign; auto picks.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), help="Stored precision.")
@common_options
def extract(images, proposals_dir, out, annotations, split, backbone, tap, weights, mode, dtype,
            config_file, common, overwrite):
    """Compute a CNN feature vector for every proposal (and ground-truth box) of each image.

    Example: rcnn extract data/images --proposals runs/props --annotations data -o runs/feats
    """
    from rcnn_cli.stages import extract_folder

    cfg = load_config(config_file, common=common, extract=dict(
        backbone=backbone, tap=tap, weights=weights, mode=mode, dtype=dtype))
    report = extract_folder(list(images), proposals_dir, out, cfg, annotations=annotations,
                            split=split, overwrite=overwrite)
    click.echo(str(Path(out)))
    finish(report)


# ------------------------------------------------------------------ finetune
@cli.command()
@common_options
def finetune(config_file, common, overwrite):
    """Fine-tune the backbone on warped or shared-feature regions of your training images.

    Example: rcnn finetune data/images --annotations data --proposals runs/props -o runs/ft
    """
    _not_implemented("finetune")


# ------------------------------------------------------------------ train-svm
@cli.command("train-svm")
@common_options
def train_svm(config_file, common, overwrite):
    """Train one linear SVM per class (hard-negative mining) and the box regressors.

    Example: rcnn train-svm --features runs/feats -o runs/model
    """
    _not_implemented("train-svm")


# ------------------------------------------------------------------ detect
@cli.command()
@common_options
def detect(config_file, common, overwrite):
    """Detect objects in every image of IMAGES with a trained model.

    Example: rcnn detect data/test_images --model runs/model -o runs/det --save-vis
    """
    _not_implemented("detect")


# ------------------------------------------------------------------ evaluate
@cli.command()
@common_options
def evaluate(config_file, common, overwrite):
    """Score detections (VOC07/VOC2010 AP, COCO AP) or proposals (recall, ABO) against
    ground truth.

    Example: rcnn evaluate --annotations data --detections runs/det --split data/test.txt
    """
    _not_implemented("evaluate")


# ------------------------------------------------------------------ demo
@cli.command()
@common_options
def demo(config_file, common, overwrite):
    """Run the whole chain on a small dataset built from photos bundled with scikit-image.

    Example: rcnn demo -o runs/demo
    """
    _not_implemented("demo")
