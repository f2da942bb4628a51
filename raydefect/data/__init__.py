"""Data: synthetic defect images, importers of raw folders, `prepare` (raw -> dataset) and the dataset reader.

Heavy submodules (pyarrow, scipy) are imported by those who need them; this package root stays light.
"""
