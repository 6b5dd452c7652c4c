"""Print the robustness tables of README.md from the CSVs `prune-cli score` wrote into this folder.

For each early checkpoint K: `epochK_compare.csv` (per-group sensitivities of the checkpoint and of the final model,
and their ranks) and `epochK.csv` (the allocation at -50% MACs); `final.csv` is the final model's allocation.

Usage: python experiments/results/fmnist-vgg/sbpf-robustness/table.py
"""

from pathlib import Path

import pandas as pd
from scipy.stats import kendalltau, spearmanr

HERE = Path(__file__).resolve().parent
epochs = sorted(int(p.stem[5:].split("_")[0]) for p in HERE.glob("epoch*_compare.csv"))

print("| checkpoint | Spearman rho (p) | Kendall tau (p) | most sensitive group | least sensitive group |")
print("|---|---|---|---|---|")
for k in epochs:
    c = pd.read_csv(HERE / f"epoch{k}_compare.csv")
    rho, tau = spearmanr(c["sensitivity_a"], c["sensitivity_b"]), kendalltau(c["sensitivity_a"], c["sensitivity_b"])
    top, last = c.loc[c["rank_a"].idxmin(), "group"], c.loc[c["rank_a"].idxmax(), "group"]
    stats = f"{rho.statistic:.3f} ({rho.pvalue:.3f}) | {tau.statistic:.3f} ({tau.pvalue:.3f})"
    print(f"| epoch {k} | {stats} | {top} | {last} |")

print()
alloc = {f"epoch {k}": pd.read_csv(HERE / f"epoch{k}.csv").set_index("group")["kept"] for k in epochs}
alloc["final"] = pd.read_csv(HERE / "final.csv").set_index("group")["kept"]
table = pd.DataFrame(alloc)
sizes = pd.read_csv(HERE / "final.csv").set_index("group")["size"]
print("| group | size | " + " | ".join(f"kept, {c}" for c in table.columns) + " |")
print("|---|---|" + "---|" * len(table.columns))
for g, row in table.iterrows():
    print(f"| {g} | {sizes[g]} | " + " | ".join(str(int(v)) for v in row) + " |")
final = table["final"]
print(
    "| channels moved against final | | "
    + " | ".join(str(int((table[c] - final).abs().sum() // 2)) for c in table.columns)
    + " |"
)
