"""The fc6/fc7 head fine-tuned on cached features (rcnn_cli.head) and its place in the bundle."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rcnn_cli.head import Head, _make_net, collect_windows, train_head
from rcnn_cli.labels import window_labels
from rcnn_cli.model import Model, ModelError, load_model, save_model


def _records(n_images=6, d=8, seed=0, with_difficult=False):
    """Records like `rcnn extract` writes: GT rows first, then proposals; feature 0 says
    object (+2) or not (-2), the rest is noise. One class (0) and a second (1) in image 0."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n_images):
        gt = np.array([[20, 20, 60, 60]], np.float32)
        labels = np.array([0 if i else 1])
        props = [gt[0] + rng.normal(0, 2, 4).astype(np.float32) for _ in range(5)]  # IoU > .5
        for _ in range(40):  # background: far from the object
            x, y = rng.uniform(70, 150, 2)
            props.append(np.array([x, y, x + 20, y + 20], np.float32))
        boxes = np.concatenate([gt, np.stack(props)]).astype(np.float32)
        feats = rng.normal(0, 0.3, (len(boxes), d)).astype(np.float32)
        feats[:6, 0] += 2.0
        feats[6:, 0] -= 2.0
        feats[:6, 1] += 2.0 * labels[0]  # class 1 also lights feature 1
        diff = np.array([False])
        if with_difficult and i == 1:  # a difficult object with two proposals on it
            gt = np.concatenate([gt, [[100, 100, 140, 140]]]).astype(np.float32)
            labels = np.array([0, 0])
            diff = np.array([False, True])
            boxes[6:8] = [[101, 101, 141, 141], [99, 100, 140, 139]]
        recs.append({"boxes": boxes, "features": feats,
                     "gt_label": np.r_[labels[:1], -np.ones(len(boxes) - 1)].astype(np.int32),
                     "gt_boxes": gt, "gt_labels": labels.astype(np.int64), "gt_difficult": diff})
    return recs


def test_collect_windows_labels_cap_and_difficult():
    recs = _records(with_difficult=True)
    x, y, n = collect_windows(lambda: iter(recs), 2, bg_per_image=10, seed=0)
    assert n == 6 and x.dtype == np.float16
    # per image: 6 foreground rows (GT + 5 jittered), background capped at 10
    assert (y > 0).sum() == 36 and (y == 0).sum() == 60 and (y < 0).sum() == 0
    assert set(y[y > 0].tolist()) == {1, 2}  # class k -> label k + 1; image 0 is class 1
    assert (y == 2).sum() == 6
    # the two rows on the difficult object are neither foreground nor background
    _, y_all, _ = collect_windows(lambda: iter(recs), 2, bg_per_image=10**6, seed=0)
    assert len(y_all) == 6 * 46 - 2
    # seeded choice of the background rows
    x2, y2, _ = collect_windows(lambda: iter(recs), 2, bg_per_image=10, seed=0)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _, _ = collect_windows(lambda: iter(recs), 2, bg_per_image=10, seed=1)
    assert not np.array_equal(x, x3)


def test_collect_windows_rejects_bad_records():
    recs = _records(n_images=1)
    recs[0]["features"] = recs[0]["features"][:-1]
    with pytest.raises(ValueError, match="record 0: features"):
        collect_windows(lambda: iter(recs), 2)
    with pytest.raises(ValueError, match="class index 1 >= 1"):
        collect_windows(lambda: iter(_records(n_images=1)), 1)


