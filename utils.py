"""Small shared helpers: seeding, atomic JSON and checkpoint I/O (checksums verified on load), file
locks, stop signals, test kill points, meters, and the process group of a torchrun launch."""
import contextlib
import datetime
import errno
import inspect
import json
import math
import os
import platform
import random
import secrets
import signal
import socket
import sys
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn

from flags import UsageError, env_rank, first_line, launched_by_torchrun

try:
    import fcntl
except ImportError:  # not a POSIX system: runs go unlocked (FileLock.acquire says so)
    fcntl = None


class StorageError(Exception):
    """A file of the run could not be written (disk full, I/O error): the previous version of the file
    is intact; main.py prints the message as one line and exits with 1."""

    def __init__(self, path, error):
        name = errno.errorcode.get(error.errno, '') if isinstance(error, OSError) and error.errno else ''
        reason = (error.strerror if isinstance(error, OSError) and error.strerror else str(error)) or type(error).__name__
        super().__init__(f'cannot write {path}: {reason}{f" ({name})" if name else ""}')
        self.path, self.error = path, error


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*values):
    """A 63-bit seed mixed from integers (numpy's SeedSequence): (seed, epoch) pairs never collide
    the way ``seed + epoch`` does (seed 0's epoch 2 would be seed 1's epoch 1)."""
    entropy = [int(value) % 2**64 for value in values]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def get_rng_state():
    """RNG states as tensors and plain types, loadable with torch.load(weights_only=True)."""
    numpy_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  *numpy_state[2:]],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    python_state = state['python']
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


TEMPORARY_PREFIX = '.tmp-'
KILL_AT_VARIABLE = 'TOOLKIT_TEST_KILL_AT'


class _KillPoints:
    """Test hook: ``TOOLKIT_TEST_KILL_AT=NAME:N[:SIGNAL[:RANK]][,...]`` sends this process (of torchrun
    rank RANK only, if given) SIGKILL (or SIGNAL, e.g. TERM) the N-th time it reaches the point NAME (``step``: inside a training step, after its
    backward pass; ``evaluate``: after an evaluation batch; ``checkpoint_write``: checkpoint.pth's
    temporary file written, not yet renamed; ``after_log``: log.json written, the checkpoint not yet),
    so that tests can kill or stop a real run anywhere. Unset (always, outside tests): one lookup."""

    def __init__(self):
        self.counts = {}

    def __call__(self, name):
        spec = os.environ.get(KILL_AT_VARIABLE)
        if not spec:
            return
        self.counts[name] = count = self.counts.get(name, 0) + 1
        for item in spec.split(','):
            point, at, signal_name, rank = (item.split(':') + ['', '', ''])[:4]
            if point == name and count == int(at or 1) and (not rank or int(rank) == env_rank()):
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), getattr(signal, f'SIG{signal_name}') if signal_name else signal.SIGKILL)


kill_point = _KillPoints()


def test_nonfinite_steps():
    """Test hook: the global step numbers (1-based) listed in ``TOOLKIT_TEST_NONFINITE_STEPS`` get a NaN loss."""
    spec = os.environ.get('TOOLKIT_TEST_NONFINITE_STEPS', '')
    return {int(item) for item in spec.split(',') if item.strip()}


def signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f'signal {signum}'


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write: torch.save reports a failed write of
    its zip writer as a RuntimeError, and the cause (a full disk) would be lost."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self):
        self.file.flush()


