"""What a SINF model gives: accuracy (overall and per cluster, against the base), MACs per input with the
router's overhead apart, measured latency against the base, storage, and the r_L / r_M sweep.

MACs follow the project's convention (conv + linear, `metrics.count_macs`). A routed input costs
extractor + router + its cluster's subgraph; an input below the confidence threshold costs extractor +
router + the base tail (the rest of the full model). The mean over the evaluated images is reported.
Latency is measured on real images (the route depends on the input), so a batch of B images runs the
extractor and router on B and each subgraph on the images routed to it, as a routed deployment would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prune_cli import metrics
from prune_cli.data import splits as D
from prune_cli.sinf.model import Sinf, SinfModel, cluster_image_source, images, reprune
from prune_cli.store.files import atomic_write, write_text

R_L_GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
R_M_GRID = (0.1, 0.08, 0.06, 0.04, 0.02)  # the paper: "10% to 1% in steps of 2"; we stop at 2%
Log = Callable[[str], None]


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@torch.no_grad()
def macs_parts(model: SinfModel, example_input: Tensor) -> dict[str, Any]:
    """MACs of each part for one input: extractor, router, every subgraph, the base tail."""
    h = model.extractor(example_input[:1])
    return {
        "extractor": metrics.count_macs(model.extractor, example_input[:1]),
        "router": metrics.count_macs(model.router, h),
        "subgraphs": [metrics.count_macs(sg, h) for sg in model.subgraphs],
        "full_tail": metrics.count_macs(model.full_tail, h),
    }


def storage(model: SinfModel, base: nn.Module) -> dict[str, Any]:
    """Parameters (conv + linear weights and biases) and state bytes of the parts and of the base."""
    sub_params = [metrics.count_params(sg) for sg in model.subgraphs]
    fallback = model.gamma > 0
    total = metrics.count_params(model.extractor) + metrics.count_params(model.router) + sum(sub_params)
    total_bytes = _state_bytes(model.extractor) + _state_bytes(model.router)
    total_bytes += sum(_state_bytes(sg) for sg in model.subgraphs)
    if fallback:  # the full model must be kept for low-confidence inputs
        total += metrics.count_params(model.full_tail)
        total_bytes += _state_bytes(model.full_tail)
    return {
        "base_params": metrics.count_params(base),
        "base_bytes": _state_bytes(base),
        "extractor_params": metrics.count_params(model.extractor),
        "router_params": metrics.count_params(model.router),
        "subgraph_params": sub_params,
        "subgraphs_params_total": sum(sub_params),
        "subgraphs_bytes_total": sum(_state_bytes(sg) for sg in model.subgraphs),
        "sinf_params_total": total,
        "sinf_bytes_total": total_bytes,
        "keeps_full_model": fallback,
    }


@dataclass
class Pass:
    """What does not change between sweep points, per batch: extractor output, router decision, base logits."""

    batches: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]  # h, y (CPU), base logits (CPU), cluster, conf


@torch.no_grad()
def shared_pass(s: Sinf, split: D.Split, splits: D.Splits, *, batch_size: int = 256,
                device: torch.device | None = None) -> Pass:  # fmt: skip
    """Run the extractor, router and base once over `split` (kept in memory for the sweep)."""
    device = device or next(s.model.parameters()).device
    model = s.model.eval()
    out = []
    for x, y in D.batches(split, splits, batch_size, device=device):
        h = model.extractor(x)
        cluster, conf = model.route(h)
        out.append((h, y.cpu(), s.base(x).float().cpu(), cluster, conf))
    return Pass(out)


@torch.no_grad()
def evaluate(
    s: Sinf, split: D.Split, splits: D.Splits, *, batch_size: int = 256, device: torch.device | None = None,
    shared: Pass | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Top-1 of SINF and of the base, route accuracy, fallback rate, per-cluster figures, MACs per input.

    Per cluster (the images whose true class is in it): router accuracy, base top-1, SINF top-1, and the
    "within-cluster" accuracies: the base's and the cluster's subgraph's, both restricted to the cluster's
    classes and given the true cluster (the paper's per-cluster comparison). `shared` reuses a
    `shared_pass` (the sweep); without it the pass is made here.
    """
    device = device or next(s.model.parameters()).device
    model = s.model.eval()
    shared = shared or shared_pass(s, split, splits, batch_size=batch_size, device=device)
    k = len(model.clusters)
    cluster_of = torch.empty(model.num_classes, dtype=torch.long)
    for m, cl in enumerate(model.clusters):
        cluster_of[cl] = m
    parts = macs_parts(model, images(split, splits, torch.arange(1)).to(device))
    route_macs = torch.tensor([*parts["subgraphs"], parts["full_tail"]], dtype=torch.float64)  # index -1: tail
    stats = {name: torch.zeros(k) for name in ("n", "route", "base", "sinf", "base_within", "sub_within")}
    macs_sum, fallback = 0.0, 0
    allowed = model.allowed.cpu()
    for h, y, base_logits, cluster, conf in shared.batches:
        z = cluster_of[y]
        sinf_logits = model.run_tails(h, cluster, conf).float().cpu()
        route = model.last_route.cpu()
        macs_sum += float(route_macs[route].sum())
        fallback += int((route < 0).sum())
        for m in range(k):
            rows = (z == m).nonzero().squeeze(1)
            if not len(rows):
                continue
            sub = model.subgraphs[m](h[rows.to(h.device)]).float().cpu().masked_fill(~allowed[m], float("-inf"))
            base_within = base_logits[rows].masked_fill(~allowed[m], float("-inf"))
            stats["n"][m] += len(rows)
            stats["route"][m] += float((cluster.cpu()[rows] == m).sum())  # the router's choice, fallback or not
            stats["base"][m] += float((base_logits[rows].argmax(1) == y[rows]).sum())
            stats["sinf"][m] += float((sinf_logits[rows].argmax(1) == y[rows]).sum())
            stats["base_within"][m] += float((base_within.argmax(1) == y[rows]).sum())
            stats["sub_within"][m] += float((sub.argmax(1) == y[rows]).sum())
    n = max(float(stats["n"].sum()), 1.0)
    per_cluster = [
        {
            "cluster": m,
            "classes": model.clusters[m],
            "images": int(stats["n"][m]),
            **{key: float(stats[key][m] / max(float(stats["n"][m]), 1.0)) for key in stats if key != "n"},
            "subgraph_macs": parts["subgraphs"][m],
        }
        for m in range(k)
    ]
    base_macs = parts["extractor"] + parts["full_tail"]
    mean_macs = parts["extractor"] + parts["router"] + macs_sum / n
    return {
        "images": int(stats["n"].sum()),
        "top1": float(stats["sinf"].sum()) / n,
        "base_top1": float(stats["base"].sum()) / n,
        "route_acc": float(stats["route"].sum()) / n,
        "within_cluster_acc": float(stats["sub_within"].sum()) / n,
        "base_within_cluster_acc": float(stats["base_within"].sum()) / n,
        "fallback_rate": fallback / n,
        "macs_per_input": mean_macs,
        "macs_extractor": parts["extractor"],
        "macs_router": parts["router"],
        "macs_subgraph_mean": macs_sum / n,
        "base_macs": base_macs,
        "macs_reduction": 1.0 - mean_macs / base_macs,
        # the two decisions that move SINF's top-1 most (docs/methods.md, SINF); None: not recorded by the build
        "bn_recalibration": s.manifest.get("config", {}).get("bn_recalibration"),
        "restrict": model.restrict,
        "per_cluster": per_cluster,
    }


