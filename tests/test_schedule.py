"""TrainingSchedule: warm-up, ensemble points and EMA weight scale with the run, in steps or seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import IterationEvents, SupervisedEvaluator
from monai.inferers import SimpleInferer
from torch.utils.data import DataLoader

from s2l_monai.ensemble import EMAEnsembleHandler, EMAStore
from s2l_monai.handlers import ScribbleLossHandler
from s2l_monai.losses import ScribbleLoss
from s2l_monai.schedule import ScheduleHandler, TrainingSchedule


@pytest.mark.parametrize("steps_per_epoch", [3, 82])
@pytest.mark.parametrize("max_steps", [200, 2000])
def test_shares_scale_with_the_run(steps_per_epoch, max_steps):
    """10 large images (3 steps an epoch) and 500 small ones (82): the same shares of the run, whatever the size."""
    s = TrainingSchedule(steps_per_epoch, max_steps=max_steps, warmup=0.6, ensemble_interval=0.1, ema_memory=0.15)
    assert s.total_steps == max_steps
    assert s.max_epochs == math.ceil(max_steps / steps_per_epoch)
    assert s.warmup_steps == round(0.6 * max_steps)
    # one interval before warm-up ends, then every tenth of the run, never at the very end
    assert s.ensemble_points == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert s.ema_alpha == pytest.approx(1 - math.exp(-0.1 / 0.15))  # 0.4866
    due = [step for step in range(1, max_steps + 1) if s.ensemble_due(step)
           and not setattr(s, "ensembles_done", s.ensembles_done + 1)]
    assert due == [round(p * max_steps) for p in (0.5, 0.6, 0.7, 0.8, 0.9)]
    assert s.in_warmup(s.warmup_steps - 1) and not s.in_warmup(s.warmup_steps)
    assert s.finished(max_steps) and not s.finished(max_steps - 1)


def test_alpha_keeps_the_memory_when_the_interval_changes():
    """Halving the interval halves alpha (to first order): the average still spans ``ema_memory`` of the run."""
    a = TrainingSchedule(10, max_steps=1000, ensemble_interval=0.1, ema_memory=0.15).ema_alpha
    b = TrainingSchedule(10, max_steps=1000, ensemble_interval=0.05, ema_memory=0.15).ema_alpha
    # weight of a prediction made 0.3 of the run ago: (1 - alpha)^(0.3 / interval), the same for both
    assert (1 - a) ** (0.3 / 0.1) == pytest.approx((1 - b) ** (0.3 / 0.05))
    assert (1 - a) ** (0.3 / 0.1) == pytest.approx(math.exp(-2.0))


def test_epoch_overrides_give_the_paper_grid():
    """``max_epochs``/``warmup_epochs``/``ema_every``/``ema_alpha`` (the paper's keys) still mean epochs."""
    s = TrainingSchedule(7, max_steps=999, max_epochs=300, warmup_epochs=100, ema_every=5, ema_alpha=0.2)
    assert s.total_steps == 2100 and s.max_epochs == 300
    assert s.warmup_steps == 700 and s.ema_alpha == 0.2
    points = [round(p * s.total_steps) for p in s.ensemble_points]
    assert points[:3] == [35, 70, 105] and points[-1] == 300 * 7 and len(points) == 60  # every 5 epochs, as Ignite
    # a resumed run counts the points it has passed as done
    s.sync(72 * 7)
    assert s.ensembles_done == 14 and not s.ensemble_due(72 * 7) and s.ensemble_due(75 * 7)
    # an interval longer than the run (the pCE baseline) means no ensemble at all
    assert TrainingSchedule(7, max_epochs=12, ema_every=100000).ensemble_points == []


def test_cosine_learning_rate_over_the_run():
    s = TrainingSchedule(10, max_steps=100, lr_min_factor=0.05)
    assert s.lr_factor(0) == pytest.approx(1.0)
    assert s.lr_factor(50) == pytest.approx(0.05 + 0.95 * 0.5)
    assert s.lr_factor(100) == pytest.approx(0.05)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=s.lr_factor)
    for _ in range(50):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (0.05 + 0.95 * 0.5))


def test_time_budget_drives_the_progress(monkeypatch):
    """With ``max_seconds`` the larger of the two shares counts, and the run ends when the clock runs out."""
    clock = [100.0]
    monkeypatch.setattr("s2l_monai.schedule.time.perf_counter", lambda: clock[0])
    s = TrainingSchedule(10, max_steps=1000, max_seconds=60, warmup=0.5)
    s.start_clock()
    clock[0] += 30  # half the time, 10% of the steps
    assert s.progress(100) == pytest.approx(0.5) and not s.in_warmup(100)
    clock[0] += 30
    assert s.finished(200)
    state = s.state_dict()
    assert state["seconds"] == pytest.approx(60)
    resumed = TrainingSchedule(10, max_steps=1000, max_seconds=60, warmup=0.5)
    resumed.load_state_dict({"seconds": 30.0, "step": 100})
    resumed.start_clock()
    assert resumed.progress(100) == pytest.approx(0.5)  # the seconds before the interruption still count


