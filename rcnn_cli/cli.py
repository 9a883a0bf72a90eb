"""The ``rcnn`` command: one thin function per subcommand.

Each command resolves its settings (defaults < --config file < flags), calls one library
function, prints results on stdout and a summary on stderr, and exits 0, 1 (some images
failed, or a missing file) or 2 (bad usage).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

import click

from rcnn_cli import __version__
from rcnn_cli import config as cfgmod

log = logging.getLogger("rcnn_cli")


# ------------------------------------------------------------------ shared options
def _setup_logging(verbose: int, quiet: int) -> None:
    """``-v`` shows our debug lines; other libraries' (PIL's chunks, matplotlib's font
    search, numba's compiler: thousands of lines) only from ``-vv``."""
    level = max(logging.INFO - 10 * verbose + 10 * quiet, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    if verbose == 1:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_ours_or_info)
    warnings.showwarning = _warning_to_log


def _ours_or_info(record: logging.LogRecord) -> bool:
    """Keep our records and other libraries' from INFO up."""
    return record.levelno >= logging.INFO or record.name.partition(".")[0] == "rcnn_cli"


def _warning_to_log(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (ours and libraries') become one log line each, on stderr (instead
    of logging.captureWarnings' file:line + source line)."""
    logging.getLogger("py.warnings").warning("%s", message)


def common_options(f):
    """--config, -v/-q, --workers, --device, --overwrite: defined once, used by every command."""
    @click.option("--config", "config_file", type=click.Path(dir_okay=False),
                  help="TOML file of settings (overrides the defaults; flags override it).")
    @click.option("-v", "--verbose", count=True,
                  help="More log output (repeatable: -v our debug lines, -vv other "
                       "libraries' too).")
    @click.option("-q", "--quiet", count=True, help="Less log output (repeatable).")
    @click.option("--workers", type=click.IntRange(min=1), default=None,
                  help="Processes for the CPU stages (default 1, except, when neither this "
                  "flag nor a config file sets them: propose and detect with selective search "
                  "on 12 or more images, one per CPU, at most 8; `rcnn demo`, one per CPU, at "
                  "most 4, for selective search). With a GPU, detect's selective search runs "
                  "in them, feeding the GPU process.")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                  help="Where the CNN runs: auto picks cuda when present.")
    @click.option("--overwrite", is_flag=True,
                  help="Recompute outputs made with other settings and replace files we wrote.")
    @functools.wraps(f)
    def wrapper(*args, config_file, verbose, quiet, workers, device, overwrite, **kw):
        _setup_logging(verbose, quiet)
        click.get_current_context().meta["rcnn.verbose"] = verbose
        common = {"workers": workers, "device": device}
        return f(*args, config_file=config_file, common=common, overwrite=overwrite, **kw)
    return wrapper


def _workers_chosen(config_file: str | None, common: dict) -> bool:
    """Whether the user set the workers (``--workers`` or ``[common] workers`` in the
    config file); else propose and detect choose them from the folder."""
    return common["workers"] is not None or "workers" in cfgmod.explicit_keys(config_file,
                                                                               "common")


def cluster_options(f):
    """--executor, --address, --shard: where the per-image work of a stage runs."""
    @click.option("--executor", type=click.Choice(["local", "dask", "ray"]), default=None,
                  help="local (default: --workers processes), dask or ray.")
    @click.option("--address", default=None,
                  help="Cluster address (dask: tcp://host:8786; ray: auto or "
                       "ray://host:10001); without it a local cluster is started.")
    @click.option("--shard", default=None, metavar="I/N",
                  help="Process only slice I of N of the images (0-based), e.g. 0/4.")
    @functools.wraps(f)
    def wrapper(*args, executor, address, shard, common, **kw):
        common = dict(common, executor=executor, address=address, shard=shard)
        return f(*args, common=common, **kw)
    return wrapper


# ------------------------------------------------------------------ the one error path
def _flag_for(ctx: click.Context, key: str | None) -> str | None:
    """The flag (e.g. ``--backbone``) that set config ``key`` on this command line, else
    ``--config`` when a config file was given, else None."""
    if key is not None:
        name = key.split(".")[-1]
        for p in ctx.command.params:
            if p.name == name and isinstance(p, click.Option) and \
                    ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
                return p.opts[-1] if p.opts[-1].startswith("--") else p.opts[0]
    return "--config" if ctx.params.get("config_file") else None


def as_click_error(e: Exception, ctx: click.Context) -> click.ClickException:
    """One line for a library error, with the exit code the README promises: 2 for a bad
    flag, setting or usage (the flag or config key is named), 1 for a missing or unusable
    file and anything else (the file is named)."""
    from rcnn_cli.executors import ExecutorError
    from rcnn_cli.images import ImageError, InputError
    from rcnn_cli.store import StaleStoreError

    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, cfgmod.ConfigError):
        flag = _flag_for(ctx, e.key)
        if flag is None:
            return click.UsageError(msg, ctx)
        if flag == "--config" and e.key and e.key not in msg:
            msg = f"{e.key}: {msg}"
        return click.BadParameter(msg, ctx, param_hint=f"'{flag}'")
    if isinstance(e, FileExistsError):
        hint = "" if "--overwrite" in msg else " (rerun with --overwrite to replace it)"
        return click.UsageError(msg + hint, ctx)
    if isinstance(e, (ExecutorError, StaleStoreError, InputError)):
        return click.UsageError(msg, ctx)
    if isinstance(e, OSError) and getattr(e, "filename", None) and e.strerror:
        return click.ClickException(f"{e.filename}: {e.strerror}")
    if isinstance(e, (OSError, ValueError, RuntimeError, ImageError)):
        return click.ClickException(msg)  # ours: ModelError, WeightsError, AnnotationError..
    return click.ClickException(f"{type(e).__name__}: {msg} (an internal error; rerun with "
                                "-v for the traceback)")


