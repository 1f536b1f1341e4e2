"""benchmarks/peers.py's measuring parts on real processes: peak memory two ways, the kill past
a memory limit, step times read from a real run's metrics, and the summary's ratios."""

from __future__ import annotations

import json
import sys

import pytest

from .helpers import load_benchmark

peers = load_benchmark("peers")
MB = 2**20

# A child that holds ``n`` MB of touched memory for a while, growing in 50 MB steps.
HOLD = """
import sys, time
blocks = []
for _ in range(int(sys.argv[1]) // 50):
    blocks.append(bytearray(50 * 2**20))  # zero-filled: every page touched
    time.sleep(0.05)
time.sleep(float(sys.argv[2]))
"""


def test_peak_memory_is_seen_by_sampling_and_by_the_high_water_mark(tmp_path):
    measured = peers.run_measured([sys.executable, "-c", HOLD, "300", "1.0"], log=tmp_path / "log")
    assert measured.returncode == 0 and measured.killed_over is None
    # The interpreter adds ~10-30 MB; 300 MB held for a second is seen by the 0.25 s sampler.
    assert 300 * MB <= measured.sampled_peak_rss <= measured.vm_hwm < 400 * MB


def test_a_process_past_the_memory_limit_is_killed_and_reported(tmp_path):
    measured = peers.run_measured([sys.executable, "-c", HOLD, "1000", "30"], log=tmp_path / "log",
                                  max_rss=200 * MB)
    assert measured.returncode == -9  # SIGKILL, long before its 30 s sleep ends
    assert 200 * MB < measured.killed_over <= measured.vm_hwm < 1000 * MB


def test_step_times_come_from_the_step_rows_of_metrics(tmp_path):
    rows = [{"step": 0, "val_ppl": 50.0, "elapsed_s": 0.5},
            {"step": 1, "loss": 3.0, "tokens_per_s": 10.0, "elapsed_s": 4.0},
            {"step": 2, "loss": 2.9, "tokens_per_s": 20.0, "elapsed_s": 6.0},
            {"step": 3, "loss": 2.8, "tokens_per_s": 18.0, "elapsed_s": 8.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    ends = peers.lmdistill_step_ends(tmp_path)
    assert ends == [4.0, 6.0, 8.5]
    measured = peers.Measured(0, 0, 0, step_ends=ends)
    assert measured.step_seconds == pytest.approx([2.0, 2.5])  # the first (warm-up) step left out


def test_summary_takes_medians_over_rounds_and_ratios_to_trl():
    def run(system, round_, rate, hwm, code=0, killed=None):
        return {"shape": "s", "system": system, "round": round_, "tokens_per_s": rate, "sampled_peak_rss": hwm,
                "vm_hwm": hwm, "returncode": code, "killed_over": killed}

    runs = [run("lmdistill", 1, 180.0, 3 * 2**30), run("trl", 1, 150.0, 5 * 2**30),
            run("lmdistill", 2, 170.0, 3.5 * 2**30), run("trl", 2, 130.0, 4 * 2**30),
            run("lmdistill", 3, 200.0, 3 * 2**30), run("trl", 3, None, 21 * 2**30, -9, 20.5 * 2**30),
            run("lmdistill-cache", 1, 300.0, 2 * 2**30)]
    rows = {row["system"]: row for row in peers.summarize(runs, {"s": 1e9, "s/lmdistill-cache": 0.5e9}, peak=250e9)}
    lmd, trl = rows["lmdistill"], rows["trl"]
    assert lmd["tokens_per_s"] == 180.0 and trl["tokens_per_s"] == 140.0  # medians of what finished
    assert lmd["speed_vs_trl"] == pytest.approx(180 / 140)
    assert lmd["fraction_of_limit"] == pytest.approx(180e9 / 250e9) and lmd["limit_tokens_per_s"] == 250.0
    assert trl["failed"] == ["round 3: killed at 20.5 GiB RSS"]
    cache = rows["lmdistill-cache"]  # its own FLOPs per token: the step without the teacher forward
    assert cache["limit_tokens_per_s"] == 500.0 and cache["fraction_of_limit"] == pytest.approx(0.6)
    assert cache["speed_vs_trl"] == pytest.approx(300 / 140)
    assert lmd["rss_vs_trl"] is None  # no memory ratio against a run that did not finish
    table = "\n".join(peers.format_rows(list(rows.values()), 250e9))
    assert "| s | lmdistill | 180.0 (180.0 / 170.0 / 200.0) | 1.29 | 180.0 | 72% | 3.50 GiB |" in table