def _atomic_write(path, write, kill_point_name=None):
    """Write to a temporary file in the same folder, flush it to the disk, then rename it over ``path``.

    The previous ``path`` stays intact until the new one is complete: a process killed at any point
    leaves either the old or the new file (and perhaps a ``.tmp-*`` file, which
    :func:`remove_temporaries` cleans up). A failed write (disk full, I/O error) raises
    :class:`StorageError` naming ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = None
    try:
        handle, tmp_path = _create_temporary(directory, os.path.basename(path))
        with os.fdopen(handle, 'wb') as f:
            recording = _RecordingFile(f)
            try:
                write(recording)
                f.flush()
                if kill_point_name:
                    kill_point(kill_point_name)  # the temporary file written, not yet renamed
                os.fsync(f.fileno())
            except Exception as error:
                if recording.error is not None:
                    raise recording.error from error
                raise
        os.replace(tmp_path, path)
        tmp_path = None
        _fsync_directory(directory)
    except OSError as error:
        raise StorageError(path, error) from None
    finally:
        if tmp_path is not None and os.path.exists(tmp_path):
            with contextlib.suppress(OSError):
                os.remove(tmp_path)


def temporary_path(directory, suffix):
    """A new name in ``directory`` for a file being written: TEMPORARY_PREFIX, a random part, ``suffix``
    (``--resume`` deletes such files that a killed run left)."""
    return os.path.join(directory, f'{TEMPORARY_PREFIX}{secrets.token_hex(4)}{suffix}')


def _create_temporary(directory, suffix):
    """A new ``.tmp-*`` file in ``directory``, open for writing: (descriptor, path).

    Created as ``open()`` creates a file, with mode 0666 less the umask (and the folder's default
    ACL), which the rename then gives the run's file; ``tempfile.mkstemp`` makes it 0600, so that
    no one else in the group could read a run's results. The kernel applies the umask as it creates
    the file: at no moment is it more open than the umask allows.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_CLOEXEC', 0) | getattr(os, 'O_NOFOLLOW', 0)
    for _ in range(100):
        path = temporary_path(directory, suffix)
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, 'no free temporary file name', directory)


def _fsync_directory(directory):
    """Make a rename in ``directory`` durable (a power loss after it keeps the new file)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(handle)


def remove_temporaries(directory):
    """Delete the ``.tmp-*`` files an interrupted :func:`_atomic_write` left in ``directory``."""
    removed = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.startswith(TEMPORARY_PREFIX):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))
                removed.append(name)
    return removed


def finite_or_none(obj):
    """``obj`` with NaN and infinite floats replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(value) for value in obj]
    return obj


def save_json(obj, path):
    """Atomically write ``obj`` as indented JSON; unknown types (torch versions, devices) as str,
    non-finite numbers as null."""
    text = json.dumps(finite_or_none(obj), indent=2, default=str, allow_nan=False) + '\n'
    _atomic_write(path, lambda f: f.write(text.encode()))


def load_json(path, what='file', source=None):
    """The JSON value in ``path``; a file that is missing, unreadable or not JSON is one UsageError starting
    with ``source`` (default: ``what`` and the path)."""
    source = source or f'{what} {path}'
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f'{source}: no such file') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f'{source}: not valid JSON ({error})') from None
    except RecursionError:
        raise UsageError(f'{source}: nested deeper than this reader follows (Python\'s recursion limit, '
                         f'{sys.getrecursionlimit()} levels)') from None
    except (OSError, ValueError) as error:  # a folder, no permission, an I/O error, a NUL in the name
        raise UsageError(f'{source}: cannot read it ({getattr(error, "strerror", None) or error})') from None


def _torch_save(obj, f):
    """torch.save with the CRC-32 of every record of its zip archive written (torch's default, which
    ``torch.utils.serialization.config.save.compute_crc32`` can turn off): :func:`load_checkpoint`
    verifies them."""
    config = getattr(getattr(getattr(torch.utils, 'serialization', None), 'config', None), 'save', None)
    if config is None or getattr(config, 'compute_crc32', True):
        return torch.save(obj, f)
    config.compute_crc32 = True
    try:
        torch.save(obj, f)
    finally:
        config.compute_crc32 = False


def save_checkpoint(state, path):
    _atomic_write(path, lambda f: _torch_save(state, f), kill_point_name='checkpoint_write')


def save_weights(state_dict, path):
    """A state_dict (model_state.pth), atomically like a checkpoint."""
    _atomic_write(path, lambda f: _torch_save(state_dict, f))


def keep_previous(path, previous):
    """Make ``previous`` a second name (a hard link) of the file ``path`` before ``path`` is replaced, so that
    the version before the next one stays readable; the old ``previous`` goes in the same rename. Costs
    no copy. Nothing happens where ``path`` does not exist or the file system has no hard links (the
    old ``previous``, if any, stays)."""
    directory = os.path.dirname(os.path.abspath(path))
    link = temporary_path(directory, os.path.basename(previous))
    with contextlib.suppress(OSError):
        if os.path.samefile(path, previous):  # linked before a write that did not happen (a kill, a full disk)
            return True
    try:
        os.link(path, link, follow_symlinks=False)
    except OSError:
        return False
    try:
        os.replace(link, previous)  # a kill before it leaves a .tmp-* link, which remove_temporaries deletes
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            if os.path.lexists(link):  # rename() of two names of one file does nothing
                os.remove(link)


