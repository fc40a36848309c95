"""The normalizers the study's report knows: the one list every table and figure reads for a
normalizer's display name, its place among the rows and whether its two inference options differ.

A run's normalizer is its variant (run_records.Run.variant): the config's name, for BKN followed by
its transition and any non-default option (``bkn-monte_carlo-state_input``). A new normalizer is one
entry in NORMALIZERS, at the place its rows should take; its colour in figures is plots.COLORS's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Normalizer:
    key: str  # the config's normalizer name, a run variant's first part
    name: str  # as tables and figures show it
    # Statistics of each example alone: the batch never touches it, so its option A (each test group's
    # own statistics) is its option B (population statistics), and tables show A as "= B".
    per_example: bool = False
    transitions: tuple[str, ...] = ()  # variants that take their own rows, in this order (BKN's transitions)


NORMALIZERS = (
    Normalizer("bn", "BN"),
    Normalizer("brn", "BRN"),
    Normalizer("gn", "GN", per_example=True),
    Normalizer("bkn", "BKN", transitions=("linear", "monte_carlo", "analytic")),
)
DEFAULT_BKN = "bkn-linear"  # BKN as configured by default
AUTHORS_BKN = "bkn-monte_carlo-state_input"  # the authors' code exactly


class UnknownNormalizer(ValueError):
    """A run of a normalizer that NORMALIZERS does not list."""


def row_order() -> list[str]:
    """The variants in the order of table rows: NORMALIZERS's, BKN's transitions in theirs."""
    return [variant for normalizer in NORMALIZERS
            for variant in ([f"{normalizer.key}-{t}" for t in normalizer.transitions] or [normalizer.key])]


def normalizer_of(variant: str) -> Normalizer:
    key = variant.partition("-")[0]
    known = {normalizer.key: normalizer for normalizer in NORMALIZERS}
    if key not in known:
        raise UnknownNormalizer(f"the study's report does not know the normalizer {key!r} (run variant "
                                f"{variant!r}): add it to NORMALIZERS in scripts/study_results/normalizers.py")
    return known[key]


def label(variant: str) -> str:
    detail = variant.partition("-")[2]
    return normalizer_of(variant).name + (f" ({detail.replace('-', ', ')})" if detail else "")


def variant_key(variant: str) -> tuple[int, str]:
    """Sorts variants in row_order(); one with options (bkn-linear-no_propagation) after its base,
    and a BKN transition not listed after every listed variant."""
    order, base = row_order(), "-".join(variant.split("-")[:2])
    return (order.index(base) if base in order else len(order), variant)


def per_example(variant: str) -> bool:
    """Whether the variant's option A is its option B (see Normalizer.per_example)."""
    return normalizer_of(variant).per_example


def inference_of(variant: str, inference: str) -> str:
    """The inference option a run of ``variant`` is read under for ``inference``: population
    statistics for a per-example normalizer, whose batch option is the same."""
    return "population" if per_example(variant) else inference


def per_example_clause() -> str:
    """What the tables say of the per-example normalizers: "GN has per-example statistics, so its A is its B"."""
    names = [normalizer.name for normalizer in NORMALIZERS if normalizer.per_example]
    if len(names) == 1:
        return f"{names[0]} has per-example statistics, so its A is its B"
    return f"{', '.join(names[:-1])} and {names[-1]} have per-example statistics, so their A is their B"
