"""Kaldi-free decoding: lexicon and grammar FSTs, HCLG, decoding of nnet outputs, WER.

  lexicon.py   read_lexicon(p), add_disambig_symbols, make_lexicon_fst (L); SymbolTable
               (from pkwrap.kaldi.symbol_table, re-exported)
  graph.py     make_word_loop_grammar / make_arpa_grammar (G), HCLG, build_decoding_graph
  decoder.py   decode(loglikes, graph) over HCLG (FasterDecoder / LatticeSimpleDecoder),
               Kaldi loglike and lattice archives
  scoring.py   compute_wer (Kaldi's compute-wer report)

Typical use (a digits recipe)::

    from pkwrap.decode import build_decoding_graph, decode, compute_wer, read_lexicon
    graph = build_decoding_graph(read_lexicon("lexicon.txt"), phone_table, tree,
                                 trans_model, grammar=digit_words, sil_phone="SIL")
    hyp = {utt: decode(nnet_output, graph).words for utt, nnet_output in outputs}
    print(compute_wer(refs, hyp))
"""
from .decoder import (DecodeError, DecodeResult, decode, decode_utterances, lattice_to_text,
                      open_wspecifier, read_loglikes, write_int_vectors, write_lattice_ark,
                      write_loglikes_ark)
from .graph import (DecodingGraph, GraphError, add_hmm_self_loops, build_decoding_graph,
                    build_decoding_graph_from_lang, compile_train_graph, compose_lg,
                    from_kaldifst, make_arpa_grammar, make_h_transducer, make_hclg,
                    make_word_loop_grammar, push_special, remove_disambig_symbols, to_kaldifst,
                    write_lang_dir)
from .lexicon import (LexiconEntry, LexiconError, SymbolTable, SymbolTableError,
                      add_disambig_symbols, make_lexicon_fst, make_phone_table, make_word_table,
                      read_lexicon, read_lexiconp, write_lexiconp)
from .scoring import ScoringError, WerStats, compute_wer, read_transcripts

__all__ = [
    "DecodeError",
    "DecodeResult",
    "DecodingGraph",
    "GraphError",
    "LexiconEntry",
    "LexiconError",
    "ScoringError",
    "SymbolTable",
    "SymbolTableError",
    "WerStats",
    "add_disambig_symbols",
    "add_hmm_self_loops",
    "build_decoding_graph",
    "build_decoding_graph_from_lang",
    "compile_train_graph",
    "compose_lg",
    "compute_wer",
    "decode",
    "decode_utterances",
    "from_kaldifst",
    "lattice_to_text",
    "make_arpa_grammar",
    "make_h_transducer",
    "make_hclg",
    "make_lexicon_fst",
    "make_phone_table",
    "make_word_loop_grammar",
    "make_word_table",
    "open_wspecifier",
    "push_special",
    "read_lexicon",
    "read_lexiconp",
    "read_loglikes",
    "read_transcripts",
    "remove_disambig_symbols",
    "to_kaldifst",
    "write_int_vectors",
    "write_lang_dir",
    "write_lattice_ark",
    "write_lexiconp",
    "write_loglikes_ark",
]
