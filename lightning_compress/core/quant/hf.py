"""Hugging Face checkpoints of int8 models: ``save_pretrained`` refuses instead of writing garbage.

``PreTrainedModel.save_pretrained`` writes ``state_dict()``; for an int8 model that is int8 weights
with float scales under the float model's keys, and ``from_pretrained`` would read the int8 values
as float weights (relative output error in the thousands) with only an "unexpected key" notice.
Teaching ``from_pretrained`` to build int8 layers would need a transformers quantizer plug-in, so
instead every Hugging Face model that holds int8 layers gets an instance-level ``save_pretrained``
(and so ``push_to_hub``) that raises with what to do: :func:`~lightning_compress.save_compressed`,
then :func:`~lightning_compress.load_compressed` into a freshly built model. transformers is never
imported here: a Hugging Face model is recognised by a ``PreTrainedModel`` base class.
"""

from __future__ import annotations

import functools
from typing import Any, NoReturn

from torch import nn

__all__ = ["guard_save_pretrained", "is_hf_pretrained"]


def is_hf_pretrained(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``PreTrainedModel`` (checked by class name and package).

    Example:
        >>> is_hf_pretrained(nn.Linear(2, 2))
        False
    """
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.partition(".")[0] == "transformers"
        for cls in type(module).__mro__
    )


def _refuse_save_pretrained(type_name: str, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(
        f"This {type_name} holds lightning-compress int8 layers: `save_pretrained` would write their int8"
        " weights and scales under the float model's keys, and `from_pretrained` would load them as float"
        " weights (garbage). Save it with `lightning_compress.save_compressed(model, path)` and restore it into"
        " a freshly built model (`from_pretrained` of the original checkpoint, or `from_config`) with"
        " `lightning_compress.load_compressed(path, model)`; or save the float model before quantizing it."
    )


def guard_save_pretrained(model: nn.Module, int8_types: tuple[type[nn.Module], ...]) -> list[str]:
    """Make ``save_pretrained`` of every Hugging Face model inside ``model`` that holds int8 layers refuse.

    Returns:
        The names of the guarded modules.
    """
    guarded = []
    for name, module in model.named_modules():
        if is_hf_pretrained(module) and any(isinstance(m, int8_types) for m in module.modules()):
            # A partial of a module-level function: the model still pickles and deep-copies.
            module.save_pretrained = functools.partial(_refuse_save_pretrained, type(module).__name__)
            guarded.append(name)
    return guarded
