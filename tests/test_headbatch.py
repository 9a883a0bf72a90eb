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
    assert set(np.unique(mask)) <= {0.0, np.float32(1 / 0.7)}
    np.testing.assert_array_equal(out, ref * mask)


def test_masks_keep_one_minus_p_per_element_and_differ_by_seed_step_and_layer():
    thresh, scale = hb.threshold(0.2)
    assert (thresh, scale) == (13107, np.float32(1.25))
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


def test_threshold_refuses_probabilities_outside_0_1():
    assert hb.threshold(0.0) == (0, np.float32(1))
    assert hb.threshold(0.5) == (32768, np.float32(2))
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            hb.threshold(p)


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