class DamagedFile(UsageError):
    """A file whose bytes no longer match the checksums written with them."""


def verify_checksums(path):
    """Check every record of the torch.save archive ``path`` (a zip: the pickled structure and each tensor
    storage) against the CRC-32 that torch's writer stored for it; raise :class:`DamagedFile` naming the
    first record that differs. torch.load itself never checks them, so a flipped bit in a tensor would
    load as a wrong weight. Files without checksums are not verified: the legacy (non-zip) format, and
    records written with ``compute_crc32`` off (stored as 0). Reads the file once more (CRC-32 runs at
    gigabytes per second)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip archive (the legacy format, or garbage): torch.load judges it
    with archive:
        for info in archive.infolist():
            if info.CRC == 0:
                continue
            try:
                with archive.open(info) as member:
                    while member.read(1 << 24):
                        pass
            except Exception as error:  # BadZipFile (a CRC), or a damaged header: zlib.error, EOFError, ...
                record = info.filename.split('/', 1)[-1]
                found = ('do not match the CRC-32 written with them' if 'CRC' in str(error) else
                         f'cannot be read ({type(error).__name__}: {str(error)[:120]})')
                raise DamagedFile(f'checkpoint {path} is damaged: the bytes of its record {record} {found} '
                                  f'(changed on the disk or in a copy)') from None


def load_checkpoint(path, map_location='cpu'):
    """Load a checkpoint as data only (weights_only=True): a checkpoint is never code. Its checksums are
    verified first (:func:`verify_checksums`): a damaged file is refused, not loaded."""
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path}: no such file')
    verify_checksums(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, garbage bytes, or a pickle with code in it
        raise UsageError(f'checkpoint {path} is corrupt or not a checkpoint '
                         f'({type(error).__name__}: {first_line(error, 200)})') from None


class LockHeld(Exception):
    """Another process holds the lock: ``holder`` names it ('PID 1234', 'PID 1234 on host gpu7')."""

    def __init__(self, path, holder):
        super().__init__(f'{path}: locked by {holder}')
        self.path, self.holder = path, holder


class FileLock:
    """An exclusive advisory lock (flock(2)) on the file ``path``, which holds the holder's PID and host.

    The kernel drops the lock when its process dies, however it dies (kill -9 included): a file left by
    a dead holder blocks nothing, the next :meth:`acquire` takes it and writes its own PID. Only
    processes that ask for the lock are kept out; the lock guards nothing else.
    """

    def __init__(self, path):
        self.path, self.fd, self.created = path, None, False

    @property
    def held(self):
        return self.fd is not None

    def acquire(self):
        """Take the lock, creating the file if there is none: True once held, False where this system or
        file system has no such locks (then nothing is held and nothing left behind). Raises
        :class:`LockHeld` if another process holds it, OSError if the file cannot be created or opened."""
        if fcntl is None:
            return False
        flags = os.O_RDWR | getattr(os, 'O_CLOEXEC', 0) | getattr(os, 'O_NOFOLLOW', 0)
        for _ in range(100):
            created = False
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, flags)
                except FileNotFoundError:
                    continue  # its holder removed it as it finished
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise LockHeld(self.path, holder) from None
            except OSError:  # ENOLCK, EOPNOTSUPP: a file system without locks
                os.close(fd)
                if created:
                    with contextlib.suppress(OSError):
                        os.remove(self.path)
                return False
            if not self._names(fd):  # removed (or replaced) by its last holder between our open and flock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f'{os.getpid()} {socket.gethostname()}\n'.encode(), 0)
            self.fd, self.created = fd, created
            return True
        raise OSError(errno.EAGAIN, 'the lock file kept being replaced', self.path)

    def _names(self, fd):
        """True if ``self.path`` still names the file open as ``fd``."""
        try:
            on_disk = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        mine = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

    @staticmethod
    def _holder(fd):
        """'PID 1234' (and ' on host NAME' if not this one) from the holder's file; it writes them just after
        taking the lock, so an empty file is read again for up to a second."""
        for _ in range(20):
            words = os.pread(fd, 200, 0).decode('utf-8', 'replace').split()
            if words:
                host = f' on host {words[1]}' if len(words) > 1 and words[1] != socket.gethostname() else ''
                return f'PID {words[0]}{host}'
            time.sleep(0.05)
        return 'a process that did not write its PID'

    def release(self, remove=False):
        """Drop the lock; ``remove``: delete the file first (while still holding it, so that no process
        takes a lock on a file that is about to go). Safe to call when not held."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if remove:
                with contextlib.suppress(OSError):
                    os.remove(self.path)
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: forked workers may share the open file
        finally:
            os.close(fd)


