"""Data: dataset readers (files, or scikit-learn's bundled digits -> uint8 tensors; `readers`), and the splits,
normalisation and batches the training loop and the criteria read (`splits`)."""
