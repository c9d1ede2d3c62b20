"""PruningCallback (2:4) then QuantizeOnFitEnd (static) under ModelParallelStrategy (FSDP2) on two CPU processes.

Usage: ``python fsdp2_quantize.py OUT_DIR``. At fit end QuantizeOnFitEnd gathers the sharded weights
once and every rank converts the same plain model; rank zero writes ``OUT_DIR/model.int8.pt``.
Each rank saves ``OUT_DIR/quantized_rank<r>.pt``: ``{"state": the int8 model's state_dict, "output":
its prediction on fixed inputs, "types": module name -> class name, "dtensors": DTensors left,
"loaded_output": the prediction of a fresh plain model after load_compressed, "report": numbers}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _shared import close_process_group, fsdp2_trainer  # this folder is sys.path[0] when the script runs
from fsdp2_pruning import Net

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fixtures and helpers

from fixtures import classification_loader

from lightning_compress import PruningCallback, QuantizeOnFitEnd, load_compressed
from lightning_compress.core.files import atomic_torch_save
from lightning_compress.core.sharding import is_dtensor


def main(out: Path) -> None:
    torch.set_num_threads(1)
    model = Net()
    path = out / "model.int8.pt"
    quantize = QuantizeOnFitEnd("static", calibration_batches=4, save_path=str(path), verbose=0)
    pruning = PruningCallback(0.5, method="2:4", exclude=["head"], update_every_n_steps=2, verbose=0)
    trainer = fsdp2_trainer(out, max_epochs=2, callbacks=[pruning, quantize])
    trainer.fit(model, classification_loader(160, 8, 3))
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        output = model(x)
        fresh = load_compressed(path, Net()).eval()  # a plain model of the same architecture
        loaded_output = fresh(x)
    result = {
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "output": output,
        "loaded_output": loaded_output,
        "types": {n: type(m).__name__ for n, m in model.named_modules()},
        "dtensors": [n for n, t in [*model.named_parameters(), *model.named_buffers()] if is_dtensor(t)],
        "report": {k: v for k, v in quantize.report.items() if isinstance(v, (int, float)) and v is not None},
        "masks": dict(pruning.masks),
    }
    atomic_torch_save(result, out / f"quantized_rank{trainer.global_rank}.pt")
    close_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