class StopSignals:
    """SIGTERM and SIGINT, as a cluster scheduler (before preemption) or Ctrl-C sends them, while the
    block runs: the first one only sets ``signum`` (the training loop reads it after each step, a
    Python attribute, no device sync), so that the run finishes its step, writes a checkpoint and
    exits with 128 + signal; a second one exits at once (status 128 + signal, without a checkpoint:
    the last complete one stays). Outside the main thread (where Python cannot take signals) it does
    nothing."""

    SIGNALS = ('SIGTERM', 'SIGINT')

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            os.write(2, f'{signal_name(signum)} again: stopping at once; checkpoint.pth keeps the last '
                        f'complete checkpoint\n'.encode())
            os._exit(128 + signum)
        self.signum = signum

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        return False


def set_threads(threads, device, dist=None):
    """Set the threads of torch's CPU operators and return their number: ``threads`` if given; else
    OMP_NUM_THREADS if set (torch has read it); else, on a CPU device, the cores this process may use
    (its CPU affinity), shared among this machine's ranks, less the cores other work keeps busy
    (:func:`busy_cores`), at least 1. More threads than idle cores make OpenMP's threads wait for each
    other: a ResNet epoch ran 5.7 times slower with the default threads than with one on a loaded 2-core
    machine. On a GPU the operators' threads hardly matter: torch's default stays."""
    if threads is None and 'OMP_NUM_THREADS' not in os.environ and device.type == 'cpu':
        cpus = os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else set(range(os.cpu_count() or 1))
        ranks = dist.local_world_size if dist is not None else 1
        threads = max(1, min(len(cpus) // ranks, round(len(cpus) - busy_cores(cpus))))
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def busy_cores(cpus, interval=0.2):
    """How many of the cores ``cpus`` other work keeps busy now: their share of non-idle time over
    ``interval`` seconds (Linux's /proc/stat; this process sleeps meanwhile). Elsewhere the load average,
    a mean over the last minute, in which the run just before this one (a seed loop's) still counts."""
    try:
        idle_before, total_before = cpu_times(cpus)
        time.sleep(interval)
        idle, total = cpu_times(cpus)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.0
    if total <= total_before:
        return 0.0
    return len(cpus) * (1 - (idle - idle_before) / (total - total_before))


def cpu_times(cpus, path='/proc/stat'):
    """(idle, total) clock ticks of the cores ``cpus`` since boot, from the ``cpuN`` lines of /proc/stat
    (user nice system idle iowait irq softirq steal; waiting for I/O counts as idle)."""
    idle = total = 0
    with open(path) as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith('cpu') and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(value) for value in fields[:8]]
                idle += ticks[3] + ticks[4]
                total += sum(ticks)
    if not total:
        raise ValueError(f'{path}: no line of the cores {sorted(cpus)}')
    return idle, total


def environment_info(device):
    info = {
        'python': sys.version.split()[0],
        'platform': platform.platform(),
        'torch': torch.__version__,
        'cuda': torch.version.cuda,
        'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        'device': str(device),
    }
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
        info['gpu_count'] = torch.cuda.device_count()
    return info


class DeviceTimer:
    """Seconds of the work queued on ``device`` since it was made: on a GPU between two CUDA events
    (what airbench and the leaderboards time), elsewhere on the host clock.

    Making it records the start event behind the work already queued (no synchronization);
    :meth:`elapsed` records an end event and waits for it, so it is read where the host may wait:
    at the end of an epoch or an evaluation, before a checkpoint.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == 'cuda'
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def elapsed(self):
        if not self.cuda:
            return time.perf_counter() - self._start
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self._start.elapsed_time(end) / 1000


class AverageMeter:
    """Running sample-weighted mean."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def update(self, value, n=1):
        # value may be a device tensor: summing it without .item() keeps the GPU queue full.
        self.total = self.total + value * n
        self.count += n

    @property
    def average(self):
        return float(self.total) / max(self.count, 1)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a run: rank, number of ranks, rank on its machine, and the
    collective operations main.py needs, which do nothing in a single process (``backend`` None)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = None
    local_world_size: int = 1  # the ranks on this machine

    @property
    def enabled(self):
        return self.backend is not None

    @property
    def is_main(self):
        return self.rank == 0

    def print(self, *values, **kwargs):
        """print() on rank 0 only: progress and results appear once however many ranks run."""
        if self.is_main:
            print(*values, **kwargs)

    def all_reduce_sum_(self, tensor):
        if self.enabled:
            torch_dist.all_reduce(tensor)
        return tensor

    def all_reduce_max_(self, tensor):
        if self.enabled:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return tensor

    def all_gather_object(self, value):
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size
        torch_dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value):
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    @torch.no_grad()
    def broadcast_tensors_(self, tensors):
        """Overwrite ``tensors`` with rank 0's, one flat broadcast per dtype and device."""
        if not self.enabled:
            return
        groups = {}
        for tensor in tensors:
            groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        for group in groups.values():
            flat = torch.cat([tensor.reshape(-1) for tensor in group])
            torch_dist.broadcast(flat, src=0)
            for tensor, value in zip(group, flat.split([tensor.numel() for tensor in group])):
                tensor.copy_(value.view_as(tensor))

    def run_on_main(self, function):
        """``function()`` on rank 0 only (a check or a read of the run directory); its result, or
        the UsageError it raised, reaches every rank, so that all of them go on or all exit."""
        result, error = None, None
        if self.is_main:
            try:
                result = function()
            except UsageError as raised:
                error = str(raised)
        if self.enabled:
            result, error = self.broadcast_object((result, error))
        if error is not None:
            raise UsageError(error)
        return result

    @contextlib.contextmanager
    def agree(self):
        """A UsageError that any rank raises inside the block is raised on every rank at its end
        (prefixed with the rank that found it), so that bad input seen by one rank (a dataset
        missing on one machine) stops all of them with exit status 2. The block must not itself
        communicate: the ranks meet once, at its end."""
        if not self.enabled:
            yield
            return
        error = None
        try:
            yield
        except UsageError as raised:
            error = str(raised)
        errors = self.all_gather_object(error)
        for rank, message in enumerate(errors):
            if message is not None:
                raise UsageError(message if rank == 0 else f'rank {rank}: {message}')