def _check_out(ctx: click.Context) -> None:
    """-o must be a folder we can create or write into (checked before any work)."""
    out = ctx.params.get("out")
    if out is None:
        return
    p = Path(out).absolute()
    if p.exists() and not p.is_dir():
        raise click.BadParameter(f"{out}: exists and is not a folder", ctx, param_hint="'-o'")
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir() or not os.access(q, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{out}: cannot write into {q} (permission denied)", ctx,
                                 param_hint="'-o'")


class RcnnCommand(click.Command):
    """A subcommand whose library errors become one line (see :func:`as_click_error`);
    with -v the traceback is printed first."""

    def invoke(self, ctx: click.Context):
        from rcnn_cli import runrecord

        ctx.meta["rcnn.started"] = runrecord.utc_now()
        try:
            _check_out(ctx)
            if ctx.params.get("out") is not None:  # a user's run.json: refused before any work
                runrecord.check_folder(ctx.params["out"])
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - this is the one place errors are mapped
            if ctx.meta.get("rcnn.verbose"):
                traceback.print_exception(e, file=sys.stderr)
            raise as_click_error(e, ctx) from None


class RcnnGroup(click.Group):
    """Every subcommand (and sub-group, e.g. ``rcnn localize``) maps errors the same way."""

    command_class = RcnnCommand
    group_class = type


def load_config(config_file, **sections):
    """Resolve and check the settings (a bad one exits 2 naming its flag or key), including
    that a cuda device exists, before any work."""
    cfg = cfgmod.load(config_file, sections)
    if cfg["common"]["device"].startswith("cuda"):
        from rcnn_cli.features import resolve_device

        resolve_device(cfg["common"]["device"])
    return cfg


def finish(report, what="images") -> None:
    """Print the batch summary to stderr and exit 1 if any image failed."""
    for path, reason in report.failures:
        click.echo(f"error: {path}: {reason}", err=True)
    click.echo(report.summary(what), err=True)
    if report.exit_code:
        sys.exit(report.exit_code)


def record_run(cfg, sections, *, inputs, report=None, counts=None, model=None,
               resolved=None, folder=None) -> None:
    """Write this command's record into ``folder/run.json`` (default: its -o folder) at
    its end: inputs, model, what ``auto`` became, the config ``sections``, versions, times
    and counts (a :class:`~rcnn_cli.runner.Report`'s or ``counts``); see
    :mod:`rcnn_cli.runrecord`."""
    from rcnn_cli import runrecord

    ctx = click.get_current_context()
    if report is not None:
        counts = {**runrecord.report_counts(report), **(counts or {})}
    runrecord.write_run(folder or ctx.params["out"], " ".join(ctx.command_path.split()[1:]),
                        started=ctx.meta["rcnn.started"], inputs=inputs, model=model,
                        resolved=resolved, counts=counts,
                        settings={k: cfg[k] for k in sections if k in cfg})


def _not_implemented(name: str):
    raise click.UsageError(f"`rcnn {name}` is not implemented yet")


