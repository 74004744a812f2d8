"""Data sets: MNIST (IDX files) and CoNLL-U treebanks, with download, caching and integrity checks."""
