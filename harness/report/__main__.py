"""python -m harness.report: rebuild a run's report, or compare runs (harness.report.build)."""

import sys

from harness.report.build import main

sys.exit(main())
