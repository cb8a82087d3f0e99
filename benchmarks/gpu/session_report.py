"""The small steps of benchmarks/gpu/session.sh that read or write JSON (standard library; numpy for
tiny-data; no torch, so that each costs a fraction of a second).

    session_report.py tiny-data ROOT --n 128          # a few CIFAR-10-format pickles, for GPU_DRY=1
    session_report.py recipe fast_airbench94_muon     # a recipe's flags from run_experiments.sh
    session_report.py correctness ... --out correctness.json
    session_report.py step-speed --dir D --expect NAME... --out step_speed.json
    session_report.py pick --seconds T FILE...        # the row's path: "mode<TAB>flags<TAB>why"
    session_report.py epochs-done --row D --seeds 0 1 2
    session_report.py row --row D --seeds 0 1 2 --out row.json
    session_report.py tta --ours F --keep D --out tta.json [--airbench LOG] [--note TEXT]
    session_report.py ensure --out F --phase c --rc N --seconds S
    session_report.py check OUT                       # the $OUT layout, and a digest of it

Everything read here is a file main.py writes (log.json, summary.json) or a line it prints; nothing
imports main.py or torch, whose import alone would cost each step seconds.
"""
import argparse
import glob
import json
import os
import pickle
import re
import statistics
import sys

RESULT_FILES = {'a': 'correctness.json', 'b': 'step_speed.json', 'c': 'row.json', 'd': 'tta.json'}
MAX_FILES = 8
PUBLISHED_ROW = {'name': 'ResNet-preact-20, 200 epochs, cosine, lr 0.2', 'test_error': 7.60, 'of': 'median of 3',
                 'ours': 'bf16 autocast + channels_last, on the JPEG quality-75 copy of CIFAR-10 (expect a little '
                         'more error than published; compare with runs on the same copy)'}
AIRBENCH_NOTE = ('compare with the airbench94_muon figures already in results/README.md (GPU section: '
                 '1.60 s mean, 90.77% mean test accuracy over 10 runs, same H100 and JPEG copy)')


def load_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def save_json(obj, path):
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def read_text(path):
    try:
        with open(path, errors='replace') as f:
            return f.read()
    except OSError:
        return ''


def read_rc(path):
    text = read_text(path).strip()
    return int(text) if re.fullmatch(r'-?\d+', text) else None


def train_records(outdir):
    return [r for r in load_json(os.path.join(outdir, 'log.json'), []) if isinstance(r, dict) and r.get('epoch', 0) > 0]


# ---- tiny data (dry run) -------------------------------------------------------------------------

