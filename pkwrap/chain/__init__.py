"""LF-MMI ("chain") training objective, equal to Kaldi's.

  DenominatorGraph   den.fst -> HMM arcs + Kaldi's initial probabilities
  ChainOptions       Kaldi's ChainTrainingOptions (--leaky-hmm-coefficient, ...)
  ChainLoss          nn.Module: objf, l2 term, xent, Kaldi's derivatives via autograd
  chain_loss         the same as a function
  denominator_logprob  differentiable denominator log-probability alone

Graph preparation (phone LM, den.fst, supervision, egs, trees) lives in the other
modules of this package and is imported from them directly.
"""
import importlib

# Names are resolved lazily: graph-preparation tools (phone_lm, den_fst, tree,
# supervision) import this package without paying for torch.
_LAZY = {
    "DenominatorGraph": ".den_graph",
    "denominator_forward_backward": ".denominator",
    "denominator_logprob": ".denominator",
    "ChainLoss": ".loss",
    "ChainResult": ".loss",
    "chain_loss": ".loss",
    "numerator_forward_backward": ".numerator",
    "ChainOptions": ".options",
    "estimate_phone_lm": ".phone_lm",
    "make_den_fst": ".den_fst",
    "chain_topology": ".tree",
    "monophone_tree": ".tree",
    "full_biphone_tree": ".tree",
    "make_transition_model": ".tree",
    "get_supervisions": ".supervision",
    "ChainEgsDataset": ".egs",
    "E2EChainEgsDataset": ".egs",
    "collate_chain_egs": ".egs",
    "ExampleGenerationConfig": ".egs",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError("module 'pkwrap.chain' has no attribute %r" % name)
