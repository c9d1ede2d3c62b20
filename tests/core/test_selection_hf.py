"""Selection on the models people compress: Hugging Face GPT-2 / BERT, attention layers, tied embeddings."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_compress.core.layout import STANDARD, WeightLayout
from lightning_compress.core.penalties import sparse_penalty
from lightning_compress.core.selection import is_hf_conv1d, left_out_message, matches_type, select_targets

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONV1D_NAMES = [
    f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def tiny_gpt2(vocab_size: int = 100) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config)


def test_gpt2_default_selects_the_conv1d_projections_with_their_layout_and_leaves_the_tied_head() -> None:
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    targets = select_targets(model)
    assert [t.param_name for t in targets] == CONV1D_NAMES
    assert all(t.layout == WeightLayout(out_axis=1) and t.tied == () for t in targets)
    assert all(t.weight is model.get_parameter(t.param_name) for t in targets)
    # "Conv1D" names them alone, and is not torch's Conv1d
    assert [t.param_name for t in select_targets(model, include=["Conv1D"])] == CONV1D_NAMES
    assert select_targets(model, include=["Conv1d"], allow_empty=True) == []
    assert is_hf_conv1d(model.transformer.h[0].attn.c_attn) and not is_hf_conv1d(nn.Conv1d(2, 2, 1))


def test_a_tied_embedding_is_one_target_selected_only_with_all_its_owners() -> None:
    model = tiny_gpt2()
    with_embeddings = select_targets(model, include=["Linear", "Embedding"])
    names = [t.param_name for t in with_embeddings]
    assert names == ["transformer.wte.weight", "transformer.wpe.weight", *CONV1D_NAMES]
    assert with_embeddings[0].tied == ("lm_head.weight",) and with_embeddings[0].layout == STANDARD
    assert len({id(t.weight) for t in with_embeddings}) == len(with_embeddings)
    # leaving the head out leaves the shared table dense too: pruning it would prune the head
    kept = [t.param_name for t in select_targets(model, include=["Linear", "Embedding"], exclude=["lm_head"])]
    assert kept == ["transformer.wpe.weight", *CONV1D_NAMES]
    bert = tiny_bert()
    assert bert.cls.predictions.decoder.weight is bert.bert.embeddings.word_embeddings.weight
    assert "cls.predictions.decoder.weight" not in [t.param_name for t in select_targets(bert)]


def test_left_out_message_names_the_largest_unselected_modules_first() -> None:
    model = tiny_gpt2(vocab_size=1000)  # the embedding is half of the model
    message = left_out_message(model, select_targets(model))
    assert message is not None
    # wte 32,000 + wpe 1,024 + five LayerNorms of 64: 33,344 of 29,696 + 900 * 32 parameters
    assert message.startswith("The default selection leaves 33,344 of 58,496 parameters (57.00%) dense")
    assert "transformer.wte (Embedding, 32,000, tied to lm_head), transformer.wpe (Embedding, 1,024)" in message
    assert left_out_message(model, select_targets(model, include=["Linear", "Embedding"])) is None
    assert "(57.00%) float, in modules" in str(left_out_message(model, select_targets(model), left_as="float"))
    # modules that `exclude` names are left out on purpose: not reported
    excluded = left_out_message(model, select_targets(model), ["transformer.wte", "transformer.wpe"])
    assert excluded is None
    small = tiny_gpt2(vocab_size=100)  # 4,224 of 29,696 parameters left out: under 20 %
    assert left_out_message(small, select_targets(small)) is None


def test_multihead_attention_packed_projection_counts_as_linear() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    targets = select_targets(model)
    names = [t.param_name for t in targets]
    assert names[:4] == [
        "layers.0.self_attn.in_proj_weight",
        "layers.0.self_attn.out_proj.weight",
        "layers.0.linear1.weight",
        "layers.0.linear2.weight",
    ]
    assert len(names) == 8
    assert targets[0].layout == WeightLayout(blocks=(16, 16, 16))
    assert targets[0].weight is model.layers[0].self_attn.in_proj_weight
    assert set(names) <= set(model.state_dict())
    attention = [t.param_name for t in select_targets(model, include=["MultiheadAttention"])]
    assert attention == [f"layers.{i}.self_attn.{w}" for i in range(2) for w in ("in_proj_weight", "out_proj.weight")]
    assert matches_type(model.layers[0].self_attn, ["Linear"])


def test_multihead_attention_with_own_key_and_value_sizes_has_three_weights() -> None:
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    targets = select_targets(nn.ModuleDict({"attn": mha}))
    assert [(t.param_name, tuple(t.weight.shape)) for t in targets] == [
        ("attn.q_proj_weight", (8, 8)),
        ("attn.k_proj_weight", (8, 4)),
        ("attn.v_proj_weight", (8, 6)),
        ("attn.out_proj.weight", (8, 8)),
    ]


def test_lightning_demo_transformer_selects_its_attention_input_projections() -> None:
    from lightning.pytorch.demos import Transformer

    model = Transformer(vocab_size=50, ninp=32, nhead=2, nhid=64, nlayers=2)
    names = [t.param_name for t in select_targets(model)]
    in_proj = [n for n in names if n.endswith("in_proj_weight")]
    assert len(in_proj) == 6  # 2 encoder self-attentions, 2 decoder self- and 2 cross-attentions
    assert set(names) <= set(model.state_dict())


def test_group_lasso_of_gpt2_sums_the_true_output_channels() -> None:
    model = tiny_gpt2()
    # a Conv1D output channel is a column of its [in, out] weight
    expected = sum(model.get_parameter(n).detach().norm(dim=0).sum() for n in CONV1D_NAMES)
    assert sparse_penalty(model, "group_lasso").item() == pytest.approx(float(expected), rel=1e-5)
    # the tied table counts once when it is selected
    with_embeddings = sparse_penalty(model, "l1", include=["Linear", "Embedding"]).item()
    by_hand = sum(p.detach().abs().sum() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert with_embeddings == pytest.approx(float(by_hand), rel=1e-5)


def test_selection_never_imports_transformers() -> None:
    code = (
        "import sys, torch; from lightning_compress.core.selection import select_targets;"
        "select_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)));"
        "assert 'transformers' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
