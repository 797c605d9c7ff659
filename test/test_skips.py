"""test/test_skips.py: every skip says how to run the test it skips.

On a fresh clone, before `pip install`, the tests that need tiktoken,
matplotlib or the shared test data skip. Each skip line must name its fix.
Here the Python tests run with `python3 -S` (no site-packages: tiktoken and
matplotlib are missing) and the shared data pointed at an empty folder, and
every skip they print must end in "; to run it: <fix>", the package ones
naming the requirements file to install.
"""
import os
import subprocess
import sys
import tempfile

from harness import REPO, main

FIX = "; to run it: "


def skips(command, empty):
    env = dict(os.environ, TRAIN_ET_SHARED_DATA=empty, PYTHONPATH=os.path.join(REPO, "test"))
    r = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert "FAIL - " not in r.stdout, f"{' '.join(command)}: {r.stdout[-1500:]}"
    return [line for line in r.stdout.splitlines() if line.startswith("skip - ")]


def test_every_skip_names_its_fix():
    with tempfile.TemporaryDirectory() as empty:
        lines = skips([sys.executable, "-S", "test/test_prepare.py"], empty)
        lines += skips([sys.executable, "-S", "test/test_plot_runs.py"], empty)
        lines += skips([sys.executable, "-S", "test/test_plot_routing.py"], empty)
        lines += skips([sys.executable, "-S", "test/test_sweep.py"], empty)
        lines += skips([sys.executable, "-S", "test/test_core_data.py"], empty)
        lines += skips([sys.executable, "-S", "test/test_cli.py", "test_real_shards_and_tokenizer"], empty)
        shard_tests = os.path.join(REPO, "build", "test_shard")
        assert os.path.exists(shard_tests), f"{shard_tests} is not built (make build/test_shard)"
        lines += skips([shard_tests], empty)
    assert len(lines) >= 20, f"only {len(lines)} skips: {lines}"
    for line in lines:
        assert FIX in line, f"no fix named: {line}"
        if "tiktoken" in line or "datasets" in line or "rustbpe" in line:
            assert line.endswith(FIX + "pip install -r data/requirements.txt"), line
        if "matplotlib" in line:
            assert line.endswith(FIX + "pip install -r dev/requirements.txt"), line
        if "shared" in line or empty in line:
            assert "TRAIN_ET_SHARED_DATA" in line, line


if __name__ == "__main__":
    main(globals())
