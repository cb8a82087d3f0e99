"""Python scripts run as processes of their own, without paying for Python's and torch's start each time.

A test that needs a real process (to kill it with -9, to signal it, to run two of them side by side, to
run torchrun's ranks) would start ``python main.py``: a new interpreter importing torch and the toolkit
before the first line of the run (a --dry_run on this 2-core machine: 1.9 s so, 0.45 s forked from
here), 37 times in the suite. Here each process is forked from a server that imported them once
(multiprocessing's forkserver, one per pytest process): a process of its own (its PID, its exit status
or the signal that killed it, its own files, signals and locks), which runs the script as ``python
script.py ARGS`` would, as ``__main__`` with that ``sys.argv``, ``os.environ``, working folder and first
``sys.path`` entry, its standard output and error captured.

What differs from a new interpreter: modules come already imported (what the script imports at module
level runs once per server, so an environment variable read at import time keeps the server's value),
standard input is empty, and atexit handlers do not run. Tests of the start itself (what main.py imports
before answering --help) start a real ``python``.
"""
import multiprocessing
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref

PRELOAD = ['torch', 'torchvision', 'numpy', 'main', 'launch']


def _context():
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload(PRELOAD)
    return context


def _run_script(script, argv, environment, cwd, out_path, err_path):
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(handle, fd)
        os.close(handle)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a new interpreter
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name='__main__')


class Process:
    """``subprocess.Popen([sys.executable, script, *argv], env=env, cwd=cwd, stdout=PIPE, stderr=PIPE,
    text=True)``, forked from the server: ``pid``, ``poll``, ``wait``, ``communicate``, ``send_signal``,
    ``kill``, ``returncode`` (negative: the signal that ended it). ``stdout_path``, ``stderr_path``: files
    that take the output instead (as Popen's ``stdout=open(path, 'w')``; communicate then reads them)."""

    def __init__(self, script, argv=(), env=None, cwd=None, stdout_path=None, stderr_path=None):
        self.args = [sys.executable, script, *argv]
        folder = tempfile.mkdtemp(prefix='launch-')
        weakref.finalize(self, shutil.rmtree, folder, True)
        self._out = stdout_path or os.path.join(folder, 'out')
        self._err = stderr_path or os.path.join(folder, 'err')
        environment = dict(os.environ if env is None else env)
        self._process = _context().Process(target=_run_script, daemon=False, args=(
            os.path.abspath(script), list(argv), environment, cwd or os.getcwd(), self._out, self._err))
        self._process.start()
        self.pid = self._process.pid
        self.returncode = None

    def poll(self):
        if self.returncode is None and self._process.exitcode is not None:
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout=None):
        """(stdout, stderr) once the process has ended."""
        self.wait(timeout)
        outputs = []
        for path in (self._out, self._err):
            with open(path, encoding='utf-8', errors='replace') as f:
                outputs.append(f.read())
        return tuple(outputs)

    def send_signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.poll() is None:
            self.kill()
            self.wait()


def run(script, argv=(), env=None, cwd=None, timeout=None):
    """``subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, ...)``, forked
    from the server; a process past ``timeout`` is killed and TimeoutExpired raised, as subprocess does."""
    process = Process(script, argv, env=env, cwd=cwd)
    try:
        out, err = process.communicate(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
