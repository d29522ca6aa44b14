"""SIGTERM while a failed run writes its last words (mmgrpo.train.signals.last_words), in a fresh process each: a
signal handler is process state."""

import subprocess
import sys
import textwrap

SCRIPT = """
import os, signal, sys
from mmgrpo.train.signals import last_words, stop_on_signals

def step():
    with stop_on_signals():
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")

with last_words():
    try:
        {body}
    except RuntimeError:
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's, after the loop failed: here, before the message
        print("error: the paragraph", file=sys.stderr)
        sys.exit(2)
"""


def _run(body: str) -> subprocess.CompletedProcess:
    code = SCRIPT.format(body=textwrap.indent(body, " " * 8).strip())
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_sigterm_after_the_training_loop_failed_waits_for_the_message():
    """A launcher's SIGTERM (torchrun sends one to every process once one exits with an error) after the loop failed
    ended the process before it printed its paragraph and removed what it made (tests/core/test_distributed.py's
    stop test failed on 2026-12-07: rank 0 exit -15, no paragraph)."""
    proc = _run("step()")
    assert proc.returncode == 2, proc.stderr
    assert "error: the paragraph" in proc.stderr


def test_a_sigterm_anywhere_else_ends_the_process_as_before():
    """Outside a failed loop (loading the models, or an error raised before the loop), SIGTERM is not held."""
    proc = _run('raise RuntimeError("while loading")')
    assert proc.returncode == -15 and "the paragraph" not in proc.stderr, proc.stderr


def test_leaving_last_words_restores_the_handler_and_forgets_the_failure():
    code = """
import signal
from mmgrpo.train.signals import last_words, stop_on_signals
with last_words():
    try:
        with stop_on_signals():
            raise ValueError("boom")
    except ValueError:
        pass
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
with last_words():
    signal.raise_signal(signal.SIGTERM)  # a new command: not failing
print("not reached")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -15 and "not reached" not in proc.stdout, proc.stderr


def test_the_traceback_of_a_failed_run_is_printed_before_sigterm_is_restored():
    """``mmgrpo train --debug`` (or an error that is not mmgrpo's): the traceback printed after last_words ended, so
    a launcher's SIGTERM arriving while it printed killed the process mid-traceback (exit -15). The console script
    prints it inside and exits 1, as Python's own exit does."""
    code = """
import os, signal, sys
from mmgrpo.train import cli
from mmgrpo.train.signals import stop_on_signals

def failed_loop(argv):
    with stop_on_signals():
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")

class Stderr:  # torchrun's SIGTERM, as the traceback starts to print
    def __init__(self, real):
        self.real, self.sent = real, False
    def write(self, text):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return self.real.write(text)
    def flush(self):
        self.real.flush()

cli._main = failed_loop
sys.argv = ["mmgrpo", "train", "--debug"]
sys.stderr = Stderr(sys.stderr)
sys.exit(cli.main())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" in proc.stderr and "Connection closed by peer" in proc.stderr
