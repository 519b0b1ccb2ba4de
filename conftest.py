"""pytest's hooks and shared fixtures for the tests of this folder."""
import signal
import socket
import time

import pytest


def pytest_collection_finish(session):
    """Before the first test runs, each collected test module with a start_ahead(items) starts what its tests will wait
    for: test_triton.py its offline kernel builds, which then run on the core the rest of the suite leaves idle."""
    if session.config.option.collectonly:
        return
    for module in {item.module for item in session.items if hasattr(item.module, "start_ahead")}:
        module.start_ahead(session.items)


@pytest.fixture(autouse=True, scope="session")
def child_tmpdir(tmp_path_factory):
    """The tests' child processes make their temporary files in this session's pytest folder (pytest keeps the last
    three sessions' folders and removes older ones), not in /tmp: torchrun's log folder (torchelastic_*, which torch
    never removes) and the temporary folder of a child a test kills were left there, 20 or more a run of the suite.
    pytest's own process keeps its temporary folder (tempfile chose it before this, from TMPDIR as it was)."""
    folder = tmp_path_factory.mktemp("tmpdir", numbered=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def python_ctrl_c():
    """engine.cli, called in a test, leaves Ctrl-C at SIGINT's default action (as a script's exit needs: it ends the
    process); after each test pytest's process gets the handler it had back (Python's, so that Ctrl-C stops pytest
    with its summary; or SIGINT ignored, as a script's background pytest has it)."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture
def recording_bar():
    """A stand-in for tqdm in a trainer (monkeypatch it in): the class; its `updates` get (steps done, the label
    shown) at each update of a bar, this test's only."""
    class RecordingBar:
        updates = []

        def __init__(self, iterable=None, initial=0, **kwargs):
            self.iterable, self.n, self.label = iterable, initial, ""

        def __iter__(self):  # an evaluation loop's bar
            return iter(self.iterable)

        def set_description(self, label, refresh=True):
            self.label = label

        def update(self, n=1):
            self.n += n
            self.updates.append((self.n, self.label))

        def set_postfix(self, **kwargs):
            pass

        def write(self, text):
            print(text)

        def close(self):
            pass

    return RecordingBar


@pytest.fixture
def run_two_gloo_ranks():
    """A function: run_two_gloo_ranks(worker, folder, timeout_s=120) runs worker(rank, 2, port, str(folder)) in two
    spawned processes over gloo on a free port; the test fails after timeout_s (a hang) or where a worker raised."""
    def run(worker, folder, timeout_s=120):
        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        workers = mp.spawn(worker, args=(2, port, str(folder)), nprocs=2, join=False)
        deadline = time.monotonic() + timeout_s
        while not workers.join(timeout=1):  # raises if a worker failed
            if time.monotonic() > deadline:
                for process in workers.processes:
                    process.kill()
                pytest.fail(f"the two gloo processes did not finish within {timeout_s} s")
    return run
