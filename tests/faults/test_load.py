"""The rollout service under several trainers' concurrent requests (bench/rollout_load.py with small numbers): no
answer dropped or mixed up (each checked token for token against its own request sent alone), and the service's
memory stays bounded. The thresholds are loose, for a shared two-core machine; the figures go to the summary at the
end of the test output, and bench/rollout_load.py with its defaults gives the real ones."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENTS, REQUESTS = 4, 12


def test_concurrent_trainers_each_get_their_own_answers_and_memory_stays_bounded(fault_summary):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "rollout_load.py"), "--clients", str(CLIENTS),
                             "--requests", str(REQUESTS), "--rounds", "2"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    fault_summary.extend(line for line in result.stdout.splitlines()[:-1] if not line.startswith("  "))
    for round_ in summary["rounds"]:
        assert round_["problems"] == []
        assert round_["requests"] == round_["sent"] == CLIENTS * REQUESTS
        assert round_["requests_per_s"] > 0.5 and round_["p99_s"] < 60
    before, first, second = summary["rss_mb"]
    assert first - before < 300, summary["rss_mb"]
    assert second - first < 50, summary["rss_mb"]  # what a second round adds would be a leak
    assert summary["service_exit_code"] == 0
