"""Detection: proposals -> features -> SVM scores -> box regression -> per-class NMS.

:func:`detect_image` is the recipe for one image (read it top to bottom, like torchvision's
``roi_heads.postprocess_detections``); :func:`detect_folder` streams it over folders,
writing each image's result as it comes (``OUT/per_image/<image path>.npz``, e.g.
``per_image/sub/img.jpg.npz``, resumable), then the standard outputs: ``detections.csv``,
COCO ``detections.json`` + ``images.json`` + ``categories.json``, and optionally VOC-devkit /
YOLO text files (:mod:`rcnn_cli.formats`) and pictures (``vis/<image path>.jpg``).
Every output names an image by its path relative to the input folder, extension included.
"""
from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rcnn_cli import boxes as bx
from rcnn_cli import config as cfgmod
from rcnn_cli.backbones import GRID_CUTS
from rcnn_cli.images import ImageItem, list_images, read_image
from rcnn_cli.postprocess import (  # noqa: F401  (re-exported: detect's post-processing)
    MIN_BOX_SIDE,
    SOFT_NMS_FLOOR,
    SOFT_NMS_SIGMA,
    DetectSettings,
    box_voting,
    postprocess,
    soft_nms,
)
from rcnn_cli.runner import Report, is_current, run_stage_into
from rcnn_cli.stages import (
    compute_proposals,
    cpu_feature_settings,
    execution,
    get_extractor,
    start_pool,
    upstream_id,
    upstream_missing_reason,
    with_auto_workers,
    with_upstream,
)
from rcnn_cli.store import (
    StageStore,
    atomic_write_json,
    check_output_folder,
    check_settings_parts,
    claim_folder,
    file_identity,
    open_upstream,
    read_manifest,
)

log = logging.getLogger("rcnn_cli.detect")

#: 2: per-image files keyed by the relative path with extension, with identity entries
DETECT_FORMAT = 2
#: what detect writes at the top of its output folder (never over a file it did not write)
OUTPUT_FILES = ("per_image", "vis", "voc", "yolo", "detections.csv", "detections.json",
                "images.json", "categories.json", "summary.json", "config.toml")
#: the files each output format writes into the output folder
FORMAT_FILES = {"csv": ("detections.csv",),
                "coco": ("detections.json", "images.json", "categories.json"),
                "voc": ("voc",), "yolo": ("yolo",)}


def model_proposals(image: NDArray[np.uint8], proposal_settings: Mapping[str, Any],
                    max_proposals: int | None) -> NDArray[np.float32]:
    """Step 1 of :func:`detect_image`: the proposals a model was trained with (its
    ``proposal_settings``), the first ``max_proposals`` of them."""
    props, _ = compute_proposals(image, proposal_settings)
    return first_proposals(props, max_proposals)


def first_proposals(props: NDArray[np.float32], max_proposals: int | None
                    ) -> NDArray[np.float32]:
    """The first ``max_proposals`` of ranked boxes (all of them for None): what a model
    scores per image, its ``[extract] max_proposals``."""
    return props if max_proposals is None else props[:max_proposals]


