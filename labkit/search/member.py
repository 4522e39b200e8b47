"""One member of an architecture search: train a derived architecture, write its run directory.

Started as a rank by ``labkit launch -n 1 -- python -m labkit.search.member RUN_DIR`` (local,
mpiexec, torchrun or SLURM alike); ``RUN_DIR/config.json`` holds the architecture and settings.
It trains on the training split less a held-out part, scores on the held-out part, and reports
the test accuracy and the table's predicted latency beside it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch


def main(run_dir: str) -> int:
    from ..data import load_dataset
    from ..models import parameter_count
    from ..nas.search import evaluate, split_holdout, train_child
    from ..runs import RunDir

    torch.set_num_threads(1)
    run = RunDir(run_dir)
    meta = json.loads((Path(run_dir) / "config.json").read_text())
    cfg, start = meta["config"], meta["start_time"]
    run.append_metrics({"t": time.time() - start, "kind": "event", "event": "started", "rank": 0, "pid": os.getpid(),
                        "host": os.uname().nodename})
    try:
        data = load_dataset(cfg["dataset"])
        w_idx, a_idx = split_holdout(len(data.x_train), 0.2, cfg["seed"])
        full = data
        data = type(data)(data.name, full.x_train[w_idx], full.y_train[w_idx], full.x_test, full.y_test,
                          full.num_classes)
        model = train_child(cfg["architecture"], data, cfg["epochs"], cfg["batch_size"], cfg["lr"], 4e-5, cfg["seed"],
                            on_epoch=lambda e, loss: run.append_metrics({
                                "t": time.time() - start, "kind": "train", "rank": 0, "epoch": e, "step": e + 1,
                                "loss": loss}))
        val_acc, val_loss = evaluate(model, full.x_train[a_idx], full.y_train[a_idx])
        test_acc, test_loss = evaluate(model, full.x_test, full.y_test)
        run.append_metrics({"t": time.time() - start, "kind": "eval", "rank": 0, "step": cfg["epochs"],
                            "accuracy": test_acc, "loss": test_loss, "validation_accuracy": val_acc})
        run.write_summary({"status": "completed", "architecture": cfg["architecture"], "validation_accuracy": val_acc,
                           "validation_loss": val_loss, "test_accuracy": test_acc, "test_loss": test_loss,
                           "parameters": parameter_count(model), "steps": cfg["epochs"],
                           "latency_predicted_ms": cfg.get("latency_predicted_ms"),
                           "wall_time_s": time.time() - start})
        return 0
    except Exception as e:
        run.write_summary({"status": "failed", "error": f"{type(e).__name__}: {e}", "wall_time_s": time.time() - start})
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