# ------------------------------------------------------------------ the group
@click.group(cls=RcnnGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rcnn")
def cli():
    """R-CNN-style object detection from the command line.

    The stages, in order: propose (selective search boxes), extract (CNN features of each
    box), finetune (adapt the CNN to your classes), train-svm (per-class SVMs and box
    regressors = the model), detect (the whole chain on new images) and evaluate (VOC and
    COCO metrics). `rcnn demo` runs all of them on a small built-in dataset; `rcnn info`
    describes a model. Every stage records its run in OUT/run.json.

    Example: rcnn demo -o runs/demo
    """


def main():  # console-script entry point
    from rcnn_cli import _numba_blas
    from rcnn_cli.cpus import limit_threads_to_quota

    limit_threads_to_quota()  # before numpy or torch start their thread pools
    _numba_blas.ENABLED = True  # this process is ours: numba starts without scipy.linalg
    try:
        cli(prog_name="rcnn")
    finally:
        # The interpreter's exit collects every object left, and torch, torchvision and
        # torch._dynamo leave millions: 1-1.5 s of exit per command here. Frozen objects
        # are not scanned (the process is ending; atexit handlers still run).
        import gc

        gc.freeze()


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
@cluster_options
def propose(images, out, split, method, strategy, max_side, min_size, top_k, seed,
            config_file, common, overwrite):
    """Compute candidate boxes for every image in IMAGES (folders, files or list files).

    Writes OUT/<relative path>.npz with `boxes` (float32, N x 4, x1 y1 x2 y2 in original
    pixels, best first) and `scores` (float32, higher is better); readable with numpy.load.

    Example: rcnn propose data/images -o runs/props --strategy fast --workers 2
    """
    from rcnn_cli.stages import propose_folder, unused_propose_keys

    cfg = load_config(config_file, common=common, propose=dict(
        method=method, strategy=strategy, max_side=max_side, min_size=min_size,
        top_k=top_k, seed=seed))
    given = [k for k, v in (("strategy", strategy), ("max_side", max_side), ("seed", seed))
             if v is not None]
    unused = unused_propose_keys(cfg["propose"]["method"], given)  # flags that do nothing
    if unused:
        log.warning("%s: selective search only (--method selective_search or opencv); "
                    "ignored by sliding windows", ", ".join(
                        "--" + k.replace("_", "-") for k in unused))
    report = propose_folder(list(images), out, cfg, split=split, overwrite=overwrite,
                            auto_workers=not _workers_chosen(config_file, common))
    from rcnn_cli.runrecord import stage_settings

    record_run(cfg, ["common", "propose"], inputs=[*images, split], report=report,
               resolved={"proposals": stage_settings(out), "workers": report.workers})
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
@click.option("--backbone", help="mobilenet_v2 (default), efficientnet_lite0, alexnet, vgg16, "
              "resnet18, resnet50.")
@click.option("--tap", help="Feature tap (e.g. pool5, fc7 for alexnet/vgg16; pool).")
@click.option("--weights", help="Backbone weights: .safetensors / .pth path, or 'random'.")
@click.option("--mode", type=click.Choice(["auto", "warp", "shared"]),
              help="warp = R-CNN crops; shared = one conv pass + RoIAlign; auto picks.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), help="Stored precision.")
@click.option("--keep", type=click.Choice(["all", "train"]),
              help="With --annotations: all proposals, or only what train-svm reads (ground "
                   "truth, windows near it, a background sample; 4.5x smaller up to 2000 "
                   "images, 12x above: [extract] keep_near_iou).")
@common_options
@cluster_options
def extract(images, proposals_dir, out, annotations, split, backbone, tap, weights, mode, dtype,
            keep, config_file, common, overwrite):
    """Compute a CNN feature vector for every proposal (and ground-truth box) of each image.

    Example: rcnn extract data/images --proposals runs/props --annotations data -o runs/feats
    """
    from rcnn_cli.stages import extract_folder

    cfg = load_config(config_file, common=common, extract=dict(
        backbone=backbone, tap=tap, weights=weights, mode=mode, dtype=dtype, keep=keep))
    report = extract_folder(list(images), proposals_dir, out, cfg, annotations=annotations,
                            split=split, overwrite=overwrite)
    from rcnn_cli.runrecord import resolved_device, stage_settings

    stored = stage_settings(out)
    record_run(cfg, ["common", "extract"], inputs=[*images, proposals_dir, annotations, split],
               report=report, resolved={"device": resolved_device(cfg["common"]["device"]),
                                        "features": stored.get("features"),
                                        "keep": stored.get("keep", {"keep": "all"})})
    click.echo(str(Path(out)))
    finish(report)


# ------------------------------------------------------------------ finetune
@cli.command()
@click.option("--annotations", required=True, type=click.Path(exists=True),
              help="Training ground truth (VOC folder, COCO .json or .csv).")
@click.option("--proposals", "proposals_dir", required=True,
              type=click.Path(exists=True, file_okay=False),
              help="Output folder of `rcnn propose` for the training images.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: backbone.safetensors, classifier.safetensors, "
                   "finetune.json, checkpoints.")
@click.option("--split", help="Stems file (or train/test/val of the VOC folder) of the "
                              "training images.")
@click.option("--backbone", help="Backbone name (default mobilenet_v2).")
@click.option("--weights", help="Starting weights (default ImageNet).")
@click.option("--mode", type=click.Choice(["auto", "warp", "shared"]),
              help="warp = R-CNN crops (GPU); shared = one conv pass + RoIAlign (CPU); "
                   "auto = warp on a GPU, shared on a CPU.")
@click.option("--iterations", type=click.IntRange(min=1), help="SGD iterations.")
@click.option("--lr", type=float, help="Base learning rate (R-CNN: 0.001).")
@click.option("--seed", type=int, help="Seed of the split, sampling and flips.")
@common_options
def finetune(annotations, proposals_dir, out, split, backbone, weights, mode, iterations, lr,
             seed, config_file, common, overwrite):
    """Fine-tune the backbone on your classes, on warped proposals (R-CNN) or through
    shared features (Fast R-CNN style): a (K+1)-way classifier replaces ImageNet's.

    Writes OUT/backbone.safetensors (use it as `rcnn extract --weights`), the classifier,
    finetune.json (the recipe and validation metrics) and resumable checkpoints.

    Example: rcnn finetune --annotations data --split data/train.txt --proposals runs/props -o runs/ft
    """
    from rcnn_cli.datasets import load_dataset
    from rcnn_cli.finetune import FinetuneSettings, proposals_from_dir
    from rcnn_cli.finetune import finetune as run_finetune

    cfg = load_config(config_file, common=common, extract=dict(backbone=backbone,
                      weights=weights, mode=mode), finetune=dict(iterations=iterations, lr=lr,
                                                                 seed=seed))
    ds = load_dataset(annotations, split=split)
    res = run_finetune(ds, proposals_from_dir(proposals_dir, ds.image_path), out,
                       FinetuneSettings.from_config(cfg), device=cfg["common"]["device"],
                       overwrite=overwrite)
    cfgmod.write_resolved(out, cfg, ["common", "extract", "finetune"])
    from rcnn_cli.runrecord import resolved_device

    done = json.loads(Path(res.recipe_path).read_text())["settings"]  # what auto became
    record_run(cfg, ["common", "extract", "finetune"], inputs=[annotations, proposals_dir],
               counts={"images": len(ds.records)},
               resolved={"device": resolved_device(cfg["common"]["device"]),
                         "mode": done["mode"], "backbone": done["backbone"], "tap": done["tap"]})
    click.echo(str(res.weights_path))


# ------------------------------------------------------------------ train-svm
@cli.command("train-svm")
@click.option("--features", "features_dir", required=True,
              type=click.Path(exists=True, file_okay=False),
              help="Output folder of `rcnn extract` run with --annotations.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Model bundle folder (model.json + model.npz).")
@click.option("--classes", help="Comma-separated class names to train (default: all).")
@click.option("--solver", type=click.Choice(["liblinear", "torch"]),
              help="SVM solver: liblinear (reference) or torch (same objective).")
@click.option("--no-bbox-regression", is_flag=True, default=None,
              help="Do not train the box regressors.")
@click.option("--head", type=click.Choice(["auto", "fc", "none"]),
              help="Fine-tune fc6/fc7 on the cached features and train the SVMs on fc7 "
                   "(auto: for conv-map taps such as mobilenet_v2's shared `grid`).")
@common_options
def train_svm(features_dir, out, classes, solver, no_bbox_regression, head, config_file,
              common, overwrite):
    """Train one linear SVM per class (hard-negative mining) and the box regressors.

    With a head (default for mobilenet_v2's shared features) R-CNN's fc6/fc7 are first
    fine-tuned on the cached features (softmax over the classes and background) and the SVMs
    read fc7, as R-CNN's SVMs read its fine-tuned fc7; the regressors read the features.

    Prints the bundle folder; per-class statistics go to the log.

    Example: rcnn train-svm --features runs/feats -o runs/model
    """
    from rcnn_cli.train import train_model

    cfg = load_config(config_file, common=common, train_svm=dict(
        solver=solver, bbox_regression=False if no_bbox_regression else None, head=head))
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    model = train_model(features_dir, out, cfg, classes=names, overwrite=overwrite)
    cfgmod.write_resolved(out, cfg, ["train_svm", "detect"])
    _record_training(cfg, features_dir, model)
    click.echo(str(Path(out)))
    head = model.training_stats.get("head")
    if head:
        click.echo(f"fc head: {head['windows']} windows ({head['foreground']} foreground) from "
                   f"{head['images']} images, loss {head['first_loss']:.3f} -> "
                   f"{head['final_loss']:.3f} in {head['seconds']:.0f} s", err=True)
    trained = [c for c, t in zip(model.classes, model.svm_trained) if t]
    click.echo(f"trained {len(trained)}/{len(model.classes)} classes: {', '.join(trained)}",
               err=True)


def _record_training(cfg, features_dir, model) -> None:
    """run.json of train-svm: what ``head = auto`` became, the features, the counts."""
    from rcnn_cli.runrecord import resolved_device

    ext = model.extractor_settings()
    resolved = {"head": "fc" if model.head is not None else "none",
                "solver": cfg["train_svm"]["solver"], "backbone": model.backbone,
                "tap": model.feature_tap, "mode": ext.get("mode")}
    if model.head is not None:  # the head trains on the device
        resolved["device"] = resolved_device(cfg["common"]["device"])
    record_run(cfg, ["common", "train_svm", "detect"], inputs=[features_dir], resolved=resolved,
               counts={"images": model.training_stats.get("images"),
                       "classes": len(model.classes),
                       "classes_trained": int(sum(bool(t) for t in model.svm_trained))})


# ------------------------------------------------------------------ detect
@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True,
              file_okay=False), help="Model bundle folder from `rcnn train-svm`.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder for detections.csv, detections.json, images.json, vis/.")
