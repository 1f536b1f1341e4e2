"""lmdistill.models.malloc: freed big blocks stay mapped for reuse (glibc), and the opt-out.

The setting is process-wide, so each case runs in a fresh Python process that allocates a
256 MiB tensor, writes it (so its pages are resident), frees it, and reports its resident
memory (VmRSS) before, while holding it, and after the free. glibc's default serves such a
block with mmap and unmaps it on free, so the memory goes back to the OS; with the tuning the
block comes from the heap and stays resident, ready for the next allocation of that size.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from lmdistill.errors import ConfigError
from lmdistill.models import malloc

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt thresholds are glibc's")

PROBE = r"""
import json, torch
from lmdistill.models.malloc import reuse_freed_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

applied = reuse_freed_memory()
again = reuse_freed_memory()
before = rss_mib()
x = torch.empty(256 * 2**20 // 4, dtype=torch.float32)
x.fill_(1.0)
held = rss_mib()
del x
after = rss_mib()
print(json.dumps({"applied": applied, "again": again, "before": before, "held": held, "after": after}))
"""


def run_probe(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != malloc.ENV}
    if setting is not None:
        env[malloc.ENV] = setting
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_block_stays_resident_by_default():
    r = run_probe(None)
    assert r["applied"] is True and r["again"] is True
    assert r["held"] - r["before"] > 200  # the 256 MiB block was written, so it is resident
    # Freed, it stays mapped: still resident (nothing else of this size was freed meanwhile).
    assert r["after"] - r["before"] > 200


@glibc_only
def test_system_setting_keeps_glibc_defaults():
    r = run_probe("system")
    assert r["applied"] is False
    assert r["held"] - r["before"] > 200
    # glibc's own behaviour: a block this big was an mmap, and its free returned it to the OS.
    assert r["after"] - r["before"] < 50


def test_unknown_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv(malloc.ENV, "jemalloc")
    monkeypatch.setattr(malloc, "_applied", None)
    with pytest.raises(ConfigError, match=r"LMDISTILL_CPU_MALLOC='jemalloc'.*'reuse'.*'system'"):
        malloc.reuse_freed_memory()


def test_cli_refuses_an_unknown_setting_before_any_work(monkeypatch, capsys):
    from lmdistill.cli import main

    monkeypatch.setenv(malloc.ENV, "tcmalloc")
    monkeypatch.setattr(malloc, "_applied", None)
    assert main(["eval", "smollm2-135m", "--task", "ppl:corpus=austen"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmdistill eval: error: LMDISTILL_CPU_MALLOC='tcmalloc': use 'reuse' (the default) or "
                   "'system' (glibc's own thresholds)"]
