from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.inferers import SimpleInferer
from PIL import Image
from s2l_testing import changing_logits, ensemble_items

from s2l_monai.ensemble import EMAEnsembleHandler, EMAStore, ema_update


def test_ema_update_formula():
    p1, p2, p3 = (np.full((1, 2, 2), v, np.float32) for v in (0.2, 0.9, 0.5))
    y = ema_update(None, p1, 0.2)
    np.testing.assert_allclose(y, p1)  # y_0 = p
    y = ema_update(y, p2, 0.2)
    np.testing.assert_allclose(y, 0.2 * 0.9 + 0.8 * 0.2)
    y = ema_update(y, p3, 0.2)
    np.testing.assert_allclose(y, 0.2 * 0.5 + 0.8 * (0.2 * 0.9 + 0.8 * 0.2), rtol=1e-6)


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("uint8", 1 / 255)])
def test_store_update_roundtrip_and_state_dict(tmp_path, dtype, tol):
    store = EMAStore(tmp_path / "ema", num_classes=2, dtype=dtype)
    assert store.probabilities("a") is None and "a" not in store
    fg1 = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    fg2 = np.random.default_rng(1).random((5, 7)).astype(np.float32)
    store.update("a", np.stack([1 - fg1, fg1]), alpha=0.3)
    out = store.update("a", torch.from_numpy(np.stack([1 - fg2, fg2])), alpha=0.3)
    expected = 0.3 * fg2 + 0.7 * fg1
    np.testing.assert_allclose(out[1], expected, atol=2 * tol)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-6)
    np.testing.assert_allclose(store.probabilities("a"), out)
    # one channel on disk for a binary task
    assert np.load(store.path("a"), mmap_mode="r").shape == (1, 5, 7)
    state = store.state_dict()
    other = EMAStore(tmp_path / "other", num_classes=2, dtype=dtype)
    other.update("stale", np.stack([1 - fg1, fg1]), alpha=1.0)
    other.load_state_dict(state)
    assert other.ids() == ["a"]
    np.testing.assert_array_equal(other.probabilities("a"), out)
    assert not list((tmp_path / "ema").glob(".*tmp*")), "temporary files left behind"


def test_store_refuses_mismatch(tmp_path):
    EMAStore(tmp_path, num_classes=2)
    with pytest.raises(ValueError, match="made with"):
        EMAStore(tmp_path, num_classes=3)
    store = EMAStore(tmp_path, num_classes=2)
    store.update("a", np.full((2, 3, 3), 0.5, np.float32), alpha=0.2)
    with pytest.raises(ValueError, match="changed shape"):
        store.update("a", np.full((2, 4, 3), 0.5, np.float32), alpha=0.2)


def test_handler_fires_every_gamma_epochs_and_applies_the_formula(tmp_path):
    items = ensemble_items()
    net = changing_logits(lambda x, k: x * k)  # the foreground logit grows with each call
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(items, batch_size=1), network=net,
        inferer=SimpleInferer(), decollate=False,
    )
    store = EMAStore(tmp_path / "ema")
    handler = EMAEnsembleHandler(evaluator, store, every=3, alpha=0.2, tau=0.8, figure_dir=tmp_path / "fig",
                                 num_figures=2)
    modes = []
    trainer = Engine(lambda engine, batch: net.train() or modes.append(net.training))
    trainer.network = net
    handler.attach(trainer)
    trainer.run(range(2), max_epochs=10)
    assert handler.epochs_run == [3, 6, 9]
    assert net.training and all(modes)  # back in train mode after every ensemble
    assert "ema_coverage" in trainer.state.metrics and trainer.state.metrics["ensemble_seconds"] > 0
    # item 0 is predicted first in each ensemble: network call k = 3 e + 1 gives p = sigmoid(k x)
    x = items[0]["image"][0].numpy()
    expected = None
    for e in range(3):
        p = 1 / (1 + np.exp(-x * (3 * e + 1)))
        expected = ema_update(expected, p, 0.2)
    np.testing.assert_allclose(store.probabilities("img0")[1], expected, atol=2e-3)
    # the statistics of the last ensemble, counted by hand over the final averages' unscribbled pixels (rows 2-19)
    final = [store.probabilities(f"img{i}")[:, 2:] for i in range(3)]
    total = sum(f[0].size for f in final)
    coverage = sum(int((f.max(0) > 0.8).sum()) for f in final) / total
    foreground = sum(int((f[1] > 0.8).sum()) for f in final) / total
    assert 0 < foreground < coverage < 1
    assert trainer.state.metrics["ema_coverage"] == pytest.approx(coverage)
    assert trainer.state.metrics["ema_foreground"] == pytest.approx(foreground)
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == [
        f"img{i}_epoch{e:04d}.png" for i in range(2) for e in (3, 6, 9)
    ]
    figure = np.asarray(Image.open(tmp_path / "fig" / "img0_epoch0009.png"))
    assert figure.shape == (20, 2 * 24 + 4, 3)