@click.option("--split", type=click.Path(exists=True, dir_okay=False),
              help="File of image stems: only these images are processed.")
@click.option("--save-vis", is_flag=True, help="Draw the detections into OUT/vis/.")
@click.option("--formats", help="Comma-separated outputs: csv, coco, voc, yolo "
                                "(default csv,coco).")
@click.option("--nms-iou", type=click.FloatRange(0, 1),
              help="Per-class IoU of greedy NMS (0.3; with --nms hard only).")
@click.option("--coco-ids", type=click.Path(exists=True, dir_okay=False),
              help="COCO instances .json: detections.json uses its image_id and category_id "
                   "values (matched by file name and class name), so it scores them directly.")
@click.option("--nms", type=click.Choice(["hard", "soft"]),
              help="hard: R-CNN's greedy NMS; soft: Gaussian soft-NMS (crowded scenes).")
@click.option("--box-vote-iou", type=click.FloatRange(0, 1),
              help="Box voting at this IoU (0 = off).")
@click.option("--score-thresh", type=float, help="Keep detections scoring above this.")
@click.option("--max-per-image", type=click.IntRange(min=1), help="Detections per image cap.")
@click.option("--no-bbox-regression", is_flag=True, default=None,
              help="Do not refine boxes with the model's regressors.")
