"""The study's report, written to results/study/ by scripts/study_report.py (``make study``), one
module a part:

- normalizers.py: the normalizers every table and figure knows, their display names, their order
  and whether their two inference options are one (per-example statistics, as GN's).
- experiments.py: the study's experiments, its grids (those with a BN baseline of their own) and
  the outside numbers set beside ours.
- records.py: the runs of an experiment from the runs dir and the committed records.
- measures.py: what a run or a cell of runs (a setting and a normalizer) is measured by.
- intervals.py: the interval statistics: mean ± std, the 95% interval of a mean, and the verdicts
  of one side against another that every table and claim uses.
- tables.py, figures.py: each experiment's results table and curves, each grid's steps to the
  baseline and final-top-1 figure, a rerun beside the runs it repeats.
- variance_gap.py: the Fig. 8 analogue.
- claims.py: the paper's claims tested on a grid, one section a claim.
- robustness.py: the learning-rate sweep of the default command.
- status.py: the first line of results/study/README.md.

A new normalizer is one entry in ``normalizers.NORMALIZERS`` (its colour in figures is
``plots.COLORS``'s, shared with aggregate.py); its runs then get rows in every table and figure, and a
batch-independent one (FRN, EvoNorm-S0) shows its option A as "= B" where it says ``per_example``. A new
claim is one function of ``claims.Evidence`` added to ``claims.SECTIONS``.
"""
