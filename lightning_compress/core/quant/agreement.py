r"""When float and int8 disagree: find the layers that cost the most, and say what to do.

After a conversion the callback compares the float and the int8 model on the calibration batches.
Agreement is *poor* when the relative output error
:math:`\lVert y_{int8} - y\rVert_2 / \lVert y\rVert_2` is above :data:`AGREEMENT_RELATIVE_ERROR`
or the top-1 agreement is below :data:`AGREEMENT_TOP1`. Per-channel int8 of a trained network is
typically at 0.005-0.03 relative error and above 99 % top-1 agreement; a model that reads
``weight.dtype`` to cast its inputs to int8 was at 0.35 (Hugging Face ViT before the float-typed
weight view). :func:`layer_errors` then measures each int8 layer against its float original *on the
same input* (one batch, one forward pass plus one float call per layer), so the layers whose own
quantization error is largest are named, whatever happened upstream of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_compress.core.batches import first_tensor

__all__ = ["AGREEMENT_RELATIVE_ERROR", "AGREEMENT_TOP1", "is_poor", "layer_errors", "poor_agreement_message"]

AGREEMENT_RELATIVE_ERROR = 0.05
"""Relative output error of the int8 model above which agreement is poor."""

AGREEMENT_TOP1 = 0.99
"""Top-1 agreement of the int8 model with the float one below which agreement is poor."""


def is_poor(relative_error: float | None, top1_agreement: float | None) -> bool:
    """Whether the measured agreement is poor (``None`` values are not judged).

    Example:
        >>> is_poor(0.01, 0.999), is_poor(0.35, None), is_poor(None, 0.9)
        (False, True, True)
    """
    bad_error = relative_error is not None and (relative_error > AGREEMENT_RELATIVE_ERROR or math.isnan(relative_error))
    return bad_error or (top1_agreement is not None and top1_agreement < AGREEMENT_TOP1)


@torch.no_grad()
def layer_errors(model: nn.Module, originals: Mapping[str, nn.Module], run: Callable[[], Any]) -> dict[str, float]:
    """Relative output error of each int8 layer of ``model`` against its float original, on the inputs it gets.

    Args:
        model: the converted model (``originals`` names its submodules).
        originals: ``{name: float module}``: the float layers that the int8 layers replaced (still holding
            their float weights).
        run: runs the model once (one batch).

    Returns:
        ``{name: relative error}``, largest first, for the layers that ran.

    Example:
        >>> from lightning_compress.core.quant.modules import Int8Linear
        >>> float_layer = nn.Linear(8, 4)
        >>> model = nn.Sequential(Int8Linear.from_float(float_layer))
        >>> errors = layer_errors(model, {"0": float_layer}, lambda: model(torch.randn(5, 8)))
        >>> list(errors), 0 < errors["0"] < 0.05
        (['0'], True)
    """
    sums: dict[str, list[float]] = {}
    handles = []

    def hook_for(name: str, original: nn.Module) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            out, ref = first_tensor(output), first_tensor(original(*args, **kwargs))
            if out is None or ref is None or out.shape != ref.shape:
                return
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float((out.float() - ref.float()).pow(2).sum())
            acc[1] += float(ref.float().pow(2).sum())

        return hook

    for name, original in originals.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            continue
        if layer is not original:
            handles.append(layer.register_forward_hook(hook_for(name, original), with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    errors = {n: math.sqrt(e / r) if r > 0 else (0.0 if e == 0 else math.inf) for n, (e, r) in sums.items()}
    return dict(sorted(errors.items(), key=lambda kv: -kv[1]))


def poor_agreement_message(
    who: str,
    relative_error: float | None,
    top1_agreement: float | None,
    errors: Mapping[str, float],
    shown: int = 5,
    *,
    qat: bool = False,
) -> str:
    """The warning for a poor agreement: the numbers against the thresholds, the worst layers and the remedies.

    Example:
        >>> print(poor_agreement_message("QuantizeOnFitEnd", 0.2, 0.9, {"fc1": 0.3, "fc2": 0.01}))
        ... # doctest: +NORMALIZE_WHITESPACE
        QuantizeOnFitEnd: the int8 model agrees poorly with the float one (relative output error 0.2000 > 0.05,
        top-1 agreement 90.00% < 99%). Layers with the largest own int8 error on one batch: fc1 (0.3000),
        fc2 (0.0100). Remedies: leave them float (`exclude=['fc1']`), keep `per_channel=True`, use
        mode='dynamic' or 'weight_only' instead of 'static' (or more `calibration_batches`), or train the last
        epochs with fake quantization (`qat_epochs`).
        >>> print(poor_agreement_message("QuantizeOnFitEnd", 0.2, None, {"fc1": 0.3}, qat=True))
        ... # doctest: +NORMALIZE_WHITESPACE
        QuantizeOnFitEnd: the int8 model agrees poorly with the fake-quantized model that QAT trained (relative
        output error 0.2000 > 0.05). Layers with the largest own int8 error on one batch: fc1 (0.3000). Remedies:
        leave them float (`exclude=['fc1']`), keep `per_channel=True`, or use mode='dynamic' or 'weight_only'
        instead of 'static'.
    """
    parts = []
    if relative_error is not None:
        bad = not relative_error <= AGREEMENT_RELATIVE_ERROR
        parts.append(
            f"relative output error {relative_error:.4f}" + (f" > {AGREEMENT_RELATIVE_ERROR:g}" if bad else "")
        )
    if top1_agreement is not None:
        bad = top1_agreement < AGREEMENT_TOP1
        parts.append(f"top-1 agreement {top1_agreement:.2%}" + (f" < {AGREEMENT_TOP1:.0%}" if bad else ""))
    worst = list(errors.items())[:shown]
    listed = ", ".join(f"{n} ({e:.4f})" for n, e in worst) or "none measured"
    suspects = [n for n, e in worst if e > AGREEMENT_RELATIVE_ERROR] or [n for n, _ in worst[:1]]
    if qat:  # the reference is the fake-quantized model QAT trained, not a float one
        return (
            f"{who}: the int8 model agrees poorly with the fake-quantized model that QAT trained"
            f" ({', '.join(parts)}). Layers with the largest own int8 error on one batch: {listed}. Remedies:"
            f" leave them float (`exclude={suspects!r}`), keep `per_channel=True`, or use mode='dynamic' or"
            " 'weight_only' instead of 'static'."
        )
    return (
        f"{who}: the int8 model agrees poorly with the float one ({', '.join(parts)}). Layers with the largest own"
        f" int8 error on one batch: {listed}. Remedies: leave them float (`exclude={suspects!r}`), keep"
        " `per_channel=True`, use mode='dynamic' or 'weight_only' instead of 'static' (or more"
        " `calibration_batches`), or train the last epochs with fake quantization (`qat_epochs`)."
    )