@click.option("--dense", is_flag=True,
              help="OverFeat-style: score sliding windows at every position in one conv pass "
                   "instead of proposals (mobilenet_v2 shared 'grid' models).")
@click.option("--proposals", "proposals_dir", type=click.Path(exists=True, file_okay=False),
              help="Output folder of `rcnn propose` for these images: use its boxes instead of "
                   "computing them (made with the model's proposal settings; others warn).")
@common_options
@cluster_options
def detect(images, model_dir, out, split, save_vis, formats, coco_ids, nms_iou, nms, box_vote_iou,
           score_thresh, max_per_image, no_bbox_regression, dense, proposals_dir, config_file,
           common, overwrite):
    """Detect objects in every image of IMAGES (folders, files or list files) with a model.

    Writes OUT/detections.csv (image,class,score,x1,y1,x2,y2 in original pixels),
    OUT/detections.json (COCO results) with images.json and categories.json, and with
    --save-vis one picture per image in OUT/vis/.

    Example: rcnn detect data/images --split data/test.txt --model runs/model -o runs/det --save-vis
    """
    from rcnn_cli.detect import detect_folder

    fmts = [f.strip() for f in formats.split(",")] if formats else None
    flags = dict(nms_iou=nms_iou, nms=nms, box_vote_iou=box_vote_iou, score_thresh=score_thresh,
                 max_per_image=max_per_image,
                 bbox_regression=False if no_bbox_regression else None, formats=fmts)
    cfg = load_config(config_file, common=common, detect=flags)
    # thresholds stored in the model apply unless the user set them (config file or flag)
    explicit = cfgmod.explicit_keys(config_file, "detect")
    explicit.update({k: v for k, v in flags.items() if v is not None})
    overrides = {k: cfg["detect"][k] for k in explicit}
    report = detect_folder(list(images), model_dir, out, cfg, split=split, save_vis=save_vis,
                           overwrite=overwrite, overrides=overrides, coco_ids=coco_ids,
                           dense=dense, proposals=proposals_dir,
                           auto_workers=not _workers_chosen(config_file, common))
    from rcnn_cli.runrecord import resolved_device, stage_settings

    used = stage_settings(Path(out) / "per_image")
    record_run(cfg, ["common", "detect"], inputs=[*images, split, coco_ids, proposals_dir],
               model=model_dir,
               report=report, resolved={"device": resolved_device(cfg["common"]["device"]),
                                        "features": used.get("features"),
                                        "post": used.get("post"), "dense": dense,
                                        "workers": report.workers})
    for name in ("detections.csv", "detections.json"):
        if (Path(out) / name).exists():
            click.echo(str(Path(out) / name))
    finish(report)