SINGLE_PROCESS = Distributed()


def is_collective_failure(error):
    """True for the error a rank gets when another rank died or stopped answering in a collective
    operation (gloo: connection closed by peer, timed out; NCCL: a DistBackendError)."""
    if isinstance(error, getattr(torch_dist, 'DistError', ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in (
        'Connection closed by peer', 'Connection reset by peer', 'Timed out waiting', 'NCCL communicator was aborted',
        'ProcessGroupNCCL', 'ProcessGroupGloo'))


def close_distributed():
    """Leave the process group, if this process joined one."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def resolve_device(name):
    """--device: ``name`` (cpu, cuda, cuda:N, ...), or CUDA where there is one and else the CPU for None."""
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: CUDA is not available on this machine')
    return device


def init_distributed(device, backend='auto', timeout_s=600, environ=None):
    """The Distributed of this process and the device it trains on.

    Outside torchrun: a single process on ``device``. Under torchrun (its RANK, WORLD_SIZE and
    LOCAL_RANK variables; no --local_rank flag): joins the process group with NCCL on GPUs and gloo
    on CPUs (``backend='auto'``), each rank on cuda:LOCAL_RANK. A collective that waits longer than
    ``timeout_s`` raises (gloo) or aborts the process (NCCL's watchdog), so a rank that stops
    answering ends the job even where no launcher kills the others. Every check here depends on the
    command line and the machine only, so all ranks fail it alike (exit status 2 everywhere).
    """
    environ = os.environ if environ is None else environ
    if not launched_by_torchrun(environ):
        if backend != 'auto':
            raise UsageError(f'--dist_backend {backend}: needs a distributed launch '
                             f'(torchrun --nproc_per_node N main.py ...)')
        return SINGLE_PROCESS, device
    rank, world_size = int(environ['RANK']), int(environ['WORLD_SIZE'])
    local_rank = int(environ['LOCAL_RANK'])
    local_world_size = int(environ.get('LOCAL_WORLD_SIZE', 1))
    if device.type == 'cuda':
        if device.index is not None:
            raise UsageError(f'--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device '
                             f'cuda (and choose GPUs with CUDA_VISIBLE_DEVICES)')
        if local_world_size > torch.cuda.device_count():
            raise UsageError(f'torchrun started {local_world_size} processes on this machine but it has '
                             f'{torch.cuda.device_count()} GPU(s); use --nproc_per_node {torch.cuda.device_count()}')
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if backend == 'auto':
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if backend == 'nccl' and device.type != 'cuda':
        raise UsageError(f'--dist_backend nccl needs GPUs, but the device is {device}; '
                         f'CPU ranks communicate with --dist_backend gloo (the default on CPU)')
    if not torch_dist.is_available() or not getattr(torch_dist, f'is_{backend}_available')():
        raise UsageError(f'--dist_backend {backend}: not available in this torch build')
    torch_dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Distributed(rank, world_size, local_rank, backend, local_world_size), device


def check_same_settings(dist, settings, machine_local=()):
    """Every rank must run the same command: a setting that differs between ranks (an --outdir per
    rank, a different --seed) is bad input on all of them. ``machine_local`` settings (paths that
    may differ between machines) are not compared."""
    if not dist.enabled:
        return
    mine = {name: value for name, value in settings.items() if name not in machine_local}
    everyone = dist.all_gather_object(mine)
    for rank, theirs in enumerate(everyone[1:], start=1):
        for name in sorted(set(everyone[0]) | set(theirs)):
            if everyone[0].get(name) != theirs.get(name):
                raise UsageError(f'--{name} differs between ranks (rank 0: {everyone[0].get(name)!r}, rank {rank}: '
                                 f'{theirs.get(name)!r}); start every rank with the same command (one --outdir '
                                 f'for the run: only rank 0 writes to it)')


def distribute(model, dist, device, sync_bn=False, find_unused_parameters=False):
    """(model, network) for training: ``network`` runs the training step, ``model`` is the module
    itself (evaluated, averaged and saved: its state_dict has no ``module.`` prefix).

    In a single process both are ``model``. In a distributed run, ``sync_bn`` first turns the
    BatchNorm layers into SyncBatchNorm (statistics over the batch of all ranks); then ``network``
    is ``model`` in DistributedDataParallel, which averages the gradients of the ranks in the
    backward pass. Buffers (BatchNorm statistics) are not synchronized at each forward pass: each
    rank keeps its own during an epoch, and :meth:`Distributed.broadcast_tensors_` gives every rank
    rank 0's at the end of each epoch, before evaluation and saving. ``find_unused_parameters``
    is DDP's: needed when a step may leave parameters out of the loss (layers skipped at random).
    """
    if sync_bn:
        if not dist.enabled:
            raise UsageError('--sync_bn needs a distributed launch (torchrun --nproc_per_node N main.py ...)')
        if device.type != 'cuda':
            raise UsageError(f'--sync_bn: torch\'s SyncBatchNorm runs on GPUs only, not on {device.type}; '
                             f'without --sync_bn each rank normalizes its own images')
        if any(getattr(module, 'num_splits', 1) > 1 for module in model.modules()):
            raise UsageError('--sync_bn with --ghost_bn_splits: ghost batch norm normalizes small groups on purpose; '
                             'choose one')
    if not dist.enabled:
        return model, model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    parallel = nn.parallel.DistributedDataParallel
    # torch 2.11+ names the switch forward_sync_buffers (and deprecates broadcast_buffers)
    no_buffer_sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in inspect.signature(parallel).parameters
                      else {'broadcast_buffers': False})
    network = parallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                       find_unused_parameters=find_unused_parameters, **no_buffer_sync)
    # older torch leaves the buffers unsynchronized at construction with broadcast_buffers=False
    dist.broadcast_tensors_(list(model.buffers()))
    return model, network
