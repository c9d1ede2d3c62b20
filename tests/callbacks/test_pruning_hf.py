"""PruningCallback and SparseRegularizer on a tiny Hugging Face GPT-2: Conv1D axes, the tied head, +0.0 zeros."""

import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from torch.utils.data import DataLoader

from lightning_compress import PruningCallback, SparseRegularizer

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONV1D_NAMES = [
    f"model.transformer.h.{i}.{m}.weight"
    for i in range(2)
    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


class GPT2Module(pl.LightningModule):
    def __init__(self, vocab_size: int = 100, optimizer: str = "adamw", lr: float = 1e-2) -> None:
        super().__init__()
        config = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        torch.manual_seed(0)
        self.model = transformers.GPT2LMHeadModel(config)
        self.optimizer, self.lr = optimizer, lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


def _tokens(vocab_size: int = 100) -> DataLoader:
    data = torch.randint(0, vocab_size, (16, 12), generator=torch.Generator().manual_seed(0))
    return DataLoader(list(data), batch_size=4)


def _fit(tmp_path, module: pl.LightningModule, *callbacks, vocab_size: int = 100) -> None:
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=list(callbacks))
    trainer.fit(module, _tokens(vocab_size))


@pytest.mark.parametrize("method", ["magnitude", "channel", "2:4"])
def test_gpt2_conv1d_pruned_along_the_true_axes_and_the_tie_holds(tmp_path, method: str) -> None:
    module = GPT2Module()
    embedding = module.model.transformer.wte.weight.detach().clone()
    pruning = PruningCallback(0.5, method=method, schedule="constant", verbose=0)
    _fit(tmp_path, module, pruning)
    gpt2 = module.model
    assert list(pruning.masks) == CONV1D_NAMES  # the eight projections; lm_head (tied to wte) is not selected
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert not (gpt2.transformer.wte.weight == 0).any() and not torch.equal(gpt2.transformer.wte.weight, embedding)
    for name in CONV1D_NAMES:
        weight = module.get_parameter(name).detach()  # [in, out]
        zero = weight == 0
        assert torch.equal(~zero, pruning.masks[name])  # exact zeros where pruned, nothing else
        assert not torch.signbit(weight[zero]).any()  # +0.0, never -0.0 (AdamW with weight decay)
        if method == "channel":
            columns = zero.all(dim=0)  # output channels are the columns of a Conv1D weight
            assert torch.equal(zero, columns.expand_as(zero)) and 0 < int(columns.sum()) < weight.shape[1]
            assert not zero.all(dim=1).any()  # no input row is dropped whole
        elif method == "2:4":
            groups = (~zero).T.reshape(weight.shape[1], -1, 4)  # 4 consecutive inputs of one output
            assert (groups.sum(dim=-1) == 2).all()
    assert pruning.sparsity == pytest.approx(0.5, abs=0.02)


def test_default_selection_that_leaves_the_embedding_out_says_so_once(tmp_path) -> None:
    module = GPT2Module(vocab_size=1000)
    callbacks = [PruningCallback(0.5, schedule="constant", verbose=0), SparseRegularizer(1e-5, verbose=0)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, module, *callbacks, vocab_size=1000)
    said = [str(w.message) for w in caught if "dense, in modules it does not select" in str(w.message)]
    assert len(said) == 1
    assert said[0].startswith("PruningCallback: The default selection leaves 33,344 of 58,496 parameters (57.00%)")
    assert "model.transformer.wte (Embedding, 32,000, tied to model.lm_head)" in said[0]
    with warnings.catch_warnings(record=True) as caught:  # an explicit include is what the user asked for
        warnings.simplefilter("always")
        _fit(
            tmp_path, GPT2Module(vocab_size=1000), PruningCallback(0.5, include=["Linear"], verbose=0), vocab_size=1000
        )
    assert not [w for w in caught if "dense, in modules it does not select" in str(w.message)]


def test_group_lasso_proximal_zeroes_conv1d_output_columns(tmp_path) -> None:
    module = GPT2Module(optimizer="sgd", lr=0.1)
    c_fc = module.model.transformer.h[0].mlp.c_fc.weight  # [32, 128]
    with torch.no_grad():
        c_fc[:, ::2] *= 1e-3  # even output channels are tiny: the proximal step removes them at once
    regularizer = SparseRegularizer(0.05, penalty="group_lasso", proximal=True, include=["Conv1D"], verbose=0)
    _fit(tmp_path, module, regularizer)
    zero = c_fc.detach() == 0
    expected = torch.zeros(128, dtype=torch.bool)
    expected[::2] = True
    assert torch.equal(zero.all(dim=0), expected) and torch.equal(zero, expected.expand_as(zero))
    assert not torch.signbit(c_fc.detach()[zero]).any()


class EncoderModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.encoder(batch).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


@pytest.mark.parametrize("method", ["channel", "2:4"])
def test_multihead_attention_packed_projection_is_pruned_per_projection(tmp_path, method: str) -> None:
    module = EncoderModule()
    pruning = PruningCallback(0.5, method=method, scope="layer", schedule="constant", verbose=0)
    data = DataLoader(list(torch.randn(8, 5, 16, generator=torch.Generator().manual_seed(0))), batch_size=4)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[pruning]).fit(module, data)
    for i in range(2):
        name = f"encoder.layers.{i}.self_attn.in_proj_weight"
        weight = module.get_parameter(name).detach()  # (3 * 16, 16): query, key, value
        zero = weight == 0
        assert torch.equal(~zero, pruning.masks[name]) and not torch.signbit(weight[zero]).any()
        for block in zero.split(16):  # each projection on its own
            if method == "channel":
                assert int(block.all(dim=1).sum()) == 8 and torch.equal(
                    block, block.all(dim=1, keepdim=True).expand_as(block)
                )
            else:
                assert ((~block).view(16, 4, 4).sum(dim=-1) == 2).all()