# ------------------------------------------------------------------ evaluate
@cli.command()
@click.option("--annotations", required=True, type=click.Path(exists=True),
              help="Ground truth: a VOC folder, a COCO .json or a .csv.")
@click.option("--detections", "detections_dir", type=click.Path(exists=True, file_okay=False),
              help="Output folder of `rcnn detect`.")
@click.option("--proposals", "proposals_dir", type=click.Path(exists=True, file_okay=False),
              help="Output folder of `rcnn propose` (scores recall and ABO instead; with "
                   "--detections and --diagnose: did a proposal cover each missed object).")
@click.option("--split", type=click.Path(exists=True, dir_okay=False),
              help="File of image stems to evaluate on.")
@click.option("-o", "--out", type=click.Path(file_okay=False),
              help="Where metrics.json and the plots go (default: the evaluated folder).")
@click.option("--diagnose", is_flag=True,
              help="Also diagnose the errors (Hoiem et al.): false-positive types, misses by "
                   "size, AP sensitivity, plot; into metrics.json under \"diagnosis\".")
@click.option("--similar", metavar="A,B;C,D",
              help="--diagnose: groups of similar classes (their confusions count as Sim).")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
              help="--diagnose: the images folder, for contact sheets of the worst false "
                   "positives and the misses.")
@common_options
def evaluate(annotations, detections_dir, proposals_dir, split, out, diagnose, similar,
             images_dir, config_file, common, overwrite):
    """Score detections (VOC07 11-point AP, VOC2010+ AP, COCO AP) or proposals (recall at
    IoU 0.5/0.7, average recall, ABO/MABO) against ground truth.

    Detections are scored on the images detect processed that are annotated. Prints
    metrics.json's path and a one-line summary; with --diagnose also the diagnosis line.

    Example: rcnn evaluate --annotations data --detections runs/det --split data/test.txt
    """
    from rcnn_cli.datasets import AnnotationError
    from rcnn_cli.evaluate import DetectionsError, evaluate_folder

    if diagnose and detections_dir is None:
        raise click.UsageError("--diagnose needs --detections")
    if not diagnose and (detections_dir is None) == (proposals_dir is None):
        raise click.UsageError("give exactly one of --detections or --proposals "
                               "(both only with --diagnose)")
    if not diagnose and (similar or images_dir):
        raise click.UsageError("--similar and --images go with --diagnose")
    if out is not None and not overwrite and (Path(out) / "metrics.json").exists():
        raise click.UsageError(f"{Path(out) / 'metrics.json'} exists; pass --overwrite to "
                               "replace it")
    cfg = load_config(config_file, common=common)
    try:
        metrics, path = evaluate_folder(annotations, detections_dir, proposals_dir, split,
                                        out, cfg, diagnose=diagnose, similar=similar,
                                        images_dir=images_dir)
    except AnnotationError as e:
        raise click.BadParameter(str(e), param_hint="--annotations") from None
    except DetectionsError as e:
        raise click.BadParameter(str(e), param_hint="--detections") from None
    except ValueError as e:  # nothing to score (no image on both sides), bad --similar
        raise click.UsageError(str(e)) from None
    record_run(cfg, ["common", "evaluate"], folder=Path(path).parent,
               inputs=[annotations, detections_dir, proposals_dir, split, images_dir],
               counts={"images": metrics.get("num_images")},
               resolved={"scored": "detections" if detections_dir else "proposals",
                         "diagnose": diagnose})
    click.echo(str(path))
    click.echo(metrics["summary"], err=True)
    if diagnose:
        click.echo(metrics["diagnosis"]["summary"])


# ------------------------------------------------------------------ demo
@cli.command()
@click.option("-o", "--out", default="runs/demo", show_default=True,
              type=click.Path(file_okay=False), help="Output folder for every stage.")
@click.option("--data", type=click.Path(exists=True, file_okay=False),
              help="Run on this VOC folder instead (its train.txt/test.txt, else a seeded "
                   "80/20 split).")
