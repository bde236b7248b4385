"""Chain egs: Kaldi's NnetChainExample and chain::Supervision.

(Readers/writers are being added; the data classes below are the shared contract.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .fst import Fst

__all__ = ["Supervision"]


@dataclass
class Supervision:
    """Kaldi's ``chain::Supervision`` for a minibatch of ``num_sequences`` sequences.

    Args:
      weight: supervision weight w (scales objf, l2 term and derivatives).
      num_sequences: S.
      frames_per_sequence: T (output frames per sequence).
      label_dim: number of pdfs P (labels of the FSTs are pdf+1).
      fst: regular supervision: ONE epsilon-free acceptor for all sequences
        concatenated (sequence 0 first; FST frame tau is sequence tau // T, frame
        tau % T); weights are -log probs read in the log semiring. None for e2e.
      e2e_fsts: end-to-end supervision: one FST per sequence (may have self-loops).
      alignment_pdfs: optional pdf alignment Kaldi may store (may be empty).
    """

    weight: float
    num_sequences: int
    frames_per_sequence: int
    label_dim: int
    fst: Optional[Fst] = None
    e2e_fsts: List[Fst] = field(default_factory=list)
    alignment_pdfs: Optional[np.ndarray] = None

    @property
    def e2e(self) -> bool:
        return len(self.e2e_fsts) > 0
