import random

import pytest
import torch
from torch import nn

from lightning_compress.core.batches import (
    ModelCall,
    call_model,
    check_model_call,
    first_batch,
    first_loader,
    first_tensor,
    model_call,
)
from lightning_compress.errors import CompressionConfigError


class Kwargs(nn.Module):  # the standard Hugging Face LightningModule pattern
    def forward(self, **inputs):
        return {"keys": sorted(inputs), "logits": inputs["input_ids"] * 2.0}


class Named(nn.Module):
    def forward(self, input_ids, attention_mask=None):
        return input_ids if attention_mask is None else input_ids * attention_mask


class NeedsLabels(nn.Module):
    def forward(self, x, labels):
        return x + labels


class TwoInputs(nn.Module):  # Lightning's LightningTransformer: forward(inputs, target)
    def forward(self, inputs, target):
        return inputs - target


def test_a_tensor_batch_is_the_input_and_a_tuple_gives_its_first_item():
    x, y = torch.ones(2, 3), torch.zeros(2)
    assert model_call(nn.Linear(3, 1), x).args[0] is x
    call = model_call(nn.Linear(3, 1), (x, y))
    assert call.args == (x,) and call.kwargs == {}
    assert model_call(nn.Linear(3, 1), [x, y]).args == (x,)


def test_a_forward_that_requires_several_positional_arguments_gets_the_first_items():
    a, b, extra = torch.ones(2), torch.full((2,), 3.0), torch.zeros(2)
    call = model_call(TwoInputs(), (a, b, extra))
    assert len(call.args) == 2 and call(TwoInputs()).tolist() == [-2.0, -2.0]


def test_a_dict_batch_is_keyword_arguments_without_labels_unless_required():
    ids, mask, labels = torch.ones(2, 4), torch.zeros(2, 4), torch.ones(2)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "label": labels}
    out = call_model(Kwargs(), batch)
    assert out["keys"] == ["attention_mask", "input_ids"]  # **kwargs takes everything but the labels
    assert model_call(Named(), {**batch, "token_type_ids": ids}).kwargs.keys() == {"input_ids", "attention_mask"}
    assert torch.equal(call_model(Named(), batch), ids * mask)
    assert torch.equal(call_model(NeedsLabels(), {"x": ids, "labels": ids}), ids * 2)  # required: kept


class EncoderDecoder(Kwargs):
    """A LightningModule around a model whose ``config.is_encoder_decoder`` (T5, BART) holds."""

    def __init__(self, is_encoder_decoder: object = True) -> None:
        super().__init__()
        self.inner = nn.Linear(1, 1)
        self.inner.config = type("Config", (), {"is_encoder_decoder": is_encoder_decoder})()


def test_an_encoder_decoder_keeps_the_labels_it_makes_its_decoder_inputs_from():
    ids, labels = torch.ones(2, 4), torch.full((2, 3), 7.0)
    batch = {"input_ids": ids, "labels": labels, "label": labels}
    assert sorted(model_call(EncoderDecoder(), batch).kwargs) == ["input_ids", "labels"]  # "label": still left out
    assert model_call(EncoderDecoder(), batch).kwargs["labels"] is labels
    # Given decoder inputs of its own, or not an encoder-decoder (also a truthy non-bool flag): left out.
    for decoder_key in ("decoder_input_ids", "decoder_inputs_embeds"):
        assert sorted(model_call(EncoderDecoder(), {**batch, decoder_key: ids}).kwargs) == sorted(
            ["input_ids", decoder_key]
        )
    for flag in (False, None, "yes"):
        assert sorted(model_call(EncoderDecoder(flag), batch).kwargs) == ["input_ids"]

    # A forward that names its arguments gets the labels only if it names them.
    class NamedSeq2Seq(EncoderDecoder):
        def forward(self, input_ids, labels=None):
            return input_ids if labels is None else labels

    assert torch.equal(call_model(NamedSeq2Seq(), batch), labels)
    assert sorted(model_call(EncoderDecoder(), {"input_ids": ids}).kwargs) == ["input_ids"]


