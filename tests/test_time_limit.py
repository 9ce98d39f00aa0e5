"""TrainingTimeLimit: stops before the budget at an epoch boundary, hard-stops mid-epoch, and is off by default."""

from __future__ import annotations

import time

import pytest
from ignite.engine import Engine, Events

from s2l_monai.handlers import TrainingTimeLimit


def _engine(step_seconds: float) -> Engine:
    return Engine(lambda engine, batch: time.sleep(step_seconds))


def _completed_flag(engine: Engine) -> list[bool]:
    fired: list[bool] = []
    engine.add_event_handler(Events.COMPLETED, lambda e: fired.append(True))
    return fired


def test_stops_at_the_last_epoch_that_fits() -> None:
    # epochs of 5 x 20 ms = 0.1 s; budget 0.35 s -> about 3 epochs fit (fewer on a loaded machine); it must stop
    # at an epoch boundary, before the budget, and only when one more epoch of the longest length would not fit.
    engine = _engine(0.02)
    limit = TrainingTimeLimit(max_seconds=0.35)
    limit.attach(engine)
    fired = _completed_flag(engine)
    start = time.perf_counter()
    engine.run(range(5), max_epochs=50)
    took = time.perf_counter() - start
    assert limit.stopped_early
    assert 1 <= engine.state.epoch <= 3
    assert engine.state.iteration == 5 * engine.state.epoch  # whole epochs only
    assert took < 0.35
    assert took + limit.longest_epoch > 0.35 - 0.01  # one more epoch would not have fitted
    assert fired == [True]  # COMPLETED still fires: final checkpoints are written


def test_hard_stop_inside_a_slow_epoch() -> None:
    # The first epoch alone (10 x 30 ms = 0.3 s) is longer than the 0.1 s budget: stop mid-epoch, just after 0.1 s.
    engine = _engine(0.03)
    limit = TrainingTimeLimit(max_seconds=0.1)
    limit.attach(engine)
    engine.run(range(10), max_epochs=5)
    assert limit.stopped_early
    assert engine.state.epoch == 1
    assert 1 <= engine.state.iteration <= 4  # each step takes >= 30 ms


@pytest.mark.parametrize("max_seconds", [None, 0, -1])
def test_disabled_trains_every_epoch(max_seconds: float | None) -> None:
    engine = _engine(0.0)
    limit = TrainingTimeLimit(max_seconds=max_seconds)
    limit.attach(engine)
    engine.run(range(3), max_epochs=4)
    assert not limit.stopped_early
    assert engine.state.epoch == 4
    assert engine.state.iteration == 12


def test_budget_larger_than_the_run_changes_nothing() -> None:
    engine = _engine(0.001)
    limit = TrainingTimeLimit(max_seconds=60)
    limit.attach(engine)
    engine.run(range(4), max_epochs=3)
    assert not limit.stopped_early
    assert engine.state.epoch == 3
