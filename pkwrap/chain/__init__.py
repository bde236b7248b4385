"""LF-MMI ("chain") training objective, equal to Kaldi's.

  DenominatorGraph   den.fst -> HMM arcs + Kaldi's initial probabilities
  ChainOptions       Kaldi's ChainTrainingOptions (--leaky-hmm-coefficient, ...)
  ChainLoss          nn.Module: objf, l2 term, xent, Kaldi's derivatives via autograd
  chain_loss         the same as a function
  denominator_logprob  differentiable denominator log-probability alone

Graph preparation (phone LM, den.fst, supervision, egs, trees) lives in the other
modules of this package and is imported from them directly.
"""
from .den_graph import DenominatorGraph
from .denominator import denominator_forward_backward, denominator_logprob
from .loss import ChainLoss, ChainResult, chain_loss
from .numerator import numerator_forward_backward
from .options import ChainOptions

__all__ = ["ChainLoss", "ChainOptions", "ChainResult", "DenominatorGraph", "chain_loss",
           "denominator_forward_backward", "denominator_logprob", "numerator_forward_backward"]
