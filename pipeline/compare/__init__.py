"""Compare two sweeps cell by cell (`python -m pipeline.compare`, pipeline/compare/cli.py):
the sides in sides.py, the matched cells' rows in cells.py, the statistics in stats.py, the outputs in
pipeline/report/comparison.py, two commits measured interleaved in commits.py."""
from pipeline.compare.cells import BY_NAME, FIGURES, Comparison, Figure, compare
from pipeline.compare.cli import main
from pipeline.compare.sides import Side, load_side
from pipeline.compare.stats import ALPHA, RUN_NOISE, THRESHOLD, VERDICTS, judge

__all__ = ["ALPHA", "BY_NAME", "FIGURES", "RUN_NOISE", "THRESHOLD", "VERDICTS", "Comparison", "Figure", "Side",
           "compare", "judge", "load_side", "main"]
