"""The VBench protocol: generate the prompt suite (generate.py), score it (score.py, VBench's own environment),
tabulate the 16 dimensions into VBench's total (tabulate.py). protocol.py holds the facts they share."""
