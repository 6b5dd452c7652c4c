"""Datasets in memory, their splits, and batches for the training loop.

A `Dataset` (read by a loader in `prune_cli.data.readers`) holds uint8 tensors (N, C, H, W). `make_splits` holds
out `val` and `calib` from the training set with a fixed seed (never from `test`) and takes the normalisation
statistics from what is left for training. `batches` slices the uint8 tensors, augments in batch with tensor
ops on the target device (random crop with zero padding, horizontal flip), and normalises: the same code on
the CPU and a GPU, no per-image Python loop and no DataLoader workers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from prune_cli.api import CalibData
from prune_cli.data.readers import DATASETS, Dataset, Split
from prune_cli.errors import BadValue

__all__ = [
    "DATASETS", "Dataset", "Split", "Splits", "batches", "calib_data", "list_datasets", "load_dataset",
    "make_splits", "to_float",
]  # fmt: skip

# ITU-R BT.601 luma: how a 3-channel dataset becomes grey for a 1-channel model.
_LUMA = (0.299, 0.587, 0.114)


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return DATASETS.names()


def load_dataset(name: str, data_dir: str | Path | None = None, channels: int | None = None) -> Dataset:
    """Read a registered dataset; `channels` (1 or 3) converts grey <-> RGB for models that need it.

    Raises:
        UnknownName: `name` is not registered (with a did-you-mean).
        DataMissing: the folder or its files are not there.
        BadValue: a file is corrupt, or `channels` is not 1 or 3.
    """
    if channels not in (None, 1, 3):
        raise BadValue(f"input channels must be 1 or 3, not {channels}")
    loader = DATASETS.get(name)
    ds = loader(None if data_dir is None else Path(data_dir).expanduser())
    if channels is None or channels == ds.in_channels:
        return ds
    if ds.in_channels not in (1, 3):
        raise BadValue(f"dataset {name!r} has {ds.in_channels} channels; cannot convert it to {channels}")
    convert = _to_rgb if channels == 3 else _to_grey
    train = Split(convert(ds.train.x), ds.train.y, ds.train.coarse)
    test = Split(convert(ds.test.x), ds.test.y, ds.test.coarse)
    return Dataset(ds.name, train, test, ds.num_classes, ds.class_names, ds.flip, ds.coarse_names)


def _to_rgb(x: Tensor) -> Tensor:
    return x.repeat(1, 3, 1, 1)


def _to_grey(x: Tensor) -> Tensor:
    w = torch.tensor(_LUMA).view(1, 3, 1, 1)
    return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------- splits
@dataclass(frozen=True, eq=False)
class Splits:
    """The four splits and how to turn their uint8 images into model inputs.

    `mean`/`std` are per channel, of the train split, in [0, 1] units; `pad` is the zero padding of the
    random-crop augmentation; `flip` says whether horizontal flips preserve labels.
    """

    train: Split
    val: Split
    calib: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    flip: bool
    pad: int
    dataset: str


def make_splits(
    ds: Dataset, val_size: int | None = None, calib_size: int | None = None, seed: int = 0,
    normalisation: dict[str, list[float]] | None = None,
) -> Splits:  # fmt: skip
    """Hold out disjoint `val` and `calib` sets from `ds.train` with a fixed seed; `test` is `ds.test`.

    Defaults: val = min(5000, 10% of train), calib = min(2048, 10% of train). The order of each split is
    random (so the first n calib images are a random sample, whatever the file order was).
    `normalisation` ({"mean": [...], "std": [...]}, as a model file records it): the statistics the model was
    trained with; without it they are computed on this seed's train split.
    """
    n = len(ds.train)
    val_n = min(5000, n // 10) if val_size is None else val_size
    calib_n = min(2048, n // 10) if calib_size is None else calib_size
    for what, k in (("validation", val_n), ("calibration", calib_n)):
        if k < 0:
            raise BadValue(f"{what} size must be >= 0, not {k}")
    if val_n + calib_n >= n:
        raise BadValue(
            f"{val_n} validation + {calib_n} calibration images leave none of the {n} training images of {ds.name}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val = ds.train.subset(perm[:val_n])
    calib = ds.train.subset(perm[val_n : val_n + calib_n])
    train = ds.train.subset(perm[val_n + calib_n :])
    if normalisation is None:
        mean, std = channel_stats(train.x)
    else:
        try:
            mean, std = tuple(map(float, normalisation["mean"])), tuple(map(float, normalisation["std"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadValue(f"the model's normalisation record is malformed: {normalisation!r}") from exc
        if len(mean) != ds.train.x.shape[1] or len(std) != len(mean):
            raise BadValue(
                f"the model's normalisation has {len(mean)} channels but {ds.name} images have {ds.train.x.shape[1]}"
            )
    h, w = ds.image_size
    pad = max(1, round(min(h, w) / 8))  # 4 at 32x32 and 28x28, as in the usual CIFAR recipe
    return Splits(train, val, calib, ds.test, mean, std, ds.num_classes, ds.flip, pad, ds.name)


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units (from 256-bin counts)."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        total = counts.sum().clamp_min(1)
        mean = float((counts * values).sum() / total)
        var = float((counts * values**2).sum() / total) - mean**2
        std = max(var, 0.0) ** 0.5
        means.append(mean / 255)
        stds.append(std / 255 if std > 1e-6 else 1.0)  # a constant channel: do not divide by zero
    return tuple(means), tuple(stds)


# ------------------------------------------------------------------------------------------ batches
@functools.lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (1, C, 1, 1) float32 on `device`: x_float = x_uint8 * scale + shift."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale, shift = 1 / (255 * s), -m / s
    return scale.float().view(1, -1, 1, 1).to(device), shift.float().view(1, -1, 1, 1).to(device)


def to_float(x_uint8: Tensor, splits: Splits, device: torch.device | str | None = None) -> Tensor:
    """Normalised float32 images (N, C, H, W) on `device` (default: where `x_uint8` is)."""
    if x_uint8.dtype != torch.uint8:
        raise ValueError(f"to_float wants uint8 images, got {x_uint8.dtype}")
    if x_uint8.shape[1] != len(splits.mean):
        raise BadValue(f"images have {x_uint8.shape[1]} channels but the statistics {len(splits.mean)}")
    if device is not None:
        x_uint8 = x_uint8.to(device)  # uint8 over the bus: a quarter of the bytes of float32
    scale, shift = _affine(tuple(splits.mean), tuple(splits.std), x_uint8.device)
    return torch.addcmul(shift, x_uint8.float(), scale)


def crop_flip(x: Tensor, pad: int, dy: Tensor, dx: Tensor, flip: Tensor | None) -> Tensor:
    """Random crops of uint8 images x (B, C, H, W) after zero padding by `pad`, then optional flips.

    dy, dx: int64 (B,) offsets in 0..2*pad into the padded image; flip: bool (B,) or None. One gather for
    the whole batch, on whatever device x is on.
    """
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    hp, wp = h + 2 * pad, w + 2 * pad
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H) rows of the padded image
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return xp.reshape(b, c, hp * wp).gather(2, index).view(b, c, h, w)


def batches(
    split: Split,
    splits: Splits,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches (x float32 (B, C, H, W) normalised, y int64 (B,)) on `device`, one pass over `split`.

    All random numbers of the pass (order, crop offsets, flips) are drawn from `generator` when this is
    called, so a pass consumes the same amount of randomness however far it is iterated, and the same
    generator state gives the same batches on the CPU and a GPU.
    """
    if batch_size < 1:
        raise BadValue(f"batch size must be >= 1, not {batch_size}")
    n = len(split)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(n, generator=generator, device=gen_device) if shuffle else None
    crop = flips = None
    if augment and (splits.pad > 0 or splits.flip):
        crop = torch.randint(0, 2 * splits.pad + 1, (2, n), generator=generator, device=gen_device)
        if splits.flip:
            flips = torch.rand(n, generator=generator, device=gen_device) < 0.5
    return _iterate(split, splits, batch_size, order, crop, flips, device, drop_last)


