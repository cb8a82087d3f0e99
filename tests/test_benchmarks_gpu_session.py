"""benchmarks/gpu/session.sh, the one command of a device call, in its CPU dry run (GPU_DRY=1).

Every phase runs on a few hundred images with --device cpu (compiling skipped), and $OUT must hold what
a device call can bring back: at most 8 plain files, env.txt, and each phase's result as JSON.
"""
import fcntl
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT

GPU = os.path.join(ROOT, 'benchmarks', 'gpu')
sys.path.insert(0, GPU)
import session_report  # noqa: E402

RESULTS = session_report.RESULT_FILES


def dry_run(work, timeout=240, **settings):
    env = {key: value for key, value in os.environ.items()
           if key not in ('OUT', 'ROW', 'PHASES', 'SEEDS', 'TOTAL', 'DRY')}
    env.update(GPU_DRY='1', WORK=str(work), PYTHON=sys.executable, OMP_NUM_THREADS='1', **settings)
    return subprocess.run(['bash', os.path.join(GPU, 'session.sh')], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope='session')
def session(tmp_path_factory):
    """One dry run for every test here, whichever pytest -n worker asks first: the others wait for it on a
    lock in the folder the workers of this session share (without workers, this session's own: the folder
    above it holds every session's), then read what it left."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'gpu_session_dry_run'
    shared.mkdir(exist_ok=True)
    with open(shared / 'lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / 'result.json').exists():
            result = dry_run(shared)
            (shared / 'result.json').write_text(json.dumps({'returncode': result.returncode, 'stdout': result.stdout,
                                                            'stderr': result.stderr}))
    result = subprocess.CompletedProcess([], **json.loads((shared / 'result.json').read_text()))
    return shared, shared / 'OUT', result


def test_dry_run_finishes_every_phase(session):
    _, _, result = session
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for phase in 'abcd':
        assert re.search(rf'phase {phase}: exit 0 after', result.stdout), result.stdout[-3000:]


def test_out_holds_what_one_device_call_brings_back(session):
    _, out, _ = session
    names = sorted(os.listdir(out))
    assert len(names) <= session_report.MAX_FILES
    assert all(os.path.isfile(out / name) and re.fullmatch(r'[A-Za-z0-9._-]+', name) for name in names)
    assert {'env.txt', 'session.log', 'logs.tgz', 'row.tgz', *RESULTS.values()} <= set(names)
    env = (out / 'env.txt').read_text()
    assert 'commit under test:' in env and 'torch' in env and 'GPU_DRY=1' in env
    for phase, name in RESULTS.items():
        result = json.loads((out / name).read_text())
        assert result['phase'] == phase and result['phase_exit_status'] == 0


def test_each_phase_reports_its_figures(session):
    _, out, _ = session
    correctness = json.loads((out / 'correctness.json').read_text())
    assert correctness['status'] == 'ok' and correctness['syncs']['epochs'] == 2
    speed = json.loads((out / 'step_speed.json').read_text())
    entries = {entry['name']: entry for entry in speed['entries']}
    assert len(entries) == 9 and entries['resnet_preact20__eager']['images_per_sec'] > 0
    assert all(entry['status'] == 'skipped' for name, entry in entries.items() if name != 'resnet_preact20__eager')
    row = json.loads((out / 'row.json').read_text())
    assert row['status'] == 'finished' and row['mode'] == 'eager'
    assert [seed['epochs_done'] for seed in row['seeds']] == [2, 2]
    tta = json.loads((out / 'tta.json').read_text())
    assert tta['status'] == 'ok' and tta['ours']['n_runs'] == 1 and 'results/README.md' in tta['airbench_note']


def test_row_comes_back_resumable(session):
    _, out, _ = session
    with tarfile.open(out / 'row.tgz') as tar:
        names = set(tar.getnames())
    assert {'row/0/checkpoint.pth', 'row/0/log.json', 'row/1/checkpoint.pth'} <= names
    with tarfile.open(out / 'logs.tgz') as tar:
        logs = set(tar.getnames())
    assert {'logs/syncs.txt', 'logs/row_0.txt', 'logs/tta_ours.txt'} <= logs


def test_pick_counts_compile_time_and_falls_back_to_eager(tmp_path, capsys):
    figures = tmp_path / 'step_speed.json'
    figures.write_text(json.dumps({'entries': [
        {'arch': 'resnet_preact20', 'mode': 'eager', 'status': 'ok', 'images_per_sec': 10000},
        {'arch': 'resnet_preact20', 'mode': 'compile', 'status': 'ok', 'images_per_sec': 12000, 'compile_s': 40},
        {'arch': 'resnet_preact20', 'mode': 'reduce-overhead', 'status': 'ok', 'images_per_sec': 30000,
         'compile_s': 60}]}))
    for seconds, mode in ((1000, 'reduce-overhead'), (70, 'eager')):
        session_report.main(['pick', '--seconds', str(seconds), str(figures)])
        assert capsys.readouterr().out.split('\t')[0] == mode
    session_report.main(['pick', '--seconds', '100', str(tmp_path / 'missing.json')])
    assert capsys.readouterr().out.split('\t')[:2] == ['eager', '']


def test_pytest_summary_line():
    text = 'F.s\nFAILED tests/test_gpu.py::x\n=== 6 passed, 1 failed, 2 skipped, 1 error in 12.30s ==='
    assert session_report.pytest_summary(text) == {'passed': 6, 'failed': 1, 'skipped': 2, 'errors': 1,
                                                   'seconds': 12.3}


@pytest.mark.slow
def test_row_stopped_at_its_deadline_resumes_in_the_next_call(tmp_path):
    """SIGTERM at the end of phase c's box: main.py checkpoints and exits 143; the next call resumes."""
    row = tmp_path / 'row'
    settings = dict(PHASES='c', ROW=str(row), ROW_EPOCHS='400', ROW_EVAL='10', ROW_SAVE='50', SEEDS='0')
    first = dry_run(tmp_path / 'w1', C_MAX='55', **settings)
    stopped = json.loads((tmp_path / 'w1' / 'OUT' / 'row.json').read_text())
    assert stopped['status'] == 'in progress', first.stdout[-2000:]
    seed = stopped['seeds'][0]
    assert seed['exit_status_this_call'] == 143 and seed['has_checkpoint'] and 0 < seed['epochs_done'] < 400
    dry_run(tmp_path / 'w2', C_MAX='60', **settings)
    resumed = json.loads((tmp_path / 'w2' / 'OUT' / 'row.json').read_text())['seeds'][0]
    assert resumed['epochs_done'] > seed['epochs_done']
    assert resumed['epochs_this_call'] == resumed['epochs_done'] - seed['epochs_done']
    log = json.loads((row / '0' / 'log.json').read_text())
    assert [record['epoch'] for record in log] == list(range(1, resumed['epochs_done'] + 1))
