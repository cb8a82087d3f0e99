"""utils: the CPU threads a run takes by default."""
import os

import pytest
import torch

import utils

CPU = torch.device('cpu')


@pytest.fixture
def four_cores(monkeypatch):
    """A 4-core machine where OMP_NUM_THREADS is unset; torch's threads put back afterwards."""
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(utils.os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3}, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('busy, ranks, expected', [(0.0, 1, 4), (1.2, 1, 3), (2.6, 1, 1), (3.9, 1, 1), (0.0, 2, 2),
                                                   (3.0, 2, 1)])
def test_default_threads_are_the_idle_cores_shared_by_the_ranks(busy, ranks, expected, four_cores, monkeypatch):
    monkeypatch.setattr(utils, 'busy_cores', lambda cpus: busy)
    dist = utils.Distributed(world_size=ranks, backend='gloo' if ranks > 1 else None, local_world_size=ranks)
    assert utils.set_threads(None, CPU, dist) == expected == torch.get_num_threads()


def test_given_threads_and_omp_num_threads_win(four_cores, monkeypatch):
    monkeypatch.setattr(utils, 'busy_cores', lambda cpus: 3.0)
    assert utils.set_threads(2, CPU) == 2
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    torch.set_num_threads(3)  # as torch read it at its start
    assert utils.set_threads(None, CPU) == 3
    assert utils.set_threads(None, torch.device('meta')) == 3  # not a CPU run: torch's default stays


def _stat(path, ticks):
    """A /proc/stat with the aggregate line and one line per core: user nice system idle iowait irq softirq
    steal guest guest_nice."""
    lines = ['cpu  ' + ' '.join(str(sum(column)) for column in zip(*ticks.values())) + ' 0 0']
    lines += [f'cpu{core} ' + ' '.join(map(str, values)) + ' 0 0' for core, values in ticks.items()]
    path.write_text('\n'.join(lines + ['intr 1 2 3', 'ctxt 5']) + '\n')
    return str(path)


def test_cpu_times_counts_the_allowed_cores_with_io_wait_as_idle(tmp_path):
    path = _stat(tmp_path / 'stat', {0: [10, 1, 5, 100, 4, 1, 1, 0], 1: [50, 0, 10, 20, 0, 0, 0, 2],
                                     2: [7, 7, 7, 7, 7, 7, 7, 7]})
    assert utils.cpu_times({0, 1}, path) == (100 + 4 + 20, 122 + 82)
    assert utils.cpu_times({2}, path) == (14, 56)
    with pytest.raises(ValueError, match='no line of the cores'):
        utils.cpu_times({5}, path)


def test_busy_cores_is_the_non_idle_share_over_the_interval(monkeypatch):
    snapshots = iter([(1000, 4000), (1000 + 150, 4000 + 400)])  # 4 cores: 250 of 400 ticks busy
    monkeypatch.setattr(utils, 'cpu_times', lambda cpus: next(snapshots))
    assert utils.busy_cores({0, 1, 2, 3}, interval=0) == pytest.approx(4 * 250 / 400)


def test_busy_cores_falls_back_to_the_load_average_without_proc_stat(monkeypatch):
    def unreadable(cpus):
        raise OSError('no /proc')
    monkeypatch.setattr(utils, 'cpu_times', unreadable)
    monkeypatch.setattr(utils.os, 'getloadavg', lambda: (1.5, 1.0, 0.5), raising=False)
    assert utils.busy_cores({0, 1}, interval=0) == 1.5


@pytest.mark.skipif(not os.path.exists('/proc/stat'), reason='Linux only')
def test_busy_cores_reads_this_machine():
    cpus = os.sched_getaffinity(0)
    assert 0 <= utils.busy_cores(cpus, interval=0.05) <= len(cpus)
