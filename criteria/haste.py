"""HASTE: Meiner, Mehnert, Condurache, "Data-Free Dynamic Compression of CNNs for Tractable Efficiency"
(arXiv 2309.17211, VISAPP 2025). Data-free and training-free; returns a Dynamic model.

Each 3x3 conv from `start_layer` on (index among the model's 3x3 convs in module order; 0 is the stem, never
replaced) becomes a `HashConv2d`. Per input and per output tile of `tile` x `tile` pixels (its input tile has the
kernel's halo: side (tile-1)*stride+3), the channel vectors of the tile are centred (minus the mean channel, or
`center=own`: minus each channel's own mean) and hashed with L sparse random hyperplanes (entries +1/0/-1 with
P(0) = `sparsity`, drawn once from the run's seed and stored in the model file). Channels with equal codes form a
bucket; each bucket's channels are replaced by their mean and the matching filter slices are summed, and the
tile is convolved with the reduced depth (exact when a bucket's members are identical).

Two paths give the same outputs (tested): `simulate` (every channel replaced by its bucket mean, then the original
conv on all tiles at once; used for batches, i.e. evaluation) and `reduced` (per tile, merged inputs and summed
filters, a batched GEMM of the reduced depth; used for batch 1, so measured latency shows the real saving or cost).

MACs per input and tile (an addition counts as one MAC):
    reduced conv   n_b * C_out * 9 * (output pixels of the tile)
    centring       C_in * d                     (d = input-tile pixels; only when L > 0)
    hashing        C_in * nnz(R)                (signed additions of the sparse projections; only when L > 0)
    input merge    (C_in - n_b) * d + (buckets with more than one channel) * d   (sums, then one scaling each)
    filter merge   (C_in - n_b) * C_out * 9
Everything but the reduced conv is the overhead.

L (`hyperplanes`) is one global value for all replaced layers. Without it, `--target-macs` picks the largest L
whose mean per-input MACs on `search_images` synthetic images (smooth Gaussian noise of the model's input shape,
see `search_images`; no data is read, the criterion stays data-free) meet the target. The hyperplanes of a
smaller L are the first rows of those of a larger one, so buckets only refine as L grows and the MACs are
monotone in L (bisection is exact on the search images). The test set's MACs differ somewhat from the noise
estimate; `prune` reports the achieved reduction on test images.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prune_cli.api import Context, Dynamic, DynamicCriterion, register_criterion
from prune_cli.api.dynamic import DynamicModule, per_input_macs
from prune_cli.errors import BadValue, TargetUnreachable

MAX_HYPERPLANES = 62  # codes are packed into one int64


def eligible_convs(model: nn.Module) -> list[str]:
    """Names of the 3x3 convs (groups 1, dilation 1, zero padding) in module order; the first is the stem."""
    out = []
    for name, m in model.named_modules():
        if (
            isinstance(m, nn.Conv2d)
            and tuple(m.kernel_size) == (3, 3)
            and m.groups == 1
            and tuple(m.dilation) == (1, 1)
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
        ):
            out.append(name)
    return out


def sparse_hyperplanes(n: int, d: int, sparsity: float, generator: torch.Generator) -> Tensor:
    """(n, d) int8 entries in {+1, 0, -1}: 0 with probability `sparsity`, +1 and -1 equally likely otherwise."""
    u = torch.rand(n, d, generator=generator)
    ones = torch.where(u < sparsity + (1 - sparsity) / 2, 1, -1)
    return torch.where(u < sparsity, 0, ones).to(torch.int8)


class HashConv2d(DynamicModule, nn.Conv2d):
    """A 3x3 conv that merges redundant input channels per input and tile (see the module docstring).

    Same parameters as the conv it replaces plus a buffer `planes` (L, d) int8. `path`: "auto" (reduced for
    batch 1, simulated otherwise), "simulate" or "reduced". `active` uses only the first rows of `planes`.
    """

    path: str = "auto"
    tile_groups: int = 1  # reduced path: tiles sorted by bucket count, each group padded to its own maximum
    chunk: int = 64  # simulate path: samples per chunk (bounds memory)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, planes: Tensor, tile: int = 3, center: str = "channel") -> HashConv2d:
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        new.tile, new.center = int(tile), center
        t = new.input_tile
        if planes.dim() != 2 or planes.shape[1] != t * t:
            raise BadValue(f"hyperplanes must be (L, {t * t}) for this conv, got {tuple(planes.shape)}")
        if planes.shape[0] > MAX_HYPERPLANES:
            raise BadValue(f"at most {MAX_HYPERPLANES} hyperplanes, got {planes.shape[0]}")
        if center not in ("channel", "own"):
            raise BadValue(f"center must be 'channel' or 'own', got {center!r}")
        new.register_buffer("planes", planes.to(device=conv.weight.device, dtype=torch.int8))
        new.active = planes.shape[0]
        new._geometry: dict[tuple[int, int], dict[str, Any]] = {}
        return new

    @property
    def input_tile(self) -> int:
        return (self.tile - 1) * self.stride[0] + self.kernel_size[0]

    @property
    def hyperplanes(self) -> int:
        return min(self.active, self.planes.shape[0])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, L={self.hyperplanes}, tile={self.tile}, center={self.center}"

    # ------------------------------------------------------------------------------------------- geometry
    def geometry(self, h: int, w: int, device: torch.device) -> dict[str, Any]:
        key = (h, w, str(device))
        g = self._geometry.get(key)
        if g is None:
            (kh, kw), (sh, sw), (ph, pw), p = self.kernel_size, self.stride, self.padding, self.tile
            h_out, w_out = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
            nh, nw = math.ceil(h_out / p), math.ceil(w_out / p)
            th, tw = (p - 1) * sh + kh, (p - 1) * sw + kw
            need_h, need_w = (nh * p - 1) * sh + kh, (nw * p - 1) * sw + kw
            extra_h, extra_w = max(0, need_h - (h + 2 * ph)), max(0, need_w - (w + 2 * pw))
            rows = torch.clamp(h_out - torch.arange(nh) * p, max=p)
            cols = torch.clamp(w_out - torch.arange(nw) * p, max=p)
            # input pixels inside the conv's padded input (not the extra padding that completes the last tiles)
            ri = (torch.arange(nh)[:, None] * p * sh + torch.arange(th)[None]) < h + 2 * ph
            ci = (torch.arange(nw)[:, None] * p * sw + torch.arange(tw)[None]) < w + 2 * pw
            valid = (ri[:, None, :, None] & ci[None, :, None, :]).reshape(nh * nw, th * tw)
            # im2col of one input tile as a gather: column (kernel a, b; output i, j) reads pixel (i*s+a, j*s+b)
            a = torch.arange(kh)[:, None, None, None] + torch.arange(p)[None, None, :, None] * sh
            b = torch.arange(kw)[None, :, None, None] + torch.arange(p)[None, None, None, :] * sw
            g = {
                "h_out": h_out, "w_out": w_out, "nh": nh, "nw": nw, "th": th, "tw": tw,
                "im2col": (a * tw + b).reshape(-1).to(device),
                "pad": (pw, pw + extra_w, ph, ph + extra_h),
                "pix": (rows[:, None] * cols[None]).reshape(-1).to(device=device, dtype=torch.float64),
                "valid": valid.to(device),
            }  # fmt: skip
            self._geometry[key] = g
        return g

    def tiles(self, x: Tensor, g: dict[str, Any]) -> Tensor:
        """(N, C, H, W) -> (N, T, C, d): the input tiles (T tiles, d = input-tile pixels)."""
        n, c = x.shape[:2]
        (sh, sw), p = self.stride, self.tile
        xp = F.pad(x, g["pad"])
        t = xp.unfold(2, g["th"], p * sh).unfold(3, g["tw"], p * sw)[:, :, : g["nh"], : g["nw"]]
        return t.permute(0, 2, 3, 1, 4, 5).reshape(n, g["nh"] * g["nw"], c, g["th"] * g["tw"])

    # -------------------------------------------------------------------------------------------- hashing
    def codes(self, tiles: Tensor, g: dict[str, Any]) -> Tensor:
        """(N, T, C, d) -> (N, T, C) int64 hash codes of the centred channel vectors."""
        L = self.hyperplanes
        if L == 0:
            return torch.zeros(tiles.shape[:3], dtype=torch.int64, device=tiles.device)
        if self.center == "channel":  # pixels outside the image are 0 in every channel, so 0 after centring
            v = tiles - tiles.mean(dim=2, keepdim=True)
        else:
            valid = g["valid"].to(tiles.dtype)[:, None, :]  # (T, 1, d)
            mean = (tiles * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
            v = (tiles - mean) * valid
        bits = (v @ self.planes[:L].to(v.dtype).t()) > 0
        weights = 2 ** torch.arange(L, device=tiles.device, dtype=torch.int64)
        return (bits.to(torch.int64) * weights).sum(-1)

    @staticmethod
    def buckets(codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Equal codes -> dense bucket ids per tile. Returns (bucket (N,T,C), n_b (N,T), counts (N,T,C))."""
        ordered, order = codes.sort(dim=-1, stable=True)
        rank = torch.zeros_like(ordered)
        rank[..., 1:] = (ordered[..., 1:] != ordered[..., :-1]).cumsum(-1)
        bucket = torch.empty_like(order).scatter_(-1, order, rank)
        counts = torch.zeros_like(codes).scatter_add_(-1, bucket, torch.ones_like(codes))
        return bucket, rank[..., -1] + 1, counts

    def costs(self, nb: Tensor, counts: Tensor, g: dict[str, Any], n_planes: int) -> tuple[Tensor, Tensor]:
        """Per-sample (MACs incl. overhead, overhead) from the bucket counts of every tile (on the CPU, float64)."""
        c_in, c_out = self.in_channels, self.out_channels
        k2 = self.kernel_size[0] * self.kernel_size[1]
        d = g["th"] * g["tw"]
        nb, counts = nb.cpu().to(torch.float64), counts.cpu()
        n_tiles = nb.shape[1]
        conv = (nb * g["pix"].cpu()).sum(-1) * c_out * k2
        merged = c_in - nb
        multi = (counts > 1).sum(-1).to(torch.float64)
        overhead = (merged * d + multi * d).sum(-1) + merged.sum(-1) * c_out * k2
        if n_planes > 0:
            nnz = int((self.planes[:n_planes] != 0).sum().cpu())
            overhead = overhead + n_tiles * c_in * (d + nnz)
        return conv + overhead, overhead

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        self.refuse_proxy(x)
        g = self.geometry(x.shape[2], x.shape[3], x.device)
        if self.path == "reduced" or (self.path == "auto" and x.shape[0] == 1):
            outs, stats = [], []
            for i in range(x.shape[0]):
                tiles = self.tiles(x[i : i + 1], g)
                bucket, nb, counts = self.buckets(self.codes(tiles, g))
                outs.append(self._reduced(tiles[0], bucket[0], nb[0], counts[0], g))
                stats.append((nb, counts))
        else:
            outs, stats = [], []
            for i in range(0, x.shape[0], self.chunk):
                tiles = self.tiles(x[i : i + self.chunk], g)
                bucket, nb, counts = self.buckets(self.codes(tiles, g))
                outs.append(self._simulate(tiles, bucket, counts, g))
                stats.append((nb, counts))
        # the accounting runs when the MACs are read, not inside the timed forward
        n_planes = self.hyperplanes
        self.record_lazy(
            lambda: self.costs(torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats]), g, n_planes)
        )
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _stitch(self, y: Tensor, g: dict[str, Any]) -> Tensor:
        """(N, T, C_out, P, P) -> (N, C_out, H_out, W_out), plus the bias."""
        n, p = y.shape[0], self.tile
        y = y.reshape(n, g["nh"], g["nw"], self.out_channels, p, p).permute(0, 3, 1, 4, 2, 5)
        y = y.reshape(n, self.out_channels, g["nh"] * p, g["nw"] * p)[:, :, : g["h_out"], : g["w_out"]]
        if self.bias is not None:
            y = y + self.bias[None, :, None, None]
        return y

    def _simulate(self, tiles: Tensor, bucket: Tensor, counts: Tensor, g: dict[str, Any]) -> Tensor:
        """Every channel replaced by its bucket's mean, then the original conv on every tile (no padding)."""
        n, n_tiles, c, d = tiles.shape
        index = bucket[..., None].expand(-1, -1, -1, d)
        sums = torch.zeros_like(tiles).scatter_add_(2, index, tiles)
        means = sums / counts.clamp_min(1)[..., None].to(tiles.dtype)
        merged = means.gather(2, index).reshape(n * n_tiles, c, g["th"], g["tw"])
        y = F.conv2d(merged, self.weight, None, self.stride)
        return self._stitch(y.reshape(n, n_tiles, self.out_channels, self.tile, self.tile), g)

    def _reduced(self, tiles: Tensor, bucket: Tensor, nb: Tensor, counts: Tensor, g: dict[str, Any]) -> Tensor:
        """One input: per tile, the bucket means (n_b merged channels) convolved with the n_b summed filters.

        Tiles are padded to the largest n_b of the layer so that one batched GEMM does all of them
        (`tile_groups` > 1 sorts the tiles by n_b and pads each group to its own maximum instead).
        """
        n_tiles, c, d = tiles.shape
        k2 = self.kernel_size[0] * self.kernel_size[1]
        c_out, p2 = self.out_channels, self.tile * self.tile
        # filter rows per input channel, laid out (channel, kernel position, out) to match the im2col rows
        w_rows = self.weight.permute(1, 2, 3, 0).reshape(c, k2 * c_out)
        parts = [None] if self.tile_groups <= 1 else nb.argsort().tensor_split(min(self.tile_groups, n_tiles))
        outs = []
        for part in parts:
            t, b, cnt = (tiles, bucket, counts) if part is None else (tiles[part], bucket[part], counts[part])
            m = t.shape[0]
            width = int(nb.max() if part is None else nb[part].max())
            xs = t.new_zeros(m, width, d).scatter_add_(1, b[..., None].expand(-1, -1, d), t)
            xs = xs / cnt[:, :width, None].clamp_min(1).to(t.dtype)
            flat = (b + torch.arange(0, m * width, width, device=b.device)[:, None]).reshape(-1)
            wm = t.new_zeros(m * width, k2 * c_out).index_add_(0, flat, w_rows.repeat(m, 1))
            cols = xs.index_select(2, g["im2col"]).reshape(m, width * k2, p2)
            outs.append(torch.bmm(cols.transpose(1, 2), wm.reshape(m, width * k2, c_out)))
        if parts[0] is None:
            out = outs[0]
        else:
            out = torch.empty(n_tiles, p2, c_out, dtype=tiles.dtype, device=tiles.device)
            out[torch.cat(parts)] = torch.cat(outs)
        y = out.reshape(1, n_tiles, self.tile, self.tile, c_out).permute(0, 1, 4, 2, 3)
        return self._stitch(y, g)


