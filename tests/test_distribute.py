"""Teleport under MirroredStrategy with two logical CPU devices.

The strategy needs its devices configured before TensorFlow initialises
them, which this process has already done: the run happens in a subprocess
(tests/_mirrored_script.py) that prints its results as JSON.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "_mirrored_script.py")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, SCRIPT], capture_output=True, text=True, env=env,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [l for l in completed.stdout.splitlines()
             if l.startswith("RESULTS ")]
    assert len(lines) == 1, completed.stdout[-4000:]
    return json.loads(lines[0][len("RESULTS "):])


@pytest.mark.parametrize("name", ["sgd", "adam", "adam_curvature"])
def test_replicas_agree_and_match_single_device(results, name):
    r = results[name]
    assert r["replicas"] == 2
    assert r["components"] == 2
    # 64 examples, global batch 16, every=2: teleports at steps 0 and 2.
    assert r["iterations"] == 4
    assert r["teleports"] == 2 and r["rejected"] == 0
    assert r["single_teleports"] == 2
    assert r["same_start"] == 0.0
    assert r["moved"] > 1e-2
    # Every model weight and every optimizer variable (slots, records,
    # counters) holds one value on both replicas.
    assert r["weight_spread"] == 0.0
    assert r["state_spread"] == 0.0
    # And the same weights as on one device with the same global batch.
    assert r["vs_single"] <= 1e-5 * max(1.0, r["weight_scale"])
    assert abs(r["loss_mirrored"] - r["loss_single"]) <= 1e-5 * max(
        1.0, abs(r["loss_single"]))
