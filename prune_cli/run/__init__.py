"""Running: where a command runs (`environment`: seed, threads, device, the machine's description), the data and
models of a run (`loading`), one training run (`training`), one pruning run (`pruning`: score -> select -> remove ->
fine-tune -> measure), the experiment schema (`experiment`) and its grid of runs (`grid`), executed by local
processes or by Ray (`ray_executor`)."""
