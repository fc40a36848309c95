"""The study's experiments as the report knows them: what each one is, which have a large-batch
BN baseline of their own (a grid: speed table, Fig. 8 analogue, final-top-1 figure), what their
top-1 is measured on, and the outside numbers set beside ours (the data set's reference accuracies,
the paper's speed claim).

A new experiment is an entry in EXPERIMENTS (and in GRIDS if it has a baseline of its own).
"""

from __future__ import annotations

from dataclasses import dataclass

from .normalizers import AUTHORS_BKN, DEFAULT_BKN

Setting = tuple[int, int]  # the paper's (gradient-batch-size, statistics-batch-size)

EXPERIMENTS = {
    "study": "BN, BRN, GN and BKN on digits, trained to convergence",
    "study_hard": "the harder digits (500 training images, pixel noise std 0.3)",
    "study_state": "what BKN passes on to the next layer's prediction: its output's statistics or its input's",
    "study_quick": "first look: (32, 2), 10 epochs, one seed (not converged by design)",
    "study_stall": "the recipe BKN-analytic stalled under: lr 0.05, no warm-up, 1,500 steps at (32, 1)",
    "study_fashion": "BN, BRN, GN, the default BKN and the authors' BKN on Fashion-MNIST, trained to convergence",
    "study_fashion_quick": "Fashion-MNIST's first try: (128, 128) and (16, 1), 2 epochs, one seed (not converged "
                           "by design)",
    "study_robustness": "the default command's recipe (no warm-up, 300 steps) over learning rates",
    "study_speed": "the main grid's (8, 2) seed 0 again, as configured then, on the code after the micro-batch "
                   "speed-up",
}
# A rerun of some of an experiment's runs (same names and configs) on newer code: experiment -> the one it reruns.
RERUNS = {"study_speed": "study"}


@dataclass(frozen=True)
class Grid:
    """An experiment with a large-batch BN baseline of its own: it gets a speed table and a Fig. 8 analogue."""

    baseline: Setting  # the BN baseline's
    files: str  # its files' names, "{}" standing for steps_to_baseline, variance_gap or claims
    evaluations: str  # how often its runs are evaluated
    bkn: tuple[str, ...]  # the BKN variants its Fig. 8 analogue (and claims) set beside BN


GRIDS = {
    "study": Grid((64, 64), "{}", "one per epoch", ("bkn-linear", "bkn-analytic")),
    "study_hard": Grid((64, 64), "{}_hard", "one per epoch", ("bkn-linear", "bkn-analytic")),
    "study_fashion": Grid((128, 128), "study_fashion_{}", "one every 3 epochs", (DEFAULT_BKN, AUTHORS_BKN)),
}
# What top-1 is measured on, and what option A keeps of it (whole statistics groups only); digits where not named.
DIGITS_TEST = ("the 360 test images", "320 of the 360 at 64 a group")
TEST_SETS = {experiment: ("the 10,000 test images", "9,984 of the 10,000 at 128 a group")
             for experiment in ("study_fashion", "study_fashion_quick")}
# Grids whose claims <files>_claims.md tests one by one, with the data set's reference accuracies to set beside
# ours: (network, top-1 %, its preprocessing), from the benchmark table of github.com/zalandoresearch/fashion-mnist.
REFERENCE_ACCURACIES = {"study_fashion": (
    ("2 Conv+pooling+BN", 93.4, "no preprocessing"),
    ("ResNet18", 94.9, "normalization, random flips, translations and rotations"),
    ("WRN-28-10", 95.9, "mean/std standardization, random crops and horizontal flips"))}
# The prior fit (scripts/prior_fit.py) of the trained networks of these experiments, by the file it goes to.
PRIOR_FIT = {"study": "prior_fit.md", "study_state": "prior_fit_state.md"}
REACH_FRACTION = 0.95  # convergence speed: steps until 95% of the baseline's final top-1
PAPER_SPEED_CLAIM = ("Paper (Table 1, InceptionV2 on ImageNet at (256, 32)): BKN reaches BN's final top-1 "
                     "in 41.2% fewer steps (100k against 170k).")