def test_invalid_budgets_are_refused():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        TrainingSchedule(0, max_steps=10)
    with pytest.raises(ValueError, match="budget"):
        TrainingSchedule(5, max_steps=None)
    with pytest.raises(ValueError, match="warmup"):
        TrainingSchedule(5, max_steps=10, warmup=1.5)


def test_schedules_that_never_use_pseudo_labels_are_flagged():
    assert TrainingSchedule(10, max_steps=1200).notes == []
    no_ensemble = TrainingSchedule(10, max_epochs=3, ema_every=5, warmup_epochs=1)
    assert no_ensemble.ensemble_points == []
    assert no_ensemble.notes == [
        "no ensemble fits in the run (ensemble interval 1.67 of the run, ema_every 5 epochs > 3 epochs): no "
        "pseudo-label is ever made"
    ]
    long_warmup = TrainingSchedule(10, max_epochs=3, warmup_epochs=5)
    assert long_warmup.warmup == 1.0 and long_warmup.in_warmup(29) and not long_warmup.finished(29)
    assert long_warmup.notes[0].startswith("warmup_epochs 5 >= the run's 3 epochs")


class _Const(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1]], 1)


def test_handlers_follow_the_schedule_mid_epoch(tmp_path):
    """A run of 40 steps in epochs of 6: L_up switches on at step 24 and ensembles run at steps 20, 24, ..., 36,
    in the middle of epochs; the run ends after exactly 40 steps."""
    rng = np.random.default_rng(0)
    items = [{"id": f"i{k}", "image": torch.from_numpy(rng.normal(size=(1, 8, 8)).astype(np.float32)),
              "scribble": torch.full((1, 8, 8), 255.0)} for k in range(2)]
    net = _Const()
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(items, batch_size=1),
                                    network=net, inferer=SimpleInferer(), decollate=False)
    schedule = TrainingSchedule(6, max_steps=40, warmup=0.6, ensemble_interval=0.1, ema_memory=0.15)
    loss = ScribbleLoss()
    enabled = []
    ensembles = []
    store = EMAStore(tmp_path / "ema")
    ens = EMAEnsembleHandler(evaluator, store, schedule=schedule, figure_dir=None)

    def step(engine, batch):
        enabled.append(loss.pseudo_label_enabled)

    trainer = Engine(step)
    trainer.register_events(*IterationEvents)
    trainer.network = net
    ScheduleHandler(schedule).attach(trainer)
    ScribbleLossHandler(loss, schedule=schedule).attach(trainer)
    ens.attach(trainer)
    done = [0]

    def record(engine):
        if schedule.ensembles_done > done[0]:
            ensembles.append(engine.state.iteration)
            done[0] = schedule.ensembles_done

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run(range(6), max_epochs=schedule.max_epochs)
    assert trainer.state.iteration == 40
    assert enabled == [False] * 24 + [True] * 16
    assert ensembles == [20, 24, 28, 32, 36]
    assert ens.alpha == pytest.approx(schedule.ema_alpha) and schedule.ensembles_done == 5
    assert sorted(store.ids()) == ["i0", "i1"]


def test_timed_snapshots_save_the_weights_when_the_clock_passes(tmp_path, monkeypatch):
    from s2l_monai.checkpoints import TimedSnapshots

    schedule = TrainingSchedule(5, max_steps=10)
    clock = iter([10.0, 40.0, 70.0, 200.0])  # seconds of training seen at steps 1..4
    monkeypatch.setattr(schedule, "seconds", lambda: next(clock))
    net = torch.nn.Linear(2, 2)
    snaps = TimedSnapshots(net, schedule, [2, 0.5], tmp_path / "snaps")
    trainer = Engine(lambda engine, batch: None)
    snaps.attach(trainer)
    trainer.run(range(4), max_epochs=1)
    import json

    saved = json.loads((tmp_path / "snaps" / "snapshots.json").read_text())
    assert [(s["minutes"], s["step"]) for s in saved] == [(0.5, 2), (2.0, 4)]
    state = torch.load(tmp_path / "snaps" / "model_0.5min.pt", weights_only=True)
    assert torch.equal(state["weight"], net.weight.detach())
