"""Speed of making end-to-end chain examples on the fly (what egs/digits/train.py does for
every training utterance before its first step): the training graph of the transcript
(:func:`pkwrap.decode.graph.compile_train_graph`, as Kaldi's ``compile-train-graphs``),
its conversion to a pkwrap FST and the example (:func:`pkwrap.chain.egs.get_e2e_chain_eg`).

kaldifst reads and writes FSTs through files only, so each graph crosses between kaldifst
and pkwrap's arrays through a file several times. The baseline, run in the same process
on the same utterances, makes a fresh temporary directory for every crossing (the code
before 2026-12-07); the current code reuses one scratch file per process and thread.
Rounds alternate between the two and the medians are compared; both give the same
examples (checked).

    python3 bench/bench_e2e_graphs.py                 # 5 rounds of 200 examples each
    python3 bench/bench_e2e_graphs.py --rounds 9 --utts 400
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                        "kaldi")


def per_call_directory_conversions():
    """The conversions as they were: a new temporary directory for every crossing."""
    import kaldifst
    from pkwrap.kaldi.fst import read_fst_binary, write_fst

    def to_kaldifst(fst):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "g.fst")
            write_fst(fst, p)
            return kaldifst.StdVectorFst.read(p)

    def from_kaldifst(kfst, name=None):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "g.fst")
            kfst.write(p)
            with open(p, "rb") as f:
                return read_fst_binary(f, name or "<kaldifst FST>")
    return {"to_kaldifst": to_kaldifst, "from_kaldifst": from_kaldifst}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--utts", type=int, default=200, help="examples per round")
    args = p.parse_args()
    import kaldifst
    from pkwrap.chain.egs import ExampleGenerationConfig, get_e2e_chain_eg
    from pkwrap.chain.supervision import read_int_vectors
    from pkwrap.decode import graph as G
    from pkwrap.kaldi.chain_egs import write_chain_egs
    from pkwrap.kaldi.fst import read_fst
    from pkwrap.kaldi.hmm import read_transition_model, read_tree

    mono, e2e = os.path.join(FIXTURES, "mono"), os.path.join(FIXTURES, "e2e")
    tree = read_tree(os.path.join(mono, "tree"))
    tm = read_transition_model(os.path.join(mono, "trans.mdl"))
    norm = read_fst(os.path.join(mono, "normalization.fst"))
    L = kaldifst.StdVectorFst.read(os.path.join(e2e, "L.fst"))
    text = dict(read_int_vectors("ark,t:%s" % os.path.join(e2e, "text.int")))
    feats = dict(np.load(os.path.join(e2e, "feats.npz")))
    cfg = ExampleGenerationConfig(left_context=10, right_context=10, num_frames="150,210",
                                  frame_subsampling_factor=3)
    keys = sorted(text)
    jobs = [keys[i % len(keys)] for i in range(args.utts)]

    def run():
        out = []
        for k in jobs:
            g = G.from_kaldifst(G.compile_train_graph(L, text[k], tree, tm))
            out.append(get_e2e_chain_eg(k, feats[k], g, tm, cfg, norm))
        return out

    current = {n: getattr(G, n) for n in ("to_kaldifst", "from_kaldifst")}
    baseline = per_call_directory_conversions()
    times = {"baseline": [], "current": []}
    results = {}
    for r in range(args.rounds):
        for name, fns in (("baseline", baseline), ("current", current)):
            for n, f in fns.items():
                setattr(G, n, f)
            t = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - t)
    for n, f in current.items():
        setattr(G, n, f)
    with tempfile.TemporaryDirectory() as d:  # the examples as Kaldi archives, byte for byte
        arks = []
        for name in ("baseline", "current"):
            path = os.path.join(d, name + ".ark")
            write_chain_egs("ark:" + path, results[name], compress=True)
            with open(path, "rb") as f:
                arks.append(f.read())
        same = arks[0] == arks[1]
    b, c = statistics.median(times["baseline"]), statistics.median(times["current"])
    print("e2e examples (graph + conversion + example), %d per round, %d rounds, medians:"
          % (args.utts, args.rounds))
    print("  baseline (a temporary directory per conversion): %.2f ms per example"
          % (1000 * b / args.utts))
    print("  current (one scratch file per process/thread):    %.2f ms per example"
          % (1000 * c / args.utts))
    print("  speed-up %.2fx; same examples: %s" % (b / c, same))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
