"""One loop for training and fine-tuning, and evaluation.

SGD (nesterov) or AdamW, cosine schedule with linear warm-up (stepped per batch), weight decay, label smoothing,
bf16 autocast on a GPU, seeded. Methods plug in through `api.TrainHooks` (extra loss term, end-of-epoch action,
parameters exempt from weight decay). A checkpoint is written atomically after each epoch; `resume` continues
from it. Progress goes to an optional `Reporter` (the CLI passes a rich one), so this module never prints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prune_cli.api import TrainHooks
from prune_cli.data import splits as D
from prune_cli.errors import BadModelFile, BadValue
from prune_cli.store.files import atomic_write


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe. Defaults are the documented recipe for CIFAR-style models on small images."""

    epochs: int = 30
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    augment: bool = True
    compile: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1:
            raise BadValue(f"epochs must be >= 0 and batch size >= 1 (got {self.epochs}, {self.batch_size})")
        # `not x > 0` alone lets inf through, and NaN fails every comparison: say "finite" where it matters.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BadValue(f"learning rate must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise BadValue(f"weight decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise BadValue(f"warm-up epochs must be a finite number >= 0, got {self.warmup_epochs}")
        if not 0 <= self.momentum < 1:
            raise BadValue(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.label_smoothing < 1:
            raise BadValue(f"label smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class EvalResult:
    top1: float
    top5: float | None
    loss: float
    images: int
    seconds: float


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        n = sum(h["images"] for h in self.history)
        return n / max(sum(h["seconds"] for h in self.history), 1e-9)


class Reporter(Protocol):
    """Progress sink: the CLI implements it with rich; None means silent."""

    def start(self, label: str, total: int) -> object: ...
    def update(self, task: object, advance: int = 1, **fields: float) -> None: ...
    def stop(self, task: object) -> None: ...


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    # bf16 autocast only on a GPU: on the CPU it is slower for these convs and changes numerics.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _param_groups(model: nn.Module, weight_decay: float, hooks: TrainHooks | None) -> list[dict]:
    decay, no_decay = [], []
    scaled: dict[tuple[bool, float], list] = {}  # (decayed, lr scale != 1) -> parameters (hooks.lr_scale)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        free = hooks is not None and hooks.no_weight_decay(name)
        scale = hooks.lr_scale(name) if hooks is not None and hasattr(hooks, "lr_scale") else 1.0
        if scale != 1.0:
            scaled.setdefault((not free, scale), []).append(p)
            continue
        (no_decay if free else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    for (decayed, scale), params in scaled.items():  # LambdaLR scales each group's own initial lr
        groups.append({"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale})
    return groups


def make_optimizer(model: nn.Module, cfg: TrainConfig, hooks: TrainHooks | None = None) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay, hooks)
    for g in groups:
        g["lr"] = cfg.lr * g.pop("lr_scale", 1.0)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise BadValue(f"unknown optimizer {cfg.optimizer!r} (sgd or adamw)")


def cosine_with_warmup(steps_per_epoch: int, cfg: TrainConfig) -> Callable[[int], float]:
    """LR multiplier for global step s: linear warm-up, then cosine decay to 0 at the last step."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return factor


def train(
    model: nn.Module,
    splits: D.Splits,
    cfg: TrainConfig,
    *,
    hooks: TrainHooks | None = None,
    device: torch.device | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
    log: Callable[[str], None] = lambda message: None,
    evaluate_val: bool = True,
    after_epoch: Callable[[nn.Module, int, list[dict]], None] | None = None,
) -> TrainResult:
    """Train `model` in place on `splits.train`; validate on `splits.val` after each epoch.

    `after_epoch(model, epochs_done, history)` runs after each epoch's checkpoint (e.g. to save a snapshot).
    Returns the per-epoch history (train loss/acc, val top-1, seconds, images/s).
    """
    if cfg.epochs and cfg.batch_size > len(splits.train):
        # Batches drop the last incomplete one (BatchNorm needs more than one image): not one step would be taken.
        raise BadValue(
            f"batch size {cfg.batch_size} is more than the {len(splits.train)} training images of {splits.dataset}: "
            f"give a batch size of at most {len(splits.train)}"
        )
    device = device or default_device()
    model.to(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg, hooks)
    steps = max(1, len(splits.train) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps, cfg))
    if hooks is not None and hasattr(hooks, "on_train_start"):
        hooks.on_train_start(model, steps, cfg.epochs)
    result = TrainResult()
    start_epoch = 0
    if resume and checkpoint is not None and checkpoint.exists():
        start_epoch, result.history = _load_checkpoint(checkpoint, model, optimizer, scheduler, gen)
        log(f"resumed from {checkpoint} after epoch {start_epoch}")
    step_fn = torch.compile(model) if cfg.compile else model
    epoch_task = reporter.start("epochs", cfg.epochs) if reporter else None
    if reporter and start_epoch:
        reporter.update(epoch_task, advance=start_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        batch_task = reporter.start(f"epoch {epoch + 1}/{cfg.epochs}", steps) if reporter else None
        for x, y in D.batches(
            splits.train,
            splits,
            cfg.batch_size,
            shuffle=True,
            augment=cfg.augment,
            generator=gen,
            device=device,
            drop_last=True,
        ):
            with _autocast(device):
                logits = step_fn(x)
            logits = logits.float()
            per_sample = F.cross_entropy(logits, y, reduction="none", label_smoothing=cfg.label_smoothing)
            loss = per_sample.mean()
            if hooks is not None:
                extra = hooks.extra_loss(model, x, y, logits, per_sample.detach())
                if extra is not None:
                    loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # Accumulate on the device: a .item() per batch would synchronise a GPU every step.
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if reporter:
                reporter.update(batch_task, advance=1)
        if reporter:
            reporter.stop(batch_task)
        seconds = time.perf_counter() - t0
        stats = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / max(seen, 1),
            "train_acc": float(correct) / max(seen, 1),
            "images": seen,
            "seconds": seconds,
            "lr": optimizer.param_groups[0]["lr"],
        }
        if evaluate_val and len(splits.val):
            stats["val_acc"] = evaluate(model, splits.val, splits, device=device).top1
        if hooks is not None:
            hooks.on_epoch_end(model, epoch, cfg.epochs, stats)
        result.history.append(stats)
        val = f", val {stats['val_acc']:.4f}" if "val_acc" in stats else ""
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['train_loss']:.4f}, train {stats['train_acc']:.4f}{val}, "
            f"{seen / seconds:.0f} img/s"
        )
        if reporter:
            reporter.update(epoch_task, advance=1, loss=stats["train_loss"], acc=stats.get("val_acc", 0.0))
        if checkpoint is not None:
            _save_checkpoint(checkpoint, epoch + 1, result.history, model, optimizer, scheduler, gen)
        if after_epoch is not None:
            after_epoch(model, epoch + 1, result.history)
    if reporter:
        reporter.stop(epoch_task)
    result.seconds = sum(h["seconds"] for h in result.history)
    model.eval()
    return result


@torch.no_grad()
def evaluate(
    model: nn.Module, split: D.Split, splits: D.Splits, *, batch_size: int = 512, device: torch.device | None = None
) -> EvalResult:
    """Top-1 (and top-5 when there are more than 10 classes) and mean loss of `model` on `split`."""
    device = device or next(model.parameters(), torch.empty(0)).device
    model.eval()
    t0 = time.perf_counter()
    top1 = top5 = 0
    loss = 0.0
    for x, y in D.batches(split, splits, batch_size, device=device):
        with _autocast(device):
            logits = model(x).float()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        top1 += int((logits.argmax(1) == y).sum())
        if splits.num_classes > 10:
            top5 += int((logits.topk(5, dim=1).indices == y[:, None]).any(1).sum())
    n = len(split)
    return EvalResult(
        top1=top1 / max(n, 1),
        top5=top5 / max(n, 1) if splits.num_classes > 10 else None,
        loss=loss / max(n, 1),
        images=n,
        seconds=time.perf_counter() - t0,
    )


def _save_checkpoint(path: Path, epoch: int, history, model, optimizer, scheduler, gen: torch.Generator) -> None:
    state = {
        "epoch": epoch,
        "history": history,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, model, optimizer, scheduler, gen: torch.Generator) -> tuple[int, list]:
    try:
        # weights_only: a checkpoint holds tensors and numbers only; never unpickle arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
    except Exception as exc:
        raise BadModelFile(f"cannot resume from {path}: {exc.__class__.__name__}: {exc}") from exc
    return int(state["epoch"]), list(state["history"])


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    data: D.Splits | Tensor,
    *,
    images: int = 2048,
    batch_size: int = 256,
    device: torch.device | None = None,
    features: Callable[[Tensor], Tensor] | None = None,
) -> int:
    """Re-estimate the running mean and variance of every BatchNorm in `model` by forward passes; no weight changes.

    Removing channels shifts the statistics the next layers see; the old running averages then mislead the model in
    eval mode, and a short fine-tune on a small dataset does not take enough steps to forget them (adaptive BN, Li
    et al., EagleEye, arXiv 2007.02491). The same holds for a dynamic model whose gates moved while it trained.

    Args:
        data: `Splits` (their first `images` training images) or normalised float images (N, C, H, W), of which the
            first `images` are used.
        batch_size: images per forward pass. Each statistic becomes the plain average over the batches (momentum
            None), not a moving one; a last batch of one image joins the batch before it (BatchNorm cannot normalise
            one value per channel).
        device: where the passes run (default: where `model`'s parameters are).
        features: a frozen front run before `model` on each batch (SINF: the shared extractor before a cluster's
            tail); its own BatchNorms are left as they are.

    Only the BatchNorms run in training mode: dropout stays off and a dynamic model's gates keep their inference
    behaviour. Every module's mode is restored afterwards. Returns the number of BatchNorm layers re-estimated (0,
    with nothing changed, when there are none or fewer than two images).
    """
    device = device or next(model.parameters()).device
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if isinstance(data, D.Splits):
        x, to_input = data.train.x[:images], lambda xb: D.to_float(xb, data, device=device)
    else:
        x, to_input = data[:images], lambda xb: xb.to(device)
    if not norms or len(x) < 2:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # the cumulative average over the batches below
        m.train()
    starts = list(range(0, len(x), batch_size))
    if len(x) - starts[-1] == 1 and len(starts) > 1:
        starts.pop()
    try:
        for i in starts:
            xb = to_input(x[i : len(x) if i == starts[-1] else i + batch_size])
            model(features(xb) if features is not None else xb)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return len(norms)