def detect_image(image: NDArray[np.uint8], model, extractor,
                 settings: DetectSettings,
                 proposals: NDArray[np.float32] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Detections of one image (uint8 (H, W, 3) RGB) with a loaded model bundle.

    ``proposals``: the image's :func:`model_proposals`, when another process made them.
    Returns a dict with ``boxes`` (M, 4) float32, ``scores`` (M,) float32, ``labels`` (M,)
    int64 and ``times`` (seconds per step, read from ``clock``).
    """
    size = image.shape[:2]
    t0 = clock()
    # 1. proposals, with the settings the model was trained with
    props = proposals if proposals is not None else model_proposals(
        image, model.proposal_settings, model.extract_settings.get("max_proposals"))
    t1 = clock()
    proj = _top_projection(model, extractor)
    if proj is None:
        # 2. one feature vector per proposal
        feats = extractor.extract(image, props)
        t2 = clock()
        # 3.-5. scores, box regression, post-processing
        out = detect_from_features(props, feats, model, size, settings)
    else:  # the same, with the first linear step moved before the top map's box means
        pooled, coverage, rest = extractor.extract_projected(image, props, proj.top_w,
                                                             proj.top_centre)
        t2 = clock()
        scores, deltas = model.scores_and_deltas(proj.finish(pooled, coverage, rest))
        out = _detections(props, scores, deltas, model, size, settings)
    t3 = clock()
    out["times"] = {"features": t2 - t1, "scoring": t3 - t2}
    if proposals is None:
        out["times"]["proposals"] = t1 - t0
    return out


def detect_from_features(props: NDArray[np.float32], feats: NDArray, model,
                         image_size: tuple[int, int], settings: DetectSettings
                         ) -> dict[str, Any]:
    """Detections of one image from its proposals (N, 4) and their features (N, D).

    The scoring half of :func:`detect_image`; cross-validation scores cached extract
    features with it, so what it measures is what ``rcnn detect`` computes (which, for an fc
    head on the ``grid`` tap, applies fc6 to the top map before its box means:
    :class:`rcnn_cli.model.TopProjection`, the same numbers to float rounding, tested).
    Returns a dict with ``boxes`` (M, 4) float32, ``scores`` (M,) float32, ``labels`` (M,).
    """
    # 3. class scores from the per-class linear SVMs (on the fc head's fc7 when the model has
    #    one); 4. per-class box regression deltas
    scores = model.score(feats)
    deltas = model.deltas(feats) if settings.bbox_regression and model.regressors is not None \
        else None
    return _detections(props, scores, deltas, model, image_size, settings)


def _top_projection(model, extractor):
    """The model's :class:`rcnn_cli.model.TopProjection` for ``extractor``'s features when
    both allow it (an fc head; the ``grid`` tap's summed-area path), else None."""
    top = getattr(extractor, "top_channels", None)
    if top is None or model.head is None or model.dim != extractor.dim:
        return None
    return model.top_projection(top)


def _detections(props: NDArray[np.float32], scores: NDArray[np.float32],
                deltas: NDArray[np.float32] | None, model, image_size: tuple[int, int],
                settings: DetectSettings) -> dict[str, Any]:
    """Steps 3.-5. of :func:`detect_from_features` from the scores (N, K) and deltas
    (N, K, 4) (None: no regression)."""
    scores[:, ~model.svm_trained] = -np.inf  # untrained classes never fire
    # 4. per-class box regression (R-CNN applies it once), else the proposal itself
    if settings.bbox_regression and deltas is not None:
        k = deltas.shape[1]
        boxes = bx.decode(np.repeat(props, k, axis=0), deltas.reshape(-1, 4)).reshape(-1, k, 4)
    else:
        boxes = np.repeat(props[:, None, :], scores.shape[1], axis=1)
    # 5. clip, threshold, per-class NMS, cap
    b, s, lab = postprocess(boxes, scores, image_size, settings)
    return {"boxes": b, "scores": s, "labels": lab}


# ------------------------------------------------------------------ folders
_MODELS: dict[str, Any] = {}


def _get_model(model_dir: str):
    from rcnn_cli.model import load_model

    if model_dir not in _MODELS:
        _MODELS.clear()
        _MODELS[model_dir] = load_model(model_dir)
    return _MODELS[model_dir]


def model_extractor_kwargs(model, model_dir: str | Path, device: str) -> dict[str, Any]:
    """FeatureExtractor arguments the model was trained with (weights inside the bundle are
    resolved against its folder, so a bundle can move between machines)."""
    kw = dict(model.extractor_settings(), device=device)
    w = kw.get("weights")
    if w and w != "random" and not Path(w).is_absolute():
        kw["weights"] = str(Path(model_dir) / w)
    return kw


def _grid_tap(kwargs: Mapping[str, Any]) -> bool:
    """Whether extractor ``kwargs`` may use the ``grid`` tap, without torch: named, or a
    default tap that :func:`rcnn_cli.features.default_tap` may resolve to it (older bundles)."""
    tap = kwargs.get("tap")
    return tap == "grid" or (not tap and kwargs.get("backbone") in GRID_CUTS
                             and kwargs.get("mode") != "warp")


def model_key(model_dir: str | Path) -> str:
    """Content hash of a bundle's files (detect caches are keyed by it)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(model_dir).iterdir()):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:32]


def prepare_detect(item: ImageItem, proposal_settings: Mapping[str, Any],
                   max_proposals: int | None) -> dict[str, Any]:
    """The CPU half of :func:`detect_one` (decode, selective search), run by a pool of
    processes that feeds a GPU process (``rcnn detect --device cuda --workers N``)."""
    t0 = time.perf_counter()
    source = file_identity(item.path)
    img = read_image(item.path)
    t1 = time.perf_counter()
    props = model_proposals(img, proposal_settings, max_proposals)
    return {"source": source, "image": img, "proposals": props,
            "times": {"decode": t1 - t0, "proposals": time.perf_counter() - t1}}


def propose_for_detect(item: ImageItem, proposal_settings: Mapping[str, Any],
                       max_proposals: int | None) -> dict[str, Any]:
    """:func:`prepare_detect` without the image: what `rcnn detect`'s driver makes while its
    pool starts (:func:`rcnn_cli.executors.map_images_on`'s ``driver_prepare``); the worker
    decodes the image again (cheap, and no image crosses the process boundary)."""
    prepared = prepare_detect(item, proposal_settings, max_proposals)
    del prepared["image"]
    return prepared


def detect_one(item: ImageItem, store: StageStore, model_dir: str,
               extractor_kwargs: Mapping[str, Any], settings: DetectSettings,
               vis_dir: str | None, dense: bool = False,
               prepared: Mapping[str, Any] | None = None,
               upstream: StageStore | None = None) -> dict:
    """Per-image work of `rcnn detect` (one process loads model and backbone once);
    ``dense``: score dense sliding windows (:func:`rcnn_cli.dense.detect_dense`) instead of
    the model's proposals; ``prepared``: :func:`prepare_detect`'s result for this image
    (made by another process), else this call decodes and proposes itself (without its
    ``"image"``: :func:`propose_for_detect`'s, the image is decoded here, and its proposals
    are used if the file is still the one they were made from); ``upstream``: an
    `rcnn propose` folder whose boxes for this image are used instead (``--proposals``)."""
    t0 = time.perf_counter()
    decoded = prepared is None or "image" not in prepared
    if decoded:
        source = file_identity(item.path)
        img = read_image(item.path)
        if prepared is not None and not np.array_equal(prepared["source"], source):
            prepared = None  # the file changed since the driver proposed: propose again
    else:
        source, img = prepared["source"], prepared["image"]
    t_load = time.perf_counter()
    model = _get_model(model_dir)
    ext = get_extractor(extractor_kwargs)
    if store.settings.get("features") not in (None, ext.settings()):  # keyed without torch
        raise RuntimeError(f"the detect store is keyed by features {store.settings['features']}"
                           f" but the backbone loaded gives {ext.settings()} (a bug: please "
                           "report it; --workers 1 avoids it)")
    times = {"decode": t_load - t0} if decoded else {}
    times["load"] = time.perf_counter() - t_load  # model and backbone: once per process
    props, up_id = None if prepared is None else prepared["proposals"], None
    if upstream is not None:
        t1 = time.perf_counter()
        up_id = upstream.record_id(item.rel, source=source)
        if up_id is None:  # changed after detect_folder paired them
            raise ValueError(f"no up-to-date proposals in {upstream.root} (image changed or "
                             "not proposed: rerun `rcnn propose`)")
        props = first_proposals(upstream.load(item.rel)["boxes"],
                                model.extract_settings.get("max_proposals"))
        times["proposals"] = time.perf_counter() - t1
    if dense:
        from rcnn_cli.dense import detect_dense

        out = detect_dense(img, model, ext, settings)
    else:
        out = detect_image(img, model, ext, settings, props)
    store.save(item.rel, {"boxes": out["boxes"], "scores": out["scores"],
                          "labels": out["labels"],
                          "image_size": np.array(img.shape[:2], np.int64)}, source=source,
               upstream=up_id)
    if vis_dir is not None:
        from rcnn_cli.visualize import draw_detections, save_image

        show = out["scores"] > settings.vis_thresh
        pic = draw_detections(img, out["boxes"][show], out["labels"][show], out["scores"][show],
                              model.classes)
        save_image(vis_path(vis_dir, item.rel), pic)
    return {"times": {**times, **out["times"]}}


def vis_path(vis_dir: str | Path, rel: str) -> Path:
    """Picture of image ``rel``: ``vis/<rel>.jpg`` (``img.png`` -> ``vis/img.png.jpg``), so
    ``img.jpg`` and ``img.png`` get two pictures."""
    from rcnn_cli.store import check_rel

    return Path(vis_dir) / f"{check_rel(rel)}.jpg"


def check_detect_folder(out: str | Path, inputs: list[str | Path], model_dir: str | Path,
                        overwrite: bool, proposals: str | Path | None = None) -> None:
    """Refuse an output folder that is (inside) an input folder, the model bundle or the
    ``proposals`` folder, or that holds files rcnn did not write (no
    ``per_image/manifest.json`` of a detect run) unless ``overwrite``; even then none of
    :data:`OUTPUT_FILES` may exist there.

    Raises:
        ForeignFolderError: naming the folder.
    """
    check_output_folder(out, [model_dir], overwrite=False, what="-o, --model")
    if proposals is not None:
        check_output_folder(out, [proposals], overwrite=False, what="-o, --proposals")
    check_output_folder(out, inputs, overwrite)
    m = read_manifest(Path(out) / "per_image")
    claim_folder(out, m is not None and m.get("stage") == "detect", OUTPUT_FILES, overwrite)


def model_detect_settings(model, cfg: Mapping[str, Any],
                          overrides: Mapping[str, Any] | None = None) -> DetectSettings:
    """Post-processing settings: the model bundle's thresholds (NMS IoU, score threshold,
    detections per image), then ``overrides`` (what the user set in a config file or with
    flags); the rest from ``cfg["detect"]``. ``overrides=None`` means: take everything from
    ``cfg`` (library callers that resolved settings themselves)."""
    d = cfg["detect"]
    if overrides is None:
        base = {k: d[k] for k in ("nms_iou", "score_thresh", "max_per_image")}
    else:
        base = {"nms_iou": model.nms_iou, "score_thresh": model.score_threshold,
                "max_per_image": model.max_detections}
        base.update({k: v for k, v in overrides.items() if k in base})
    extra = dict(d) if overrides is None else {**d, **overrides}
    if overrides and "nms_iou" in overrides and extra["nms"] != "hard":  # soft: no IoU cut
        log.warning("nms_iou (--nms-iou) applies to --nms hard only; Gaussian soft-NMS "
                    "(nms = %s) has no IoU threshold, so it is ignored", extra["nms"])
    return DetectSettings(nms_iou=float(base["nms_iou"]), score_thresh=float(base["score_thresh"]),
                          max_per_image=int(base["max_per_image"]),
                          bbox_regression=bool(extra["bbox_regression"]),
                          vis_thresh=float(extra["vis_thresh"]), nms=str(extra["nms"]),
                          box_vote_iou=float(extra["box_vote_iou"]))


def _feeds_gpu(device_type: str, cfg: Mapping[str, Any], dense: bool) -> bool:
    """Whether detect runs as a pipeline: ``--workers`` processes of selective search feeding
    the one process that holds the model on a GPU (there, proposals are the slow part: 0.21 s
    per image on a core against 0.04 s of GPU features and 0.04 s of scoring, H200)."""
    c = cfg["common"]
    return (device_type == "cuda" and not dense and c["executor"] == "local"
            and c["workers"] > 1)


def detect_folder(inputs: list[str | Path], model_dir: str | Path, out: str | Path,
                  cfg: Mapping[str, Any], split: str | Path | None = None,
                  save_vis: bool = False, formats: list[str] | None = None,
                  overwrite: bool = False,
                  overrides: Mapping[str, Any] | None = None,
                  coco_ids: str | Path | None = None, dense: bool = False,
                  proposals: str | Path | None = None, auto_workers: bool = False) -> Report:
    """Detect objects in folders of images with a model bundle; write all outputs to ``out``.

    Thresholds come from the model bundle unless ``overrides`` (the user's explicit
    [detect] settings) change them; see :func:`model_detect_settings`. Per-image results
    stream to ``out/per_image`` (a killed run resumes); the summary files are written at
    the end from those. ``coco_ids``: a COCO instances file whose ``image_id`` and
    ``category_id`` values ``detections.json`` uses (:func:`coco_ids_for`). ``dense``:
    score dense sliding windows instead of proposals (:mod:`rcnn_cli.dense`; the model must
    have shared-mode ``grid`` features, else :class:`ConfigError` before any work).
    ``proposals``: an `rcnn propose` folder for these images, whose boxes are used instead of
    computing them (precomputed proposals, as Fast R-CNN evaluates); an image it has no
    up-to-date boxes for fails, the rest are detected. Boxes made with other settings than
    the model's are used with a warning (the results are keyed by the folder's settings).
    ``auto_workers``: choose ``cfg``'s workers from the folder
    (:func:`rcnn_cli.stages.with_auto_workers`: processes for selective search; the CLI's
    default); the report's ``workers`` says how many ran. With a local pool on a CPU this
    process does not load the backbone (the store's key comes from
    :func:`rcnn_cli.stages.cpu_feature_settings`, which each worker checks against its
    extractor) and proposes the images after the pool's first ones while its processes
    start (:func:`propose_for_detect`).
    """
    if dense and proposals is not None:
        raise cfgmod.ConfigError("--proposals: dense windows replace the proposals; give "
                                 "--dense or --proposals, not both")
    check_detect_folder(out, inputs, model_dir, overwrite, proposals)
    model = _get_model(str(model_dir))
    items = list_images(inputs, split=split, exclude=[out])
    upstream = up_ids = None
    if proposals is not None:
        upstream = open_upstream(proposals, "propose")
        if dict(upstream.settings) != dict(model.proposal_settings):
            log.warning("--proposals %s: made with %s, the model was trained on %s; "
                        "detections may be worse", proposals, dict(upstream.settings),
                        dict(model.proposal_settings))
        up_ids = {it.rel: upstream_id(upstream, it) for it in items}
    ids = None if coco_ids is None else coco_ids_for(items, coco_ids, model.classes)
    if auto_workers:  # each process runs its images' selective search (and, on a CPU, CNN)
        cfg = with_auto_workers(cfg, items, not dense and upstream is None and
                                model.proposal_settings.get("method") != "sliding")
    d = cfg["detect"]
    settings = model_detect_settings(model, cfg, overrides)
    kwargs = model_extractor_kwargs(model, model_dir, cfg["common"]["device"])
    # the parts of the store key known without loading the backbone: a folder of another
    # model or other settings is refused now, not after torch and the backbone load
    key = {"model": model_key(model_dir),
           "proposals": model.proposal_settings if upstream is None else dict(upstream.settings),
           "post": {k: v for k, v in settings.__dict__.items() if k != "vis_thresh"}}
    check_settings_parts(Path(out) / "per_image", "detect",
                         {**key, **({} if dense else {"dense": None})},
                         None if upstream is None else upstream.key, DETECT_FORMAT, overwrite)
    # inputs checked: the workers import torch beside this process
    searches = (not dense and upstream is None
                and model.proposal_settings.get("method") == "selective_search")
    # a CPU pool of selective-search processes: the features' key without torch here, so
    # this process makes proposals while the pool starts instead of loading the backbone,
    # and the pool's server loads model and backbone once for its workers
    helping = (searches and cfg["common"]["executor"] == "local"
               and cfg["common"]["workers"] > 1)
    key["features"] = cpu_feature_settings(kwargs) if helping else None
    start_pool(cfg, "detect", selective_search=searches,
               grid_kernel=not dense and _grid_tap(kwargs),
               detector=None if key["features"] is None else (str(model_dir), kwargs))
    if key["features"] is None:
        helping = False
        ext = get_extractor(kwargs)  # load once here: fails early on missing weights
        key["features"] = ext.settings()
    device_type = "cpu" if helping else ext.device.type
    if dense:  # dense windows replace the proposals: their results never mix
        from rcnn_cli.dense import check_dense, dense_settings

        check_dense(ext)
        key["dense"] = dense_settings()
    store = StageStore(Path(out) / "per_image", "detect", key, format_version=DETECT_FORMAT,
                       upstream_key=None if upstream is None else upstream.key)
    vis_dir = str(Path(out) / "vis") if save_vis else None
    fn = functools.partial(detect_one, store=store, model_dir=str(model_dir),
                           extractor_kwargs=kwargs, settings=settings, vis_dir=vis_dir,
                           dense=dense, upstream=upstream)
    run = execution(cfg, device_type)
    prepare = driver_prepare = None
    proposing = {"proposal_settings": model.proposal_settings,
                 "max_proposals": model.extract_settings.get("max_proposals")}
    if helping:
        driver_prepare = functools.partial(propose_for_detect, **proposing)
    if upstream is None and _feeds_gpu(device_type, cfg, dense):  # CPU processes feed
        # this GPU process (with --proposals there is no selective search to hand them)
        prepare = functools.partial(prepare_detect, **proposing)
        run["workers"] = cfg["common"]["workers"]
        log.info("detect: %d processes make proposals for the %s process",
                 run["workers"], device_type)
    todo, missing = (items, []) if up_ids is None else with_upstream(items, up_ids,
                                                                      run.pop("shard"))
    # an image is done when its result is current (and its picture exists, with --save-vis)
    report = run_stage_into(store, fn, todo, overwrite=overwrite, desc="detect", holds_model=True,
                            upstream=up_ids,
                            write_settings=functools.partial(cfgmod.write_resolved, out, cfg,
                                                             ["common", "detect"]),
                            also_done=None if vis_dir is None else
                            lambda it: vis_path(vis_dir, it.rel).is_file(),
                            prepare=prepare, driver_prepare=driver_prepare, **run)
    for it in missing:
        report.fail(str(it.path), f"{upstream_missing_reason(upstream, it)} (run `rcnn "
                    "propose` on it)")
    # every shard's current results, but none whose proposals are gone or changed
    write_outputs(out, store, [it for it in items if up_ids is None or up_ids[it.rel]],
                  model.classes, formats or d["formats"], coco_ids=ids)
    return report


def coco_ids_for(items: list[ImageItem], annotations: str | Path, classes: list[str]
                 ) -> tuple[dict[str, int], list[int]]:
    """The user's COCO ids for detect's outputs: (image rel -> image_id, the category_id of
    each model class), from a COCO instances file paired with ``items`` by file name.

    Raises:
        ValueError: the file is not COCO, or a model class has no category of that name.
    """
    from rcnn_cli.datasets import load_dataset, match_annotations

    full = load_dataset(annotations)
    if full.category_ids is None:
        raise ValueError(f"{annotations}: --coco-ids needs a COCO instances .json")
    by_name = dict(zip(full.classes, full.category_ids))
    missing = [c for c in classes if c not in by_name]
    if missing:
        raise ValueError(f"{annotations}: no category named {missing[0]!r} (the model's "
                         f"classes: {classes})")
    ds, _ = match_annotations(items, full)
    image_ids = {r.file_name: r.image_id for r in ds.records if r.image_id is not None}
    return image_ids, [int(by_name[c]) for c in classes]


def write_outputs(out: str | Path, store: StageStore, items: list[ImageItem],
                  classes: list[str], formats: list[str],
                  coco_ids: tuple[dict[str, int], list[int]] | None = None) -> list[Path]:
    """Summary files of a detect run from its per-image results (images that failed, or
    changed since they were detected, are left out)."""
    from rcnn_cli import formats as fm

    dets, sizes = {}, {}
    for it in items:
        if not is_current(store, it):
            continue
        r = store.load(it.rel)
        dets[it.rel] = fm.Detections(r["boxes"], r["scores"], r["labels"])
        sizes[it.rel] = tuple(int(v) for v in r["image_size"])
    out = Path(out)
    written = []
    unknown = set(formats) - {"csv", "coco", "voc", "yolo"}
    if unknown:
        raise ValueError(f"formats: unknown {sorted(unknown)} (choose csv, coco, voc, yolo)")
    # outputs of formats not asked for this time are an earlier run's: remove them, so that
    # evaluate never scores stale files next to fresh ones (the folder is ours: claim_folder)
    for fmt, names in FORMAT_FILES.items():
        if fmt not in formats:
            for name in names:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.is_file():
                    p.unlink()
    if "csv" in formats:
        written.append(fm.write_detections_csv(out / "detections.csv", dets, classes))
    if "coco" in formats:
        image_ids, cat_ids = coco_ids if coco_ids is not None else (None, None)
        written += fm.write_coco_results(out, dets, sizes, classes, image_ids, cat_ids)
    if "voc" in formats:
        written += fm.write_voc_results(out / "voc", dets, classes)
    if "yolo" in formats:
        written += fm.write_yolo_results(out / "yolo", dets, sizes)
    n = sum(len(d) for d in dets.values())
    atomic_write_json(out / "summary.json", {"images": len(dets), "detections": n,
                                             "classes": classes})
    return written
