"""The progress bar of ``Run.wait(progress=True)`` and ``labkit train``: tqdm, driven by
rank 0's training metrics."""

from __future__ import annotations

from ..runs import MetricsTail


class ProgressBar:
    """A tqdm bar driven by rank 0's training metrics."""

    def __init__(self, run):  # a labkit.launch.Run
        from tqdm.auto import tqdm

        from ..data import train_size

        self.run = run
        total = run.config.total_steps(train_size(run.config.dataset, run.config.data_dir))
        self.bar = tqdm(total=total, unit="step", desc=f"{run.config.sync} x{run.config.workers}",
                        dynamic_ncols=True)
        self.tail = MetricsTail(run.run_dir)
        self.step = 0

    def update(self):
        postfix = {}
        for record in self.tail.read():
            if record.get("rank") != 0:
                continue
            if record.get("kind") == "event" and record.get("event") == "total_steps":
                self.bar.total = record["steps"]
                self.bar.refresh()
            if record.get("kind") not in ("train", "eval"):
                continue
            if record["kind"] == "train":
                self.bar.update(max(0, record["step"] - self.step))
                self.step = max(self.step, record["step"])
                postfix["loss"] = _fmt(record.get("loss"))  # null when the loss was NaN or infinite
            else:
                postfix["test_acc"] = _fmt(record.get("accuracy"))
        if postfix:
            self.bar.set_postfix(postfix, refresh=True)

    def close(self):
        self.bar.close()


def _fmt(value) -> str:
    return "nan" if value is None else f"{value:.3f}"
