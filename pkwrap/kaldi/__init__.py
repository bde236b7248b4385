"""Kaldi file formats, read and written directly (no Kaldi build needed)."""
from .fst import (Fst, FstFormatError, read_fst, read_fst_binary, read_fst_text,  # noqa: F401
                  write_fst, write_fst_binary, write_fst_text)
