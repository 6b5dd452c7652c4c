"""Data and models for a run: a dataset's splits, a saved model with the splits of its dataset, a new zoo model, and
the check that a model runs on the data before any work. The CLI commands, `compare` and the tests call these; they
hold no terminal code."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from torch import nn

import models
from prune_cli.data import splits as D
from prune_cli.errors import BadValue
from prune_cli.store.modelfile import load_weights


def input_channels_for(model_name: str) -> int | None:
    """Torchvision classifiers are RGB: grey data is repeated to 3 channels for them."""
    return 3 if model_name.startswith("torchvision:") else None


def load_splits(
    dataset: str, data_dir: str | Path | None = None, *, model_name: str = "", seed: int = 0,
    val_size: int | None = None, calib_size: int | None = None, normalisation: dict | None = None,
) -> D.Splits:  # fmt: skip
    """The dataset's splits for `seed`; `normalisation` is a model file's recorded statistics (see make_splits)."""
    ds = D.load_dataset(dataset, data_dir, channels=input_channels_for(model_name))
    return D.make_splits(ds, val_size=val_size, calib_size=calib_size, seed=seed, normalisation=normalisation)


def normalisation(splits: D.Splits) -> dict[str, list[float]]:
    """The input statistics to record in a model file: what a user must normalise its inputs with."""
    return {"mean": list(splits.mean), "std": list(splits.std)}


def recorded_normalisation(info: dict, dataset: str) -> dict | None:
    """A model file's recorded input statistics, if it was trained on `dataset` (None: compute them)."""
    return info.get("normalisation") if dataset == info.get("dataset") else None


def load_model_and_data(
    model_file: str | Path, dataset: str | None, data_dir: Path | None, *, seed: int = 0,
    device: torch.device | str = "cpu", trust: Collection[str] = (),
) -> tuple[nn.Module, str, D.Splits]:  # fmt: skip
    """A saved model and the splits of its dataset (by default the one recorded in the file). `trust`: the user
    factories the file may name (see `modelfile.load_model`)."""
    from prune_cli.store.modelfile import load_model

    model = load_model(model_file, device, trust=trust)
    info = getattr(model, "prune_cli_info", {})
    dataset = dataset or info.get("dataset")
    if dataset is None:
        raise BadValue(f"{model_file} does not record its dataset: pass --dataset")
    data_dir = data_dir or (Path(info["data_dir"]) if info.get("data_dir") else None)
    splits = load_splits(
        dataset, data_dir, model_name=model.prune_cli_arch["factory"], seed=seed,
        normalisation=recorded_normalisation(info, dataset),
    )  # fmt: skip
    check_runs_on(model, str(model_file), splits, trained_on=info.get("input_shape"))
    return model, dataset, splits


def new_model(name: str, splits: D.Splits, weights: Path | None = None) -> nn.Module:
    """A freshly built model for the data's classes and channels, optionally with a user's weights."""
    in_channels = splits.train.x.shape[1]
    model = models.create_model(name, num_classes=splits.num_classes, in_channels=in_channels)
    if weights is not None:
        load_weights(model, weights)
    check_runs_on(model, name, splits)
    return model


@torch.no_grad()
def check_runs_on(model: nn.Module, name: str, splits: D.Splits, trained_on: Sequence[int] | None = None) -> None:
    """One image through the model before any work, and an output for every class of the data: a model too deep
    for small images (inception_v3 on 8x8 digits pools them away), RGB data for a grey model (`trained_on`: the
    (C, H, W) a model file records) or a dataset with more classes than outputs fail here with one line, not
    minutes later with a traceback."""
    x = example_input(splits).to(next(model.parameters(), torch.empty(0)).device)
    shape = tuple(x.shape[1:])
    recorded = list(trained_on) if isinstance(trained_on, (list, tuple)) and len(trained_on) == 3 else None
    if recorded and isinstance(recorded[0], int) and recorded[0] != shape[0]:
        raise BadValue(
            f"{name} takes {recorded[0]}-channel images, but {splits.dataset}'s have {shape[0]} channels "
            f"(the model was trained on {tuple(recorded)} images)"
        )
    was_training = model.training
    try:
        logits = model.eval()(x)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadValue(f"model {name} cannot run on {shape} images of {splits.dataset}: {first}") from exc
    finally:
        model.train(was_training)
    outputs = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None
    if outputs is not None and outputs < splits.num_classes:
        raise BadValue(f"{splits.dataset} has {splits.num_classes} classes, but model {name} has {outputs} outputs")


def example_input(splits: D.Splits) -> torch.Tensor:
    """One normalised training image, (1, C, H, W): what tracing and MAC counting run on."""
    return D.to_float(splits.train.x[:1], splits)
