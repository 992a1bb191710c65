"""Evaluation tools that sit on top of duca_video: the VBench protocol (eval/vbench), fidelity of cached videos
to the uncached ones (eval/fidelity.py) and the side-by-side comparison report (eval/report.py)."""
