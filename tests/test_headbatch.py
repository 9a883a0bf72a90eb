"""The head's mini-batch kernel: gather + standardise + counter-based dropout masks."""
import numpy as np
import pytest

from rcnn_cli import _headbatch as hb


def _x(m=50, d=37, seed=0):
    return np.random.default_rng(seed).normal(2, 3, size=(m, d)).astype(np.float16)


def test_float16_table_is_exact_for_every_bit_pattern():
    ref = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(hb.F16_TO_F32, ref)  # NaNs compare equal here
    assert hb.F16_TO_F32.dtype == np.float32 and hb.F16_TO_F32.flags.c_contiguous


@pytest.mark.parametrize("d", [37, 40, 1])
def test_gather_is_standardised_rows_times_the_same_masks_as_dropout_mask(d):
    x = _x(d=d)
    rows = np.array([3, 0, 49, 3, 17], np.int64)
    mean = np.linspace(-1, 1, d).astype(np.float32)
    inv = np.linspace(0.5, 2, d).astype(np.float32)
    ref = (x[rows].astype(np.float32) - mean) * inv
    out = np.full((len(rows), d), np.nan, np.float32)
    hb.gather_standardised(x.view(np.uint16), hb.F16_TO_F32, rows, mean, inv, 0,
                           np.float32(1), 7, 3, 0, out)
    np.testing.assert_array_equal(out, ref)  # no dropout: exact, every element written
    thresh, scale = hb.threshold(0.3)
    hb.gather_standardised(x.view(np.uint16), hb.F16_TO_F32, rows, mean, inv, thresh, scale,
                           7, 3, 0, out)
    mask = np.full_like(out, np.nan)
    hb.dropout_mask(thresh, scale, 7, 3, 0, mask)
    assert set(np.unique(mask)) <= {0.0, scale} and abs(scale - 1 / 0.7) < 1e-4
    np.testing.assert_array_equal(out, ref * mask)


def test_masks_keep_one_minus_p_per_element_and_differ_by_seed_step_and_layer():
    thresh, scale = hb.threshold(0.2)
    assert (thresh, scale) == (13107, np.float32(65536 / 52429))  # 1.25 to 4e-6: E[mask] = 1
    steps = np.empty((200, 16, 64), np.float32)
    for s in range(200):
        hb.dropout_mask(thresh, scale, 5, s, 1, steps[s])
    kept = steps > 0
    assert abs(kept.mean() - 0.8) < 0.005  # 204 800 draws: sd 0.0009
    per_element = kept.mean(0)  # 200 draws each: sd 0.028; none stuck or biased
    assert per_element.min() > 0.6 and per_element.max() < 0.97
    # consecutive steps and neighbouring elements are uncorrelated
    a, b = kept[:-1].ravel().astype(float), kept[1:].ravel().astype(float)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
    assert abs(np.corrcoef(kept[..., :-1].ravel(), kept[..., 1:].ravel())[0, 1]) < 0.02
    again, other = np.empty((16, 64), np.float32), np.empty((16, 64), np.float32)
    hb.dropout_mask(thresh, scale, 5, 7, 1, again)
    np.testing.assert_array_equal(again, steps[7])  # a pure function of its coordinates
    for seed, step, layer in ((6, 7, 1), (5, 8, 1), (5, 7, 2)):
        hb.dropout_mask(thresh, scale, seed, step, layer, other)
        assert (other != again).mean() > 0.2  # independent masks differ in ~32 %


def test_threshold_refuses_probabilities_outside_0_1_and_keeps_the_expected_value():
    assert hb.threshold(0.0) == (0, np.float32(1))
    assert hb.threshold(0.5) == (32768, np.float32(2))
    assert hb.threshold(1e-6) == (0, np.float32(1))  # rounds to no dropout
    thresh, scale = hb.threshold(0.999)
    assert abs((1 - thresh / 65536) * scale - 1) < 1e-6
    for p in (1.0, -0.1, 1.5, 1 - 2**-18):
        with pytest.raises(ValueError, match="dropout probability"):
            hb.threshold(p)


def test_gather_batch_checks_shapes_and_rows_and_takes_any_seed():
    x = _x(m=10, d=8)
    mean, inv = np.zeros(8, np.float32), np.ones(8, np.float32)
    out = np.empty((2, 8), np.float32)
    ok = hb.gather_batch(x.view(np.uint16), np.array([0, 9]), mean, inv, 0.0, 1, 0, out)
    np.testing.assert_array_equal(ok, x[[0, 9]].astype(np.float32))
    for rows, o, m in (([0, 10], out, mean), ([-1, 0], out, mean), ([0, 1, 2], out, mean),
                       ([0, 1], np.empty((2, 12), np.float32), mean), ([0, 1], out, mean[:4])):
        with pytest.raises(ValueError, match="shapes do not fit|rows must be"):
            hb.gather_batch(x.view(np.uint16), np.array(rows), m, inv, 0.2, 1, 0, o)
    a, b = np.empty((2, 8), np.float32), np.empty((2, 8), np.float32)
    hb.mask(0.5, 2**64 + 5, 3, 1, a)  # seeds are taken modulo 2**64
    hb.mask(0.5, 5, 3, 1, b)
    np.testing.assert_array_equal(a, b)
    hb.mask(0.5, 2**63 + 5, 3, 1, a)
    assert int(hb.stream_key(hb._int64(2**63 + 5), 3, 1)) == _splitmix64(
        _splitmix64(_splitmix64(2**63 + 5) ^ 3) ^ 1)


