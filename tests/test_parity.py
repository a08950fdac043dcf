"""Faithfulness to the published Ovis-U1: every golden case the parity kit's data holds (tests/parity).

golden/ is what the published implementation computed on a small checkpoint its own classes wrote
(release-style config.json, two shards, preprocessor config, tokenizer); check_golden.py rebuilds each
quantity with this package's public functions and compares at the kit's tolerances. One subprocess, so the
checker's global settings (no grad, warnings off) stay out of the other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent / "parity"


def test_every_golden_case_matches_the_published_implementation(tmp_path):
    rows = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(HERE / "check_golden.py"), "--json", str(rows), "--threads", "1"],
                         capture_output=True, text=True, cwd=HERE.parent.parent, timeout=900)
    assert rows.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(rows.read_text())
    failed = [f"{r['case']}: {r['name']} {r.get('detail', '')}" for r in report["rows"]
              if not r["ok"] and not r["info"]]
    assert not failed, "\n".join(failed)
    summary = report["summary"]
    assert summary["cases"] >= 43 and not summary["workaround_load"], summary
