"""Reports: leaderboards (terminal, CSV, Markdown, LaTeX) and their plots from run records alone (`leaderboard`), and
rank correlations between criteria and between model files (`correlations`)."""
