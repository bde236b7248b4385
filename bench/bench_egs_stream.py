"""Peak memory of streaming a Kaldi egs dir of several GB (pkwrap.train.stream).

Makes an egs dir by replicating real Kaldi egs (the kaldi_recipe fixture's
``exp/chain/tdnn/egs/cegs.*.ark``, or any egs dir given with ``--src``) into
``--num-archives`` archives of ``--archive-gb`` GB each (entries are copied byte for
byte; keys repeat, which Kaldi's readers and ours accept), then iterates
:class:`~pkwrap.train.stream.StreamingEgs` over it as train.py would (shuffle buffer
5000, merge rule 64,32) and reports the peak resident memory (``ru_maxrss``) against
the egs dir's size. Not a test: it reads GBs.

    python3 bench/bench_egs_stream.py                      # 3 x 1 GB, first 1 pass
    python3 bench/bench_egs_stream.py --passes 3 --keep    # more passes, keep the dir
"""
import argparse
import glob
import os
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_egs_dir(src: str, dst: str, num_archives: int, archive_bytes: int) -> int:
    arks = sorted(glob.glob(os.path.join(src, "cegs.*.ark")))
    if not arks:
        sys.exit("bench_egs_stream: %s: no cegs.*.ark" % src)
    os.makedirs(os.path.join(dst, "info"), exist_ok=True)
    blob = b"".join(open(p, "rb").read() for p in arks)
    total = 0
    for a in range(1, num_archives + 1):
        with open(os.path.join(dst, "cegs.%d.ark" % a), "wb") as f:
            n = 0
            while n < archive_bytes:
                f.write(blob)
                n += len(blob)
        total += n
    if os.path.isdir(os.path.join(src, "info")):
        for name in os.listdir(os.path.join(src, "info")):
            shutil.copy(os.path.join(src, "info", name), os.path.join(dst, "info", name))
    with open(os.path.join(dst, "info", "num_archives"), "w") as f:
        f.write("%d\n" % num_archives)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default="/work/shared/fixtures/kaldi_recipe/exp/chain/tdnn/egs")
    ap.add_argument("--dir", default="/tmp/pkwrap_bench_egs")
    ap.add_argument("--num-archives", type=int, default=3)
    ap.add_argument("--archive-gb", type=float, default=1.0)
    ap.add_argument("--passes", type=int, default=1, help="archive passes to iterate")
    ap.add_argument("--minibatch-size", default="64,32")
    ap.add_argument("--buffer-size", type=int, default=5000)
    ap.add_argument("--keep", action="store_true", help="keep the egs dir")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(1)
    from pkwrap.train.stream import StreamingEgs

    t0 = time.time()
    if not os.path.isdir(args.dir):
        make_egs_dir(args.src, args.dir, args.num_archives, int(args.archive_gb * 2 ** 30))
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(args.dir, "cegs.*.ark")))
    print("egs dir %s: %d archives, %.2f GB (made in %.0f s)"
          % (args.dir, args.num_archives, size / 2 ** 30, time.time() - t0))
    base = rss_mb()
    print("RSS before iterating: %.0f MB (peak so far %.0f MB)" % (base, peak_mb()))
    src = StreamingEgs(args.dir, args.minibatch_size, 3, shuffle_buffer_size=args.buffer_size,
                       seed=0, rank=0, world_size=1, frame_shift=False)
    src.set_epoch(0)
    t0 = time.time()
    n_mb = n_egs = 0
    for b in src.batches():
        if src.iteration >= args.passes:  # the batch belongs to iteration src.iteration
            break
        src.step_done()
        n_mb += 1
        n_egs += b.num_sequences
        if n_mb % 500 == 0:
            print("  %d minibatches, %d egs, %.0f s: RSS %.0f MB, peak %.0f MB"
                  % (n_mb, n_egs, time.time() - t0, rss_mb(), peak_mb()), flush=True)
    passes = min(args.passes, src.iteration)
    read_bytes = sum(os.path.getsize(src.egs.archives[i % src.num_archives])
                     for i in range(passes))
    secs = time.time() - t0
    print("iterated %d archive pass(es), %.2f GB: %d minibatches, %d egs in %.0f s "
          "(%.0f egs/s)" % (passes, read_bytes / 2 ** 30, n_mb, n_egs, secs,
                            n_egs / max(secs, 1e-9)))
    print("peak RSS %.0f MB (RSS before iterating %.0f MB); egs dir %.2f GB"
          % (peak_mb(), base, size / 2 ** 30))
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
