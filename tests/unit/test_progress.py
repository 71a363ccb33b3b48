"""IngestProgress: plain lines off a terminal, rates from this run's work only, right from the first update."""

from __future__ import annotations

import time

from pipeline.ingest.progress import IngestProgress


def _counters(docs: int, tokens: int, quarantined: int = 0) -> dict[str, int]:
    return {"docs": docs, "tokens": tokens, "quarantined": quarantined}


def test_lines_report_this_runs_rate_and_never_the_resumed_work(capsys):
    p = IngestProgress(1000, mode="lines", interval=0.0)
    p.update(_counters(400, 40_000))  # finished by an earlier run: the start, not speed
    first = capsys.readouterr().err
    assert "embedding: 400/1,000 docs (40%)" in first and "docs/s" not in first
    p.start()
    time.sleep(0.2)
    p.update(_counters(500, 50_000, quarantined=10))
    line = capsys.readouterr().err.strip()
    assert line.startswith("embedding: 510/1,000 docs (51%), ")
    rate = float(line.split(", ")[1].split()[0].replace(",", ""))
    tok = float(line.split(", ")[2].split()[0].replace(",", ""))
    assert 110 / 0.2 / 3 < rate <= 110 / 0.2 and 10_000 / 0.2 / 3 < tok <= 10_000 / 0.2
    assert "ETA" in line
    assert p.done_this_run == 110
    p.close()
    assert "510/1,000" in capsys.readouterr().err


def test_a_resumed_run_with_nothing_to_do_reports_no_rate(capsys):
    p = IngestProgress(50, mode="lines", interval=0.0)
    p.update(_counters(50, 900))
    p.start()
    p.update(_counters(50, 900))
    p.close()
    err = capsys.readouterr().err
    assert "50/50 docs (100%)" in err and "docs/s" not in err and p.done_this_run == 0


def test_off_prints_nothing(capsys):
    p = IngestProgress(10, mode="off")
    p.start()
    p.update(_counters(5, 50))
    p.close()
    assert capsys.readouterr().err == ""


def test_steps_name_each_one_off_step_its_progress_and_its_time(capsys):
    from pipeline.ingest.progress import Steps

    s = Steps()
    s.begin("building the model")
    s.tick("calibrating int8, layers", 1, 6, every=0.0)
    s.tick("calibrating int8, layers", 6, 6, every=60.0)  # the end is always said
    s.end("building the model", "fingerprint f00")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "fbas: building the model ..."
    assert err[1:3] == ["fbas: calibrating int8, layers: 1/6", "fbas: calibrating int8, layers: 6/6"]
    assert err[3].startswith("fbas: building the model: done in ") and err[3].endswith("s, fingerprint f00")
    Steps(enabled=False).begin("quiet")
    assert capsys.readouterr().err == ""
