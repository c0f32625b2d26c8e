"""Fine-tuning: recover accuracy after a lossy step, from labels, the original model's outputs, or both."""
from __future__ import annotations

from compression.pipeline import StepData, WorkingModel
from compression.steps._common import recover


def finetune(model: WorkingModel, data: StepData, *, steps: int = 50, lr: float = 5e-4, batch_size: int = 8,
             crop: int | None = None, amp: str = "auto", use: str = "auto", max_slices: int | None = 64):
    """``use``: "labels", "teacher" (label-free: the original/teacher model's soft outputs), "both", "auto"."""
    model.require_module("finetune")
    stats = yield from recover(model, data, steps=steps, lr=lr, batch_size=batch_size, crop=crop, amp=amp,
                               use=use, max_slices=max_slices)
    model.notes.append(f"Fine-tuned {steps} steps from {stats.get('learnt_from')} ({stats.get('amp')}), "
                       f"loss {stats.get('loss_first', 0):.4f} → {stats.get('loss_last', 0):.4f}.")
    model.metrics.setdefault("finetune", []).append(stats)
    return model
