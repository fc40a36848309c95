"""``python -m bkn.models NAME [--norm bn|brn|gn|bkn|frn|evonorm_s0|cbn|all] [--depth 6n+2]``: parameters
and MACs, one row per normalizer."""

from __future__ import annotations

import argparse

from bkn.models import PAPER_MODELS
from bkn.models.summary import NORM_VARIANTS, format_table, summarize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bkn.models", description=__doc__)
    parser.add_argument("name", choices=[*PAPER_MODELS, "all"], help="a model, or all of them")
    parser.add_argument("--depth", type=int, default=32, help="preact_resnet's depth 6n + 2 (default 32)")
    parser.add_argument("--norm", choices=["bn", "brn", "gn", "bkn", "frn", "evonorm_s0", "cbn", "all"], default="all")
    parser.add_argument("--image-size", type=int, help="default: the paper's (224 ImageNet, 32 CIFAR)")
    parser.add_argument("--num-classes", type=int, help="default: the paper's (1000 ImageNet, 10 CIFAR)")
    args = parser.parse_args(argv)
    # all: preact_resnet's rows are those of its named depths (preact_resnet32, preact_resnet110).
    names = [name for name in PAPER_MODELS if name != "preact_resnet"] if args.name == "all" else [args.name]
    norms = {label: norm for label, norm in NORM_VARIANTS.items() if args.norm in ("all", norm["name"])}
    try:
        rows = [row for name in names for row in summarize(
            name, norms, args.image_size, args.num_classes, {"depth": args.depth} if name == "preact_resnet" else {})]
    except ValueError as error:  # a depth that is not 6n + 2, an image too small
        parser.error(str(error))
    print(format_table(rows))


if __name__ == "__main__":
    main()
