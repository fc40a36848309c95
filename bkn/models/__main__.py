"""``python -m bkn.models NAME [--norm bn|brn|gn|bkn|all]``: parameters and MACs, BN vs BRN vs GN vs BKN."""

from __future__ import annotations

import argparse

from bkn.models import PAPER_MODELS
from bkn.models.summary import NORM_VARIANTS, format_table, summarize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bkn.models", description=__doc__)
    parser.add_argument("name", choices=[*PAPER_MODELS, "all"], help="a model, or all of them")
    parser.add_argument("--norm", choices=["bn", "brn", "gn", "bkn", "all"], default="all")
    parser.add_argument("--image-size", type=int, help="default: the paper's (224 ImageNet, 32 CIFAR)")
    parser.add_argument("--num-classes", type=int, help="default: the paper's (1000 ImageNet, 10 CIFAR)")
    args = parser.parse_args(argv)
    names = list(PAPER_MODELS) if args.name == "all" else [args.name]
    norms = {label: norm for label, norm in NORM_VARIANTS.items() if args.norm in ("all", norm["name"])}
    rows = [row for name in names for row in summarize(name, norms, args.image_size, args.num_classes)]
    print(format_table(rows))


if __name__ == "__main__":
    main()
