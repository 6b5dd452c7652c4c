"""Reports from run records alone: leaderboards (terminal, CSV, Markdown, LaTeX) and their plots (`leaderboard`)."""
