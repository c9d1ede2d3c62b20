"""How a batch becomes a model call: the one rule that calibration, agreement checks, latency and export share.

The model is called the way a user's own ``training_step`` calls it:

* a **tensor** batch: ``model(batch)``;
* a **tuple or list** batch: ``model(batch[0])``, the first item being the input and the rest the
  targets; a model whose ``forward`` *requires* ``n > 1`` positional arguments gets the first ``n``
  items, ``model(*batch[:n])`` (Lightning's ``LightningTransformer`` takes ``(inputs, target)``);
* a **mapping** batch (a dict, a Hugging Face ``BatchEncoding``): ``model(**batch)``, the entries
  being keyword arguments. The label entries ``"labels"`` and ``"label"`` are left out unless the
  ``forward`` *requires* them: a Hugging Face model given ``labels`` computes a loss and returns it
  first, which is work the comparison does not need; without them it returns the same predictions.
  One exception: a model that holds a Hugging Face encoder-decoder (``config.is_encoder_decoder``:
  T5, BART, Whisper...) keeps ``"labels"`` when the batch has no ``decoder_input_ids`` or
  ``decoder_inputs_embeds``, since it makes its decoder's inputs from them, as in training (without
  them T5 cannot run, and BART would decode the shifted input instead). A ``forward`` without
  ``**kwargs`` gets only the entries it names.

Whether the model can be driven so is decided from ``inspect.signature(forward).bind(...)`` on one
batch, without running the model (:func:`check_model_call`): cheap, and without side effects on the
model, its buffers or the random state.

:func:`first_tensor` reads the prediction out of whatever the model returns: a tensor, the first
tensor of a tuple / list, or of a mapping, where a Hugging Face ``ModelOutput``'s ``logits`` (then
``last_hidden_state``, ``prediction_logits``, ...) come before a ``loss``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.errors import CompressionConfigError

__all__ = [
    "LABEL_KEYS",
    "OUTPUT_KEYS",
    "ModelCall",
    "batch_size",
    "batch_to",
    "call_model",
    "check_model_call",
    "first_batch",
    "first_loader",
    "first_tensor",
    "model_call",
]

LABEL_KEYS: tuple[str, ...] = ("labels", "label")
"""Entries of a mapping batch left out of the model call (unless ``forward`` requires them)."""

OUTPUT_KEYS: tuple[str, ...] = (
    "logits",
    "last_hidden_state",
    "prediction_logits",
    "start_logits",
    "sentence_embedding",
    "pooler_output",
    "reconstruction",
)
"""Entries of a mapping output (a Hugging Face ``ModelOutput``) read first, in this order."""


@dataclass(frozen=True)
class ModelCall:
    """Positional and keyword arguments of one model call, made from one batch.

    Example:
        >>> import torch
        >>> call = ModelCall((torch.ones(1, 2),), {})
        >>> call(nn.Linear(2, 1)).shape
        torch.Size([1, 1])
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: Callable[..., Any]) -> Any:
        """Call ``model`` with these arguments."""
        return model(*self.args, **self.kwargs)

    def example_inputs(self) -> Tensor | tuple[Any, ...] | dict[str, Any]:
        """The call as ``export_onnx`` takes it: a tensor, a tuple of positional inputs or a dict of keyword inputs."""
        if self.kwargs:
            return dict(self.kwargs)
        if len(self.args) == 1 and isinstance(self.args[0], Tensor):
            return self.args[0]
        return tuple(self.args)


def _forward_of(model: Callable[..., Any]) -> Callable[..., Any]:
    forward = getattr(model, "forward", None)
    return forward if isinstance(model, nn.Module) and callable(forward) else model


def _signature(model: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(_forward_of(model))
    except (TypeError, ValueError):  # a builtin or C-implemented forward: nothing to read
        return None


def _required_positional(sig: inspect.Signature | None) -> int:
    if sig is None:
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in sig.parameters.values() if p.kind in kinds and p.default is inspect.Parameter.empty)


_DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")


def _decodes_from_labels(model: Callable[..., Any], batch: Mapping[str, Any]) -> bool:
    """Whether ``model`` makes its decoder's inputs from ``batch["labels"]`` (see the module docstring)."""
    if "labels" not in batch or any(key in batch for key in _DECODER_INPUTS) or not isinstance(model, nn.Module):
        return False
    return any(getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True for m in model.modules())


