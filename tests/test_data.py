"""Dataset loaders on small files written here in the real formats, splits, normalisation, batches, errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prune_cli.data import splits as D
from prune_cli.errors import BadValue, DataMissing, UnknownName

# ------------------------------------------------------------------------------------ file writers


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """The IDX format: 0x0000, type 0x08 (unsigned byte), ndim; big-endian int32 dims; the bytes."""
    raw = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_mnist_like(folder: Path, n_train=50, n_test=20, gz=True, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, a in arrays.items():
        write_idx(folder / (f"{name}.gz" if gz else name), a, gz)
    return arrays


def dump(path: Path, obj, protocol: int = 2) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(folder: Path, per_batch=6, n_test=8, protocol=2, seed=0) -> dict[str, np.ndarray]:
    """Like cifar-10-batches-py: dicts with bytes keys, data uint8 (N, 3072) row-major R, G, B planes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        xs.append(x)
        ys += y
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": y, b"data": x,
                 b"filenames": [f"img_{i}_{k}.png".encode() for k in range(per_batch)]}  # fmt: skip
        dump(folder / f"data_batch_{i}", batch, protocol)
    x_test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    y_test = [int(v) for v in rng.integers(0, 10, n_test)]
    dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": y_test, b"data": x_test}, protocol)
    names = [n.encode() for n in ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return {"x_train": np.concatenate(xs), "y_train": np.array(ys), "x_test": x_test, "y_test": np.array(y_test)}


def write_cifar100(folder: Path, n_train=30, n_test=10, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        coarse = fine // 5  # any fixed map of the 100 classes onto 20 superclasses
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch = {b"filenames": [b"f.png"] * n, b"batch_label": split.encode(),
                 b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist(), b"data": x}  # fmt: skip
        dump(folder / split, batch)
        out[split] = (x, fine, coarse)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}  # fmt: skip
    dump(folder / "meta", meta)
    return out


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ------------------------------------------------------------------------------------------ loaders


def test_digits():
    ds = D.load_dataset("digits")
    assert (len(ds.train), len(ds.test)) == (1438, 359)
    assert ds.train.x.shape[1:] == (1, 32, 32) and ds.train.x.dtype == torch.uint8
    assert ds.train.y.dtype == torch.int64 and ds.num_classes == 10 and ds.class_names[3] == "3"
    assert ds.in_channels == 1 and ds.image_size == (32, 32) and ds.flip is False
    assert int(ds.train.x.max()) == 255 and int(ds.train.x.min()) == 0
    counts_test, counts_all = ds.test.y.bincount(), torch.cat([ds.train.y, ds.test.y]).bincount()
    assert ((counts_test - 0.2 * counts_all).abs() <= 0.5).all()  # stratified 20%
    again = D.load_dataset("digits")
    assert torch.equal(again.test.x, ds.test.x) and torch.equal(again.train.y, ds.train.y)


def test_digits_fast_path_matches_sklearn():
    from sklearn.datasets import load_digits

    from prune_cli.data import readers as S

    images, target = S._sklearn_digits()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    arrays = write_mnist_like(tmp_path, gz=gz)
    ds = D.load_dataset("mnist", tmp_path)
    assert ds.train.x.shape == (50, 1, 28, 28) and ds.test.x.shape == (20, 1, 28, 28)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert np.array_equal(ds.train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.num_classes == 10 and ds.flip is False


def test_fashion_mnist_torchvision_layout(tmp_path):
    arrays = write_mnist_like(tmp_path / "FashionMNIST" / "raw")
    ds = D.load_dataset("fashion-mnist", str(tmp_path))
    assert np.array_equal(ds.test.x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot" and ds.flip is True


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10(tmp_path, protocol):
    ref = write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    ds = D.load_dataset("cifar10", tmp_path)
    assert ds.train.x.shape == (30, 3, 32, 32) and ds.test.x.shape == (8, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert np.array_equal(ds.train.x[4, 1].numpy(), ref["x_train"][4, 1024:2048].reshape(32, 32))  # G plane
    assert np.array_equal(ds.train.y.numpy(), ref["y_train"]) and np.array_equal(ds.test.y.numpy(), ref["y_test"])
    assert ds.class_names[:2] == ("plane", "car") and ds.coarse_names is None and ds.train.coarse is None
    assert len(D.load_dataset("cifar10", tmp_path / "cifar-10-batches-py").train) == 30  # the folder itself


def test_cifar100_superclasses(tmp_path):
    ref = write_cifar100(tmp_path / "cifar-100-python")
    ds = D.load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.class_names[7] == "fine7"
    assert ds.coarse_names is not None and len(ds.coarse_names) == 20 and ds.coarse_names[19] == "coarse19"
    assert ds.train.coarse is not None and ds.train.coarse.dtype == torch.int64
    assert np.array_equal(ds.train.coarse.numpy(), ref["train"][2])
    assert np.array_equal(ds.test.y.numpy(), ref["test"][1])
    s = D.make_splits(ds, val_size=5, calib_size=5)
    for part in (s.train, s.val, s.calib, s.test):
        assert part.coarse is not None and torch.equal(part.coarse, part.y // 5)


def test_python2_pickles(tmp_path):
    """The real files are Python 2 pickles: str keys (SHORT_BINSTRING) and numpy.core module names."""
    from prune_cli.data.readers import read_cifar_pickle

    (tmp_path / "meta").write_bytes(b"\x80\x02}q\x00(U\x06labelsq\x01]q\x02(K\x01K\x02eU\x01kU\x03abcu.")
    assert read_cifar_pickle(tmp_path / "meta") == {"labels": [1, 2], "k": "abc"}
    ref = write_cifar10(tmp_path)
    for f in tmp_path.glob("*_batch*"):
        f.write_bytes(f.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert np.array_equal(D.load_dataset("cifar10", tmp_path).test.x.reshape(8, -1).numpy(), ref["x_test"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_may_not_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    dump(folder / "data_batch_3", {b"data": _Evil(), b"labels": []})
    with pytest.raises(BadValue, match=r"data_batch_3 is not a CIFAR python batch \(refusing to load .*system"):
        D.load_dataset("cifar10", tmp_path)


def test_cifar_wrong_shape(tmp_path):
    write_cifar10(tmp_path)
    dump(tmp_path / "test_batch", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    with pytest.raises(BadValue, match=r"test_batch: 'data' should be uint8 \(N, 3072\)"):
        D.load_dataset("cifar10", tmp_path)


def test_imagefolder_train_test(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            for k in range(n):
                write_png(tmp_path / split / cls / f"{k}.png", rng.integers(0, 256, (40 + k, 50, 3), dtype=np.uint8))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = D.load_dataset("imagefolder", tmp_path)
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    assert ds.train.x.shape == (6, 3, 32, 32) and ds.test.x.shape == (4, 3, 32, 32)
    assert ds.train.y.tolist() == [0, 0, 0, 1, 1, 1] and ds.test.y.tolist() == [0, 0, 1, 1]


def test_imagefolder_flat_grey(tmp_path):
    for cls in ("a", "b", "c"):
        for k in range(5):
            write_png(tmp_path / cls / f"{k}.png", np.full((8, 8), 40 * k, np.uint8))
    ds = D.load_dataset("imagefolder", tmp_path)
    assert ds.in_channels == 1 and ds.image_size == (32, 32)
    assert (len(ds.train), len(ds.test)) == (12, 3) and ds.test.y.tolist() == [0, 1, 2]  # 80/20 per class
    again = D.load_dataset("imagefolder", tmp_path)
    assert torch.equal(again.test.x, ds.test.x)


def test_imagefolder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataMissing, match="no class folders with images"):
        D.load_dataset("imagefolder", tmp_path / "empty")
    write_png(tmp_path / "tt" / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "tt" / "test" / "zebra" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(BadValue, match="classes that train/ lacks: zebra"):
        D.load_dataset("imagefolder", tmp_path / "tt")
    write_png(tmp_path / "bad" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad" / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(BadValue, match=r"cannot read image .*1\.png"):
        D.load_dataset("imagefolder", tmp_path / "bad")


def test_grey_to_rgb_and_back():
    grey = D.load_dataset("digits")
    rgb = D.load_dataset("digits", channels=3)
    assert rgb.train.x.shape[1:] == (3, 32, 32) and rgb.in_channels == 3
    for c in range(3):
        assert torch.equal(rgb.train.x[:, c], grey.train.x[:, 0])
    assert torch.equal(D.load_dataset("digits", channels=1).train.x, grey.train.x)


def test_rgb_to_grey(tmp_path):
    write_cifar10(tmp_path)
    ds = D.load_dataset("cifar10", tmp_path, channels=1)
    assert ds.train.x.shape == (30, 1, 32, 32) and ds.train.x.dtype == torch.uint8


# ------------------------------------------------------------------------------------------- errors


def test_unknown_name():
    with pytest.raises(UnknownName, match="did you mean 'fashion-mnist'"):
        D.load_dataset("fashion-minst")
    with pytest.raises(BadValue, match="channels must be 1 or 3"):
        D.load_dataset("digits", channels=2)


def test_missing_data(tmp_path):
    with pytest.raises(DataMissing, match=f"mnist: data folder {tmp_path / 'nope'} does not exist"):
        D.load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DataMissing, match="mnist needs --data-dir"):
        D.load_dataset("mnist")
    with pytest.raises(DataMissing, match=r"no IDX files train-images-idx3-ubyte\[\.gz\].* in " + str(tmp_path)):
        D.load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(DataMissing, match=r"cifar100: no train, test in"):
        D.load_dataset("cifar100", tmp_path)
    arrays = write_mnist_like(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataMissing, match=r"no IDX files t10k-labels-idx1-ubyte\[\.gz\] in") as err:
        D.load_dataset("mnist", tmp_path / "partial")
    assert "\n" not in str(err.value) and arrays


def test_corrupt_idx(tmp_path):
    arrays = write_mnist_like(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(BadValue, match="train-images-idx3-ubyte.gz is truncated or corrupt: its header says 50x28x28"):
        D.load_dataset("mnist", tmp_path)
    images.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))  # a labels magic on an images file
    with pytest.raises(BadValue, match="not an IDX file of 3-d unsigned bytes"):
        D.load_dataset("mnist", tmp_path)
    images.write_bytes(gzip.compress(raw)[:-30])  # a gzip stream cut short
    with pytest.raises(BadValue, match="corrupt gzip"):
        D.load_dataset("mnist", tmp_path)
    write_idx(images, arrays["train-images-idx3-ubyte"][:49])
    with pytest.raises(BadValue, match="49 train images but 50 labels"):
        D.load_dataset("mnist", tmp_path)
    write_idx(images, arrays["train-images-idx3-ubyte"])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(50, 10, np.uint8))
    with pytest.raises(BadValue, match=r"labels out of range 0\.\.9"):
        D.load_dataset("mnist", tmp_path)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist absent")
def test_real_fashion_mnist():
    ds = D.load_dataset("fashion-mnist")
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.train.y.bincount().tolist() == [6000] * 10
    s = D.make_splits(ds)
    assert (len(s.train), len(s.val), len(s.calib), len(s.test)) == (52952, 5000, 2048, 10000)
    assert s.mean[0] == pytest.approx(0.286, abs=0.002) and s.std[0] == pytest.approx(0.353, abs=0.002)


# ------------------------------------------------------------------------------------------- splits


def indexed_dataset(n_train=1000, n_test=100, channels=1, flip=True, size=8) -> D.Dataset:
    """Images that carry their own index in pixel (0, 0) and (0, 1), so a split can be traced back."""

    def make(n, offset):
        x = torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(offset))
        x = x.to(torch.uint8)
        ids = torch.arange(offset, offset + n)
        x[:, 0, 0, 0], x[:, 0, 0, 1] = (ids % 256).to(torch.uint8), (ids // 256).to(torch.uint8)
        return D.Split(x, ids % 10)

    return D.Dataset("indexed", make(n_train, 0), make(n_test, 50_000), 10, tuple("abcdefghij"), flip)


def ids(split: D.Split) -> list[int]:
    return (split.x[:, 0, 0, 0].long() + 256 * split.x[:, 0, 0, 1].long()).tolist()


def test_splits_disjoint_deterministic_never_test():
    ds = indexed_dataset()
    s = D.make_splits(ds, seed=3)
    assert (len(s.train), len(s.val), len(s.calib)) == (800, 100, 100)  # 10% each
    parts = [set(ids(p)) for p in (s.train, s.val, s.calib)]
    assert set.union(*parts) == set(range(1000)) and sum(map(len, parts)) == 1000
    assert s.test is ds.test and s.num_classes == 10 and s.dataset == "indexed" and s.flip and s.pad == 1
    assert ids(D.make_splits(ds, seed=3).calib) == ids(s.calib)
    assert ids(D.make_splits(ds, seed=4).calib) != ids(s.calib)
    small = D.make_splits(ds, val_size=0, calib_size=7)
    assert (len(small.train), len(small.val), len(small.calib)) == (993, 0, 7)


def test_split_sizes_validated():
    ds = indexed_dataset(n_train=100)
    with pytest.raises(BadValue, match="leave none of the 100 training images"):
        D.make_splits(ds, val_size=60, calib_size=40)
    with pytest.raises(BadValue, match="validation size must be >= 0"):
        D.make_splits(ds, val_size=-1)


def test_normalisation_stats():
    ds = indexed_dataset(channels=3)
    s = D.make_splits(ds)
    xf = s.train.x.double() / 255
    assert s.mean == pytest.approx(xf.mean((0, 2, 3)).tolist(), abs=1e-9)
    assert s.std == pytest.approx(xf.std((0, 2, 3), unbiased=False).tolist(), abs=1e-9)
    z = D.to_float(s.train.x, s)
    assert z.dtype == torch.float32 and z.shape == s.train.x.shape
    assert z.mean((0, 2, 3)).abs().max() < 1e-4 and (z.std((0, 2, 3)) - 1).abs().max() < 1e-3


def test_calib_data():
    s = D.make_splits(indexed_dataset())
    c = D.calib_data(s, 10)
    assert len(c) == 10 and torch.equal(c.x, D.to_float(s.calib.x[:10], s)) and torch.equal(c.y, s.calib.y[:10])
    assert len(D.calib_data(s)) == len(D.calib_data(s, 10_000)) == 100


# ------------------------------------------------------------------------------------------ batches


def collect(split, s, bs, **kw):
    xs, ys = zip(*D.batches(split, s, bs, **kw), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_batches_cover_every_sample_once():
    ds = indexed_dataset(n_train=1000)
    s = D.make_splits(ds)
    train = D.Split(s.train.x, torch.arange(len(s.train)))  # labels = positions, to count them
    y = collect(train, s, 64, shuffle=True, generator=torch.Generator().manual_seed(0))[1]
    assert y.dtype == torch.int64 and sorted(y.tolist()) == list(range(800)) and y.tolist() != list(range(800))
    sizes = [len(b[1]) for b in D.batches(train, s, 64, shuffle=True, drop_last=True)]
    assert sizes == [64] * 12
    x, y = collect(s.val, s, 33)
    assert torch.equal(y, s.val.y) and torch.equal(x, D.to_float(s.val.x, s))  # in order without shuffle


def test_batches_deterministic_for_a_generator():
    s = D.make_splits(indexed_dataset())
    a = collect(s.train, s, 50, shuffle=True, augment=True, generator=torch.Generator().manual_seed(1))
    b = collect(s.train, s, 50, shuffle=True, augment=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(BadValue, match="batch size must be >= 1"):
        D.batches(s.train, s, 0)


def reference_crop_flip(x, pad, dy, dx, flip):
    """The per-image definition: zero-pad, cut H x W at (dy, dx), mirror if asked."""
    out = []
    for i in range(len(x)):
        img = F.pad(x[i], (pad, pad, pad, pad))[:, dy[i] : dy[i] + x.shape[2], dx[i] : dx[i] + x.shape[3]]
        out.append(img.flip(-1) if flip is not None and flip[i] else img)
    return torch.stack(out)


def test_crop_flip_matches_per_image_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 7, 9), generator=g).to(torch.uint8)
    dy, dx = torch.randint(0, 7, (16,), generator=g), torch.randint(0, 7, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    assert torch.equal(D.crop_flip(x, 3, dy, dx, flip), reference_crop_flip(x, 3, dy, dx, flip))
    assert torch.equal(D.crop_flip(x, 3, dy, dx, None), reference_crop_flip(x, 3, dy, dx, None))


def test_augment_changes_images_keeps_shapes():
    s = D.make_splits(indexed_dataset(size=16))
    plain = collect(s.train, s, 100)[0]
    aug = collect(s.train, s, 100, augment=True, generator=torch.Generator().manual_seed(0))[0]
    assert aug.shape == plain.shape and aug.dtype == torch.float32
    changed = (aug != plain).flatten(1).any(1)
    assert changed.float().mean() > 0.8  # 1 in 18 draws is the identity (no shift, no flip)


def test_flip_only_and_no_flip():
    ds = indexed_dataset(flip=True)
    s = D.make_splits(ds)
    plain = collect(s.train, s, 128)[0]
    s0 = D.Splits(**{**s.__dict__, "pad": 0})
    aug = collect(s.train, s0, 128, augment=True, generator=torch.Generator().manual_seed(0))[0]
    mirrored = (aug == plain.flip(-1)).flatten(1).all(1)
    same = (aug == plain).flatten(1).all(1)
    assert (mirrored | same).all() and 0.3 < mirrored.float().mean() < 0.7
    no_flip = D.Splits(**{**s.__dict__, "pad": 0, "flip": False})
    assert torch.equal(collect(s.train, no_flip, 128, augment=True)[0], plain)  # nothing left to augment
    crop_only = D.Splits(**{**s.__dict__, "flip": False})
    aug = collect(s.train, crop_only, 128, augment=True, generator=torch.Generator().manual_seed(0))[0]
    assert not (aug == plain.flip(-1)).flatten(1).all(1)[(aug != plain).flatten(1).any(1)].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_same_batches_on_cpu_and_gpu():
    s = D.make_splits(indexed_dataset(size=16, channels=3))
    kw = dict(shuffle=True, augment=True)
    cpu = collect(s.train, s, 64, generator=torch.Generator().manual_seed(5), **kw)
    gpu = collect(s.train, s, 64, generator=torch.Generator().manual_seed(5), device="cuda", **kw)
    assert gpu[0].is_cuda and gpu[1].is_cuda
    assert torch.equal(gpu[1].cpu(), cpu[1]) and torch.allclose(gpu[0].cpu(), cpu[0], atol=1e-5)
    assert D.calib_data(s, 8, device="cuda").x.is_cuda


def test_split_validation():
    with pytest.raises(ValueError, match="uint8"):
        D.Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Split.y must be \(2,\)"):
        D.Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


def test_splits_use_a_recorded_normalisation_and_refuse_a_malformed_one():
    ds = D.load_dataset("digits")
    recorded = {"mean": [0.25], "std": [0.5]}
    splits = D.make_splits(ds, seed=1, normalisation=recorded)
    assert (splits.mean, splits.std) == ((0.25,), (0.5,))
    for bad in ({"mean": [0.25]}, {"mean": [0.2, 0.3], "std": [1.0, 1.0]}, {"mean": ["x"], "std": [1.0]}):
        with pytest.raises(BadValue):
            D.make_splits(ds, seed=1, normalisation=bad)
