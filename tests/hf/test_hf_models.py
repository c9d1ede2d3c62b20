"""Hugging Face models end to end: the HF LightningModule pattern, Lightning's LightningTransformer, ViT, GPT-2."""

import copy
import os

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from torch.utils.data import DataLoader, Dataset

from lightning_compress import QuantizeOnFitEnd, load_compressed, save_compressed
from lightning_compress.core.quant.convert import int8_layers, quantizable_targets, quantize_model
from lightning_compress.errors import CompressionConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def _bert_config():
    return transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )


class TokenBatches(Dataset):
    """Dict batches as a tokenizer + collator make them (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, n=32, length=12, vocab=120):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class HFClassifier(pl.LightningModule):
    """The LightningModule pattern of the Hugging Face / Lightning tutorials."""

    def __init__(self):
        super().__init__()
        self.model = transformers.BertForSequenceClassification(_bert_config())
        self.steps = 0

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_hf_lightning_module_with_dict_batches_quantizes_and_agrees(tmp_path):
    model = HFClassifier()
    cb = QuantizeOnFitEnd(calibration_batches=2, save_path=str(tmp_path / "bert.pt"), verbose=0)
    quiet_trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(model, DataLoader(TokenBatches(), batch_size=8))
    names = set(int8_layers(model))
    assert "model.bert.embeddings.word_embeddings" in names  # Embedding is in the default include
    assert "model.bert.encoder.layer.0.attention.self.query" in names and "model.classifier" in names
    assert cb.report["calibration_batches"] == 2
    assert cb.report["relative_error"] < 0.05 and cb.report["top1_agreement"] >= 0.99
    fresh = HFClassifier()
    load_compressed(tmp_path / "bert.pt", fresh)
    batch = next(iter(DataLoader(TokenBatches(), batch_size=4)))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def test_a_model_that_cannot_take_the_batches_fails_before_the_first_step(tmp_path):
    class Positional(HFClassifier):
        def forward(self, input_ids, token_type_ids):  # the dict batch has no token_type_ids
            return self.model(input_ids=input_ids, token_type_ids=token_type_ids)

        def setup(self, stage):
            self.set_up = True

    model = Positional()
    model.set_up = False
    cb = QuantizeOnFitEnd(calibration_batches=2, verbose=0)
    with pytest.raises(CompressionConfigError, match=r"QuantizeOnFitEnd cannot call Positional.*'token_type_ids'"):
        quiet_trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(model, DataLoader(TokenBatches(), batch_size=8))
    # Raised in the callback's `setup`, which Lightning runs before the module's own `setup`.
    assert model.steps == 0 and model.set_up is False


def test_a_model_whose_own_loader_needs_its_setup_is_checked_before_the_first_step(tmp_path):
    class OwnLoader(HFClassifier):
        def setup(self, stage):
            self.data = TokenBatches()  # the loader can only be built after this

        def train_dataloader(self):
            return DataLoader(self.data, batch_size=8)

        def forward(self, input_ids, token_type_ids):
            return self.model(input_ids=input_ids, token_type_ids=token_type_ids)

    model = OwnLoader()
    cb = QuantizeOnFitEnd(calibration_batches=2, verbose=0)
    with pytest.raises(CompressionConfigError, match=r"QuantizeOnFitEnd cannot call OwnLoader.*'token_type_ids'"):
        quiet_trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(model)
    assert model.steps == 0 and isinstance(model.data, TokenBatches)


def test_lightning_demo_transformer_quantizes_after_fit(tmp_path):
    from lightning.pytorch.demos import LightningTransformer

    class OfflineTransformer(LightningTransformer):  # no WikiText2 download
        def prepare_data(self):
            pass

    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 50, (10,), generator=g), torch.randint(0, 50, (10,), generator=g)) for _ in range(8)]
    model = OfflineTransformer(vocab_size=50)
    ref = copy.deepcopy(model)
    cb = QuantizeOnFitEnd(calibration_batches=2, verbose=0)
    quiet_trainer(tmp_path, max_steps=0, callbacks=[cb]).fit(model, DataLoader(data, batch_size=4))
    layers = int8_layers(model)
    # The packed attention projections and the token embedding are int8 too.
    assert {"model.embedding", "model.transformer.encoder.layers.0.self_attn"} <= set(layers)
    assert cb.report["relative_error"] < 0.05
    inputs, target = next(iter(DataLoader(data, batch_size=4)))
    model.eval()
    ref.eval()
    with torch.no_grad():
        out, want = model(inputs, target), ref(inputs, target)
    assert float((out - want).norm() / want.norm()) < 0.05


def test_vit_in_int8_computes_like_float():
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.ViTModel(cfg).eval()
    ref = copy.deepcopy(model)
    result = quantize_model(model, quantizable_targets(model)[0])
    assert "embeddings.patch_embeddings.projection" in result.converted  # the Conv2d that ViT casts pixels to
    assert model.embeddings.patch_embeddings.projection.weight.dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, want = model(pixel_values=x).last_hidden_state, ref(pixel_values=x).last_hidden_state
    assert float((out - want).norm() / want.norm()) < 0.02  # was 0.35 with an int8-typed weight


def test_gpt2_tied_head_is_one_int8_tensor_stored_once_and_restored_tied(tmp_path):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    torch.save(model.state_dict(), tmp_path / "float.pt")
    quantize_model(model, quantizable_targets(model)[0])
    assert model.lm_head._buffers["weight"] is model.transformer.wte._buffers["weight"]
    assert {type(m).__name__ for m in int8_layers(model).values()} == {"Int8Conv1D", "Int8Embedding", "Int8Linear"}
    save_compressed(model, tmp_path / "int8.pt")
    ratio = os.path.getsize(tmp_path / "int8.pt") / os.path.getsize(tmp_path / "float.pt")
    assert ratio < 0.3  # the tied table is stored once (twice it would be 0.42)
    fresh = transformers.GPT2LMHeadModel(cfg).eval()
    load_compressed(tmp_path / "int8.pt", fresh)
    assert fresh.lm_head._buffers["weight"] is fresh.transformer.wte._buffers["weight"]
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_save_pretrained_of_an_int8_model_refuses_with_what_to_do(tmp_path):
    model = transformers.BertModel(_bert_config()).eval()
    model.save_pretrained(tmp_path / "float")  # a float model saves as usual
    quantize_model(model, quantizable_targets(model)[0])
    with pytest.raises(TypeError, match=r"save_pretrained.*garbage.*save_compressed\(model, path\).*load_compressed"):
        model.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()
    copy.deepcopy(model)  # the guard does not stop copies
    # The way that works: save_compressed, then load into the float checkpoint rebuilt with from_pretrained.
    save_compressed(model, tmp_path / "bert.pt")
    fresh = transformers.BertModel.from_pretrained(tmp_path / "float").eval()
    load_compressed(tmp_path / "bert.pt", fresh)
    ids = torch.randint(0, 120, (2, 10))
    with torch.no_grad():
        assert torch.equal(fresh(ids).last_hidden_state, model(ids).last_hidden_state)
    with pytest.raises(TypeError, match="holds lightning-compress int8 layers"):
        fresh.save_pretrained(tmp_path / "again")  # load_compressed guards it too


class Seq2Seq(pl.LightningModule):
    """T5 fine-tuned the usual way: the batch holds ``labels`` and no decoder inputs (T5 shifts the labels)."""

    def __init__(self):
        super().__init__()
        config = transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0,
        )  # fmt: skip
        self.model = transformers.T5ForConditionalGeneration(config)

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_t5_trained_on_labels_only_quantizes_at_fit_end(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (16, 8), generator=g)
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.flip(0)} for i in ids]
    model = Seq2Seq()
    cb = QuantizeOnFitEnd(mode="static", calibration_batches=2, save_path=str(tmp_path / "t5.pt"), verbose=0)
    quiet_trainer(tmp_path, max_steps=4, callbacks=[cb]).fit(model, DataLoader(rows, batch_size=4))
    names = set(int8_layers(model))
    assert "model.encoder.block.0.layer.0.SelfAttention.q" in names
    assert "model.decoder.block.0.layer.1.EncDecAttention.o" in names
    assert cb.report["calibration_batches"] == 2
    assert cb.report["relative_error"] < 0.05
    fresh = Seq2Seq()
    load_compressed(tmp_path / "t5.pt", fresh)
    batch = next(iter(DataLoader(rows, batch_size=4)))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)
