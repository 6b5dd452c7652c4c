"""Dataset readers: each registered loader turns files (or scikit-learn's bundled digits) into a `Dataset`.

Everything is held in memory as uint8 tensors (N, C, H, W). The readers are small and our own: the IDX
and CIFAR formats are a few lines each, and torchvision's readers insist on the md5 of the full-size files.
`prune_cli.data.splits` re-exports `Split`, `Dataset` and `DATASETS`; use that module.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import math
import os
import pickle
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prune_cli.errors import BadValue, DataMissing
from prune_cli.registry import Registry

IMAGE_SIZE = (32, 32)  # imagefolder images are resized to this (H, W)
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


# eq=False: identity semantics (comparing tensors field by field is neither cheap nor a bool).
@dataclass(frozen=True, eq=False)
class Split:
    """Images and labels of one split. x: uint8 (N, C, H, W); y: int64 (N,); coarse: int64 (N,) or None."""

    x: Tensor
    y: Tensor
    coarse: Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"Split.x must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dim() != 1 or len(self.y) != len(self.x):
            raise ValueError(f"Split.y must be ({len(self.x)},), got {tuple(self.y.shape)}")
        if self.coarse is not None and self.coarse.shape != self.y.shape:
            raise ValueError(f"Split.coarse must be ({len(self.x)},), got {tuple(self.coarse.shape)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: Tensor) -> Split:
        """The samples at `index` (int64 (K,) or bool (N,)), in that order."""
        coarse = None if self.coarse is None else self.coarse[index]
        return Split(self.x[index], self.y[index], coarse)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset as read from disk: its train and test splits and what the labels mean."""

    name: str
    train: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    flip: bool  # horizontal flip is a label-preserving augmentation (not for digits)
    coarse_names: tuple[str, ...] | None = None

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.train.x.shape[2], self.train.x.shape[3])


DATASETS: Registry = Registry("dataset", entry_point_group="prune_cli.datasets")


