"""SINF (arXiv 2310.01259): the router and per-cluster subgraphs (`model`) and what such a model gives (`report`).
Its graph split lives in `prune_cli.surgery.split`."""
