"""python -m harness.data check NAME ROOT: validate a dataset tree and decode every listed image.

Prints the image and class counts per split; exit 0 when the tree is sound, 2 otherwise (with every
missing or undecodable image listed).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from harness.data import DATASETS, load_imageset
from harness.data._decode import DatasetError
from harness.core.escape import printable
from harness.core.registry import RegistryError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a dataset tree and decode every listed image")
    check.add_argument("name", help=f"dataset family ({', '.join(n for n in DATASETS.names() if n != 'synthfg')})")
    check.add_argument("root", help="the dataset's folder as distributed")
    check.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                       help="other dataset parameters, e.g. --set level=family")
    args = parser.parse_args(argv)
    try:
        family = DATASETS.get(args.name)
        options = dict(o.split("=", 1) for o in args.options)
        params = family.Params(root=args.root, **options)
        t0 = time.perf_counter()
        imageset = load_imageset(params, 32, use_cache=False)  # decoding at a small size still reads every file
    except (RegistryError, DatasetError, ValueError, TypeError, OSError) as e:  # file names may hold escape codes
        print(printable(f"error: {e}"), file=sys.stderr)
        return 2
    print(printable(f"{args.name} at {args.root}: {imageset.num_classes} classes, decoded in "
                    f"{time.perf_counter() - t0:.1f} s"))
    for split in ("train", "test"):
        s = getattr(imageset, split)
        print(f"  {split:5s} {len(s):7d} images  {len(np.unique(s.labels)):5d} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
