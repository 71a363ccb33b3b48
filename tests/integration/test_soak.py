"""The soak test at a CI size: a fleet ingest of 4,000 rows through four faults, one of each kind (a worker
killed, Redis restarted, Triton killed, the output disk filled), seeded; every row exactly once at the end.
Longer runs by hand: ``python -m tests.soak --rows 20000 --faults 20`` (docs/reliability.md has results)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_fleet_ingest_survives_a_seeded_fault_schedule(tmp_path):
    from tests.pipeline_support import need_services
    from tests.soak import run_soak

    need_services()
    # short gaps: the four faults (one of each kind, the schedule's first four) land before the job ends
    summary = run_soak(tmp_path / "soak", rows=4000, faults=4, seed=11, gap=(1.0, 2.0))
    print(summary)
    assert summary["rows_checked"] == 4000, summary
    kinds = ("kill_worker", "restart_redis", "kill_triton") + (("fill_disk",) if summary["disk_faults"] else ())
    assert all(summary["faults"][k] >= 1 for k in kinds), summary
    assert summary["attempts"][-1] == 0
