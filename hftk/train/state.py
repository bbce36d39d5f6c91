"""The loop's own position, saved in every checkpoint through Accelerate's register_for_checkpointing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


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
    # train.spike_factor's running window of step losses, and what rollbacks did (train.on_divergence)
    recent_losses: list[float] = field(default_factory=list)
    skipped_windows: list[list[int]] = field(default_factory=list)  # [epoch, micro-batch position] of each skip
    rollbacks: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for known in fields(self):  # checkpoints from before a field existed keep its default
            if known.name in state:
                setattr(self, known.name, state[known.name])
