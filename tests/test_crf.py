"""Mean-field boundary refinement (s2l_monai.crf, s2l_monai.transforms.MeanFieldRefined): the window pairs, the
update against a direct evaluation of its formula, what it does to an outline off an edge, and the transform."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from s2l_monai.crf import mean_field_refine, window_pairs
from s2l_monai.transforms import MeanFieldRefined


def test_window_pairs_visit_every_unordered_neighbour_pair_once():
    shape, radius = (3, 4), 1
    index = np.arange(12).reshape(1, 1, *shape)
    seen = []
    for a, b, d2 in window_pairs(shape, radius):
        ia, ib = index[a].ravel(), index[b].ravel()
        for i, j in zip(ia, ib):
            (yi, xi), (yj, xj) = divmod(int(i), 4), divmod(int(j), 4)
            assert (yj - yi) ** 2 + (xj - xi) ** 2 == d2
            seen.append(frozenset((int(i), int(j))))
    expected = {frozenset((i, j)) for i, j in itertools.combinations(range(12), 2)
                if max(abs(i // 4 - j // 4), abs(i % 4 - j % 4)) <= radius}
    assert len(seen) == len(set(seen)) == len(expected) == 29 and set(seen) == expected
    # offsets as long as the image are skipped; 3D windows too
    assert len(list(window_pairs((1, 5), 2))) == 2
    assert len(list(window_pairs((3, 3, 3), 1))) == 13


def _direct(prob, image, weight, radius, sigma_xy, sigma_intensity, iterations, eps=1e-4):
    """The update of ``mean_field_refine``'s docstring, one pixel and one neighbour at a time (2D, one image)."""
    c, h, w = prob.shape
    unary = np.log(np.clip(prob, eps, 1 - eps))
    q = prob.copy()
    for _ in range(iterations):
        new = np.empty_like(q)
        for y, x in itertools.product(range(h), range(w)):
            message, total = np.zeros(c), 0.0
            for dy, dx in itertools.product(range(-radius, radius + 1), repeat=2):
                yy, xx = y + dy, x + dx
                if (dy, dx) == (0, 0) or not (0 <= yy < h and 0 <= xx < w):
                    continue
                contrast = float(image[:, y, x].mean() - image[:, yy, xx].mean()) ** 2  # channels averaged
                affinity = math.exp(-(dy * dy + dx * dx) / (2 * sigma_xy**2) - contrast / (2 * sigma_intensity**2))
                message += affinity * q[:, yy, xx]
                total += affinity
            logits = unary[:, y, x] + weight * message / total
            new[:, y, x] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        q = new
    return q