def test_hf_t5_and_bart_are_called_with_their_labels_as_in_training():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=64,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    ).eval()
    bart = transformers.BartForConditionalGeneration(
        transformers.BartConfig(
            vocab_size=64,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=32,
        )
    ).eval()
    ids, labels = torch.randint(1, 64, (2, 6)), torch.randint(1, 64, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        for model in (t5, bart):
            want = model(**batch).logits  # what the training step computes (T5 cannot run without labels)
            got = first_tensor(call_model(model, batch))
            assert got.shape == (2, 5, 64)
            assert torch.equal(got, want)


def test_hf_batch_encoding_is_a_mapping():
    transformers = pytest.importorskip("transformers")
    batch = transformers.BatchEncoding({"input_ids": torch.ones(1, 2), "labels": torch.ones(1)})
    assert list(model_call(Kwargs(), batch).kwargs) == ["input_ids"]


def test_example_inputs_for_export():
    x = torch.ones(1)
    assert ModelCall((x,), {}).example_inputs() is x
    assert ModelCall((x, x), {}).example_inputs() == (x, x)
    assert ModelCall((), {"input_ids": x}).example_inputs() == {"input_ids": x}


def test_batches_of_no_known_structure_are_refused():
    with pytest.raises(TypeError, match="Cannot make a model call from a batch of type int"):
        model_call(nn.Identity(), 3)
    with pytest.raises(TypeError, match="tuple"):
        model_call(nn.Identity(), ())


def test_check_model_call_binds_the_signature_without_running_the_model():
    calls = []

    class Counting(nn.Module):
        def forward(self, input_ids, attention_mask):
            calls.append(1)
            return input_ids

    state = torch.get_rng_state()
    call = check_model_call(Counting(), {"input_ids": 1, "attention_mask": 2, "labels": 3}, "QuantizeOnFitEnd")
    assert call.kwargs == {"input_ids": 1, "attention_mask": 2} and calls == []
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(
        CompressionConfigError,
        match=r"QuantizeOnFitEnd cannot call Counting on the training batches: the batch was read as 0 positional.*"
        r"keyword argument\(s\) input_ids.*missing a required argument: 'attention_mask'",
    ):
        check_model_call(Counting(), {"input_ids": 1}, "QuantizeOnFitEnd")
    with pytest.raises(CompressionConfigError, match=r"cannot call Identity on the training batches: Cannot make"):
        check_model_call(nn.Identity(), None, "QuantizeOnFitEnd")
    with pytest.raises(CompressionConfigError, match=r"read as 1 positional.*`TwoInputs.forward\(inputs, target\)`"):
        check_model_call(TwoInputs(), torch.ones(1), "QuantizeOnFitEnd")


def test_first_tensor_prefers_logits_over_the_loss_in_mappings_and_hf_outputs():
    loss, logits, hidden = torch.tensor(1.0), torch.ones(2, 3), torch.zeros(2, 4)
    assert first_tensor({"loss": loss, "logits": logits}) is logits
    assert first_tensor({"loss": loss, "other": hidden}) is hidden
    assert first_tensor({"loss": loss}) is loss
    assert first_tensor([None, (hidden, logits)]) is hidden
    assert first_tensor(("no", 1)) is None
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)
    assert first_tensor(out) is logits
    base = transformers.modeling_outputs.BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=logits)
    assert first_tensor(base) is hidden


def test_first_loader_of_lists_and_dicts_of_loaders():
    a, b = torch.utils.data.DataLoader(torch.ones(4, 2)), torch.utils.data.DataLoader(torch.zeros(4, 2))
    assert first_loader(a) is a
    assert first_loader([a, b]) is a
    assert first_loader({"x": b, "y": a}) is b
    assert first_loader({"x": [b]}) is b
    assert first_loader([]) is None and first_loader({}) is None and first_loader(None) is None
    assert first_loader(5) is None
    random.seed(0)


def _refuse_to_start(worker_id: int) -> None:
    raise RuntimeError("a worker was started")


def test_first_batch_of_a_worker_loader_starts_no_worker_and_is_a_batch_of_the_dataset():
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(20.0).reshape(10, 2), torch.arange(10))
    loader = DataLoader(
        data,
        batch_size=4,
        shuffle=True,
        num_workers=2,
        worker_init_fn=_refuse_to_start,
        generator=torch.Generator().manual_seed(3),
    )
    found, (x, y) = first_batch(loader)
    assert found and x.shape == (4, 2) and len(set(y.tolist())) == 4
    assert torch.equal(x, data.tensors[0][y])  # collated items of the dataset, pairs kept
    with pytest.raises(RuntimeError, match="a worker was started"):  # the loop itself would start them
        next(iter(loader))


def test_first_batch_iterates_other_loaders_once_and_reports_empty_ones():
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield from (torch.tensor([float(i)]) for i in range(3))

    found, batch = first_batch(DataLoader(Stream(), batch_size=2))
    assert found and torch.equal(batch, torch.tensor([[0.0], [1.0]]))
    assert first_batch(iter([[5, 6], [7]])) == (True, [5, 6])
    assert first_batch(DataLoader([], batch_size=2, num_workers=1)) == (False, None)
    assert first_batch([]) == (False, None)
