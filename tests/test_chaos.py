"""The chaos soak, three minutes of it (`python -m bench chaos`): three
namespace hosts while a client places, chats and deletes, with runners and
daemons killed, daemons restarted and links cut at random. Every invariant
holds all along; a failure names the seed to repeat it with."""

import json
import random
import subprocess
import sys

from .conftest import REPO
from .netns import child_run, leftover_namespaces


def test_three_minutes_of_chaos_break_no_invariant():
    seed = random.SystemRandom().randrange(2**31)
    env, run = child_run()
    proc = subprocess.run([sys.executable, "-m", "bench", "chaos", "--minutes", "3", "--seed", str(seed)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    report = json.loads(proc.stdout)
    assert report["seed"] == seed
    assert proc.returncode == 0 and report["ok"], f"seed {seed}: {report.get('broken')}\n{proc.stderr[-3000:]}"
    counts = report["counts"]
    # It really did place, chat and inject faults.
    assert counts.get("place", 0) >= 5 and counts.get("chat", 0) >= 5, counts
    assert sum(counts.get(k, 0) for k in ("kill runner", "kill daemon", "restart daemon", "cut link")) >= 5, counts
    assert not leftover_namespaces(run)
