"""Kaldi file formats, read and written directly (no Kaldi build needed)."""
from .fst import (Fst, FstFormatError, read_fst, read_fst_binary, read_fst_text,  # noqa: F401
                  write_fst, write_fst_binary, write_fst_text)
from .io import KaldiFormatError, KaldiReader, KaldiWriter  # noqa: F401
from .matrix import (CompressedMatrix, SparseMatrix, read_matrix, write_matrix,  # noqa: F401
                     read_vector, write_vector, read_general_matrix, write_general_matrix)
from .table import (SequentialTableReader, RandomAccessTableReader, TableWriter,  # noqa: F401
                    parse_rspecifier, parse_wspecifier, read_table)
from .chain_egs import (Supervision, NnetChainExample, read_chain_egs,  # noqa: F401
                        write_chain_egs, merge_chain_egs, merge_supervision,
                        scale_supervision_weight, shift_chain_example_times, ChainEgsWriter,
                        merge_chain_egs_stream, merge_chain_egs_table, copy_chain_egs,
                        modify_chain_example_context, read_supervision, write_supervision)
from .hmm import (ContextDependency, HmmTopology, TransitionModel, read_tree,  # noqa: F401
                  write_tree, read_topology, write_topology, read_transition_model,
                  write_transition_model, read_phone_symbols)
from .symbol_table import SymbolTable, SymbolTableError  # noqa: F401
from .lattice import CompactLattice, read_compact_lattices  # noqa: F401