def search_images(n: int, shape: tuple[int, ...], kind: str, generator: torch.Generator) -> Tensor:
    """Data-free inputs for the L search, standardised per image (inputs are normalised images).

    "smooth-noise": Gaussian noise on coarse grids (side H/8 for half the images, H/4 for the others) upsampled
    bilinearly, so that neighbouring pixels are correlated as in images; "white-noise": i.i.d. Gaussian pixels.
    On trained ResNet-20s (digits, Fashion-MNIST) the smooth noise's per-input MACs are within about 2 points of
    the test images' at every L, while white noise underestimates the redundancy (5-8 points more MACs).
    """
    c, h, w = shape
    if kind == "white-noise":
        return torch.randn(n, c, h, w, generator=generator)
    parts = []
    for i, div in enumerate((8, 4)):
        m = n // 2 + (n % 2 if i == 0 else 0)
        if m == 0:
            continue
        coarse = torch.randn(m, c, max(2, round(h / div)), max(2, round(w / div)), generator=generator)
        parts.append(F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False))
    z = torch.cat(parts)
    return (z - z.mean((1, 2, 3), keepdim=True)) / z.std((1, 2, 3), keepdim=True).clamp_min(1e-6)


def wrap(model: nn.Module, layers: dict[str, Tensor], tile: int, center: str) -> nn.Module:
    """Replace the named convs of `model` (in place) by HashConv2d with the given hyperplanes."""
    for name, planes in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        if not isinstance(conv, nn.Conv2d):
            raise BadValue(f"HASTE layer {name!r} is a {type(conv).__name__}, not a Conv2d")
        setattr(parent, child, HashConv2d.from_conv(conv, planes, tile, center))
    return model


