"""One training run: a new model trained on a dataset and saved as a model file with its provenance."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_cli import engine
from prune_cli.run.environment import machine
from prune_cli.run.loading import load_splits, new_model, normalisation
from prune_cli.store.modelfile import save_model


def train_and_save(
    model_name: str, dataset: str, data_dir: str | Path | None, cfg: Any, out: Path, *, weights: Path | None = None,
    device: torch.device | None = None, resume: bool = False, reporter: Any = None, log=lambda m: None,
    save_every: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Train a new `model_name` on `dataset` with `cfg` (engine.TrainConfig), save it to `out`, return a summary.

    A checkpoint (OUT.ckpt) is written after each epoch so that `resume` can continue an interrupted run. With
    `save_every` N > 0, every N-th epoch before the last is also saved as a model file OUT-epochK.safetensors: the
    same run's early snapshots, for checking whether a criterion ranks an early model as it ranks the final one.
    """
    splits = load_splits(dataset, data_dir, model_name=model_name, seed=cfg.seed)
    net = new_model(model_name, splits, weights)
    log(f"training {model_name} on {dataset} ({len(splits.train)} train / {len(splits.val)} val images) on {device}")
    checkpoint = out.with_suffix(".ckpt")
    provenance = dict(
        dataset=dataset, input_shape=list(splits.train.x.shape[1:]), data_dir=str(data_dir) if data_dir else None,
        seed=cfg.seed, train=engine.config_dict(cfg), machine=machine(), normalisation=normalisation(splits),
    )  # fmt: skip

    def snapshot(model: nn.Module, epochs_done: int, history: list[dict]) -> None:
        if save_every > 0 and epochs_done % save_every == 0 and epochs_done < cfg.epochs:
            path = snapshot_path(out, epochs_done)
            save_model(model, path, kind="snapshot", epoch=epochs_done, history=list(history), **provenance)
            log(f"saved the epoch-{epochs_done} snapshot to {path}")

    t0 = time.perf_counter()
    result = engine.train(net, splits, cfg, device=device, checkpoint=checkpoint, resume=resume, reporter=reporter,
                          log=log, after_epoch=snapshot)  # fmt: skip
    test = engine.evaluate(net, splits.test, splits, device=device)
    summary = {
        "model": model_name,
        "dataset": dataset,
        "test_top1": test.top1,
        "test_top5": test.top5,
        "val_top1": result.history[-1].get("val_acc") if result.history else None,
        "epochs": cfg.epochs,
        "train_seconds": result.seconds,
        "wall_seconds": time.perf_counter() - t0,
        "images_per_second": result.images_per_second if result.history else None,
    }
    save_model(net.cpu(), out, kind="trained", history=result.history, metrics=summary, **provenance)
    checkpoint.unlink(missing_ok=True)
    return summary


def snapshot_path(out: Path, epoch: int) -> Path:
    """Where `train --save-every` writes the model after `epoch` epochs: OUT-epochK.safetensors."""
    return out.with_name(f"{out.stem}-epoch{epoch}{out.suffix}")
