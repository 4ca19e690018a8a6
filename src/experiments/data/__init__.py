"""Data: the tasks (folders, splits, folds, downloads, decoding, the image cache), the arrays
that hold them on disk, and the batches a model reads."""
