import numpy as np
import pytest

from rcnn_cli import boxes as bx


def test_iou_hand_computed_table():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 15, 15]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    expected = np.array([[1.0, 50 / 150, 0.0],
                         [1.0, 50 / 150, 0.0],
                         [25 / 175, 50 / 150, 0.0]], np.float32)
    np.testing.assert_allclose(bx.box_iou(a, b), expected, rtol=1e-6)


def test_iou_empty_shapes():
    assert bx.box_iou(np.zeros((0, 4)), np.ones((3, 4))).shape == (0, 3)
    assert bx.box_iou(np.ones((2, 4)), []).shape == (2, 0)


def test_as_boxes_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        bx.as_boxes(np.zeros((3, 5)))


def test_clip_and_valid():
    b = np.array([[-5, -5, 20, 30], [5, 5, 5, 9], [0, 0, 8, 8]], np.float32)
    c = bx.clip(b, (25, 10))
    np.testing.assert_array_equal(c[0], [0, 0, 10, 25])
    np.testing.assert_array_equal(bx.valid_mask(c), [True, False, True])
    np.testing.assert_array_equal(bx.valid_mask(c, min_size=9), [True, False, False])


def test_area_and_scale_and_flip():
    b = np.array([[1, 2, 4, 8]], np.float32)
    assert bx.area(b)[0] == 18
    np.testing.assert_array_equal(bx.scale(b, 2, 0.5), [[0.5, 4, 2, 16]])
    np.testing.assert_array_equal(bx.hflip(b, 10), [[6, 2, 9, 8]])
    np.testing.assert_array_equal(bx.hflip(bx.hflip(b, 10), 10), b)


def test_voc_roundtrip_and_devkit_area():
    voc = np.array([[1, 1, 10, 20], [5, 7, 5, 7]], np.float32)
    ours = bx.from_voc(voc)
    np.testing.assert_array_equal(ours[0], [0, 0, 10, 20])
    # the devkit's (xmax - xmin + 1) width equals our x2 - x1
    np.testing.assert_array_equal(bx.area(ours), [200, 1])
    np.testing.assert_array_equal(bx.to_voc(ours), voc)


def test_xywh_and_yolo_roundtrip():
    b = np.array([[10, 20, 50, 100], [0, 0, 1, 1]], np.float32)
    np.testing.assert_array_equal(bx.to_xywh(b)[0], [10, 20, 40, 80])
    np.testing.assert_allclose(bx.from_xywh(bx.to_xywh(b)), b)
    y = bx.to_yolo(b, (200, 100))
    np.testing.assert_allclose(y[0], [0.3, 0.3, 0.4, 0.4])
    np.testing.assert_allclose(bx.from_yolo(y, (200, 100)), b, atol=1e-5)


def test_encode_known_values_and_roundtrip():
    p = np.array([[0, 0, 10, 20]], np.float32)
    g = np.array([[5, 0, 25, 20]], np.float32)
    t = bx.encode(p, g)
    np.testing.assert_allclose(t, [[1.0, 0.0, np.log(2), 0.0]], atol=1e-6)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 400, (100, 2))
    wh = rng.uniform(1, 200, (100, 2))
    P = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    xy2 = xy + rng.normal(0, 20, xy.shape)
    G = np.concatenate([xy2, xy2 + wh * rng.uniform(0.5, 2, wh.shape)], 1).astype(np.float32)
    np.testing.assert_allclose(bx.decode(P, bx.encode(P, G)), G, atol=1e-3)


def test_decode_clamps_huge_deltas():
    p = np.array([[0, 0, 10, 10]], np.float32)
    out = bx.decode(p, [[0, 0, 100, 100]])
    assert np.all(np.isfinite(out))


def test_box_iou_is_torchvisions_bit_for_bit():
    """The numpy IoU gives torchvision.ops.box_iou's float32 values exactly, degenerate and
    touching boxes included (nan where the union is 0, as there)."""
    import torch
    from torchvision.ops import box_iou as tv_box_iou

    rng = np.random.default_rng(0)
    xy = rng.random((300, 2)) * 400
    a = np.concatenate([xy, xy + rng.random((300, 2)) * 200], 1).astype(np.float32)
    a[:10, 2:] = a[:10, :2]  # zero-area boxes
    a[10:20] = a[20:30]  # duplicates
    a[30:40, 0] = a[40:50, 2]  # touching edges
    b = a[::3].copy()
    want = tv_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got = bx.box_iou(a, b)
    assert got.dtype == np.float32 and got.shape == (300, 100)
    np.testing.assert_array_equal(got, want)  # nan == nan here
    assert np.isnan(got).any() and (got[np.isfinite(got)] >= 0).all()