def tiny_data(args):
    """CIFAR-10's python pickles with ``n`` train and ``n // 5`` test images whose brightness encodes
    the label (as tests/conftest.py makes them), when the real pack is not at hand."""
    import numpy as np
    folder = os.path.join(args.root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [args.n // 5 + (i < args.n % 5) for i in range(5)] + [max(1, args.n // 5)]
    for index, (name, n) in enumerate(zip([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch'], sizes)):
        labels = rng.permutation(np.arange(n) % 10)
        images = (labels[:, None] * 22 + rng.integers(0, 56, size=(n, 3072))).astype(np.uint8)
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({'batch_label': name, 'labels': labels.tolist(), 'data': images,
                         'filenames': [f'{index}_{i}.png' for i in range(n)]}, f, protocol=2)
    with open(os.path.join(folder, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': [str(i) for i in range(10)], 'num_cases_per_batch': sizes[0],
                     'num_vis': 3072}, f, protocol=2)
    print(f'wrote {sum(sizes[:5])} train and {sizes[5]} test images (synthetic) to {folder}')


# ---- phase a -------------------------------------------------------------------------------------

PLURALS = {'error': 'errors', 'warning': 'warnings'}


def pytest_summary(text):
    """The counts of pytest's last line ('6 passed, 1 skipped in 12.3s')."""
    counts = {}
    for line in reversed(text.strip().splitlines()):
        found = re.findall(r'(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)', line)
        if found:
            counts = {PLURALS.get(word, word): int(n) for n, word in found}
            seconds = re.search(r'in ([\d.]+)s', line)
            if seconds:
                counts['seconds'] = float(seconds.group(1))
            break
    return counts


def correctness(args):
    pytest_text = read_text(args.pytest_log)
    if pytest_text.startswith('not run'):
        args.pytest_command = pytest_text.strip()
    failures = [line for line in pytest_text.splitlines() if line.startswith(('FAILED', 'ERROR'))]
    syncs = load_json(args.syncs_json, {}) or {}
    result = {
        'pytest': {'command': args.pytest_command, 'exit_status': args.pytest_rc, **pytest_summary(pytest_text),
                   'failures': failures[:20]},
        'syncs': {'command': args.syncs_command, 'exit_status': args.syncs_rc, **syncs},
    }
    ok = args.pytest_rc == 0 and args.syncs_rc == 0
    result['status'] = 'ok' if ok else 'failed'
    if syncs.get('per_epoch'):
        result['syncs_per_epoch'] = syncs['per_epoch'][-1]
    save_json(result, args.out)


# ---- phase b -------------------------------------------------------------------------------------

def speed_entry(directory, name, batch_size, prewarm):
    arch, _, mode = name.partition('__')
    entry = {'name': name, 'arch': arch, 'mode': mode}
    skip = read_text(os.path.join(directory, f'{name}.skip')).strip()
    rc = read_rc(os.path.join(directory, f'{name}.rc'))
    records = train_records(os.path.join(directory, name))
    if skip:
        entry.update(status='skipped', why=skip)
    elif rc is None and not records:
        entry.update(status='not reached')
    else:
        entry['exit_status'] = rc
        rates = [r['train_images_per_sec'] for r in records if r.get('train_images_per_sec')]
        timed = rates[1:] or rates  # the first epoch holds cuDNN's autotuning and CUDA graph recording
        if timed:
            images_per_sec = statistics.median(timed)
            entry.update(images_per_sec=round(images_per_sec, 1),
                         steps_per_sec=round(images_per_sec / batch_size, 2),
                         ms_per_step=round(1000 * batch_size / images_per_sec, 3),
                         epochs_timed=len(timed))
        compile_time = next((r['compile_time'] for r in records if r.get('compile_time') is not None), None)
        if mode != 'eager':
            entry['compile_s'] = None if compile_time is None else round(compile_time, 1)
        entry['status'] = 'ok' if rc == 0 and timed else ('timeout' if rc in (124, 137, 143) else 'failed')
    if prewarm and mode != 'eager':
        cold = next((r['compile_time'] for r in train_records(os.path.join(prewarm, name))
                     if r.get('compile_time') is not None), None)
        if cold is not None:
            entry['compile_cold_s'] = round(cold, 1)
    return entry


def step_speed(args):
    entries = [speed_entry(args.dir, name, args.batch_size, args.prewarm) for name in args.expect]
    result = {'status': 'ok' if any(e.get('status') == 'ok' for e in entries) else 'failed',
              'batch_size': args.batch_size, 'flags': args.flags, 'entries': entries,
              'notes': ['images_per_sec: median over the epochs after the first (log.json train_images_per_sec)',
                        'compile_s: log.json compile_time of the timed run; compile_cold_s: the same config '
                        'compiled earlier beside the GPU tests with empty caches, several compiling at once']}
    if args.dry:
        result['dry_run'] = True
    save_json(result, args.out)
    if args.table:
        print(speed_table(result))


def speed_table(result):
    lines = [f'{"arch":<16} {"mode":<16} {"status":<8} {"img/s":>9} {"steps/s":>8} {"ms/step":>8} '
             f'{"compile s":>9} {"cold s":>7}']
    for e in result.get('entries', []):
        def cell(key, width):
            value = e.get(key)
            return f'{"-" if value is None else value:>{width}}'
        lines.append(f'{e["arch"]:<16} {e["mode"]:<16} {e.get("status", "?"):<8} {cell("images_per_sec", 9)} '
                     f'{cell("steps_per_sec", 8)} {cell("ms_per_step", 8)} {cell("compile_s", 9)} '
                     f'{cell("compile_cold_s", 7)}')
    return '\n'.join(lines)


MODE_FLAGS = {'eager': '', 'compile': '--compile', 'reduce-overhead': '--compile --compile_mode reduce-overhead'}


def pick(args):
    """The mode of ResNet-preact-20 that trains the most images in ``seconds`` (its compile time
    counted), from the first step-speed file that has figures for it; eager when none has."""
    for path in args.files:
        result = load_json(path)
        if not result:
            continue
        candidates = [e for e in result.get('entries', [])
                      if e.get('arch') == args.arch and e.get('status') == 'ok' and e.get('mode') in MODE_FLAGS]
        if not candidates:
            continue

        def images(entry):
            return max(0.0, args.seconds - (entry.get('compile_s') or 0.0)) * entry['images_per_sec']
        best = max(candidates, key=images)
        why = (f'{path}: ' + ', '.join(f'{e["mode"]} {e["images_per_sec"]:.0f} img/s'
                                        + (f' after {e.get("compile_s") or 0:.0f}s compile' if e['mode'] != 'eager'
                                           else '') for e in candidates)
               + f'; most images in {args.seconds:.0f}s: {best["mode"]}')
        print(f'{best["mode"]}\t{MODE_FLAGS[best["mode"]]}\t{why}')
        return
    print(f'eager\t\tno step-speed figures for {args.arch} ({", ".join(args.files) or "none given"}): eager')


# ---- phase c -------------------------------------------------------------------------------------

def row(args):
    seeds, errors = [], []
    for seed in args.seeds:
        outdir = os.path.join(args.row, seed)
        records = train_records(outdir)
        summary = load_json(os.path.join(outdir, 'summary.json'))
        evaluated = [r for r in records if 'test_accuracy' in r]
        rc = read_rc(os.path.join(args.rc_dir, seed)) if args.rc_dir else None
        this_call = [r for r in records if r['epoch'] > args.start_epochs.get(seed, 0)]
        entry = {'seed': int(seed) if seed.isdigit() else seed,
                 'epochs_done': records[-1]['epoch'] if records else 0, 'epochs': args.epochs,
                 'finished': summary is not None, 'exit_status_this_call': rc,
                 'epochs_this_call': len(this_call),
                 'has_checkpoint': os.path.isfile(os.path.join(outdir, 'checkpoint.pth'))}
        if this_call:
            entry['epoch_s_this_call'] = round(statistics.median(r.get('epoch_time', r.get('train_time', 0))
                                                                 for r in this_call), 2)
        if evaluated:
            entry['last_test_error'] = round(100 * (1 - evaluated[-1]['test_accuracy']), 2)
            entry['last_test_epoch'] = evaluated[-1]['epoch']
        if summary is not None and summary.get('final_test_error') is not None:
            entry['final_test_error'] = round(100 * summary['final_test_error'], 2)
            errors.append(entry['final_test_error'])
        seeds.append(entry)
    result = {'status': 'finished' if len(errors) == len(args.seeds) else 'in progress', 'row': PUBLISHED_ROW,
              'command': args.row_command, 'mode': args.mode, 'why': args.why, 'seeds': seeds}
    if errors:
        result['final_test_errors'] = errors
    if len(errors) == len(args.seeds):
        result['median_test_error'] = statistics.median(errors)
        result['published_test_error'] = PUBLISHED_ROW['test_error']
    else:
        left = [s for s in seeds if not s['finished']]
        rates = [s['epoch_s_this_call'] for s in left if s.get('epoch_s_this_call')]
        if rates:
            result['seconds_to_finish_estimate'] = round(max(s['epochs'] - s['epochs_done'] for s in left)
                                                         * statistics.median(rates))
        result['resume'] = ('benchmarks/gpu/prepare.sh FILES_AT (it unpacks row.tgz into .gpu/row), then session.sh '
                            'again with .gpu/row carried: it passes --resume')
    if args.dry:
        result['dry_run'] = True
    save_json(result, args.out)
    for s in seeds:
        print(f'row seed {s["seed"]}: epoch {s["epochs_done"]}/{s["epochs"]}'
              + (f', test error {s["last_test_error"]}% at epoch {s["last_test_epoch"]}'
                 if 'last_test_error' in s else '')
              + (f', {s["epochs_this_call"]} epochs this call at {s.get("epoch_s_this_call")} s each'
                 if s['epochs_this_call'] else '') + (' (finished)' if s['finished'] else ''))
    if 'median_test_error' in result:
        print(f'row: median test error {result["median_test_error"]}% (published {PUBLISHED_ROW["test_error"]}%)')


def epochs_done(args):
    """'seed:epochs' of each run folder (from its log.json), for ``row --start``."""
    print(' '.join(f'{seed}:{len(train_records(os.path.join(args.row, seed)))}' for seed in args.seeds))


# ---- phase d -------------------------------------------------------------------------------------

def airbench_rows(text):
    """(accuracy, seconds) of each ``eval`` row airbench prints, the warm-up first."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split('|')]
        if 'eval' in cells:
            numbers = []
            for cell in cells:
                try:
                    numbers.append(float(cell))
                except ValueError:
                    pass
            if len(numbers) >= 2:
                rows.append((numbers[-2], numbers[-1]))
    return rows


def describe(accuracies, times):
    return {'n_runs': len(accuracies), 'accuracy_mean': statistics.mean(accuracies),
            'accuracy_std': statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            'accuracy_min': min(accuracies), 'accuracy_max': max(accuracies),
            'time_mean': statistics.mean(times), 'time_min': min(times), 'time_max': max(times)}


def tta(args):
    ours = load_json(args.ours) if args.ours else None
    result = {'recipe': 'fast_airbench94_muon', 'runs_planned': args.runs_planned, 'exit_status': args.rc}
    if ours:
        result['ours'] = ours
        result['status'] = 'ok'
    else:
        runs = []  # the runs time_to_accuracy.py finished before it was stopped, from the folders it kept
        for outdir in sorted(glob.glob(os.path.join(args.keep or '', 'seed*'))):
            records = train_records(outdir)
            if not records or not os.path.isfile(os.path.join(outdir, 'summary.json')):
                continue
            last = records[-1]
            accuracy = last.get('ema_test_accuracy', last.get('test_accuracy'))
            runs.append({'outdir': os.path.basename(outdir), 'accuracy': accuracy,
                         'wall_time': sum(r.get('train_time', 0) + r.get('test_time', 0) for r in records),
                         'compile_time': records[0].get('compile_time')})
        if runs:
            result['ours'] = {'runs': runs, 'partial': True,
                              **describe([r['accuracy'] for r in runs], [r['wall_time'] for r in runs])}
            result['status'] = 'partial'
        else:
            result['status'] = 'skipped' if args.skipped else 'failed'
    if args.skipped:
        result['why'] = args.skipped
    rows = airbench_rows(read_text(args.airbench)) if args.airbench else []
    if rows[1:]:
        counted = rows[1:]
        result['airbench94_muon'] = {'runs': counted, 'warmup_excluded': 1,
                                     **describe([a for a, _ in counted], [t for _, t in counted])}
        mean_ours = (result.get('ours') or {}).get('wall_time_mean') or (result.get('ours') or {}).get('time_mean')
        if mean_ours:
            result['time_ratio_ours_to_airbench'] = mean_ours / result['airbench94_muon']['time_mean']
    result['airbench_note'] = ('airbench94_muon ran beside ours in this call' if rows[1:]
                               else args.note + AIRBENCH_NOTE)
    if args.dry:
        result['dry_run'] = True
    save_json(result, args.out)
    print(f'tta: {result["status"]}; ' + summary_of_tta(result))


def summary_of_tta(result):
    ours = result.get('ours') or {}
    parts = []
    if ours.get('n_runs'):
        time_mean = ours.get('wall_time_mean', ours.get('time_mean'))
        parts.append(f'ours {ours["n_runs"]} runs, accuracy {ours["accuracy_mean"]:.4f}, time {time_mean:.2f}s')
    airbench = result.get('airbench94_muon')
    if airbench:
        parts.append(f'airbench94_muon {airbench["n_runs"]} runs, accuracy {airbench["accuracy_mean"]:.4f}, '
                     f'time {airbench["time_mean"]:.2f}s')
    else:
        parts.append(result.get('airbench_note', ''))
    return '; '.join(parts)


def recipe(args):
    """A recipe's flags from run_experiments.sh, read as benchmarks/time_to_accuracy.py reads them."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = read_text(os.path.join(root, 'run_experiments.sh'))
    match = re.search(rf'^{args.name.upper()}=\((.*?)\)', text, re.S | re.M)
    if not match:
        print(f'no recipe {args.name} in run_experiments.sh', file=sys.stderr)
        return 1
    print(' '.join(match.group(1).split()))


# ---- every phase ---------------------------------------------------------------------------------

def ensure(args):
    """After a phase: its result file exists and parses, and says how the phase ended."""
    result = load_json(args.out)
    if not isinstance(result, dict):
        if args.rc == 'not-run':
            result = {'status': 'not run', 'why': args.why or 'not in PHASES'}
        else:
            status = 'timeout' if args.rc in ('124', '137') else 'failed'
            result = {'status': status, 'why': args.why or f'the phase ended with status {args.rc} before '
                                                         f'writing its result (see logs.tgz)'}
    if args.rc != 'not-run':
        result['phase_exit_status'] = int(args.rc)
        result['phase_seconds'] = args.seconds
        if args.rc in ('124', '137') and result.get('status') in ('ok', 'finished', 'in progress', 'partial'):
            result['phase_timed_out'] = True
    result['phase'] = args.phase
    save_json(result, args.out)


def check(args):
    """The layout of $OUT: at most 8 plain files, env.txt, and each phase's result file parseable."""
    problems = []
    names = sorted(os.listdir(args.out))
    files = [n for n in names if os.path.isfile(os.path.join(args.out, n))]
    others = [n for n in names if n not in files]
    if len(files) > MAX_FILES:
        problems.append(f'{len(files)} files under $OUT, at most {MAX_FILES} come back: {files}')
    if others:
        problems.append(f'not plain files under $OUT: {others}')
    if not os.path.isfile(os.path.join(args.out, 'env.txt')):
        problems.append('env.txt missing')
    for phase, name in RESULT_FILES.items():
        result = load_json(os.path.join(args.out, name))
        if not isinstance(result, dict) or 'status' not in result:
            problems.append(f'{name} (phase {phase}) missing or unparseable')
    print(f'$OUT: {len(files)} files: {", ".join(files)}')
    for phase, name in RESULT_FILES.items():
        result = load_json(os.path.join(args.out, name)) or {}
        print(f'  phase {phase} {name}: {result.get("status", "?")}' + digest(phase, result))
    for problem in problems:
        print(f'PROBLEM: {problem}')
    return 1 if problems else 0


def digest(phase, result):
    if phase == 'a' and result.get('pytest'):
        p = result['pytest']
        return (f'; pytest -m gpu: {p.get("passed", 0)} passed, {p.get("failed", 0)} failed, '
                f'{p.get("skipped", 0)} skipped; syncs per epoch {result.get("syncs_per_epoch", "n/a")}')
    if phase == 'b' and result.get('entries'):
        return '\n' + '\n'.join('    ' + line for line in speed_table(result).splitlines())
    if phase == 'c' and result.get('seeds'):
        return '; ' + ', '.join(f'seed {s["seed"]} epoch {s["epochs_done"]}/{s["epochs"]}'
                                + (f' err {s["last_test_error"]}%' if 'last_test_error' in s else '')
                                for s in result['seeds']) + f'; mode {result.get("mode")}'
    if phase == 'd':
        return '; ' + summary_of_tta(result)
    return ''


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)

    p = commands.add_parser('tiny-data')
    p.add_argument('root')
    p.add_argument('--n', type=int, default=128)
    p.set_defaults(run=tiny_data)

    p = commands.add_parser('correctness')
    p.add_argument('--pytest_log', required=True)
    p.add_argument('--pytest_rc', type=int)
    p.add_argument('--pytest_command', default='')
    p.add_argument('--syncs_json', required=True)
    p.add_argument('--syncs_rc', type=int)
    p.add_argument('--syncs_command', default='')
    p.add_argument('--out', required=True)
    p.set_defaults(run=correctness)

    p = commands.add_parser('step-speed')
    p.add_argument('--dir', required=True)
    p.add_argument('--prewarm')
    p.add_argument('--expect', nargs='+', required=True, help='ARCH__MODE names, in order')
    p.add_argument('--batch_size', type=int, default=128)
    p.add_argument('--flags', default='')
    p.add_argument('--dry', action='store_true')
    p.add_argument('--table', action='store_true')
    p.add_argument('--out', required=True)
    p.set_defaults(run=step_speed)

    p = commands.add_parser('pick')
    p.add_argument('files', nargs='*')
    p.add_argument('--seconds', type=float, required=True)
    p.add_argument('--arch', default='resnet_preact20')
    p.set_defaults(run=pick)

    p = commands.add_parser('row')
    p.add_argument('--row', required=True)
    p.add_argument('--rc_dir', help="a file per seed holding its run's exit status in this call")
    p.add_argument('--seeds', nargs='+', required=True)
    p.add_argument('--epochs', type=int, default=200)
    p.add_argument('--start', nargs='*', default=[], help='seed:epochs done before this call')
    p.add_argument('--mode', default='')
    p.add_argument('--why', default='')
    p.add_argument('--row_command', default='')
    p.add_argument('--dry', action='store_true')
    p.add_argument('--out', required=True)
    p.set_defaults(run=row)

    p = commands.add_parser('epochs-done')
    p.add_argument('--row', required=True)
    p.add_argument('--seeds', nargs='+', required=True)
    p.set_defaults(run=epochs_done)

    p = commands.add_parser('tta')
    p.add_argument('--ours')
    p.add_argument('--keep')
    p.add_argument('--rc', type=int)
    p.add_argument('--runs_planned', type=int)
    p.add_argument('--airbench')
    p.add_argument('--note', default='', help='said before the note on airbench when it did not run')
    p.add_argument('--skipped', default='')
    p.add_argument('--dry', action='store_true')
    p.add_argument('--out', required=True)
    p.set_defaults(run=tta)

    p = commands.add_parser('recipe')
    p.add_argument('name')
    p.set_defaults(run=recipe)

    p = commands.add_parser('ensure')
    p.add_argument('--out', required=True)
    p.add_argument('--phase', required=True)
    p.add_argument('--rc', required=True, help='the phase exit status, or not-run')
    p.add_argument('--seconds', type=int, default=None)
    p.add_argument('--why', default='')
    p.set_defaults(run=ensure)

    p = commands.add_parser('check')
    p.add_argument('out')
    p.set_defaults(run=check)

    args = parser.parse_args(argv)
    if args.command == 'row':
        args.start_epochs = {k: int(v) for k, _, v in (item.partition(':') for item in args.start)}
    return args.run(args) or 0


if __name__ == '__main__':
    sys.exit(main())