@click.option("--no-vis", is_flag=True, help="Do not draw pictures of the detections.")
@common_options
def demo(out, data, no_vis, config_file, common, overwrite):
    """Run the whole chain (propose, extract, train-svm, detect, evaluate) on a small dataset
    built from photos bundled with scikit-image, or on your own VOC folder with --data.

    Prints the mAP and the paths of the pictures it drew. Without --workers (or a config
    file's [common] workers) selective search runs in one process per CPU (at most 4); the
    CNN stages stay in this process, whose torch threads use the cores already.

    Example: rcnn demo -o runs/demo
    """
    cfg = load_config(config_file, common=common)
    chosen = _workers_chosen(config_file, common)
    from rcnn_cli.demo import demo_workers, run_demo
    from rcnn_cli.stages import start_pool

    propose_workers = None if chosen else demo_workers()
    start_pool(cfg, "propose", propose_workers)  # selective search's workers warm meanwhile
    res = run_demo(out, cfg, data=data, overwrite=overwrite, save_vis=not no_vis,
                   propose_workers=propose_workers)
    from rcnn_cli.runrecord import resolved_device, stage_settings

    scored = json.loads(Path(res["metrics"]).read_text()).get("num_images")
    record_run(cfg, list(cfg), inputs=[data], model=Path(out) / "model",
               counts={"test_images": scored},
               resolved={"device": resolved_device(cfg["common"]["device"]),
                         "features": stage_settings(Path(out) / "features").get("features"),
                         "propose_workers": propose_workers or cfg["common"]["workers"]})
    click.echo(f"mAP (VOC07 11-point) {res['mAP_voc07']:.3f}  mAP (all-point) "
               f"{res['mAP_voc']:.3f}  COCO AP {res['coco_AP']:.3f}")
    click.echo(f"metrics: {res['metrics']}")
    for p in res["pictures"][:8]:
        click.echo(p)
    click.echo(f"seconds per stage: {json.dumps(res['seconds'])}", err=True)


# ------------------------------------------------------------------ info
@cli.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(model_dir, as_json):
    """Describe the model bundle MODEL_DIR: classes, backbone / tap / mode, training data
    (images, positives per class), stored thresholds, the post-processing `rcnn detect`
    applies without flags, and file sizes.

    Example: rcnn info runs/model --json
    """
    from rcnn_cli.info import format_info, model_info

    summary = model_info(model_dir)
    click.echo(json.dumps(summary, indent=2) if as_json else format_info(summary))


# ------------------------------------------------------------------ localize (issue 14)
@cli.group()
def localize():
    """Classification + localisation by regression: one class and one box per image (the
    approach R-CNN grew out of), for images with one main object.

    Example: rcnn localize train --annotations data --split data/train.txt -o runs/loc
    """


def _loc_default(key: str):
    """A [localize] default for help texts (default.toml is the one place it is written)."""
    return cfgmod.default(f"localize.{key}")


@localize.command("train")
@click.option("--annotations", required=True, type=click.Path(exists=True),
              help="Training ground truth (VOC folder, COCO .json or .csv).")
@click.option("--split", help="Stems file (or train/test/val of the VOC folder).")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
              help="Folder the annotation file names are relative to (COCO/CSV; default: "
                   "next to the file).")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Bundle folder (localize.json + localize.npz).")
@click.option("--attach", type=click.Choice(["conv", "fc"]),
              help="Box regressor on the conv features (conv, VGG-style) or after the shared "
                   f"fc layers (fc, DeepPose-style); default {_loc_default('attach')}.")
@click.option("--loss", type=click.Choice(["l2", "smooth_l1"]),
              help=f"Box regression loss (default {_loc_default('loss')}).")
@click.option("--finetune/--no-finetune", default=None,
              help="Also train the backbone's last blocks.")
@click.option("--parts", type=click.IntRange(min=1), default=None,
              help="Regress K part boxes per image (the K classes, ordered by name).")
@click.option("--iterations", type=click.IntRange(min=1),
              help=f"SGD iterations (default {_loc_default('iterations')}).")
@click.option("--seed", type=int,
              help="Seed of the init, batches and dropout (and of --weights random).")
@click.option("--backbone", type=click.Choice(["mobilenet_v2", "resnet18", "resnet50",
                                               "vgg16", "alexnet"]),
              help=f"Backbone network (default {_loc_default('backbone')}).")
@click.option("--weights", help="Backbone weights: .safetensors / .pth path, or 'random' "
                                "(default ImageNet).")
@click.option("--input-size", type=click.IntRange(min=32), default=None,
              help="Side the whole image is resized to (default: the backbone's, 224).")
