"""``rcnn info MODEL_DIR``: what a model bundle holds, in a few lines (or JSON).

:func:`model_info` gathers it from the bundle (validated as ``rcnn detect`` loads it):
classes, backbone / tap / mode, the training data (images, positives per class), the
thresholds stored at training and the post-processing ``rcnn detect`` applies without flags,
and the size of each file. :func:`format_info` writes the text form.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def model_info(directory: str | Path) -> dict[str, Any]:
    """A JSON-able summary of the model bundle in ``directory``.

    Raises:
        ModelError: not a bundle, or an inconsistent one (one line naming the file).
    """
    from rcnn_cli import config as cfgmod
    from rcnn_cli.detect import model_detect_settings
    from rcnn_cli.model import load_model

    d = Path(directory)
    m = load_model(d)
    ext = m.extractor_settings()
    stats = m.training_stats
    svm = stats.get("svm") or []
    positives = ({c: int(s.get("positives", 0)) for c, s in zip(m.classes, svm)}
                 if len(svm) == len(m.classes) else None)
    reg = m.regressor_trained
    detect = model_detect_settings(m, cfgmod.defaults(), {})  # what `rcnn detect` applies
    return {
        "path": str(d), "package_version": m.package_version,
        "classes": list(m.classes),
        "features": {"backbone": m.backbone, "tap": m.feature_tap, "mode": ext.get("mode"),
                     "dim": m.dim, "weights": m.weights_source},
        "head": None if m.head is None else {"in_dim": m.head.in_dim,
                                             "hidden": m.head.out_dim},
        "proposals": dict(m.proposal_settings),
        "training": {"images": stats.get("images"), "positives": positives,
                     "svm_trained": [c for c, t in zip(m.classes, m.svm_trained) if t],
                     "regressors_trained": None if reg is None else
                     [c for c, t in zip(m.classes, reg) if t],
                     "solver": (stats.get("train_svm") or {}).get("solver")},
        "stored_thresholds": {"nms_iou": m.nms_iou, "score_threshold": m.score_threshold,
                              "max_detections": m.max_detections},
        "detect_defaults": {k: v for k, v in detect.__dict__.items()},
        "files": {p.name: p.stat().st_size for p in sorted(d.iterdir())
                  if p.is_file() and not p.name.startswith(".")},
    }


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def format_info(info: dict[str, Any]) -> str:
    """The text form of :func:`model_info` (one topic per line)."""
    f, t, h = info["features"], info["training"], info["head"]
    pos = t["positives"]
    train = f"{t['images']} images" if t["images"] is not None else "images not recorded"
    if pos is not None:
        train += "; positives " + ", ".join(f"{c} {n}" for c, n in pos.items())
    train += f"; SVMs trained {len(t['svm_trained'])}/{len(info['classes'])}"
    if t["regressors_trained"] is not None:
        train += f", box regressors {len(t['regressors_trained'])}/{len(info['classes'])}"
    if t["solver"]:
        train += f" ({t['solver']})"
    s = info["stored_thresholds"]
    props = ", ".join(f"{k} {v}" for k, v in info["proposals"].items())
    rows = [
        ("model", info["path"]),
        ("classes", f"{len(info['classes'])}: {', '.join(info['classes'])}"),
        ("features", (f"{f['backbone']}, tap {f['tap']}, mode {f['mode']}, D={f['dim']}"
                      + (f", weights {f['weights']['id']}" if f["weights"].get("id") else ""))),
        ("head", "none (SVMs on the features)" if h is None else
         f"fc6/fc7 {h['in_dim']} -> {h['hidden']} (SVMs on fc7)"),
        ("proposals", props),
        ("training", train),
        ("stored", ", ".join(f"{k} {v}" for k, v in s.items())),
        ("detect", ", ".join(f"{k} {v}" for k, v in info["detect_defaults"].items())),
        ("files", ", ".join(f"{n} {_size(b)}" for n, b in info["files"].items())),
        ("version", f"rcnn_cli {info['package_version']}"),
    ]
    return "\n".join(f"{k:<10} {v}" for k, v in rows)
