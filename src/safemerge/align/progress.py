"""A rich progress bar for a transformers Trainer: optimizer steps, the latest training loss, the rate."""

from __future__ import annotations

from transformers import TrainerCallback


class RichProgress(TrainerCallback):
    """Shows `step/total`, the last logged `loss` (and DPO's reward accuracy when logged) on stderr."""

    def __init__(self, description: str, *, console=None):
        from rich.console import Console

        self.description = description
        self.console = console or Console(stderr=True)  # stdout is for results (--json)
        self._progress = None
        self._task = None

    def on_train_begin(self, args, state, control, **kwargs):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=state.max_steps, metrics="")

    def on_step_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._progress is None or not logs or "loss" not in logs:
            return
        metrics = f"loss {logs['loss']:.4f}"
        if "rewards/accuracies" in logs:
            metrics += f"  acc {logs['rewards/accuracies']:.2f}"
        self._progress.update(self._task, metrics=metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
