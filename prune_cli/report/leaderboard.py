"""Leaderboards from run records alone: one row per criterion and target, mean +- std over seeds.

`runs(records)` flattens records into one row per run; `leaderboard(runs)` aggregates them; `write(records, dir)`
writes `leaderboard.csv` (numbers, mean and std columns), `leaderboard.md` and `leaderboard.tex` (formatted),
`accuracy_vs_macs.png` and `latency_vs_macs.png`. Ranks are per target, by mean top-1 after fine-tuning.

Cells pruned to a latency target (`latency_targets:`) have a leaderboard of their own, `latency_leaderboard(runs)`,
written by `write_latency` to `leaderboard-latency.{csv,md}`: per requested fraction, the latency reduction each entry
reached (measured on the final models, base and pruned in alternating turns) next to its top-1, ranked by top-1 among
the entries that reached the request. The MACs leaderboard never counts those cells.

Speed-ups compare the pruned model with the base measured in the same run, on the same machine and threads:
MAC speed-up = base MACs / pruned MACs (per-input average for dynamic methods), latency speed-up = base latency /
pruned latency (median of repeated timings at each batch size).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from prune_cli.store.files import atomic_write, write_text

# An entry whose achieved MACs reduction falls short of the target by more than this is not ranked.
TARGET_TOLERANCE = 0.02
LEADERBOARD_FILES = ("leaderboard.csv", "leaderboard.md", "leaderboard.tex", "accuracy_vs_macs.png",
                     "latency_vs_macs.png")  # fmt: skip
# A latency-targeted entry whose measured reduction falls short of the request by more than this is not ranked:
# wider than TARGET_TOLERANCE, since it is a timing (the selection itself aims within 0.02).
LATENCY_TOLERANCE = 0.05
LATENCY_FILES = ("leaderboard-latency.csv", "leaderboard-latency.md")
# accuracy_vs_macs.png adds a close-up panel on the entries within this many points of the base top-1.
CLOSE_UP_PT = 2.0


def is_latency(record: dict[str, Any]) -> bool:
    """Whether a record's cell was pruned to a latency target (`latency_targets:`), not a MACs or params one."""
    return bool(record["config"]["job"].get("target_latency"))


