"""The `fgvc` command (installed with the package), beside `python -m`:

    fgvc run studies/pmg_ablation.yaml [options]       = python -m harness.run ...
    fgvc report runs/<study>/<profile> [options]       = python -m harness.report ...
    fgvc gate RUN_DIR BASELINE [options]               = python -m harness.gate ...
    fgvc data check DATASET ROOT                       = python -m harness.data ...

`fgvc COMMAND --help` shows each command's options."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"run": "harness.run", "report": "harness.report.build", "gate": "harness.gate.cli",
            "data": "harness.data.__main__"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fgvc: no command {command!r}; the commands: {', '.join(COMMANDS)} (fgvc --help)", file=sys.stderr)
        return 2
    return int(importlib.import_module(COMMANDS[command]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
