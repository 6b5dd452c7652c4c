"""Selection: a criterion's scores or allocation -> a keep-plan (channels kept per group) under a budget in MACs,
parameters (`plan`) or measured latency (`latency`, with its per-layer timing table), and the widths the hardware
runs fast (`fast_widths`). The same code for every score-based criterion, which is what makes the comparison fair."""
