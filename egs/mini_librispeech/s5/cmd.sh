# Kaldi's job commands. run.pl runs everything on this machine; on a grid use queue.pl or
# slurm.pl as in your other Kaldi recipes. pkwrap-chain-train ignores --cmd for training
# (it runs its workers under torchrun itself) and uses it for nothing else.
export train_cmd="run.pl --mem 2G"
export decode_cmd="run.pl --mem 4G"
export mkgraph_cmd="run.pl --mem 8G"
