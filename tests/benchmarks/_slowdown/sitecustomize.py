"""Loaded by every Python process of a benchmark run whose PYTHONPATH holds this folder (tests/benchmarks/gate_noise.py
--slowdown F): it makes each training batch F times slower, by sleeping (F - 1) x the batch's own time before the
next one, without touching the harness's code. Ray's workers inherit the driver's environment, so the trials see it.
"""

import importlib.abc
import importlib.util
import os
import sys
import time

FACTOR = float(os.environ.get("FGVC_TEST_SLOWDOWN", "1") or 1)


def _slower(batches):
    def wrapped(self, *args, **kwargs):
        for item in batches(self, *args, **kwargs):
            start = time.perf_counter()
            yield item  # the caller trains on it
            if self.train:
                time.sleep((FACTOR - 1) * (time.perf_counter() - start))
    return wrapped


class _PatchEngine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "harness.engine.loop":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.BatchPipeline.batches = _slower(module.BatchPipeline.batches)
        spec.loader.exec_module = exec_module
        return spec


if FACTOR != 1:
    sys.meta_path.insert(0, _PatchEngine())