@pytest.mark.parametrize("channels,classes", [(1, 2), (3, 2), (1, 3)])
def test_mean_field_matches_its_formula(channels, classes):
    """Two classes take a shortcut (a sigmoid, foreground messages only); three the general softmax update."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(classes, 7, 6))
    prob = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float64)
    image = rng.uniform(size=(channels, 7, 6))
    out = mean_field_refine(torch.tensor(prob[None], dtype=torch.float32), torch.tensor(image[None]), weight=1.5,
                            radius=2, sigma_xy=1.5, sigma_intensity=0.3, iterations=2)
    expected = _direct(prob, image, 1.5, 2, 1.5, 0.3, 2)
    assert out.dtype == torch.float32 and out.shape == (1, classes, 7, 6)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=2e-6)
    np.testing.assert_allclose(out.sum(1).numpy(), 1.0, atol=1e-6)
    # the cached and the recomputed affinities give the same result
    import s2l_monai.crf as crf

    cached_limit = crf._MAX_CACHED_WEIGHTS
    crf._MAX_CACHED_WEIGHTS = 0
    try:
        again = mean_field_refine(torch.tensor(prob[None], dtype=torch.float32), torch.tensor(image[None]), 1.5, 2,
                                  1.5, 0.3, 2)
    finally:
        crf._MAX_CACHED_WEIGHTS = cached_limit
    torch.testing.assert_close(again, out)


@pytest.mark.parametrize("crossing", [13.5, 9.5])
def test_refinement_moves_an_outline_onto_the_edge(crossing):
    """An image with a vertical step edge between columns 11 and 12, and a prediction (a soft ramp) whose 0.5 crossing
    sits two columns too far right (a mask too tight) or left (too wide): after refinement with the defaults the
    mask ``p > 0.5`` is the bright half, exactly."""
    image = torch.zeros(1, 1, 24, 24)
    image[..., 12:] = 1.0
    fg = torch.sigmoid((torch.arange(24.0) - crossing) * 0.5).expand(24, 24)
    prob = torch.stack([1 - fg, fg])[None]
    assert ((prob[0, 1] > 0.5) != (image[0, 0] > 0.5)).sum() == 2 * 24  # two columns wrong
    out = mean_field_refine(prob, image)
    np.testing.assert_array_equal((out[0, 1] > 0.5).numpy(), (image[0, 0] > 0.5).numpy())
    # far from the edge the prediction is left about as it was
    assert (out[0, 1, :, :3] - prob[0, 1, :, :3]).abs().max() < 0.05
    assert (out[0, 1, :, 21:] - prob[0, 1, :, 21:]).abs().max() < 0.05
    # weight 0 (or no steps) leaves it as it is; bad arguments are refused
    torch.testing.assert_close(mean_field_refine(prob, image, weight=0.0), prob)
    torch.testing.assert_close(mean_field_refine(prob, image, iterations=0), prob)
    with pytest.raises(ValueError, match="same"):
        mean_field_refine(prob, image[..., :20])
    with pytest.raises(ValueError, match="radius"):
        mean_field_refine(prob, image, radius=0)


def test_mean_field_refined_transform_keeps_metadata_and_can_be_off():
    image = torch.zeros(1, 24, 24)
    image[:, :, 12:] = 1.0
    fg = torch.sigmoid((torch.arange(24.0) - 14.5) * 0.8).expand(24, 24)
    pred = MetaTensor(torch.stack([1 - fg, fg]), meta={"filename_or_obj": "a.png"})
    out = MeanFieldRefined("pred")({"pred": pred, "image": MetaTensor(image)})
    assert isinstance(out["pred"], MetaTensor) and out["pred"].meta["filename_or_obj"] == "a.png"
    torch.testing.assert_close(out["pred"].as_tensor(), mean_field_refine(pred.as_tensor()[None], image[None])[0])
    off = MeanFieldRefined("pred", weight=0)({"pred": pred, "image": image})
    assert off["pred"] is pred


def test_mean_field_refined_slice_by_slice():
    """A ``CZYX`` volume with ``slice_axis=0``: every Z slice refined alone (2D windows), as MONAI Label's 3D task
    segments it; without it, 3D windows mix the slices."""
    rng = np.random.default_rng(1)
    fg = torch.tensor(rng.uniform(0.05, 0.95, size=(3, 10, 12)), dtype=torch.float32)
    prob = torch.stack([1 - fg, fg])
    image = torch.tensor(rng.uniform(size=(1, 3, 10, 12)), dtype=torch.float32)
    out = MeanFieldRefined("pred", weight=2.0, radius=2, slice_axis=0)({"pred": prob, "image": image})["pred"]
    for z in range(3):
        torch.testing.assert_close(out[:, z], mean_field_refine(prob[None, :, z], image[None, :, z], 2.0, radius=2)[0])
    whole = MeanFieldRefined("pred", weight=2.0, radius=2)({"pred": prob, "image": image})["pred"]
    assert not torch.allclose(whole, out)


def test_mean_field_runs_on_one_thread_and_restores_the_setting():
    """The same bytes whatever the caller's thread count (the post-processing worker and the inline chain write the
    same files), and the caller's thread count is left as it was."""
    rng = np.random.default_rng(2)
    fg = torch.tensor(rng.uniform(0.01, 0.99, size=(1, 1, 300, 270)), dtype=torch.float32)
    prob, image = torch.cat([1 - fg, fg], dim=1), torch.tensor(rng.uniform(size=(1, 1, 300, 270)), dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(mean_field_refine(prob, image))
            assert torch.get_num_threads() == threads
        assert torch.equal(outs[0], outs[1])
    finally:
        torch.set_num_threads(before)