@common_options
def localize_train(annotations, split, images_dir, out, attach, loss, finetune, parts,
                   iterations, seed, backbone, weights, input_size, config_file, common,
                   overwrite):
    """Train a softmax classifier and a box regressor on whole images (largest object of
    each image); prints the bundle folder.

    Example: rcnn localize train --annotations data --split data/train.txt -o runs/loc --attach conv
    """
    from rcnn_cli import localize as loc
    from rcnn_cli.datasets import AnnotationError, load_dataset

    cfg = load_config(config_file, common=common, localize={
        "attach": attach, "loss": loss, "finetune": finetune, "parts": parts,
        "iterations": iterations, "seed": seed, "backbone": backbone, "weights": weights,
        "input_size": input_size})
    lc = cfg["localize"]  # defaults < --config < flags; "" / 0 = the library's None
    parts = lc["parts"] or None
    if not overwrite and (Path(out) / loc.JSON_NAME).exists():
        raise click.UsageError(f"{out}: a localize bundle exists; pass --overwrite")
    try:
        ds = load_dataset(annotations, split=split, image_root=images_dir)
        if images_dir and Path(annotations).is_dir():
            ds.image_root = Path(images_dir)
        loc.training_targets(ds, parts)  # checks --parts against the classes first
    except (AnnotationError, loc.LocalizeError) as e:
        raise click.BadParameter(str(e), param_hint="--parts" if parts else "--annotations")
    try:
        model = loc.train_localizer(
            ds, attach=lc["attach"], loss=lc["loss"], finetune=lc["finetune"], parts=parts,
            iterations=lc["iterations"], seed=lc["seed"], backbone=lc["backbone"],
            weights=lc["weights"] or None, input_size=lc["input_size"] or None,
            hidden=lc["hidden"], lr=lc["lr"], batch_size=lc["batch_size"],
            device=cfg["common"]["device"])
    except (ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    loc.save_localizer(out, model, overwrite=overwrite)
    from rcnn_cli.runrecord import resolved_device

    record_run(cfg, ["common", "localize"], inputs=[annotations, images_dir],
               counts={"images": model.training_stats["images"]},
               resolved={"device": resolved_device(cfg["common"]["device"])})
    s = model.training_stats
    click.echo(f"localize: {s['images']} images, {s['several_objects']} with several objects "
               f"(largest used), loss {s['first_loss']:.3f} -> {s['final_loss']:.3f} in "
               f"{s['seconds']:.0f} s", err=True)
    click.echo(str(Path(out)))


@localize.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", "model_dir", required=True,
              type=click.Path(exists=True, file_okay=False),
              help="Bundle folder from `rcnn localize train`.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: detections.csv, detections.json, images.json, "
                   "categories.json, localize.json.")
@click.option("--split", type=click.Path(exists=True, dir_okay=False),
              help="File of image stems: only these images are processed.")
@click.option("--formats", help="Comma-separated outputs: csv, coco, voc, yolo (default "
                                f"{','.join(_loc_default('formats'))}).")
@click.option("--annotations", type=click.Path(exists=True),
              help="Ground truth: also write OUT/metrics.json (classification and "
                   "localisation accuracy, mean IoU).")
@click.option("--save-vis", is_flag=True, help="Draw the predictions into OUT/vis/.")
@common_options
def localize_predict(images, model_dir, out, split, formats, annotations, save_vis,
                     config_file, common, overwrite):
    """One class and one box (or K part boxes) per image of IMAGES, written in the formats
    of `rcnn detect` (one row per image in detections.csv).

    Example: rcnn localize predict data/images --split data/test.txt --model runs/loc -o runs/locdet --annotations data
    """
    from rcnn_cli import localize as loc

    try:
        fmts = loc.check_formats(formats.split(",")) if formats else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--formats") from None
    cfg = load_config(config_file, common=common, localize={"formats": fmts})
    fmts = cfg["localize"]["formats"]
    res = loc.predict_folder(list(images), model_dir, out, split=split, formats=fmts,
                             annotations=annotations, save_vis=save_vis,
                             device=cfg["common"]["device"], overwrite=overwrite)
    from rcnn_cli.runrecord import resolved_device

    record_run(cfg, ["common", "localize"], inputs=[*images, split, annotations],
               model=model_dir,
               report=res.report, resolved={"device": resolved_device(cfg["common"]["device"])})
    for p in res.written:
        if p.name in ("detections.csv", "detections.json", "metrics.json"):
            click.echo(str(p))
    if res.metrics is not None:
        click.echo(res.metrics["summary"], err=True)
    finish(res.report)
