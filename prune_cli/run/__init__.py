"""Running: the steps every command shares (`steps`), one pruning run (`pruning`: score -> select -> remove ->
fine-tune -> measure), the experiment schema (`experiment`) and its grid of runs (`grid`), executed by local
processes or by Ray (`ray_executor`)."""