def stratified_split(y: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices (kept, held out) with `fraction` of every class held out (rounded), both sorted."""
    gen = torch.Generator().manual_seed(seed)
    held = [torch.zeros(0, dtype=torch.long)]
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held.append(idx[: int(round(fraction * len(idx)))])
    mask = torch.ones(len(y), dtype=torch.bool)
    out = torch.cat(held).sort().values
    mask[out] = False
    return mask.nonzero().flatten(), out


def _check_labels(what: str, y: np.ndarray, num_classes: int) -> None:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise BadValue(f"{what}: labels out of range 0..{num_classes - 1} (found {y.min()}..{y.max()})")


def _folder(name: str, data_dir: Path | None, default: Path | None = None, hint: str = "") -> Path:
    folder = data_dir if data_dir is not None else default
    if folder is None:
        raise DataMissing(f"{name} needs --data-dir: a folder holding {hint}")
    if not folder.exists():
        extra = " (no --data-dir given; that is the default location)" if data_dir is None else ""
        raise DataMissing(f"{name}: data folder {folder} does not exist{extra}")
    if not folder.is_dir():
        raise DataMissing(f"{name}: {folder} is not a folder")
    return folder


# --------------------------------------------------------------------------------------------- digits
@DATASETS.register("digits")
def load_digits(data_dir: Path | None = None) -> Dataset:
    """scikit-learn's 1,797 bundled 8x8 digits (0..16), scaled to 0..255 and upsampled once to 32x32.

    scikit-learn has no test set: a fixed stratified 20% (seed 0) is the test split. `data_dir` is ignored.
    """
    images, target = _sklearn_digits()
    grey = torch.from_numpy(images).float().unsqueeze(1) * (255.0 / 16.0)  # (N, 1, 8, 8)
    big = F.interpolate(grey, size=(32, 32), mode="bilinear", align_corners=False)
    x = big.round().clamp(0, 255).to(torch.uint8)
    y = torch.from_numpy(target).long()
    train, test = stratified_split(y, 0.2, seed=0)
    names = tuple(str(i) for i in range(10))
    return Dataset("digits", Split(x[train], y[train]), Split(x[test], y[test]), 10, names, flip=False)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float 0..16, target (1797,) int) from scikit-learn's bundled file.

    The file is read directly when it is where scikit-learn keeps it: importing `sklearn.datasets` costs
    most of a second, which every command on digits would pay. Otherwise through `load_digits`.
    """
    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            if table.shape == (1797, 65):
                return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return bunch.images, bunch.target


# ------------------------------------------------------------------------------------------------ IDX
def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) with `ndim` dimensions, e.g. (N, 28, 28) or (N,)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataMissing(f"cannot read {path}: {exc.strerror or exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise BadValue(f"{path} is a corrupt gzip file ({exc})") from exc
    magic = 0x800 + ndim
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != magic:
        found = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise BadValue(f"{path} is not an IDX file of {ndim}-d unsigned bytes (magic number {found}, want {magic:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise BadValue(f"{path} is truncated (IDX header of {header} bytes, file has {len(raw)})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise BadValue(
            f"{path} is truncated or corrupt: its header says {'x'.join(map(str, dims))} "
            f"({math.prod(dims)} bytes) but it holds {len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem.replace("-idx", ".idx")):  # also the original MNIST site's names
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_idx_dataset(
    name: str, folder: Path, class_names: tuple[str, ...], flip: bool, subdirs: Sequence[str]
) -> Dataset:
    tried = [folder] + [folder / s for s in subdirs if (folder / s).is_dir()]
    best: dict[str, Path | None] = {}
    for where in tried:
        found = {stem: _find_idx(where, stem) for stem in _IDX_STEMS}
        if all(found.values()):
            break
        if sum(v is not None for v in found.values()) > sum(v is not None for v in best.values()):
            best = found
    else:
        missing = [s for s in _IDX_STEMS if best.get(s) is None]
        raise DataMissing(
            f"{name}: no IDX files {', '.join(f'{s}[.gz]' for s in missing)} in {', '.join(map(str, tried))}"
        )
    xs, ys = [], []
    for split in ("train", "t10k"):
        images = read_idx(found[f"{split}-images-idx3-ubyte"], 3)
        labels = read_idx(found[f"{split}-labels-idx1-ubyte"], 1)
        if len(images) != len(labels):
            raise BadValue(f"{name}: {len(images)} {split} images but {len(labels)} labels in {where}")
        _check_labels(f"{name} {split} labels in {where}", labels, len(class_names))
        xs.append(torch.from_numpy(images).unsqueeze(1))
        ys.append(torch.from_numpy(labels).long())
    return Dataset(name, Split(xs[0], ys[0]), Split(xs[1], ys[1]), len(class_names), class_names, flip=flip)


FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(data_dir: Path | None = None) -> Dataset:
    """Fashion-MNIST IDX files from `data_dir`, else from the Debian package's folder."""
    folder = _folder("fashion-mnist", data_dir, FASHION_MNIST_DEBIAN)
    return _load_idx_dataset("fashion-mnist", folder, FASHION_NAMES, True, ("raw", "FashionMNIST/raw"))


@DATASETS.register("mnist")
def load_mnist(data_dir: Path | None = None) -> Dataset:
    """MNIST IDX files from `data_dir`. Flipping changes a digit's meaning, so no flip."""
    folder = _folder("mnist", data_dir, hint="the MNIST IDX files (train-images-idx3-ubyte.gz, ...)")
    names = tuple(str(i) for i in range(10))
    return _load_idx_dataset("mnist", folder, names, False, ("raw", "MNIST/raw"))


# ---------------------------------------------------------------------------------------------- CIFAR
try:
    from numpy._core import numeric as _numeric  # numpy >= 2
except ImportError:  # pragma: no cover
    from numpy.core import numeric as _numeric


def _numpy_globals() -> dict[tuple[str, str], object]:
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles of bytes written by Python 3
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _numeric._frombuffer  # protocol 5
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Plain containers and numpy arrays only: a data folder is not a place to run code from."""

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_pickle(path: Path) -> dict[str, object]:
    """One CIFAR python batch as a dict with str keys (the originals are Python 2 pickles: bytes keys)."""
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise BadValue(f"{path} is not a CIFAR python batch ({exc or type(exc).__name__})") from exc
    if not isinstance(obj, dict):
        raise BadValue(f"{path} is not a CIFAR python batch (holds a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_arrays(path: Path, label_keys: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    d = read_cifar_pickle(path)
    for key in ("data", *label_keys):
        if key not in d:
            raise BadValue(f"{path} has no {key!r} entry (keys: {', '.join(sorted(d))})")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise BadValue(f"{path}: 'data' should be uint8 (N, 3072), found {data.dtype} {data.shape}")
    labels = [np.asarray(d[k], dtype=np.int64).reshape(-1) for k in label_keys]
    for k, lab in zip(label_keys, labels, strict=True):
        if len(lab) != len(data):
            raise BadValue(f"{path}: {len(data)} images but {len(lab)} {k}")
    return data.reshape(-1, 3, 32, 32), labels


def _names(meta: dict[str, object], key: str, count: int, fallback: Sequence[str]) -> tuple[str, ...]:
    names = meta.get(key)
    if names is None:
        return tuple(fallback)
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)  # type: ignore[union-attr]
    if len(names) != count:
        raise BadValue(f"CIFAR meta file: {len(names)} {key}, expected {count}")
    return names


def _cifar_folder(name: str, data_dir: Path | None, sub: str, files: Sequence[str], archive: str) -> Path:
    folder = _folder(name, data_dir, hint=f"the python batches ({', '.join(files)}) or {sub}/")
    for where in (folder, folder / sub):
        if all((where / f).is_file() for f in files):
            return where
    hint = f"; unpack {archive} there first" if (folder / archive).exists() else ""
    raise DataMissing(f"{name}: no {', '.join(files)} in {folder} or {folder / sub}{hint}")


CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@DATASETS.register("cifar10")
def load_cifar10(data_dir: Path | None = None) -> Dataset:
    """CIFAR-10's python batches (data_batch_1..5, test_batch, batches.meta) in `data_dir[/cifar-10-batches-py]`."""
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = _cifar_folder("cifar10", data_dir, "cifar-10-batches-py", files, "cifar-10-python.tar.gz")
    parts = [_cifar_arrays(folder / f, ["labels"]) for f in files]
    meta = read_cifar_pickle(folder / "batches.meta") if (folder / "batches.meta").is_file() else {}
    names = _names(meta, "label_names", 10, CIFAR10_NAMES)
    x_train = torch.from_numpy(np.concatenate([p[0] for p in parts[:5]]))
    y_train = np.concatenate([p[1][0] for p in parts[:5]])
    _check_labels(f"cifar10 in {folder}", y_train, 10)
    _check_labels(f"cifar10 in {folder}", parts[5][1][0], 10)
    train = Split(x_train, torch.from_numpy(y_train))
    test = Split(torch.from_numpy(parts[5][0]), torch.from_numpy(parts[5][1][0]))
    return Dataset("cifar10", train, test, 10, names, flip=True)


@DATASETS.register("cifar100")
def load_cifar100(data_dir: Path | None = None) -> Dataset:
    """CIFAR-100's python files (train, test, meta) in `data_dir[/cifar-100-python]`, with the 20 superclasses."""
    folder = _cifar_folder("cifar100", data_dir, "cifar-100-python", ["train", "test"], "cifar-100-python.tar.gz")
    meta = read_cifar_pickle(folder / "meta") if (folder / "meta").is_file() else {}
    names = _names(meta, "fine_label_names", 100, [f"class_{i}" for i in range(100)])
    coarse_names = _names(meta, "coarse_label_names", 20, [f"superclass_{i}" for i in range(20)])
    splits = []
    for f in ("train", "test"):
        x, (fine, coarse) = _cifar_arrays(folder / f, ["fine_labels", "coarse_labels"])
        _check_labels(f"cifar100 {f} fine_labels in {folder}", fine, 100)
        _check_labels(f"cifar100 {f} coarse_labels in {folder}", coarse, 20)
        splits.append(Split(torch.from_numpy(x), torch.from_numpy(fine), torch.from_numpy(coarse)))
    return Dataset("cifar100", splits[0], splits[1], 100, names, flip=True, coarse_names=coarse_names)


# ---------------------------------------------------------------------------------------- imagefolder
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not any(s.startswith(".") for s in p.parts)
    )  # fmt: skip


def _read_image(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            grey = im.mode in _GREY_MODES
            rgb = im.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8), grey
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadValue(f"cannot read image {path}: {exc}") from exc


def _read_class_folders(root: Path, classes: list[str], size: tuple[int, int]) -> tuple[Tensor, Tensor, bool]:
    """Every image under root/<class>/ (classes absent there are skipped): x (N, H, W, 3), y, all grey."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        if (root / name).is_dir():
            files = _image_files(root / name)
            paths += files
            labels += [label] * len(files)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        read = list(pool.map(lambda p: _read_image(p, size), paths))
    x = torch.from_numpy(np.stack([r[0] for r in read])) if read else torch.zeros(0, *size, 3, dtype=torch.uint8)
    return x, torch.tensor(labels, dtype=torch.long), all(r[1] for r in read)


def _nchw(x: Tensor, grey: bool) -> Tensor:
    x = x.permute(0, 3, 1, 2)
    return (x[:, :1] if grey else x).contiguous()


@DATASETS.register("imagefolder")
def load_imagefolder(data_dir: Path | None = None, size: tuple[int, int] = IMAGE_SIZE) -> Dataset:
    """`data_dir/{train,test}/<class>/*.png` (or `val/` for test), or `data_dir/<class>/*` split 80/20 (seed 0).

    Images are resized to `size` (bilinear). One channel when every image is grey, else RGB.
    """
    root = _folder("imagefolder", data_dir, hint="train/ and test/ folders of class folders, or class folders")
    held_out = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    layout = "root/train/<class>/* and root/test/<class>/*, or root/<class>/*"
    if (root / "train").is_dir():
        if held_out is None:
            raise DataMissing(f"imagefolder: {root / 'train'} has no test/ or val/ folder beside it")
        classes = [p.name for p in _class_dirs(root / "train")]
        unknown = sorted({p.name for p in _class_dirs(held_out)} - set(classes))
        if unknown:
            raise BadValue(f"imagefolder: {held_out} has classes that train/ lacks: {', '.join(unknown)}")
        xs, ys, grey = _read_class_folders(root / "train", classes, size)
        xt, yt, grey_t = _read_class_folders(held_out, classes, size)
        grey = grey and grey_t
    else:
        classes = [p.name for p in _class_dirs(root)]
        x, y, grey = _read_class_folders(root, classes, size)
        train, test = stratified_split(y, 0.2, seed=0)
        xs, ys, xt, yt = x[train], y[train], x[test], y[test]
    if not classes or len(ys) == 0:
        raise DataMissing(f"imagefolder: no class folders with images in {root} (expected {layout})")
    empty = [c for i, c in enumerate(classes) if not (ys == i).any()]
    if empty:
        raise BadValue(f"imagefolder: training class folders without images: {', '.join(empty)}")
    train_split, test_split = Split(_nchw(xs, grey), ys), Split(_nchw(xt, grey), yt)
    return Dataset("imagefolder", train_split, test_split, len(classes), tuple(classes), flip=True)
