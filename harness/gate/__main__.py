"""python -m harness.gate: judge a run against its baseline, or record one (harness.gate.cli)."""

import sys

from harness.gate.cli import main

sys.exit(main())