def hash_layers(model: nn.Module) -> list[HashConv2d]:
    return [m for m in model.modules() if isinstance(m, HashConv2d)]


def set_hyperplanes(model: nn.Module, n: int) -> None:
    """Use the first `n` hyperplanes in every hashing conv."""
    for m in hash_layers(model):
        m.active = n


@register_criterion()
class Haste(DynamicCriterion):
    name = "haste"
    paper = "2309.17211"
    needs = frozenset()
    summary = "data-free per-input channel merging by LSH (dynamic; L hyperplanes set the cost)"

    @dataclass(frozen=True)
    class Options:
        hyperplanes: int | None = None  # L; None: the largest L meeting --target-macs on noise images
        sparsity: float = 2 / 3  # P(0) of a hyperplane entry (CIFAR value; ImageNet 1/2)
        tile: int = 3  # output tile side
        start_layer: int = 1  # first replaced 3x3 conv (0 = the stem, never replaced)
        center: Literal["channel", "own"] = "channel"
        search_images: int = 64
        search_input: Literal["smooth-noise", "white-noise"] = "smooth-noise"
        max_hyperplanes: int = MAX_HYPERPLANES

    def run(self, ctx: Context) -> Dynamic:
        o = self.options
        if not 0 <= o.sparsity < 1:
            raise BadValue(f"haste sparsity must be in [0, 1), got {o.sparsity}")
        if o.tile < 1 or o.start_layer < 1 or o.search_images < 1:
            raise BadValue("haste tile, search-images must be >= 1 and start-layer >= 1 (the stem is never hashed)")
        if not 0 <= o.max_hyperplanes <= MAX_HYPERPLANES:
            raise BadValue(f"haste max-hyperplanes must be in [0, {MAX_HYPERPLANES}]")
        if o.hyperplanes is not None and not 0 <= o.hyperplanes <= o.max_hyperplanes:
            raise BadValue(f"haste hyperplanes must be in [0, {o.max_hyperplanes}], got {o.hyperplanes}")
        names = eligible_convs(ctx.model)[o.start_layer :]
        if not names:
            raise BadValue(f"no 3x3 conv at or after start-layer {o.start_layer} to hash")
        model = copy.deepcopy(ctx.model).eval()
        modules = dict(model.named_modules())
        n_max = o.max_hyperplanes if o.hyperplanes is None else o.hyperplanes
        planes = {}
        for i, name in enumerate(names):
            conv = modules[name]
            t = (o.tile - 1) * conv.stride[0] + conv.kernel_size[0]
            planes[name] = sparse_hyperplanes(n_max, t * t, o.sparsity, ctx.generator(salt=7919 + i))
        wrap(model, planes, o.tile, o.center)
        model.to(ctx.device)
        search: dict[str, Any] = {}
        if o.hyperplanes is None:
            L, search = self.search(model, ctx)
        else:
            L = o.hyperplanes
        for m in hash_layers(model):  # keep only the rows in use: the model file stores exactly these
            m.planes = m.planes[:L].clone()
            m.active = L
        ctx.log(f"haste: L = {L} hyperplanes in {len(names)} layers from {names[0]}")
        config = {"criterion": self.name, "tile": o.tile, "center": o.center, "layers": {n: L for n in names}}
        return Dynamic(model=model, hooks=None, config=config, extra={"hyperplanes": L, "search": search})

    def search(self, model: nn.Module, ctx: Context) -> tuple[int, dict[str, Any]]:
        """The largest L whose mean per-input MACs on noise images meet the target (bisection; monotone in L)."""
        if ctx.target.metric != "macs":
            raise BadValue("haste reduces MACs per input, not parameters: use --target-macs (or set hyperplanes)")
        shape = tuple(ctx.example_input.shape[1:])
        x = search_images(self.options.search_images, shape, self.options.search_input, ctx.generator(salt=104729))
        x = x.to(ctx.device)
        base = float(per_input_macs(ctx.model, x[:1])[0][0])
        budget = ctx.target.keep * base
        cache: dict[int, float] = {}

        def mean_macs(n: int) -> float:
            if n not in cache:
                set_hyperplanes(model, n)
                cache[n] = float(per_input_macs(model, x)[0].mean())
            return cache[n]

        lo, hi = 0, self.options.max_hyperplanes
        if mean_macs(lo) > budget:
            raise TargetUnreachable(
                f"haste cannot reach -{100 * ctx.target.reduction:.0f}% MACs per input: even one bucket per tile "
                f"(L = 0) leaves {100 * (1 - mean_macs(lo) / base):.1f}% fewer MACs on noise images"
            )
        if mean_macs(hi) <= budget:
            lo = hi
        while hi - lo > 1:  # invariant: mean_macs(lo) <= budget < mean_macs(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if mean_macs(mid) <= budget else (lo, mid)
        set_hyperplanes(model, lo)
        info = {
            "input": self.options.search_input, "images": len(x), "base_macs": base, "macs": mean_macs(lo),
            "reduction": 1 - mean_macs(lo) / base, "tried": {str(k): v for k, v in sorted(cache.items())},
        }  # fmt: skip
        return lo, info

    @classmethod
    def rebuild(cls, model: nn.Module, config: dict[str, Any]) -> nn.Module:
        """Re-wrap a freshly built base model as `config` says (hyperplanes come with the state dict)."""
        modules = dict(model.named_modules())
        planes = {}
        for name, n in config["layers"].items():
            conv = modules.get(name)
            if not isinstance(conv, nn.Conv2d):
                raise BadValue(f"HASTE layer {name!r} is not a Conv2d of this model")
            t = (int(config["tile"]) - 1) * conv.stride[0] + conv.kernel_size[0]
            planes[name] = torch.zeros(int(n), t * t, dtype=torch.int8)
        return wrap(model, planes, int(config["tile"]), config["center"])
