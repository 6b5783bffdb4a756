import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# --------------------------------------------------------------------------- fuzzing (tests/test_fuzz.py)

import pytest  # noqa: E402

FUZZ_SUMMARY = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("autotp fuzz", "property-based fuzzing of autotp.shard (tests/test_fuzz.py)")
    group.addoption("--fuzz-examples", type=int, default=None, metavar="N",
                    help="models per world size in tests/test_fuzz.py (default 150, the CI profile)")
    group.addoption("--fuzz-seed", type=int, default=0, metavar="S",
                    help="another deterministic draw of fuzz models (default 0)")
    group.addoption("--fuzz-shrink", action="store_true", default=False,
                    help="minimize each distinct fuzz failure before reporting it (slow)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped on CPU (bench/gpu_check.sh runs them: -m cuda)")


@pytest.fixture
def fuzz_summary(request) -> list:
    """Lines the fuzz test reports; printed at the end of the run whatever the capture mode."""
    return request.config.stash.setdefault(FUZZ_SUMMARY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(FUZZ_SUMMARY, [])
    if lines:
        terminalreporter.section("autotp fuzz")
        for line in lines:
            terminalreporter.write_line(line)
