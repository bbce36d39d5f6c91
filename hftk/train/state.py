"""The loop's own position, saved in every checkpoint through Accelerate's register_for_checkpointing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainState:
    optimizer_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of this process already consumed in `epoch`
    # Loss and token sums since the last metrics row, so a resumed run logs the same rows.
    pending_loss: float = 0.0
    pending_steps: int = 0
    pending_tokens: int = 0
    # The best evaluation with a checkpoint (load_best_model_at_end) and early stopping's count.
    best_metric: float | None = None
    best_step: int = 0
    stop_best_metric: float | None = None
    evaluations_without_improvement: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for field in fields(self):  # checkpoints from before a field existed keep its default
            if field.name in state:
                setattr(self, field.name, state[field.name])