def latencies(
    s: Sinf, split: D.Split, splits: D.Splits, batches: Sequence[int], *, device: torch.device, max_seconds: float = 2.0
) -> dict[str, float]:
    """Base and SINF latency (median ms, spread) at each batch size, on the split's first images; the two take turns
    (`metrics.latency_in_turns`), so that the machine's drift hits both alike."""
    pool = images(split, splits, torch.arange(min(len(split), max(512, 4 * max(batches))))).to(device)
    out: dict[str, float] = {}
    for b in batches:
        timed = metrics.latency_in_turns((s.base, s.model), pool, b, max_seconds=2 * max_seconds)
        for name, (median_ms, spread_ms) in zip(("base", "sinf"), timed, strict=True):
            out[f"{name}_latency_b{b}_ms"], out[f"{name}_latency_b{b}_spread_ms"] = median_ms, spread_ms
    return out


def sweep(
    s: Sinf,
    split: D.Split,
    splits: D.Splits,
    *,
    r_L_grid: Sequence[float] = R_L_GRID,
    r_M_grid: Sequence[float] = R_M_GRID,
    device: torch.device,
    log: Log = lambda message: None,
) -> list[dict[str, Any]]:
    """Top-1 and MACs per input at each (r_M, r_L) point, from the stored DCS scores (no re-scoring)."""
    example = images(split, splits, torch.arange(1)).to(device)
    shared = shared_pass(s, split, splits, device=device)
    cfg = s.manifest["config"]
    bn_images = (
        cluster_image_source(splits, s.model.clusters, cfg["dcs_images_per_class"])
        if cfg.get("bn_recalibration")
        else None
    )
    rows = []
    for r_M in r_M_grid:
        for r_L in r_L_grid:
            point = Sinf(reprune(s, r_M, r_L, example, bn_images).to(device).eval(), s.base, s.cut, s.groups, s.scores,
                         s.widths, s.manifest)  # fmt: skip
            result = evaluate(point, split, splits, device=device, shared=shared)
            st = storage(point.model, s.base)
            rows.append({
                "r_M": r_M, "r_L": r_L, "top1": result["top1"], "base_top1": result["base_top1"],
                "macs_per_input": result["macs_per_input"], "base_macs": result["base_macs"],
                "macs_reduction": result["macs_reduction"], "route_acc": result["route_acc"],
                "within_cluster_acc": result["within_cluster_acc"],
                "subgraphs_params_total": st["subgraphs_params_total"],
            })  # fmt: skip
            log(f"sweep r_M={r_M:.2f} r_L={r_L:.2f}: top-1 {result['top1']:.4f}, "
                f"MACs -{100 * result['macs_reduction']:.1f}%")  # fmt: skip
    return rows


