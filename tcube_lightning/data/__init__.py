"""The data a run reads: the DataModule and its splits, one reader per on-disk format, the modality registry, split
names, unlabelled sources for ``predict``, and the embedded demo's models and files."""
