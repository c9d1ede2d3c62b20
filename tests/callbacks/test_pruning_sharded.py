"""PruningCallback refuses remove_channels=True on sharded (DTensor) weights; a one-rank gloo group in-process.

The two-rank behaviour of PruningCallback under FSDP2 is tested in ``tests/distributed/test_fsdp2_pruning.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from helpers import one_rank_gloo_group
from torch import nn

from lightning_compress import CompressionConfigError, PruningCallback


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    with one_rank_gloo_group():
        yield


def test_remove_channels_is_refused_on_sharded_weights(one_rank_group: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    mesh = init_device_mesh("cpu", (1,))
    for i in (0, 2):
        model[i].weight = nn.Parameter(distribute_tensor(model[i].weight.detach(), mesh, [Shard(0)]))
    callback = PruningCallback(0.5, method="channel", remove_channels=True, verbose=0)
    with pytest.raises(CompressionConfigError, match=r"`remove_channels` to be False when the weights are sharded"):
        callback.on_fit_start(SimpleNamespace(optimizers=[]), model)  # type: ignore[arg-type]
