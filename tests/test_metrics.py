"Unit and property tests of influence_nb.metrics (correlations with bootstrap intervals, selections)."
import math
import numpy as np
import pytest
import torch
from scipy import stats
from hypothesis import given, settings, strategies as st, assume

from influence_nb.metrics import (Correlation, correlation, compare, top_k, top_fraction, percentile_band,
                                  highest_loss, loss_percentile, plot_agreement)

PROP = settings(max_examples=40, deadline=None)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@PROP
@given(xs=st.lists(st.tuples(finite, finite), min_size=3, max_size=40), method=st.sampled_from(['pearson', 'spearman']))
def test_correlation_matches_scipy_and_ci_is_ordered(xs, method):
    x, y = np.array([a for a, _ in xs]), np.array([b for _, b in xs])
    assume(np.ptp(x) > 1e-6 and np.ptp(y) > 1e-6)
    c = correlation(x, y, method, n_boot=200)
    ref = (stats.pearsonr if method == 'pearson' else stats.spearmanr)(x, y)[0]
    assert math.isclose(c.r, ref, abs_tol=1e-6)
    assert c.n == len(x) and 0 <= c.n_valid <= 200
    if c.n_valid: assert -1 <= c.low <= c.high <= 1


@PROP
@given(xs=st.lists(st.integers(-1000, 1000), min_size=3, max_size=30, unique=True), scale=st.floats(0.1, 10),
       shift=st.integers(-1000, 1000))
def test_spearman_invariant_to_monotone_maps(xs, scale, shift):
    x = np.array(xs, dtype=float)  # distinct integers: the maps below cannot create ties by rounding
    a, b = correlation(x, scale * x + shift, 'spearman', n_boot=100), correlation(x, np.exp(x / 1000) * scale,
                                                                                  'spearman', n_boot=0)
    assert math.isclose(a.r, 1.0, abs_tol=1e-9) and math.isclose(a.low, 1.0, abs_tol=1e-9)
    assert b.r > 0.99


def test_bootstrap_deterministic_and_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30); y = x + rng.normal(size=30)
    a, b, c = correlation(x, y, seed=1), correlation(x, y, seed=1), correlation(x, y, seed=2)
    assert (a.low, a.high) == (b.low, b.high) and (a.low, a.high) != (c.low, c.high)
    assert a.low < a.r < a.high


def test_bootstrap_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(3)
    x = rng.normal(size=50); y = 0.5 * x + rng.normal(size=50)
    mine = correlation(x, y, 'spearman', n_boot=4000, seed=0)
    ref = stats.bootstrap((x, y), lambda u, v: stats.spearmanr(u, v)[0], paired=True, vectorized=False,
                          n_resamples=4000, method='percentile', random_state=1).confidence_interval
    assert abs(mine.low - ref.low) < 0.04 and abs(mine.high - ref.high) < 0.04


def test_ci_shrinks_with_n():
    rng = np.random.default_rng(0)
    def width(n):
        u = rng.normal(size=n); v = u + rng.normal(size=n)
        c = correlation(u, v, 'pearson'); return c.high - c.low
    assert width(400) < width(20)


def test_correlation_errors_and_inputs():
    with pytest.raises(ValueError, match='length'): correlation([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match='at least 3'): correlation([1, 2], [1, 2])
    with pytest.raises(ValueError, match='method'): correlation([1, 2, 3], [1, 2, 3], 'kendall')
    c = correlation(torch.tensor([1., 2, 3, 4]), [1, 3, 2, 4], n_boot=0)
    assert isinstance(c, Correlation) and c.n_valid == 0 and math.isnan(c.low)
    assert 'spearman' in str(c)


def test_compare_keys():
    out = compare([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], n_boot=50)
    assert set(out) == {'pearson', 'spearman'} and out['pearson'].method == 'pearson'


@PROP
@given(s=st.lists(finite, min_size=1, max_size=60), data=st.data())
def test_top_k_properties(s, data):
    s = np.array(s); k = data.draw(st.integers(0, len(s)))
    for by, key in [('abs', np.abs(s)), ('signed', s), ('neg', -s)]:
        idx = top_k(s, k, by)
        assert len(idx) == k and len(set(idx.tolist())) == k
        if 0 < k < len(s):
            rest = np.setdiff1d(np.arange(len(s)), idx)
            assert key[idx].min() >= key[rest].max()
        assert np.all(np.diff(key[idx]) <= 0)  # best first


def test_top_k_examples_and_errors():
    s = [0.1, -5., 3., 0., 2., -1.]
    assert top_k(s, 3).tolist() == [1, 2, 4]
    assert top_k(s, 2, 'signed').tolist() == [2, 4]
    assert top_k(s, 2, 'neg').tolist() == [1, 5]
    with pytest.raises(ValueError): top_k(s, 7)
    with pytest.raises(ValueError): top_k(s, 2, 'max')


def test_top_fraction():
    assert len(top_fraction(np.arange(120.))) == 20      # the paper's 16.6% of Iris training points
    assert len(top_fraction(np.arange(3.), 0.01)) == 1
    assert top_fraction(np.arange(10.), 0.2, 'signed').tolist() == [9, 8]
    with pytest.raises(ValueError): top_fraction([1., 2.], 0)


@PROP
@given(s=st.lists(finite, min_size=1, max_size=80), q=st.floats(0, 100), data=st.data())
def test_percentile_band_properties(s, q, data):
    s = np.array(s); k = data.draw(st.integers(0, len(s)))
    idx = percentile_band(s, q, k)
    dist = np.abs(s - np.percentile(s, q))
    assert len(idx) == k and len(set(idx.tolist())) == k
    if 0 < k < len(s):
        rest = np.setdiff1d(np.arange(len(s)), idx)
        assert dist[idx].max() <= dist[rest].min()


def test_percentile_band_example():
    s = np.arange(101.)[::-1].copy()
    band = percentile_band(s, 30, 5)
    assert band[0] == 70 and sorted(s[band].tolist()) == [28., 29., 30., 31., 32.]


def test_test_point_choices():
    L = torch.tensor([0.2, 3.0, 0.01, 0.7, 1.5])
    assert highest_loss(L).tolist() == [1] and highest_loss(L, 3).tolist() == [1, 4, 3]
    assert loss_percentile(L) == 3 and loss_percentile(L, 0) == 2 and loss_percentile(L, 100) == 1


def test_plot_agreement_draws():
    import matplotlib; matplotlib.use('Agg')
    ax = plot_agreement([1, 2, 3, 4], [1.1, 2.2, 2.9, 4.2], title='t', n_boot=50)
    assert 'P 0.9' in ax.get_title() and len(ax.collections) == 1
