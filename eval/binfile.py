"""The InsightFace ``.bin`` verification format, as evaluation imports it: the format itself lives in
``utils/data/binfile.py`` (file format code, below every layer that reads or writes it); these names stay importable
from ``eval.binfile``."""
from utils.data.binfile import BinFileError, load_bin, restricted_loads, write_bin

__all__ = ["BinFileError", "load_bin", "write_bin", "restricted_loads"]
