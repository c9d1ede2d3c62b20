"""The recipe for a pretrained encoder: prune the student with Wanda while it distils from its dense copy."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import quiet_trainer
from torch import nn

from lightning_compress import CompressionConfigError, DistillationModule, PruningCallback

pytest.importorskip("transformers")

from lightning_compress.demo_text import SentenceDataModule, SentenceEncoder, embed


def _encoder() -> SentenceEncoder:
    return SentenceEncoder(vocab_size=200, hidden_size=32, layers=2, heads=2, intermediate_size=64, max_length=16)


def test_output_loss_is_checked() -> None:
    with pytest.raises(CompressionConfigError, match=r"output_loss.*'kd'.*'cosine'.*'mse'.*'hinge'"):
        DistillationModule(nn.Linear(2, 2), nn.Linear(2, 2), output_loss="hinge")


@pytest.mark.filterwarnings("ignore:PruningCallback. The default selection leaves")
def test_wanda_row_pruning_while_distilling_from_the_dense_copy(tmp_path) -> None:
    teacher = _encoder()
    student = _encoder()  # same seed: the student starts as an exact copy of the dense teacher
    assert all(
        torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values(), strict=True)
    )
    dense = copy.deepcopy(teacher.state_dict())
    module = DistillationModule(student, teacher, output_loss="cosine", lr=2e-3, weight_decay=0.0)
    data = SentenceDataModule(max_length=16, batch_size=16, held_out=32, train_sentences=96, vocab_size=200)
    pruning = PruningCallback(
        0.5, scope="row", score="wanda", score_batches=2, end_epoch=1, update_every_n_steps=2, verbose=0
    )
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[pruning], limit_val_batches=2)
    trainer.fit(module, data)
    # every row of every selected Linear of the student is exactly half zero; the teacher is untouched
    linears = {f"student.{n}.weight": m for n, m in student.named_modules() if isinstance(m, nn.Linear)}
    assert set(pruning.masks) == set(linears) and len(linears) == 12  # q, k, v, out, 2 MLP per layer
    for name, layer in linears.items():
        zeros = (layer.weight == 0).sum(1)
        assert (zeros == layer.weight.shape[1] // 2).all(), name
        assert torch.equal(pruning.masks[name], layer.weight.detach() != 0)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in dense.items())
    assert set(module.state_dict()) == {f"student.{k}" for k in dense}  # keys unchanged, no teacher
    # the student trained (its kept weights moved) and still embeds like the teacher; that distilling
    # recovers what pruning loses is measured on the real MiniLM in benchmarks/pretrained_pruning.py
    data.setup("validate")
    tokens = data._val
    assert tokens is not None
    name = "student.encoder.encoder.layer.0.attention.self.query.weight"
    kept = pruning.masks[name]
    assert not torch.equal(linears[name].weight.detach()[kept], dense[name.removeprefix("student.")][kept])
    cosine = torch.cosine_similarity(embed(student, tokens), embed(teacher, tokens)).mean()
    assert cosine > 0.99
    assert "val/cosine" in trainer.callback_metrics
