"""Per-epoch seeding of the training augmentations (``s2l_monai.data.seeding``): persistent workers, no workers and
a resumed run draw the same augmentations."""

from __future__ import annotations

import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, Lambdad, RandGaussianNoised

from s2l_monai.data.seeding import EpochSeededDataset, EpochSeededSampler

N_ITEMS = 6


def _dataset() -> CacheDataset:
    """Six items; the cached part is deterministic, the noise is drawn from the transform's random state."""
    data = [{"image": torch.full((1, 2, 2), float(i))} for i in range(N_ITEMS)]
    transform = Compose([Lambdad("image", lambda x: x + 0), RandGaussianNoised("image", prob=1.0, std=1.0)])
    return CacheDataset(data, transform, cache_rate=1.0, progress=False)


def _loader(num_workers: int, seed: int = 0) -> DataLoader:
    dataset = _dataset()
    return DataLoader(EpochSeededDataset(dataset), sampler=EpochSeededSampler(dataset, seed=seed), batch_size=2,
                      num_workers=num_workers, persistent_workers=num_workers > 0)


def _epochs(loader: DataLoader, epochs: range) -> list[torch.Tensor]:
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)  # MONAI's Workflow does this when an epoch starts
        out.append(torch.cat([b["image"] for b in loader]))
    return out


def test_sampler_pairs_every_index_with_seed_epoch_and_rank() -> None:
    sampler = EpochSeededSampler(list(range(N_ITEMS)), seed=5)  # no process group: one replica, rank 0
    sampler.set_epoch(1)
    first = list(sampler)
    assert len(sampler) == N_ITEMS and sorted(i for i, _ in first) == list(range(N_ITEMS))
    assert {s for _, s in first} == {(5, 1, 0)}
    torch.manual_seed(123)  # the global generator plays no part
    assert list(sampler) == first
    sampler.set_epoch(2)
    assert [i for i, _ in list(sampler)] != [i for i, _ in first]  # a new order each epoch
    assert [i for i, _ in EpochSeededSampler(list(range(4)), shuffle=False)] == [0, 1, 2, 3]
    halves = [[i for i, _ in EpochSeededSampler(list(range(N_ITEMS)), num_replicas=2, rank=r)] for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == list(range(N_ITEMS))  # ranks share the items out


def test_dataset_reseeds_only_when_the_stream_changes() -> None:
    ds = EpochSeededDataset(_dataset())
    a, b = ds[(0, (0, 1, 0))]["image"], ds[(0, (0, 1, 0))]["image"]
    assert not torch.equal(a, b)  # same epoch: the random state runs on
    assert torch.equal(EpochSeededDataset(_dataset())[(0, (0, 1, 0))]["image"], a)  # the stream fixes the draws
    assert not torch.equal(ds[(0, (0, 2, 0))]["image"], a)
    assert ds[3]["image"].shape == (1, 2, 2)  # a plain index passes through


def test_persistent_workers_no_workers_and_a_resume_draw_the_same_augmentations() -> None:
    no_workers = _epochs(_loader(0), range(1, 4))
    torch.manual_seed(99)  # other draws from the global generator change nothing
    persistent = _epochs(_loader(1), range(1, 4))
    for a, b in zip(no_workers, persistent):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(persistent[0], persistent[1])
    # resumed at epoch 3: a fresh persistent worker draws what the kept-alive one drew
    torch.testing.assert_close(_epochs(_loader(1), range(3, 4))[0], persistent[2], rtol=0, atol=0)
    assert not torch.equal(_epochs(_loader(0, seed=1), range(1, 2))[0], no_workers[0])  # the run's seed counts