def test_train_head_learns_separable_windows_deterministically():
    recs = _records()
    state = torch.random.get_rng_state()
    res = train_head(lambda: iter(recs), 2, hidden=16, iterations=300, batch_size=32,
                     fg_per_batch=8, lr=0.05, dropout=0.1, input_dropout=0.0, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    head = res.head
    head.check(2)
    assert res.stats["final_loss"] < 0.2 < res.stats["first_loss"]
    x = np.concatenate([r["features"] for r in recs])
    y = np.concatenate([window_labels(r["boxes"], r["gt_boxes"], r["gt_labels"])[0]
                        for r in recs])
    pred = head.logits(x).argmax(1)
    assert (pred == y).mean() >= 0.97
    assert head.fc7(x).shape == (len(x), 16) and (head.fc7(x) >= 0).all()
    again = train_head(lambda: iter(recs), 2, hidden=16, iterations=300, batch_size=32,
                       fg_per_batch=8, lr=0.05, dropout=0.1, input_dropout=0.0, seed=3).head
    for name, a in head.arrays().items():
        np.testing.assert_array_equal(a, again.arrays()[name], err_msg=name)


def test_head_numpy_forward_matches_torch_module():
    torch.manual_seed(0)
    net = _make_net(8, 16, 2, 0.5, 0.2).eval()
    mean = np.linspace(-1, 1, 8).astype(np.float32)
    std = np.linspace(0.5, 2, 8).astype(np.float32)
    head = Head(mean, std, *(p.detach().numpy() for p in (net.fc[1].weight, net.fc[1].bias,
                                                          net.fc[4].weight, net.fc[4].bias,
                                                          net.cls.weight, net.cls.bias)))
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    with torch.no_grad():
        ref = net((torch.from_numpy(x) - torch.from_numpy(mean)) / torch.from_numpy(std))
    np.testing.assert_allclose(head.logits(x), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_train_head_needs_both_kinds_of_windows():
    recs = _records(n_images=1)
    recs[0]["gt_boxes"] = np.zeros((0, 4), np.float32)
    recs[0]["gt_labels"] = np.zeros(0, np.int64)
    recs[0]["gt_difficult"] = np.zeros(0, bool)
    with pytest.raises(ValueError, match="foreground and background"):
        train_head(lambda: iter(recs), 1, iterations=5)


def _head(d=6, h=4, k=2, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return Head(f(d), np.abs(f(d)) + 0.5, f(h, d), f(h), f(h, h), f(h), f(k + 1, h), f(k + 1))


def _model_with_head(k=2, d=6, h=4):
    rng = np.random.default_rng(1)
    return Model(classes=["a", "b"][:k], svm_weights=rng.normal(size=(k, h)).astype(np.float32),
                 svm_biases=np.zeros(k, np.float32), feat_scale=0.5,
                 svm_trained=np.ones(k, bool),
                 regressors=rng.normal(size=(k, 4, d + 1)).astype(np.float32) * 0.01,
                 regressor_trained=np.ones(k, bool), head=_head(d, h, k), reg_feat_scale=2.0)


def test_bundle_with_head_round_trips_and_scores_fc7(tmp_path):
    from rcnn_cli.bbox_regression import predict_deltas
    from rcnn_cli.svm import score

    m = _model_with_head()
    save_model(tmp_path, m)
    back = load_model(tmp_path)
    assert back.dim == 6 and back.reg_feat_scale == 2.0 and back.head is not None
    x = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_allclose(back.score(x),
                               score(m.head.fc7(x), m.svm_weights, m.svm_biases, 0.5), rtol=1e-6)
    np.testing.assert_allclose(back.deltas(x), predict_deltas(x, m.regressors, 2.0), rtol=1e-6)
    from rcnn_cli.detect import DetectSettings, detect_from_features

    out = detect_from_features(np.tile([[1, 1, 5, 5]], (5, 1)).astype(np.float32), x, back,
                               (9, 9), DetectSettings(1.0, -1e9, 100, nms="hard",
                                                      box_vote_iou=0.0))
    assert out["boxes"].shape == (10, 4) and sorted(set(out["labels"].tolist())) == [0, 1]


def test_bundle_with_broken_head_is_refused(tmp_path):
    m = _model_with_head()
    m.head.fc7_w = m.head.fc7_w[:, :3]
    with pytest.raises(ModelError, match="head fc7_w has shape"):
        save_model(tmp_path, m)
    m = _model_with_head()
    m.regressors = np.zeros((2, 4, 5), np.float32)  # sized for fc7, not the features
    with pytest.raises(ModelError, match=r"regressors has shape .* expected \(2, 4, 7\)"):
        save_model(tmp_path, m)


def test_train_head_uses_the_process_threads_and_drops_out_as_configured(monkeypatch):
    """The SGD loop runs on the process's torch threads (a 2-thread step is ~1.6x faster on
    two free cores), records the count, and leaves it as it was; dropout (own seeded masks)
    changes the result, and a repeat with the same seed and thread count does not."""
    recs = _records()
    threads = torch.get_num_threads()
    kw = {"hidden": 16, "iterations": 40, "batch_size": 32, "fg_per_batch": 8, "seed": 3}
    try:
        torch.set_num_threads(2)
        set_threads = torch.set_num_threads

        def refuse(n):  # the old loop switched to 1 thread and back
            raise AssertionError(f"train_head changed the thread count to {n}")

        monkeypatch.setattr(torch, "set_num_threads", refuse)
        two = train_head(lambda: iter(recs), 2, dropout=0.5, input_dropout=0.2, **kw)
        assert torch.get_num_threads() == 2 and two.stats["threads"] == 2
        two_again = train_head(lambda: iter(recs), 2, dropout=0.5, input_dropout=0.2, **kw)
        monkeypatch.setattr(torch, "set_num_threads", set_threads)
        torch.set_num_threads(1)
        a = train_head(lambda: iter(recs), 2, dropout=0.5, input_dropout=0.2, **kw)
        assert torch.get_num_threads() == 1 and a.stats["threads"] == 1
        b = train_head(lambda: iter(recs), 2, dropout=0.5, input_dropout=0.2, **kw).head
        c = train_head(lambda: iter(recs), 2, dropout=0.0, input_dropout=0.0, **kw).head
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(a.head.fc6_w, b.fc6_w)
    assert not np.array_equal(a.head.fc6_w, c.fc6_w)
    # same recipe either way: a 1-thread model is a 2-thread model up to rounding
    np.testing.assert_array_equal(two.head.fc6_w, two_again.head.fc6_w)
    np.testing.assert_allclose(two.head.fc6_w, a.head.fc6_w, atol=1e-3)


def test_fc7_is_exact_for_tiny_std_and_follows_new_weights(tmp_path):
    """fc7 folds 1/std into fc6 but subtracts the mean first (folding the mean into the bias
    lost 2e-4 in float32 on dimensions at the std floor); a changed array is used at once;
    1-D rows, float16 and read-only memmaps are accepted without warnings."""
    import warnings

    rng = np.random.default_rng(0)
    d, hid = 64, 16
    std = rng.uniform(0.5, 2, d).astype(np.float32)
    std[::8] = 1e-3  # the std floor of train_head
    mean = rng.uniform(0, 2, d).astype(np.float32)
    h = Head(mean, std, rng.standard_normal((hid, d)).astype(np.float32) * 0.01,
             np.zeros(hid, np.float32), np.eye(hid, dtype=np.float32), np.zeros(hid, np.float32),
             np.zeros((2, hid), np.float32), np.zeros(2, np.float32))
    x = (mean + rng.standard_normal((50, d)) * std).astype(np.float32)

    def ref(head, x):
        z = (x.astype(np.float64) - head.mean) / head.std
        z = np.maximum(z @ head.fc6_w.T.astype(np.float64) + head.fc6_b, 0)
        return np.maximum(z @ head.fc7_w.T.astype(np.float64) + head.fc7_b, 0)

    np.testing.assert_allclose(h.fc7(x), ref(h, x), atol=2e-6)
    h.fc7_w = 2 * h.fc7_w  # after a first fc7 call
    np.testing.assert_allclose(h.fc7(x), ref(h, x), atol=4e-6)
    np.testing.assert_allclose(h.fc7(x[3]), h.fc7(x)[3], atol=1e-6)
    np.save(tmp_path / "x.npy", x.astype(np.float16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ro = h.fc7(np.load(tmp_path / "x.npy", mmap_mode="r"))
    np.testing.assert_allclose(ro, h.fc7(x.astype(np.float16).astype(np.float32)), atol=1e-6)