def write_sweep(rows: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "SINF sweep") -> list[Path]:
    """sweep.csv, sweep.md and sweep.png (top-1 against MACs per input, one line per r_M, the base as a star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    write_text(out / "sweep.csv", df.to_csv(index=False))
    shown = df.assign(
        macs_per_input=(df.macs_per_input / 1e6).round(2), base_macs=(df.base_macs / 1e6).round(2)
    ).rename(columns={"macs_per_input": "MMACs/input", "base_macs": "base MMACs"})
    write_text(out / "sweep.md", f"# {title}\n\n" + markdown(shown) + "\n")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r_M, part in df.groupby("r_M"):
        part = part.sort_values("macs_per_input")
        ax.plot(part.macs_per_input / 1e6, 100 * part.top1, marker="o", ms=3, label=f"SINF r_M={r_M:g}")
    ax.plot([df.base_macs.iloc[0] / 1e6], [100 * df.base_top1.iloc[0]], "k*", ms=12, label="base model")
    ax.set_xlabel("MMACs per input (extractor + router + subgraph)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(out / "sweep.png") as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)
    return [out / "sweep.csv", out / "sweep.md", out / "sweep.png"]


def markdown(df) -> str:
    """A pandas frame as a Markdown table (floats to 4 decimals), without the optional `tabulate`."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