def runs(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per run record: criterion, target, seed, costs, accuracies, speed-ups, timings.

    Rows come in one canonical order (criterion, target, seed), not the order the records arrive in: `compare` has
    them in grid order and `report` in file-name order, and both must write the same leaderboard, to the last digit
    of every mean."""
    rows = []
    for r in sorted(records, key=lambda r: (str(r["criterion"]), str(r["target"]), str(r["seed"]), str(r["key"]))):
        b, a, t, job = r["before"], r["after"], r["timings"], r["config"]["job"]
        # The base measured as the pruned model's final top-1 is: without fine-tuning, with its BatchNorm statistics
        # re-estimated on the same images when the pruned model's were; after fine-tuning, with the statistics
        # training leaves (its own). Records made before the re-estimated figure existed give their own.
        same = b.get("top1_bn_recalibrated") if not job.get("finetune_epochs") else None
        row = {
            "criterion": r["criterion"], "result": r.get("result"), "target": r["target"], "seed": r["seed"],
            "base_top1": b["top1"] if same is None else same, "base_top1_own": b["top1"],
            "base_top1_bn_recalibrated": b.get("top1_bn_recalibrated"),
            "bn_recalibration": job.get("recalibrate_bn", True), "bn_images": a.get("bn_recalibrated_images"),
            # none for a method that prunes while it trains (ManiDP): its model before training is the base
            "top1_before_ft": a.get("top1_before_finetune", float("nan")), "top1": a["top1"],
            "macs_removed": 1 - a["macs"] / b["macs"], "params_removed": 1 - a["params"] / b["params"],
            "mac_speedup": b["macs"] / a["macs"], "base_macs": b["macs"], "macs": a["macs"],
            "base_params": b["params"], "params": a["params"],
            "score_s": t.get("score_s"), "finetune_s": t.get("finetune_s"), "total_s": t.get("total_s"),
            "finetune_epochs": r["config"]["job"].get("finetune_epochs"), "threads": a.get("threads"),
            "runtime": a.get("runtime", "torch"), "load_average": a.get("load_average"),
        }  # fmt: skip
        for key, value in b.items():
            if key.startswith("latency_b") and key.endswith("_ms") and not key.endswith("spread_ms"):
                batch = key[len("latency_b") : -len("_ms")]
                if a.get(key):
                    row[f"latency_speedup_b{batch}"] = value / a[key]
        if job.get("target_latency"):
            row.update(_latency_fields(r))
        rows.append(row)
    return pd.DataFrame(rows)


def _latency_fields(r: dict[str, Any]) -> dict[str, Any]:
    """A latency-targeted run's request, whether its criterion used it, and the reduction it reached: measured on the
    final models at the target's batch (`latency_reached`; NaN if not timed) and by its selection (NaN if unused)."""
    job, b, a = r["config"]["job"], r["before"], r["after"]
    batch = job.get("latency_batch", 1)
    report = r.get("target_report") if isinstance(r.get("target_report"), dict) else {}
    used = report.get("metric") == "latency"
    base_ms, ms = b.get(f"latency_b{batch}_ms"), a.get(f"latency_b{batch}_ms")
    selection = report.get("achieved") if used else None
    return {
        "latency_target": job["target_latency"], "latency_batch": batch, "latency_used": used,
        "latency_reached": 1 - ms / base_ms if base_ms and ms else float("nan"),
        "latency_selection": selection if isinstance(selection, (int, float)) else float("nan"),
    }  # fmt: skip


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """Aggregate runs per (criterion, target): means, stds over seeds, drop from the base, rank per target."""
    if "latency_target" in df.columns:  # latency-targeted runs have their own leaderboard (latency_leaderboard)
        df = df[df["latency_target"].isna()]
    if df.empty:
        return df
    order = list(dict.fromkeys(df["criterion"]))
    grouped = df.groupby(["target", "criterion"], sort=False)
    mean_cols = ["macs_removed", "params_removed", "mac_speedup", "score_s", "finetune_s", "base_top1"]
    mean_cols += sorted(c for c in df.columns if c.startswith("latency_speedup_b"))
    out = grouped[mean_cols].mean()
    for col in ("top1_before_ft", "top1"):
        out[f"{col}_mean"] = grouped[col].mean()
        out[f"{col}_std"] = grouped[col].std(ddof=1).fillna(0.0)
    out["seeds"] = grouped["seed"].nunique()
    out["drop_pt"] = 100 * (out["base_top1"] - out["top1_mean"])
    out = out.reset_index()
    # Only entries that reached their cost target compete: a method that removed less is not "more accurate".
    out["met_target"] = out["macs_removed"] >= out["target"] - TARGET_TOLERANCE
    ranked = out["top1_mean"].where(out["met_target"])
    out["rank"] = ranked.groupby(out["target"]).rank(ascending=False, method="min").astype("Int64")
    out["_order"] = out["criterion"].map({c: i for i, c in enumerate(order)})
    out = out.sort_values(["target", "rank", "_order"], na_position="last").drop(columns="_order")
    out = out.reset_index(drop=True)
    first = ["target", "rank", "criterion", "met_target", "seeds", "macs_removed", "params_removed",
             "top1_before_ft_mean", "top1_before_ft_std", "top1_mean", "top1_std", "drop_pt",
             "mac_speedup"]  # fmt: skip
    return out[first + [c for c in out.columns if c not in first]]


def ranking_shift(lb: pd.DataFrame) -> pd.DataFrame:
    """Per target, how fine-tuning reorders the criteria: Spearman's rho between the mean top-1 before and after
    fine-tuning over the ranked entries that have both (a dynamic method's training is its fine-tuning: it has no
    "before" and is left out), and the leader of each. Empty when no target has two such entries."""
    from scipy.stats import spearmanr

    rows = []
    for target, g in lb[lb["rank"].notna() & lb["top1_before_ft_mean"].notna()].groupby("target", sort=True):
        if len(g) < 2:
            continue
        rho = spearmanr(g["top1_before_ft_mean"], g["top1_mean"]).statistic
        rows.append({"target": target, "criteria": len(g), "spearman": rho,
                     "leader_before_ft": g.loc[g["top1_before_ft_mean"].idxmax(), "criterion"],
                     "leader_after_ft": g.loc[g["top1_mean"].idxmax(), "criterion"]})  # fmt: skip
    return pd.DataFrame(rows)


def ranking_shift_markdown(shift: pd.DataFrame) -> str:
    """The `ranking_shift` table as a Markdown section ('' when empty)."""
    if shift.empty:
        return ""
    table = pd.DataFrame({
        "target": [f"-{100 * t:.0f}%" for t in shift["target"]], "criteria": shift["criteria"],
        "Spearman (before FT, after FT)": [f"{rho:+.2f}" for rho in shift["spearman"]],
        "leads before FT": shift["leader_before_ft"], "leads after FT": shift["leader_after_ft"],
    })  # fmt: skip
    return ("\n## Ranking before and after fine-tuning\n\nSpearman's rho between the criteria's mean top-1 before and "
            "after fine-tuning, over the ranked entries that have both (a dynamic method's training is its "
            f"fine-tuning, so it has no figure before).\n\n{markdown(table)}")  # fmt: skip


def latency_leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """Aggregate latency-targeted runs per (requested fraction, batch, criterion): the reduction reached and top-1,
    mean and std over seeds; ranked per request by mean top-1 among the entries that used the target and reached it
    (within LATENCY_TOLERANCE). `note` says why an entry is not ranked: its criterion chooses its own widths (it
    ignored the target), it fell short, or it was not timed."""
    if "latency_target" not in df.columns or df["latency_target"].isna().all():
        return pd.DataFrame()
    df = df[df["latency_target"].notna()]
    order = list(dict.fromkeys(df["criterion"]))
    grouped = df.groupby(["latency_target", "latency_batch", "criterion"], sort=False)
    mean_cols = ["macs_removed", "params_removed", "mac_speedup", "score_s", "finetune_s", "base_top1",
                 "latency_selection"]  # fmt: skip
    mean_cols += sorted(c for c in df.columns if c.startswith("latency_speedup_b"))
    out = grouped[mean_cols].mean()
    for col in ("latency_reached", "top1_before_ft", "top1"):
        out[f"{col}_mean"] = grouped[col].mean()
        out[f"{col}_std"] = grouped[col].std(ddof=1).fillna(0.0)
    out["latency_used"] = grouped["latency_used"].all()
    out["seeds"] = grouped["seed"].nunique()
    out["drop_pt"] = 100 * (out["base_top1"] - out["top1_mean"])
    out = out.reset_index()
    reached = out["latency_reached_mean"]
    out["met_target"] = out["latency_used"] & (reached >= out["latency_target"] - LATENCY_TOLERANCE)
    out["note"] = [
        "" if met else "chooses its own widths: ignores the latency target" if not used
        else "not timed" if pd.isna(r) else f"missed target: reached -{100 * r:.1f}%"
        for met, used, r in zip(out["met_target"], out["latency_used"], reached, strict=True)
    ]  # fmt: skip
    ranked = out["top1_mean"].where(out["met_target"])
    request = [out["latency_target"], out["latency_batch"]]
    out["rank"] = ranked.groupby(request).rank(ascending=False, method="min").astype("Int64")
    out["_order"] = out["criterion"].map({c: i for i, c in enumerate(order)})
    out = out.sort_values(["latency_target", "latency_batch", "rank", "_order"], na_position="last")
    out = out.drop(columns="_order").reset_index(drop=True)
    first = ["latency_target", "latency_batch", "rank", "criterion", "note", "met_target", "seeds",
             "latency_reached_mean", "latency_reached_std", "latency_selection", "top1_before_ft_mean",
             "top1_before_ft_std", "top1_mean", "top1_std", "drop_pt", "macs_removed", "params_removed",
             "mac_speedup"]  # fmt: skip
    return out[first + [c for c in out.columns if c not in first]]


def before_ft(r: pd.Series) -> str:
    """A leaderboard row's top-1 before fine-tuning, mean +- std in %; "(trains)" for a method that prunes while it
    trains, which has no pruned model before its training."""
    mean, std = r["top1_before_ft_mean"], r["top1_before_ft_std"]
    return "(trains)" if pd.isna(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def formatted_latency(lb: pd.DataFrame) -> pd.DataFrame:
    """The latency leaderboard as display strings: requested and reached reduction, top-1 in % (mean +- std)."""
    rows = []
    for _, r in lb.iterrows():
        reached = r["latency_reached_mean"]
        rows.append({
            "target": f"-{100 * r['latency_target']:.0f}% latency b{int(r['latency_batch'])}",
            "rank": str(int(r["rank"])) if pd.notna(r["rank"]) else "-", "criterion": r["criterion"],
            "seeds": int(r["seeds"]),
            "latency removed": "not timed" if pd.isna(reached)
            else f"{100 * reached:.1f} ± {100 * r['latency_reached_std']:.1f}%",
            "top-1 before FT": before_ft(r),
            "top-1": f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f}", "drop (pt)": f"{r['drop_pt']:+.2f}",
            "MACs removed": f"{100 * r['macs_removed']:.1f}%", "scoring (s)": f"{r['score_s']:.1f}",
            "note": r["note"],
        })  # fmt: skip
    return pd.DataFrame(rows)


def formatted(lb: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as display strings: accuracies in %, mean +- std, speed-ups as 1.23x."""

    def pm(mean: float, std: float) -> str:
        return f"{100 * mean:.2f} ± {100 * std:.2f}"

    latency = sorted(c for c in lb.columns if c.startswith("latency_speedup_b"))
    rows = []
    for _, r in lb.iterrows():
        row = {
            "target": f"-{100 * r['target']:.0f}%", "criterion": r["criterion"],
            "rank": str(int(r["rank"])) if pd.notna(r["rank"]) else "missed target",
            "seeds": int(r["seeds"]), "MACs removed": f"{100 * r['macs_removed']:.1f}%",
            "params removed": f"{100 * r['params_removed']:.1f}%",
            "top-1 before FT": before_ft(r),
            "top-1": pm(r["top1_mean"], r["top1_std"]), "drop (pt)": f"{r['drop_pt']:+.2f}",
            "MAC speed-up": f"{r['mac_speedup']:.2f}x",
        }  # fmt: skip
        for c in latency:
            row[f"latency speed-up b{c.rsplit('_b', 1)[1]}"] = f"{r[c]:.2f}x"
        row["scoring (s)"] = f"{r['score_s']:.1f}"
        row["fine-tune (s)"] = f"{r['finetune_s']:.1f}"
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def header(df: pd.DataFrame) -> str:
    """A few lines on the base model, the budget and the BatchNorm re-estimation, for the Markdown file."""
    base = df.iloc[0]
    epochs = sorted(set(df["finetune_epochs"].dropna().astype(int)))
    return (f"Base model: top-1 {100 * df['base_top1_own'].mean():.2f}%, {base['base_macs'] / 1e6:.2f}M MACs, "
            f"{base['base_params'] / 1e6:.3f}M params. Fine-tuning: {', '.join(map(str, epochs))} epoch(s) for "
            f"every criterion. {len(df)} runs; latency on {int(base['threads'] or 0)} thread(s), timed with "
            f"{', '.join(sorted(set(df['runtime'].fillna('torch'))))}.\n\n"
            f"{bn_sentence(df)}")  # fmt: skip


def bn_sentence(df: pd.DataFrame) -> str:
    """How BatchNorm statistics were treated after removal, and what the base's top-1 (and so each drop) is."""
    on = df["bn_recalibration"].astype(bool)
    if not on.any():
        return ("BatchNorm statistics are not re-estimated after removal (`bn_recalibration: false`): every model is "
                "measured with the statistics it carries.")  # fmt: skip
    if not on.all():
        return (f"BatchNorm re-estimation after removal is on in {int(on.sum())} runs and off in {int((~on).sum())}: "
                "these rows mix two settings.")  # fmt: skip
    images = sorted({int(n) for n in df["bn_images"].dropna() if n})
    count = f"{', '.join(f'{n:,}' for n in images)} training images" if images else "up to 2,048 training images"
    text = (f"BatchNorm statistics are re-estimated after removal on {count} (`bn_recalibration: true`, every static "
            "criterion; dynamic methods keep theirs).")  # fmt: skip
    measured = df["base_top1_bn_recalibrated"].dropna()
    if len(measured):
        text += (f" The base, with its statistics re-estimated on the same images, reads {100 * measured.mean():.2f}%"
                 "; without fine-tuning, the static criteria's drops are measured from that figure.")  # fmt: skip
    else:
        text += " The base's top-1 is with its own statistics (these records predate its re-estimated figure)."
    return text


def write(records: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "leaderboard") -> pd.DataFrame:
    """Write every MACs leaderboard file into `out_dir` from the `records` of MACs (or params) targets; return the
    numeric leaderboard (empty, and nothing written, if there are none). Latency targets: `write_latency`."""
    out_dir = Path(out_dir)
    records = [r for r in records if not is_latency(r)]
    if not records:
        return pd.DataFrame()
    df = runs(records)
    lb = leaderboard(df)
    table = formatted(lb)
    with atomic_write(out_dir / "leaderboard.csv") as tmp:
        lb.to_csv(tmp, index=False, float_format="%.6g")
    shift = ranking_shift(lb) if df["finetune_epochs"].fillna(0).gt(0).any() else pd.DataFrame()
    text = f"# {title}\n\n{header(df)}\n\n{markdown(table)}{ranking_shift_markdown(shift)}"
    write_text(out_dir / "leaderboard.md", text)
    write_text(out_dir / "leaderboard.tex", table.to_latex(index=False).replace("±", r"$\pm$").replace("%", r"\%"))
    plot(df, lb, out_dir)
    return lb


def write_latency(records: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "leaderboard") -> pd.DataFrame:
    """Write `leaderboard-latency.{csv,md}` into `out_dir` from the `records` of latency targets; return the numeric
    latency leaderboard (empty, and nothing written, if there are none)."""
    out_dir = Path(out_dir)
    records = [r for r in records if is_latency(r)]
    if not records:
        return pd.DataFrame()
    df = runs(records)
    lb = latency_leaderboard(df)
    with atomic_write(out_dir / LATENCY_FILES[0]) as tmp:
        lb.to_csv(tmp, index=False, float_format="%.6g")
    batches = ", ".join(str(b) for b in sorted(set(df["latency_batch"].astype(int))))
    text = (f"Equal latency: each entry was pruned to remove a fraction of the base's measured latency at batch "
            f"{batches} (`latency_targets`, as `prune --target-latency`). `latency removed` is what it reached, "
            "measured on the final models, base and pruned in alternating turns; entries are ranked by top-1 among "
            f"those that reached the request within {LATENCY_TOLERANCE:g}. A criterion that chooses its own widths "
            "ignores the target (it aims at the same fraction of MACs) and is listed unranked.")  # fmt: skip
    table = formatted_latency(lb)
    write_text(out_dir / LATENCY_FILES[1], f"# {title}: equal latency\n\n{header(df)}\n\n{text}\n\n{markdown(table)}")
    return lb


def plot(df: pd.DataFrame, lb: pd.DataFrame, out_dir: Path) -> None:
    """accuracy_vs_macs.png (top-1 after fine-tuning against MACs removed, bands = std over seeds; a close-up panel
    beside it when some entries lie far below the others, see `close_up_limits`) and latency_vs_macs.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_top1 = 100 * df["base_top1_own"].mean()  # the model as it is (its own BatchNorm statistics)
    epochs = sorted(set(df["finetune_epochs"].dropna().astype(int)))
    ylabel = "top-1, no fine-tuning (%)" if epochs == [0] else "top-1 after fine-tuning (%)"
    colours = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(lb["criterion"]))}
    limits = close_up_limits(lb, base_top1)
    fig, axes = plt.subplots(1, 1 if limits is None else 2, figsize=(6.4 if limits is None else 11.5, 4.4),
                             squeeze=False)  # fmt: skip
    for ax in axes[0]:
        for name, g in lb.groupby("criterion", sort=False):
            g = g.sort_values("macs_removed")
            x, mean, std = 100 * g["macs_removed"], 100 * g["top1_mean"], 100 * g["top1_std"]
            ax.plot(x, mean, marker="o", label=name, color=colours[name])
            ax.fill_between(x, mean - std, mean + std, color=colours[name], alpha=0.2, linewidth=0)
        ax.axhline(base_top1, color="grey", linestyle="--", linewidth=1, label="base")
        ax.set(xlabel="MACs removed (% of base)", ylabel=ylabel)
    axes[0][0].set_title("accuracy against MACs removed (mean, band ± std over seeds)")
    axes[0][0].legend(fontsize=8)
    if limits is not None:
        axes[0][1].set_ylim(*limits)
        axes[0][1].set_title(f"close-up: the entries within {CLOSE_UP_PT:g} pt of the base")
    _save(fig, out_dir / "accuracy_vs_macs.png")

    # One colour per criterion, one marker per batch size.
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    latency = sorted(c for c in lb.columns if c.startswith("latency_speedup_b"))
    markers = dict(zip(latency, "o^sD", strict=False))
    for col in latency:
        for name, g in lb.groupby("criterion", sort=False):
            ax.scatter(g["mac_speedup"], g[col], marker=markers[col], color=colours[name], alpha=0.8)
    top = max([2.0, *lb["mac_speedup"]])
    ax.plot([1, top], [1, top], color="grey", linestyle="--", linewidth=1)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=n) for n, c in colours.items()]
    handles += [plt.Line2D([], [], color="black", marker=m, linestyle="", label=f"batch {c.rsplit('_b', 1)[1]}")
                for c, m in markers.items()]  # fmt: skip
    handles.append(plt.Line2D([], [], color="grey", linestyle="--", label="latency = MACs"))
    ax.set(xlabel="MAC speed-up (x)", ylabel="measured latency speed-up (x)", title="latency against MACs")
    ax.legend(handles=handles, fontsize=7, ncol=2)
    _save(fig, out_dir / "latency_vs_macs.png")


def close_up_limits(lb: pd.DataFrame, base_top1: float) -> tuple[float, float] | None:
    """The y-limits (top-1 in %) of a close-up on the entries whose mean top-1 lies within CLOSE_UP_PT of the base
    (`base_top1`, in %), when most but not all of them do; else None, and a single panel shows what matters. The
    case it serves: after fine-tuning, one method far below (HASTE at -70%) squeezes the rest into one line."""
    near = 100 * lb["top1_mean"] >= base_top1 - CLOSE_UP_PT
    if near.all() or near.mean() <= 0.5:
        return None
    top = (100 * (lb["top1_mean"] + lb["top1_std"].fillna(0)))[near].max()
    return float(base_top1 - CLOSE_UP_PT - 0.1), float(max(top, base_top1) + 0.1)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
