"""PseudoLabelDriftControl: L_up's background weight from the pseudo-labels' own foreground share."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader
from monai.engines import IterationEvents, SupervisedEvaluator
from monai.inferers import SimpleInferer
from s2l_testing import changing_logits, ensemble_items

from s2l_monai.ensemble import EMAEnsembleHandler, EMAStore, EnsembleEvents
from s2l_monai.handlers import PseudoLabelDriftControl, ScribbleLossHandler
from s2l_monai.losses import ScribbleLoss


def _shares(store, n=3, tau=0.8):
    """Foreground share of the confidently pseudo-labelled unscribbled pixels, counted by hand from the store."""
    averages = [store.probabilities(f"img{i}")[:, 2:] for i in range(n)]
    confident = sum(int((a.max(0) > tau).sum()) for a in averages)
    foreground = sum(int((a[1] > tau).sum()) for a in averages)
    return foreground / confident


def test_weight_follows_the_foreground_share_of_each_ensemble(tmp_path):
    items = ensemble_items(shift=-1.0)
    net = changing_logits(lambda x, k: 4 * (x + 0.4 * k))  # more foreground in each ensemble
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(items, batch_size=1), network=net,
        inferer=SimpleInferer(), decollate=False,
    )
    store = EMAStore(tmp_path / "ema")
    loss = ScribbleLoss()
    shares, seen = [], []

    def step(engine, batch):
        seen.append((engine.state.epoch, loss.pseudo_label_enabled, loss.pseudo_class_weights))

    trainer = Engine(step)
    trainer.network = net
    trainer.register_events(*IterationEvents)
    ScribbleLossHandler(loss, warmup_epochs=4).attach(trainer)  # L_up from epoch 5 on
    EMAEnsembleHandler(evaluator, store, every=2, alpha=0.5, tau=0.8).attach(trainer)
    control = PseudoLabelDriftControl(loss, max_weight=10.0)
    control.attach(trainer)
    trainer.add_event_handler(EnsembleEvents.ENSEMBLE_COMPLETED, lambda engine: shares.append(_shares(store)))
    trainer.run(range(1), max_epochs=9)

    # ensembles after epochs 2, 4 (both in warm-up: the later one is the reference), 6 and 8
    assert len(shares) == 4
    assert shares[1] < shares[2] < shares[3], "the test network must make the foreground grow"
    w6 = shares[2] / shares[1]
    w8 = w6 * shares[3] / shares[1]
    assert control.reference == pytest.approx(shares[1])
    assert control.weight == pytest.approx(w8)
    weights = {epoch: w for epoch, _, w in seen}
    assert weights[1] is None  # nothing set before the first ensemble
    assert weights[3] == pytest.approx([1.0, 1.0]) and weights[5] == pytest.approx([1.0, 1.0])
    assert weights[7] == pytest.approx([w6, 1.0])
    assert weights[9] == pytest.approx([w8, 1.0])
    assert trainer.state.metrics["pseudo_background_weight"] == pytest.approx(w8)


def test_weight_is_bounded_and_survives_a_checkpoint():
    loss = ScribbleLoss()
    loss.pseudo_label_enabled = False
    control = PseudoLabelDriftControl(loss, num_classes=3, max_weight=2.0)
    engine = Engine(lambda e, b: None)
    for enabled, foreground, expected in [(False, 0.10, 1.0), (True, 0.05, 1.0), (True, 0.15, 1.5), (True, 0.2, 2.0)]:
        loss.pseudo_label_enabled = enabled
        engine.state.metrics = {"ema_foreground": foreground, "ema_coverage": 0.5}
        control(engine)
        assert control.weight == pytest.approx(expected)  # never below 1 (shrinking), never above max_weight
    assert loss.pseudo_class_weights == pytest.approx([2.0, 1.0, 1.0])
    other_loss = ScribbleLoss()
    other = PseudoLabelDriftControl(other_loss, num_classes=3, max_weight=2.0)
    other.load_state_dict(control.state_dict())
    assert other.reference == pytest.approx(0.2) and other.weight == pytest.approx(2.0)
    assert other_loss.pseudo_class_weights == pytest.approx([2.0, 1.0, 1.0])
    # switched off (drift_control false, configs/paper.json): L_up keeps the weights it was given
    fixed = ScribbleLoss(pseudo_class_weights=[3.0, 1.0])
    off = PseudoLabelDriftControl(fixed, enabled=False)
    for enabled in (False, True):
        fixed.pseudo_label_enabled = enabled
        off(engine)
    assert fixed.pseudo_class_weights == pytest.approx([3.0, 1.0]) and off.reference is None
    with pytest.raises(ValueError, match="max_weight"):
        PseudoLabelDriftControl(loss, max_weight=0.5)