def _iterate(split, splits, batch_size, order, crop, flips, device, drop_last) -> Iterator[tuple[Tensor, Tensor]]:
    device = split.x.device if device is None else torch.device(device)
    # The whole split goes to the device once per pass (uint8; ~150 MB for CIFAR) and is sliced there.
    x, y = split.x.to(device), split.y.to(device)
    order, crop, flips = (None if t is None else t.to(device) for t in (order, crop, flips))
    n = len(split)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        j = min(i + batch_size, n)
        if order is None:
            xb, yb = x[i:j], y[i:j]
        else:
            idx = order[i:j]
            xb, yb = x[idx], y[idx]
        if crop is not None:
            xb = crop_flip(xb, splits.pad, crop[0, i:j], crop[1, i:j], None if flips is None else flips[i:j])
        yield to_float(xb, splits), yb


def calib_data(splits: Splits, n: int | None = None, device: torch.device | str | None = None) -> CalibData:
    """The first `n` images of the calib split (all of them when n is None or larger), normalised."""
    if n is not None and n < 0:
        raise BadValue(f"number of calibration images must be >= 0, not {n}")
    m = len(splits.calib) if n is None else min(n, len(splits.calib))
    x = to_float(splits.calib.x[:m], splits, device)
    return CalibData(x, splits.calib.y[:m].to(x.device))
