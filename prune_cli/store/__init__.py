"""What runs leave on disk: run records keyed by config hash (`records`), pickle-free model files (`modelfile`),
ONNX exports (`onnx`), and output files checked first and written atomically (`files`)."""
