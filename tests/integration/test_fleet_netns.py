"""A job shared by several hosts, each a network namespace (tests/fleet.py): a broker host, worker hosts that
each run `fbas-pipeline serve` + `fbas-pipeline worker`, and a producer host. Mid-job one worker host dies
(every process killed), another joins, a third is cut off for longer than the visibility timeout and then
healed, and the broker host restarts from its append-only file. The oracle holds, and no part committed
before the cut-off host came back was replaced by its late results."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.pipeline_support import check_oracle, count_parts, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _parts(out: Path) -> dict[str, tuple[int, int]]:
    d = out / "vectors"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.glob("part-*.parquet")} if d.is_dir() else {}


def test_hosts_die_join_and_come_back_and_every_row_is_there_once(template_out, tmp_path, stsb_en_test):
    from tests.fleet import Fleet, available

    why = available()
    if why:
        pytest.skip(why)
    texts = [f"{a} ({i})" for i, (a, _, _) in enumerate(stsb_en_test * 2)][:2000]
    ids = [f"n{i}" for i in range(len(texts))]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus)
    with Fleet(tmp_path / "fleet", template_out / ".fbas" / "model") as fleet:
        fleet.start_broker()
        a, b = fleet.add_worker_host(), fleet.add_worker_host()
        out = fleet.out_root / "out"
        producer = fleet.run_producer(
            corpus, out, "--batch-rows", "16", "--visibility-timeout", "25", "--task-time-limit", "10"
        )
        wait_for(lambda: count_parts(out) >= 8, 240, "the first parts")
        fleet.kill_host(a)  # every process of host a, mid-batch
        c = fleet.add_worker_host()  # joins mid-job
        wait_for(lambda: count_parts(out) >= 20, 240, "host c to take work")
        fleet.restart_broker(down_s=2.0)  # from its append-only file, mid-job
        fleet.cut(b)
        time.sleep(30)  # longer than the visibility timeout: b's batches are handed to c meanwhile
        before_heal = _parts(out)
        fleet.heal(b)
        assert producer.wait(timeout=400) == 0, fleet.log(fleet.producer, "producer-0")[-3000:]
        said = fleet.log(fleet.producer, "producer-0")
        assert "stopped answering" in said and "answers again" in said, said[-3000:]
        manifest = check_oracle(out, ids)
        after = _parts(out)
        assert all(after[name] == key for name, key in before_heal.items()), "a committed part was replaced"
        assert "fbas.embed_batch" in fleet.log(c, "worker") and "succeeded" in fleet.log(c, "worker")
        assert manifest["counts"]["embedded"] == len(ids)