def _keyword_call(sig: inspect.Signature | None, batch: Mapping[str, Any], keep_labels: bool = False) -> dict[str, Any]:
    dropped = ("label",) if keep_labels else LABEL_KEYS
    if sig is None:
        return {k: v for k, v in batch.items() if k not in dropped}
    params = sig.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    required = {
        name
        for name, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    named = {name for name, p in params.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    kwargs = {}
    for key, value in batch.items():
        if not isinstance(key, str) or (key in dropped and key not in required):
            continue
        if takes_any or key in named:
            kwargs[key] = value
    return kwargs


def model_call(model: Callable[..., Any], batch: Any) -> ModelCall:
    """The call that feeds ``batch`` to ``model`` (see the module docstring for the rule).

    Args:
        model: the module (its ``forward`` signature decides how many positional items and which
            keyword entries it takes) or any callable.
        batch: a tensor, a tuple / list whose first item is the input, or a mapping of keyword arguments.

    Raises:
        TypeError: for a batch of another structure (``None``, a number, an empty tuple...).

    Example:
        >>> import torch
        >>> class TwoInputs(nn.Module):
        ...     def forward(self, a, b, scale=1.0):
        ...         return (a + b) * scale
        >>> call = model_call(TwoInputs(), (torch.ones(2), torch.ones(2), torch.zeros(2)))
        >>> len(call.args), call(TwoInputs()).tolist()
        (2, [2.0, 2.0])
        >>> sorted(model_call(nn.Linear(2, 2), {"input": torch.ones(2), "labels": torch.ones(1)}).kwargs)
        ['input']
    """
    if isinstance(batch, Tensor):
        return ModelCall((batch,), {})
    sig = _signature(model)
    if isinstance(batch, Mapping):
        return ModelCall((), _keyword_call(sig, batch, _decodes_from_labels(model, batch)))
    if isinstance(batch, (tuple, list)) and batch:
        n = max(1, _required_positional(sig))
        return ModelCall(tuple(batch[:n]) if n > 1 else (batch[0],), {})
    raise TypeError(
        f"Cannot make a model call from a batch of type {type(batch).__name__}: expected a tensor, a tuple or"
        " list whose first item is the input, or a dict of keyword arguments."
    )


def check_model_call(model: Callable[..., Any], batch: Any, who: str) -> ModelCall:
    """The call for ``batch``, checked against ``model``'s ``forward`` signature without running the model.

    Args:
        model: the module to be driven.
        batch: one batch as the dataloader yields it.
        who: the caller, named in the error (``"QuantizeOnFitEnd"``).

    Raises:
        CompressionConfigError: the batch has no structure that :func:`model_call` understands, or
            ``forward`` cannot be bound to the arguments made from it (a required argument missing,
            too many positional ones...). The message says how the batch was read and what to do.

    Example:
        >>> import torch
        >>> class Needs(nn.Module):
        ...     def forward(self, input_ids, attention_mask):
        ...         return input_ids
        >>> check_model_call(Needs(), {"input_ids": torch.ones(1)}, "QuantizeOnFitEnd")
        Traceback (most recent call last):
        ...
        lightning_compress.errors.CompressionConfigError: QuantizeOnFitEnd cannot call Needs on the training ...
    """
    name = type(model).__name__
    try:
        call = model_call(model, batch)
    except TypeError as err:
        raise CompressionConfigError(
            f"{who} cannot call {name} on the training batches: {err} Give the dataloader batches of one of"
            " these structures, or exclude this callback."
        ) from None
    sig = _signature(model)
    if sig is not None:
        try:
            sig.bind(*call.args, **call.kwargs)
        except TypeError as err:
            kwargs = ", ".join(sorted(call.kwargs)) or "none"
            raise CompressionConfigError(
                f"{who} cannot call {name} on the training batches: the batch was read as {len(call.args)}"
                f" positional argument(s) and keyword argument(s) {kwargs} (a tensor batch is the input, a tuple's"
                f" first item is the input, a dict is `model(**batch)` without {list(LABEL_KEYS)}), and"
                f" `{name}.forward{sig}` refuses them: {err}. Make `forward` take the batch the way the training"
                " step passes it."
            ) from None
    return call


def call_model(model: Callable[..., Any], batch: Any) -> Any:
    """``model`` called on ``batch`` by the rule of :func:`model_call`; returns what the model returns.

    Example:
        >>> import torch
        >>> call_model(nn.Identity(), (torch.ones(1), torch.zeros(1))).tolist()
        [1.0]
    """
    return model_call(model, batch)(model)


def first_tensor(output: Any) -> Tensor | None:
    """The prediction in a model's output: the tensor itself, or the first one inside it; ``None`` if none.

    In a mapping (a Hugging Face ``ModelOutput`` is one) the entries of :data:`OUTPUT_KEYS` come
    first, then any other entry but ``"loss"``, then the loss.

    Example:
        >>> import torch
        >>> first_tensor({"loss": torch.tensor(1.0), "logits": torch.ones(2)}).tolist()
        [1.0, 1.0]
        >>> first_tensor((None, [torch.zeros(1)])).tolist(), first_tensor("text")
        ([0.0], None)
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        keys = [k for k in OUTPUT_KEYS if k in output]
        keys += [k for k in output if k not in OUTPUT_KEYS and k != "loss"]
        keys += ["loss"] if "loss" in output else []
        items: Iterable[Any] = (output[k] for k in keys)
    elif isinstance(output, (tuple, list)):
        items = output
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def first_loader(loaders: Any) -> Iterable[Any] | None:
    """The first dataloader of what a trainer holds: a loader, a list / tuple or a dict of them, or ``None``.

    Example:
        >>> first_loader({"a": [[1, 2]], "b": [[3]]}), first_loader([]), first_loader(None)
        ([1, 2], None, None)
    """
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        return first_loader(next(iter(loaders.values()))) if loaders else None
    if isinstance(loaders, Sequence) and not isinstance(loaders, (str, bytes, Tensor)):
        # A list of loaders, not a map-style dataset that a DataLoader wraps.
        if not loaders:
            return None
        head = loaders[0]
        if isinstance(head, (Iterable, Mapping)) and not isinstance(head, (Tensor, str, bytes)):
            return first_loader(head)
        return loaders
    return loaders if isinstance(loaders, Iterable) else None


def batch_to(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it (nested tuples, lists and mappings too) moved to ``device``.

    Example:
        >>> out = batch_to({"ids": torch.ones(1), "meta": ("a", [torch.zeros(1)])}, "cpu")
        >>> out["meta"][0], out["meta"][1][0].device.type
        ('a', 'cpu')
    """
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(batch_to(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int | None:
    """The leading size of the first tensor in ``batch`` (``None`` if it holds none).

    Example:
        >>> batch_size({"input_ids": torch.ones(4, 7)}), batch_size((torch.ones(3, 2), torch.ones(3))), batch_size(1)
        (4, 3, None)
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        size = batch_size(item)
        if size is not None:
            return size
    return None


def first_batch(loader: Iterable[Any]) -> tuple[bool, Any]:
    """``(True, batch)``: a first batch of ``loader``, or ``(False, None)`` for an empty loader.

    A ``torch.utils.data.DataLoader`` with worker processes over a map-style dataset gives one
    without starting its workers: its batch sampler's first indices, the dataset's items and the
    loader's ``collate_fn``, in this process (the loop starts the workers once, for training; its
    own first batch may hold other indices of a shuffled dataset). Any other loader (an iterable
    dataset, no workers, a plain iterable) is iterated once.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> first_batch(DataLoader(list(range(10)), batch_size=4, num_workers=2))
        (True, tensor([0, 1, 2, 3]))
        >>> first_batch([])
        (False, None)
    """
    from torch.utils.data import DataLoader, IterableDataset

    if (
        isinstance(loader, DataLoader)
        and loader.num_workers > 0
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_sampler is not None
    ):
        indices = next(iter(loader.batch_sampler), None)
        if indices is None:
            return False, None
        return True, loader.collate_fn([loader.dataset[i] for i in indices])
    for batch in loader:
        return True, batch
    return False, None
