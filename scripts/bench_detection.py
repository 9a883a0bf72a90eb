"""Detection quality and CPU speed on a VOC folder, against torchvision's Faster R-CNN.

Trains on train.txt and scores on test.txt (default ../shared/data/raccoon) with the
toolkit's CPU configuration (selective search fast + shared-mode features + fc head + SVMs
+ box regression), once with frozen ImageNet mobilenet_v2 features and, with ``--weights``,
once with fine-tuned weights (e.g. the warp-mode fine-tuning of scripts/gpu_bench.sh); each
with the fc head (``train_svm.head = auto``, the default) and without it (SVMs on the
features, R-CNN on pool5-like features). Reports AP50 (VOC07 11-point and all-point) and
COCO AP with and without box regression, seconds
per image per detect stage, and the peer's CPU inference time on the same test images in
the same run (torchvision Faster R-CNN, mobilenet_v2 ImageNet backbone, tutorial
configuration, default 800 px resize), and our marginal detect time per image (a second
run over every image of the folder: the peer's figure leaves out its start-up, ours on 40
images carries the worker pool's). Prints one JSON line.

usage: python scripts/bench_detection.py [--data DIR] [--weights FT.safetensors] [--work DIR]
       python scripts/bench_detection.py --cv 5 [--configs default,head_seed1,...]

``--cv K`` chooses settings on the training images only (the VOC rule): K folds of
``train.txt`` (by image, seeded ``sklearn.model_selection.KFold``); the training features are
extracted once, each configuration is trained on K-1 folds and scored on the held-out fold
from the cached features of its proposals (exactly what ``rcnn detect`` computes for those
images: same proposals, same extractor), for several post-processing variants at once.
Prints one JSON line: per configuration and variant the mean, standard deviation and per-fold
AP50 (VOC07 and all-point) and COCO AP. ``test.txt`` is never read in this mode.
A configuration with an ``extract`` override (e.g. ``lite0``: the efficientnet_lite0 backbone)
or a ``propose`` one gets its own feature folder (``WORK/feats_cv_<name>``), extracted once; every configuration is
paired fold by fold with the first one named. ``--feats DIR`` reads the default configuration's
training features from an earlier run's folder (read only) instead of extracting them.
``--score-test`` then trains each configuration on all of ``train.txt`` and scores
``test.txt`` once, offline from the test images' cached features (what ``rcnn detect``
computes), with the seconds per image of feature extraction on the test images.
Configurations that change ``[propose]`` or ``[extract]`` (``shared720``, ``propose800``: small
objects) propose / extract the training images again into their own folders; the folds stay
the same, so the paired differences hold.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rcnn_cli import config
from rcnn_cli.datasets import load_dataset
from rcnn_cli.detect import detect_folder
from rcnn_cli.evaluate import evaluate_folder
from rcnn_cli.images import read_image
from rcnn_cli.stages import extract_folder, propose_folder
from rcnn_cli.train import train_model

ROOT = Path(__file__).resolve().parents[1]


def peer_seconds_per_image(paths: list[Path], threads: int) -> float:
    """CPU inference time of torchvision's Faster R-CNN (peer_fasterrcnn.py's build())."""
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.set_num_threads(threads)
    mb = torchvision.models.mobilenet_v2(
        weights=torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)
    backbone = mb.features
    backbone.out_channels = 1280
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    torch.manual_seed(0)
    model = FasterRCNN(backbone, num_classes=2, rpn_anchor_generator=anchors,
                       box_roi_pool=pool).eval()
    ims = [torch.from_numpy(read_image(p)).permute(2, 0, 1).float() / 255 for p in paths]
    with torch.inference_mode():
        model([ims[0]])  # warm-up
        t0 = time.perf_counter()
        for im in ims:
            model([im])
    return (time.perf_counter() - t0) / len(ims)


def run_variant(tag: str, data: Path, work: Path, cfg: dict, weights: str | None,
                heads: tuple[str, ...] = ("auto", "none")) -> dict:
    """Extract the training features once, then for each ``train_svm.head`` setting train a
    model and detect / evaluate on the test split with and without box regression."""
    cfg = json.loads(json.dumps(cfg))
    cfg["extract"]["weights"] = weights or ""
    images = [str(data / "images")]
    t0 = time.perf_counter()
    rep = extract_folder(images, work / "props", work / f"feats_{tag}", cfg, annotations=data,
                         split=data / "train.txt", overwrite=True)
    out: dict = {"extract_train_s_per_image": round((time.perf_counter() - t0)
                                                    / max(rep.done, 1), 3)}
    for head in heads:
        cfg["train_svm"]["head"] = head
        model_dir = work / f"model_{tag}_{head}"
        t0 = time.perf_counter()
        model = train_model(work / f"feats_{tag}", model_dir, cfg, overwrite=True)
        res: dict = {"train_svm_s": round(time.perf_counter() - t0, 1),
                     "fc_head": model.head is not None}
        for reg in (True, False):
            cfg["detect"]["bbox_regression"] = reg
            name = f"det_{tag}_{head}" + ("" if reg else "_noreg")
            shutil.rmtree(work / name, ignore_errors=True)
            rep = detect_folder(images, model_dir, work / name, cfg, split=data / "test.txt")
            m, _ = evaluate_folder(data, work / name, None, data / "test.txt", None, cfg)
            key = "bbox_reg" if reg else "no_bbox_reg"
            res[key] = {"ap50_voc07": round(m["mAP_voc07"], 4),
                        "ap50_allpoint": round(m["mAP_voc"], 4),
                        "coco_ap": round(m["coco"]["AP"], 4)}
            if reg:
                n = max(rep.done, 1)
                res["detect_s_per_image"] = {k: round(v / n, 3)
                                             for k, v in rep.stage_seconds.items()}
                res["detect_s_per_image"]["total"] = round(rep.seconds / n, 3)
                res["detect_seconds"], res["detect_images"] = round(rep.seconds, 3), rep.done
        out[f"head_{head}"] = res
    return out


# ------------------------------------------------------------------ cross-validation
#: Training configurations compared by ``--cv`` (overrides of the resolved config).
CV_CONFIGS: dict[str, dict] = {
    "default": {},
    "head_seed1": {"train_svm": {"seed": 1}},
    "head_seed2": {"train_svm": {"seed": 2}},
    "no_head": {"train_svm": {"head": "none"}},
    "lambda300": {"train_svm": {"bbox_lambda": 300.0}},
    "lambda3000": {"train_svm": {"bbox_lambda": 3000.0}},
    "reg_iou05": {"train_svm": {"bbox_min_overlap": 0.5}},
    "neg_overlap05": {"train_svm": {"neg_overlap": 0.5}},
    # feature-side settings (small objects): own proposals / features per configuration
    "shared720": {"extract": {"shared_scale": [720, 1200]}},
    "propose800": {"propose": {"max_side": 800, "min_size": 10}},
    "lite0": {"extract": {"backbone": "efficientnet_lite0"}},
    "lite0_pool": {"extract": {"backbone": "efficientnet_lite0", "tap": "pool"}},
    # the compact training store (`extract --keep train`, the default of `rcnn extract
    # --annotations`); held-out images are still scored from all their windows
    "compact": {"extract": {"keep": "train", "keep_near_iou": 0.3}},
    "compact_near01": {"extract": {"keep": "train", "keep_near_iou": 0.1}},
    # `rcnn extract --annotations` as it is by default (keep_near_iou = 0: by dataset size)
    "compact_auto": {"extract": {"keep": "train"}},
    # fewer fc-head SGD iterations (train-svm time; the demo's 60 s)
    "head_500": {"train_svm": {"head_iterations": 500}},
    "head_1000": {"train_svm": {"head_iterations": 1000}},
    "head_3000": {"train_svm": {"head_iterations": 3000}},
    "head_lr002": {"train_svm": {"head_lr": 0.02}},
}

#: Post-processing variants scored offline on every trained fold model ("default" is the
#: current [detect] default: soft-NMS + box voting at 0.5; "rcnn" is R-CNN's greedy NMS 0.3).
CV_VARIANTS: dict[str, dict] = {
    "default": {},
    "rcnn": {"nms": "hard", "box_vote_iou": 0.0},
    "no_bbox_reg": {"bbox_regression": False},
    "hard_nms0.4": {"nms": "hard", "box_vote_iou": 0.0, "nms_iou": 0.4},
    "hard_nms0.5": {"nms": "hard", "box_vote_iou": 0.0, "nms_iou": 0.5},
    "soft_nms_only": {"nms": "soft", "box_vote_iou": 0.0},
    "hard_nms_vote0.5": {"nms": "hard", "box_vote_iou": 0.5},
    "soft_nms_vote0.7": {"nms": "soft", "box_vote_iou": 0.7},
}


def _merge(cfg: dict, over: dict) -> dict:
    out = json.loads(json.dumps(cfg))
    for sec, kv in over.items():
        out[sec].update(kv)
    return out


def _offline_detections(model, record: dict, settings) -> dict:
    """What detect computes for one image, from its cached proposal features."""
    from rcnn_cli.detect import detect_from_features

    props = record["gt_label"] < 0
    return detect_from_features(record["boxes"][props],
                                record["features"][props].astype(np.float32), model,
                                tuple(int(v) for v in record["image_size"]), settings)


def _fold_scores(model_dir: Path, store, ids: list[str], classes: list[str], cfg: dict) -> dict:
    """AP of every post-processing variant on the held-out images ``ids``."""
    from rcnn_cli.detect import model_detect_settings
    from rcnn_cli.evaluate import Detections, evaluate_detections
    from rcnn_cli.model import load_model

    model = load_model(model_dir)
    records = {i: store.load(i) for i in ids}
    gts = {i: (r["gt_boxes"], r["gt_labels"], r["gt_difficult"]) for i, r in records.items()}
    out = {}
    for name, over in CV_VARIANTS.items():
        st = model_detect_settings(model, cfg, over)
        dets = {}
        for i, r in records.items():
            d = _offline_detections(model, r, st)
            dets[i] = Detections(d["boxes"], d["scores"], d["labels"])
        m, _ = evaluate_detections(gts, dets, classes)
        out[name] = {"ap50_voc07": m["mAP_voc07"], "ap50_allpoint": m["mAP_voc"],
                     "coco_ap": m["coco"]["AP"]}
    return out


def _spread(values: list[float]) -> dict:
    v = np.asarray(values, float)
    return {"mean": round(float(v.mean()), 4), "std": round(float(v.std(ddof=1)), 4)
            if len(v) > 1 else 0.0, "folds": [round(float(x), 4) for x in v]}


def _cv_features(data: Path, work: Path, cfg: dict, name: str, feats: Path | None):
    """The training features of configuration ``name``: ``feats`` (read only) for the default
    propose and extract settings when given, else extracted once into
    ``WORK/feats_cv[_<name>]`` (from ``WORK/props[_<name>]`` when it overrides [propose])."""
    from rcnn_cli.store import open_upstream

    over = CV_CONFIGS[name]
    own = bool({"propose", "extract"} & set(over))
    if not own and feats is not None:
        return feats, open_upstream(feats, "extract")
    c = _merge(cfg, over)
    props = work / ("props_" + name if "propose" in over else "props")
    out = work / ("feats_cv_" + name if own else "feats_cv")
    images, split = [str(data / "images")], data / "train.txt"
    propose_folder(images, props, c, split=split)
    t0 = time.perf_counter()
    rep = extract_folder(images, props, out, c, annotations=data, split=split)
    if rep.done:
        print(json.dumps({"config": name, "extract_s_per_image": round(
            (time.perf_counter() - t0) / rep.done, 3)}), file=sys.stderr, flush=True)
    return out, open_upstream(out, "extract")


def run_cv(data: Path, work: Path, cfg: dict, k: int, configs: list[str], seed: int,
           reuse: bool = False, feats: Path | None = None) -> dict:
    """K-fold cross-validation over train.txt (see the module docstring)."""
    from sklearn.model_selection import KFold

    cfg = _merge(cfg, {"extract": {"keep": "all"}})  # held-out folds are scored from the store
    res: dict = {"data": str(data), "k": k, "fold_seed": seed, "variants": list(CV_VARIANTS),
                 "configs": {}}
    ids: list[str] = []
    full = None  # the first configuration's store: held-out images of a compact one
    for name in configs:
        c = _merge(cfg, CV_CONFIGS[name])
        feats_dir, store = _cv_features(data, work, cfg, name, feats)
        if "keep" in store.settings:  # a compact store trains; all windows are scored
            if full is None:
                raise SystemExit(f"{name}: a compact store needs a full configuration first")
            store = full
        full = full or store
        if not ids:
            ids = store.done_rels()
            classes = list(store.settings["classes"])
            folds = list(KFold(k, shuffle=True, random_state=seed).split(ids))
            res["images"] = len(ids)
        elif store.done_rels() != ids:  # the folds must hold the same images for every config
            raise SystemExit(f"{feats_dir}: holds other images than the first configuration's")
        per: dict[str, dict[str, list[float]]] = {}
        t0 = time.perf_counter()
        for f, (tr, te) in enumerate(folds):
            model_dir = work / f"cv_model_{name}_{f}"
            if not (reuse and (model_dir / "model.json").is_file()):
                train_model(feats_dir, model_dir, c, images=[ids[i] for i in tr],
                            overwrite=True)
            scores = _fold_scores(model_dir, store, [ids[i] for i in te], classes, c)
            for var, m in scores.items():
                for key, v in m.items():
                    per.setdefault(var, {}).setdefault(key, []).append(v)
        res["configs"][name] = {"seconds": round(time.perf_counter() - t0, 1),
                                "features": str(feats_dir),
                                **{var: {key: _spread(v) for key, v in m.items()}
                                   for var, m in per.items()}}
        # paired against the first configuration's default post-processing, fold by fold
        # (the folds' own spread is mostly which images they hold; the paired one is not)
        base = res["configs"][configs[0]]["default"]["ap50_voc07"]["folds"]
        res["configs"][name]["paired_ap50_voc07_vs_first"] = {
            var: _spread(list(np.round(np.asarray(m["ap50_voc07"]) - base, 4)))
            for var, m in per.items()}
        print(json.dumps({"config": name, **res["configs"][name]}), file=sys.stderr,
              flush=True)
    return res


def run_test(data: Path, work: Path, cfg: dict, configs: list[str],
             feats: Path | None = None) -> dict:
    """Train each configuration on all of train.txt, score test.txt once (every variant)."""
    from rcnn_cli.store import open_upstream

    out: dict = {}
    cfg = _merge(cfg, {"extract": {"keep": "all"}})  # test images are scored from the store
    images, split = [str(data / "images")], data / "test.txt"
    for name in configs:
        c = _merge(cfg, CV_CONFIGS[name])
        props = work / ("props_" + name if "propose" in CV_CONFIGS[name] else "props")
        propose_folder(images, props, c, split=split)
        feats_dir, _ = _cv_features(data, work, cfg, name, feats)
        model_dir = work / f"test_model_{name}"
        t0 = time.perf_counter()
        train_model(feats_dir, model_dir, c, overwrite=True)
        train_s = time.perf_counter() - t0
        own = bool({"propose", "extract"} & set(CV_CONFIGS[name]))
        test_dir = work / (f"feats_test_{name}" if own else "feats_test")
        t0 = time.perf_counter()
        rep = extract_folder(images, props, test_dir, c, annotations=data, split=split)
        ext_s = (time.perf_counter() - t0) / rep.done if rep.done else None
        test = open_upstream(test_dir, "extract")
        scores = _fold_scores(model_dir, test, test.done_rels(), list(test.settings["classes"]),
                              c)
        out[name] = {"train_svm_s": round(train_s, 1), "images": len(test.done_rels()),
                     "extract_test_s_per_image": None if ext_s is None else round(ext_s, 3),
                     **{var: {k: round(v, 4) for k, v in m.items()}
                        for var, m in scores.items()}}
        print(json.dumps({"test": name, **out[name]}), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "raccoon"))
    ap.add_argument("--weights", help="fine-tuned backbone (safetensors) for the second run")
    ap.add_argument("--work", default="/tmp/rcnn_bench_detection")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--cv", type=int, default=0, metavar="K",
                    help="K-fold cross-validation over train.txt instead of the test run")
    ap.add_argument("--configs", default="default",
                    help=f"--cv: comma-separated configurations of {sorted(CV_CONFIGS)}")
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--reuse-models", action="store_true",
                    help="--cv: score the fold models of an earlier run (new variants only)")
    ap.add_argument("--score-test", action="store_true",
                    help="--cv: then train on all of train.txt and score test.txt once")
    ap.add_argument("--feats", type=Path,
                    help="--cv: training features of the default extract settings from an "
                         "earlier run (read only)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data, work = Path(a.data), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = config.load(overrides={"common": {"workers": a.threads, "device": "cpu"},
                                 "extract": {"mode": "shared"}})
    if a.cv:
        names = [n.strip() for n in a.configs.split(",") if n.strip()]
        bad = [n for n in names if n not in CV_CONFIGS]
        if bad or a.cv < 2:
            ap.error(f"--configs: unknown {bad} (choose from {sorted(CV_CONFIGS)})" if bad
                     else "--cv needs K >= 2")
        res = run_cv(data, work, cfg, a.cv, names, a.fold_seed, a.reuse_models, a.feats)
        if a.score_test:
            res["test"] = run_test(data, work, cfg, names, a.feats)
        print(json.dumps(res), flush=True)
        return
    t0 = time.perf_counter()
    rep = propose_folder([str(data / "images")], work / "props", cfg)
    res = {"data": str(data), "device": "cpu", "threads": a.threads,
           "torch": torch.__version__,
           "propose_s_per_image_2workers": round((time.perf_counter() - t0) / max(rep.done, 1), 3)
           if rep.done else None}
    res["frozen_shared"] = run_variant("frozen", data, work, cfg, None)
    if a.weights:
        res["finetuned_shared"] = run_variant("ft", data, work, cfg, a.weights)
    if not a.no_peer:
        test = load_dataset(data, split=data / "test.txt")
        paths = [test.image_path(r) for r in test.records]
        res["peer_fasterrcnn_cpu_s_per_image"] = round(peer_seconds_per_image(paths, a.threads), 3)
        res["ours_detect_s_per_image"] = (
            res["frozen_shared"]["head_auto"]["detect_s_per_image"]["total"])
        res["speed_ratio_peer_over_ours"] = round(
            res["peer_fasterrcnn_cpu_s_per_image"] / res["ours_detect_s_per_image"], 2)
        res.update(marginal_detect(data, work, cfg, res["frozen_shared"]["head_auto"],
                                   res["peer_fasterrcnn_cpu_s_per_image"]))
    print(json.dumps(res), flush=True)


def marginal_detect(data: Path, work: Path, cfg: dict, head_auto: dict, peer: float) -> dict:
    """Our detect time per image without its fixed cost, against the peer's.

    The peer's time leaves out its start-up (torch's import, the model's build) and the
    decoding (its images are tensors before the clock starts); ours on the test split
    includes the worker pool's start-up, a fixed cost that weighs on a 40-image run.
    A second run over every image of the folder gives the marginal time per image,
    (T_all - T_test) / (N_all - N_test), which still includes the decoding.
    """
    cfg = json.loads(json.dumps(cfg))
    cfg["detect"]["bbox_regression"] = True
    out = work / "det_frozen_auto_all"
    shutil.rmtree(out, ignore_errors=True)
    rep = detect_folder([str(data / "images")], work / "model_frozen_auto", out, cfg)
    extra = rep.done - head_auto["detect_images"]
    if extra <= 0:
        return {}
    marginal = (rep.seconds - head_auto["detect_seconds"]) / extra
    return {"ours_detect_all_images": {"images": rep.done,
                                       "s_per_image": round(rep.seconds / rep.done, 3)},
            "ours_detect_marginal_s_per_image": round(marginal, 3),
            "speed_ratio_peer_over_ours_marginal": round(peer / marginal, 2)}


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
