"""benchmarks/faults.py keeps working: its cheap 'outputs' group runs through the real CLI here.

The whole battery (models, cache damage, kill -9) takes minutes and is run by hand
(``.venv/bin/python benchmarks/faults.py``); its cases are also covered one by one by the fault
tests (test_preflight, test_error_boundary, test_cache_integrity, test_crash_recovery,
test_reuse_integrity, test_garbage_*).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "faults.py"


def _faults():
    spec = importlib.util.spec_from_file_location("pathfm_faults", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_output_faults_are_clear_errors():
    faults = _faults()
    results = faults.run_battery(quick=True, only="outputs")
    assert len(results) >= 6
    table = faults.format_table(results)
    assert "0 traceback, 0 silent wrong" in table, table
    for r in results:
        assert r.outcome in ("clear error", "skipped"), (r.case, r.outcome, r.detail)
