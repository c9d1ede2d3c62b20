"""SparseRegularizer refuses group_lasso on sharded weights whose output channels are not their rows.

Runs in this process on a one-rank gloo group (a DTensor needs a process group); the two-rank
behaviour is tested in ``tests/distributed/test_fsdp2_regularizer.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from helpers import one_rank_gloo_group
from torch import nn

from lightning_compress import CompressionConfigError, SparseRegularizer

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    with one_rank_gloo_group():
        yield


def test_group_lasso_on_sharded_conv1d_is_refused(one_rank_group: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = nn.Sequential(Conv1D(6, 4))  # GPT-2 style: weight [in=4, out=6]
    mesh = init_device_mesh("cpu", (1,))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
    callback = SparseRegularizer(1e-3, penalty="group_lasso", include=["Conv1D"], verbose=0)
    with pytest.raises(
        CompressionConfigError, match=r"`penalty`.*'l1' for sharded \(FSDP2\).*got 'group_lasso'.*0\.weight"
    ):
        callback.on_fit_start(SimpleNamespace(optimizers=[]), model)  # type: ignore[arg-type]
    SparseRegularizer(1e-3, penalty="l1", include=["Conv1D"], verbose=0).on_fit_start(
        SimpleNamespace(optimizers=[torch.optim.SGD(model.parameters(), lr=0.1)]),
        model,  # type: ignore[arg-type]
    )  # l1 is a sum over entries: any sharding is fine
