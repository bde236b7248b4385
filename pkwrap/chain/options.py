"""Options of the chain (LF-MMI) objective, as Kaldi's ``chain::ChainTrainingOptions``.

The objective maximized for a minibatch with supervision weight w is::

    F = w * log p_num(O) - w * log p_den(O)                    (the "objf")
        - 0.5 * w * l2_regularize * sum(X**2)                  (the "l2_term")
        - 0.5 * out_of_range_regularize * sum(max(|X| - 30, 0)**2)   (only through its derivative)
        + xent_regularize * sum(num_post * xent_output)        (separate 'output-xent' head)

where X is the chain output (one row per frame and sequence, one column per pdf).
Field names, meanings and flag spellings are Kaldi's (src/chain/chain-training.h).
The one default that differs is ``leaky_hmm_coefficient``: Kaldi's C++ default is
1e-05, but every Kaldi chain recipe passes ``--leaky-hmm-coefficient=0.1``, and so
does pkwrap by default.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

__all__ = ["ChainOptions"]


@dataclass
class ChainOptions:
    """Settings of the chain objective (Kaldi's ``ChainTrainingOptions``).

    Args:
      leaky_hmm_coefficient: ``--leaky-hmm-coefficient``. Coefficient of the "leaky
        HMM": from every state of the denominator graph there is an epsilon
        transition to a special state, and from it to every state s with
        probability ``leaky_hmm_coefficient * initial_prob(s)``. It lets the
        denominator forget its context gradually (helps generalization) and keeps
        the non-log-space recursion from underflowing, so it must lie strictly
        between 0 and 1. Recipes use 0.1 (Kaldi's C++ default is 1e-05).
      l2_regularize: ``--l2-regularize``. L2 penalty on the chain output: the term
        ``-0.5 * w * l2_regularize * sum(X**2)`` is added to the objective (reported
        as ``l2_term``) and ``-w * l2_regularize * X`` to its derivative. E.g. 0.0005
        (0 turns it off, the default).
      xent_regularize: ``--xent-regularize``. Cross-entropy regularization constant.
        If nonzero the network has a second output ('output-xent', a log-softmax);
        its objective is ``sum(num_post * xent_output)`` and it is back-propagated
        scaled by ``xent_regularize``. E.g. 0.1 (0 = off, the default).
      out_of_range_regularize: ``--out-of-range-regularize``. Like l2_regularize but
        only for the part of X beyond [-30, 30]: the denominator clamps X to that
        range before its exp(), so outputs outside it get no denominator gradient.
        Kaldi adds ``-2 * out_of_range_regularize * (x -+ 30)`` to the derivative of
        each such element on a random half of the minibatches; pkwrap adds the
        expected value ``-out_of_range_regularize * (x -+ 30)`` on every minibatch
        (see :mod:`pkwrap.chain.loss`). Default 0.01.
    """

    leaky_hmm_coefficient: float = 0.1
    l2_regularize: float = 0.0
    xent_regularize: float = 0.0
    out_of_range_regularize: float = 0.01

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError("ChainOptions.%s must be a number, got %r" % (f.name, v))
            setattr(self, f.name, float(v))
            if not math.isfinite(float(v)):
                raise ValueError("ChainOptions.%s must be a finite number, got %r"
                                 % (f.name, v))
        if not 0.0 < self.leaky_hmm_coefficient < 1.0:
            raise ValueError("ChainOptions.leaky_hmm_coefficient must be in (0, 1) "
                             "(Kaldi asserts this; the denominator is not computed in "
                             "log space), got %r" % self.leaky_hmm_coefficient)
        for name in ("l2_regularize", "xent_regularize", "out_of_range_regularize"):
            if getattr(self, name) < 0:
                raise ValueError("ChainOptions.%s must be >= 0, got %r"
                                 % (name, getattr(self, name)))

    @staticmethod
    def flag_name(field_name: str) -> str:
        """Kaldi's flag for a field: ``"leaky_hmm_coefficient"`` -> ``"--leaky-hmm-coefficient"``."""
        if field_name not in {f.name for f in dataclasses.fields(ChainOptions)}:
            raise KeyError("ChainOptions has no field %r" % field_name)
        return "--" + field_name.replace("_", "-")

    def to_kaldi_flags(self) -> List[str]:
        """The options as Kaldi command-line flags, e.g. ``["--leaky-hmm-coefficient=0.1", ...]``."""
        return ["%s=%s" % (self.flag_name(f.name), repr(getattr(self, f.name)))
                for f in dataclasses.fields(self)]

    @classmethod
    def from_kaldi_flags(cls, flags: Sequence[str]) -> "ChainOptions":
        """Parse Kaldi-style flags (``--l2-regularize=5e-5``); unknown flags raise ValueError.

        Args:
          flags: strings of the form ``--name=value``.
        Returns:
          A ChainOptions with those fields set and the others at their defaults.
        """
        names = {cls.flag_name(f.name): f.name for f in dataclasses.fields(cls)}
        kw: Dict[str, float] = {}
        for flag in flags:
            key, sep, val = flag.partition("=")
            if not sep or key not in names:
                raise ValueError("unknown chain training flag %r (known: %s)"
                                 % (flag, ", ".join(sorted(names))))
            try:
                kw[names[key]] = float(val)
            except ValueError:
                raise ValueError("chain training flag %r: %r is not a number" % (key, val))
        return cls(**kw)

    def as_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)