def _splitmix64(state):
    m = (1 << 64) - 1
    z = (state + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_draws_are_splitmix64_of_the_stream_key_plus_the_counter():
    assert int(hb._mix(np.uint64(0))) == 0xE220A8397B1DCDAF  # splitmix64(0)'s first output
    for z in (1, 12345, 2**63 + 7, 2**64 - 1):
        assert int(hb._mix(np.uint64(z))) == _splitmix64(z)
    key = _splitmix64(_splitmix64(_splitmix64(9) ^ 4) ^ 2)
    assert int(hb.stream_key(9, 4, 2)) == key
    d, thresh = 6, 30000  # 2 blocks of 4 draws per row, the last 2 draws of a row unused
    out = np.empty((2, d), np.float32)
    hb.dropout_mask(thresh, np.float32(3), 9, 4, 2, out)
    want = np.empty_like(out)
    for r in range(2):
        for j in range(d):
            z = _splitmix64((key + r * 2 + j // 4) % 2**64)
            want[r, j] = 3 if (z >> (16 * (j % 4))) & 0xFFFF >= thresh else 0
    np.testing.assert_array_equal(out, want)
    u = _splitmix64(key) & 0xFFFF  # element (0, 0)'s draw: kept at a threshold equal to it
    for t, kept in ((u, 3), (u + 1, 0)):
        hb.dropout_mask(t, np.float32(3), 9, 4, 2, out)
        assert out[0, 0] == kept


def _doc_mask(seed, step, layer, n, d, p):
    """The mask the module docstring describes, computed in plain Python."""
    t = round(p * 65536)
    key = _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ layer)
    m = np.zeros((n, d), np.float32)
    for r in range(n):
        for j in range(d):
            z = _splitmix64((key + r * ((d + 3) // 4) + j // 4) % 2**64)
            if (z >> (16 * (j % 4))) & 0xFFFF >= t:
                m[r, j] = 65536 / (65536 - t)
    return m


@pytest.mark.parametrize("p, p_in", [(0.5, 0.2), (0.3, 0.0)])
def test_head_sgd_is_the_plain_torch_loop_with_the_documented_masks(p, p_in):
    """head._sgd against a plain torch loop whose masks come from the docstring's formula:
    each layer's mask, its step, its probability and the input's own probability (fails if
    fc7 reuses fc6's mask, a mask repeats across steps, or a probability is swapped)."""
    import torch

    from rcnn_cli import head

    rng = np.random.default_rng(0)
    m_rows, d, hid, k, n, n_fg, seed, iters = 300, 37, 9, 2, 16, 4, 3, 30
    x16 = rng.normal(1, 2, size=(m_rows, d)).astype(np.float16)
    labels = rng.integers(0, k + 1, size=m_rows).astype(np.int64)
    fg, bg = np.flatnonzero(labels > 0), np.flatnonzero(labels == 0)
    mean, std = head._mean_std(torch.from_numpy(x16))
    std = std + head.STD_FLOOR

    def net():
        torch.manual_seed(1)
        return head._make_net(d, hid, k, p, p_in)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        new = net()
        head._sgd(new, x16, torch.from_numpy(labels), mean, std, fg, bg, iterations=iters,
                  batch_size=n, fg_per_batch=n_fg, lr=0.05, momentum=0.9, weight_decay=5e-4,
                  seed=seed, progress=False)
        ref = net()
        opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                              fused=True)
        batches = np.random.default_rng(seed + 1)
        x, y = torch.from_numpy(x16), torch.from_numpy(labels)
        for it in range(iters):
            if it == (2 * iters) // 3:
                opt.param_groups[0]["lr"] = 0.005
            i = torch.from_numpy(np.concatenate([fg[batches.integers(len(fg), size=n_fg)],
                                                 bg[batches.integers(len(bg), size=n - n_fg)]]))
            h = (x[i].float() - mean) * (1 / std)
            if p_in > 0:
                h = h * torch.from_numpy(_doc_mask(seed, it, 0, n, d, p_in))
            h = torch.relu(ref.fc[1](h)) * torch.from_numpy(_doc_mask(seed, it, 1, n, hid, p))
            h = torch.relu(ref.fc[4](h)) * torch.from_numpy(_doc_mask(seed, it, 2, n, hid, p))
            loss = torch.nn.functional.cross_entropy(ref.cls(h), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(new.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
