"""The training data-loader's worker set-up (``s2l_monai.engine.untracked_worker_init``)."""

from __future__ import annotations

import torch
from monai.data import DataLoader, MetaTensor, get_track_meta
from monai.transforms import RandFlip


class _Flipped(torch.utils.data.Dataset):
    """One flipped MetaTensor, the worker's metadata-tracking flag and a draw of the dataset's random transform."""

    def __init__(self) -> None:
        self.flip = RandFlip(prob=1.0, spatial_axis=0)  # seeded per worker by MONAI's worker_init_fn

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        out = self.flip(MetaTensor(torch.arange(6.0).reshape(1, 2, 3)))
        return {"tracked": get_track_meta(), "meta_tensor": isinstance(out, MetaTensor),
                "draw": int(self.flip.R.randint(1 << 30))}


def test_worker_drops_metadata_tracking_and_keeps_monai_seeding() -> None:
    from s2l_monai.engine import untracked_worker_init

    loader = DataLoader(_Flipped(), batch_size=1, num_workers=1, worker_init_fn=untracked_worker_init)
    batches = list(loader)
    assert [bool(b["tracked"]) for b in batches] == [False, False]
    assert [bool(b["meta_tensor"]) for b in batches] == [False, False]  # transforms return plain tensors there
    assert get_track_meta()  # the main process keeps its metadata (ensembles, saving)
    # the transforms are seeded as MONAI's default worker_init_fn seeds them
    torch.manual_seed(0)
    ours = [int(b["draw"]) for b in DataLoader(_Flipped(), batch_size=1, num_workers=1,
                                               worker_init_fn=untracked_worker_init)]
    torch.manual_seed(0)
    monai_default = [int(b["draw"]) for b in DataLoader(_Flipped(), batch_size=1, num_workers=1)]
    assert ours == monai_default
    torch.manual_seed(1)
    assert [int(b["draw"]) for b in DataLoader(_Flipped(), batch_size=1, num_workers=1,
                                               worker_init_fn=untracked_worker_init)] != ours
