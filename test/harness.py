"""test/harness.py: the small test harness the Python tests share.

Each test is a function named test_*; run_module() runs them in file order
(or those named on the command line) and prints one line each, "ok - name",
"FAIL - name: reason" or "skip - name: reason; to run it: fix", the lines
test/run_tests.sh counts. A test skips by raising Skip(reason, fix) (only
for missing optional data or tools, never to hide a failure; the fix says
what makes it run), and fails on any exception: a failed assert or an error
alike.
"""
import os
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Skip(Exception):
    def __init__(self, reason, fix):
        super().__init__(f"{reason}; to run it: {fix}")


def png_size(path):
    """(width, height, bytes) of a PNG a plotting script wrote; fails the test if it is missing or no PNG."""
    assert os.path.isfile(path), f"{path} was not written"
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), len(data)


def shared_data_dir():
    """$TRAIN_ET_SHARED_DATA, else ../shared/data beside the checkout."""
    return os.environ.get("TRAIN_ET_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")


SHARED_DATA_FIX = "put the shared test data there, or point TRAIN_ET_SHARED_DATA at it (README: Tests)"


def shared_file(name):
    """Path of a file of the shared test data, or Skip when it is absent."""
    path = os.path.join(shared_data_dir(), name)
    if not os.path.exists(path):
        raise Skip(f"no {path}", SHARED_DATA_FIX)
    return path


def run_module(namespace, only=()):
    """Runs the test_* functions of a module's namespace (those named in `only`, if any); returns the exit code."""
    tests = [name for name, fn in namespace.items() if name.startswith("test_") and callable(fn)]
    unknown = [name for name in only if name not in tests]
    if unknown:
        print(f"FAIL - {' '.join(unknown)}: no such test (there are: {' '.join(tests)})", flush=True)
        return 1
    failed = 0
    for name in tests:
        fn = namespace[name]
        if only and name not in only:
            continue
        try:
            fn()
            print(f"ok - {name}", flush=True)
        except Skip as s:
            print(f"skip - {name}: {s}", flush=True)
        except Exception as e:  # noqa: BLE001: every error is a failure to report
            failed += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            reason = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
            reason = " ".join(reason.split()) or "assertion failed"  # one line, whatever it quotes
            print(f"FAIL - {name}: {reason} (line {where.lineno})", flush=True)
    return 1 if failed else 0


def main(namespace):
    """python3 test/x.py [test_name ...]: every test of the module, or the named ones."""
    sys.exit(run_module(namespace, sys.argv[1:]))
