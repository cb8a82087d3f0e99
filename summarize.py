#!/usr/bin/env python
"""Summarize finished and running experiments: a table row per experiment, a figure per table, README block.

    ./summarize.py results/                       # Markdown table of every experiment under results/
    ./summarize.py results/rp56 --csv             # the same table as CSV (--json: a list of objects)
    ./summarize.py results/rp56 --plots figures/  # the figure in figures/rp56.png (default results/plots/)
    ./summarize.py results/ --readme results/README.md   # rewrite the generated block of that file

A run is a folder holding config.json and log.json (main.py's --outdir); it is finished when
summary.json is there too, else in progress (or stopped). An experiment is the run's parent
folder, named by its path relative to the given folder, so the seeds 0, 1, 2 of
results/rp56/cutout/ form the experiment rp56/cutout. Statistics of the final test error are
over finished runs; the best-epoch error is selected on the test set and so is optimistic.
Runs of one experiment whose settings differ (other than the seed and flags.RUN_ONLY_FLAGS,
epochs excepted) or whose data differ are reported by name. The data column names the dataset,
the last part of --dataset_dir and the image counts config.json records (its "data" object, see
run_data), else the evaluated images counted in log.json. Published figures come from
run_experiments.sh lines ``# published: NAME ERROR_PERCENT RUNS_DESCRIPTION`` (NAME as in
results/NAME/<seed>).

One figure per top-level folder (a table of the README block) overlays its experiments: test
error against epoch (median over the runs, min-max band), train error dashed, and the learning
rate in a panel below. It goes to plots/ inside the results folder (ignored by git there; inside
the given folder when that is not under a results folder), never into the tracked measurements'
folders. Without matplotlib the table still prints and the plots are skipped with one line.
"""
import argparse
import csv
import io
import json
import os
import re
import statistics
import sys
import tempfile

import flags

EXPERIMENTS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'run_experiments.sh')
README_BEGIN = '<!-- summarize:begin -->'
README_END = '<!-- summarize:end -->'
PLOTS_FOLDER = 'plots'  # default figure folder, inside the results folder
_PUBLISHED_LINE = re.compile(r'^\s*#\s*published:\s+(\S+)\s+(\d+(?:\.\d*)?)\s*(.*?)\s*$')

COLUMNS = [  # (key in a row, Markdown header)
    ('experiment', 'experiment'),
    ('runs', 'runs'),
    ('error_median', 'test error % (median)'),
    ('error_mean_std', 'mean ± std'),
    ('best_error_median', 'best-epoch error % (selected on test set)'),
    ('epochs', 'epochs (done/planned)'),
    ('wall_time', 'wall time / run'),
    ('hardware', 'hardware'),
    ('data', 'data (images)'),
    ('published', 'published %'),
]


class SummarizeError(Exception):
    """A bad argument or file: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------- reading runs

def published_figures(path=None):
    """``{name: (error_percent_text, runs_description)}`` from ``# published:`` lines of run_experiments.sh."""
    path = EXPERIMENTS_SCRIPT if path is None else path
    figures = {}
    try:
        with open(path) as f:
            for line in f:
                match = _PUBLISHED_LINE.match(line)
                if match:
                    figures[match.group(1).strip('/')] = (match.group(2), match.group(3))
    except OSError:
        pass
    return figures


def find_run_folders(root):
    """Folders under ``root`` (itself included) holding config.json or log.json; run folders are not entered."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if 'config.json' in filenames or 'log.json' in filenames:
            found.append(dirpath)
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(('.', '__')))
    return found


def _load(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def read_run(folder):
    """One run's config, log and summary (None while in progress); raises ValueError saying what is wrong."""
    for name in ('config.json', 'log.json'):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f'no {name} (not started, or not a run folder)')
    run = {'path': folder}
    for name in ('config.json', 'log.json', 'summary.json'):
        if name == 'summary.json' and not os.path.isfile(os.path.join(folder, name)):
            run['summary'] = None
            continue
        try:
            run[name[:-5]] = _load(folder, name)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f'{name} is not readable JSON ({error})') from None
    if not isinstance(run['config'], dict) or not isinstance(run['config'].get('settings'), dict):
        raise ValueError('config.json has no "settings" object')
    if not isinstance(run['config'].get('environment', {}), dict):
        raise ValueError('config.json\'s "environment" is not an object')
    if not isinstance(run['log'], list) or not all(isinstance(r, dict) and 'epoch' in r for r in run['log']):
        raise ValueError('log.json is not a list of epoch records')
    if run['summary'] is not None and not isinstance(run['summary'], dict):
        raise ValueError('summary.json is not an object')
    run['split'] = 'val' if any('val_accuracy' in r for r in run['log']) else 'test'
    try:
        epochs = [r for r in run['log'] if r['epoch'] > 0]
        run['epochs_done'] = epochs[-1]['epoch'] if epochs else 0
        run['wall_time'] = float(sum(r.get('epoch_time', 0.0) for r in epochs))
        if run['summary'] is not None:
            # percent, rounded off float noise (100 * (1 - 0.3715) = 62.85000000000001)
            run['final_error'] = round(100 * _summary_error(run, 'final'), 6)
            run['best_error'] = round(100 * _summary_error(run, 'best'), 6)
    except (TypeError, KeyError) as error:
        raise ValueError(f'unexpected values in log.json or summary.json ({type(error).__name__}: {error})') from None
    return run


def _summary_error(run, which):
    split, summary = run['split'], run['summary']
    if f'{which}_{split}_accuracy' in summary:
        return 1 - float(summary[f'{which}_{split}_accuracy'])
    evaluated = [r[f'{split}_accuracy'] for r in run['log'] if r['epoch'] > 0 and f'{split}_accuracy' in r]
    if not evaluated:
        raise ValueError(f'summary.json has no {which}_{split}_accuracy and log.json no {split}_accuracy')
    return 1 - (evaluated[-1] if which == 'final' else max(evaluated))


def collect(roots, report):
    """Experiments under ``roots``: dicts of name, path, group and runs, sorted by group and name.

    A run folder named by a number is a seed of the experiment its parent folder holds
    (``results/NAME/<seed>/``, as run_experiments.sh writes); any other run folder is an experiment
    of its own. ``report(line)`` receives one line per folder that could not be read.
    """
    experiments = {}
    seen = set()
    for root in roots:
        base = _naming_base(root)
        for folder in find_run_folders(root):
            real = os.path.realpath(folder)
            if real in seen:
                continue
            seen.add(real)
            try:
                run = read_run(folder)
            except ValueError as error:
                report(f'{folder}: skipped: {error}')
                continue
            run_folder = os.path.normpath(folder)
            experiment_folder = os.path.dirname(run_folder) if os.path.basename(run_folder).isdigit() else run_folder
            key = os.path.realpath(experiment_folder or '.')
            if key not in experiments:
                experiments[key] = dict(_experiment_names(base, experiment_folder), path=experiment_folder or '.',
                                        base=base, runs=[])
            experiments[key]['runs'].append(run)
    for experiment in experiments.values():
        experiment['runs'].sort(key=lambda run: _natural_key(os.path.basename(run['path'])))
    return sorted(experiments.values(), key=lambda e: (_natural_key(e['group']), _natural_key(e['name'])))


def _naming_base(root):
    """The folder experiment names are relative to: the nearest ``results`` folder at or above
    ``root`` (so ``results/rp56`` and ``results/cpu_reg`` name their experiments ``rp56/...`` and
    ``cpu_reg/...``, as run_experiments.sh does), else ``root`` itself."""
    path = os.path.normpath(root)
    while True:
        if os.path.basename(path) == 'results':
            return path
        parent = os.path.dirname(path)
        if parent == path or not parent:
            return os.path.normpath(root)
        path = parent


def _experiment_names(base, folder):
    """The experiment's name (its path relative to ``base``) and its top-level folder under ``base``."""
    relative = os.path.relpath(folder or '.', base)
    if relative == '.' or relative.startswith('..'):
        name = os.path.normpath(os.path.join(base, relative))  # runs directly in the given folder
        return {'name': name, 'group': name}
    parts = relative.split(os.sep)
    group = os.path.join(base, parts[0]) if len(parts) > 1 else base
    return {'name': '/'.join(parts), 'group': os.path.normpath(group)}


def _natural_key(text):
    return [(0, int(part), '') if part.isdigit() else (1, 0, part) for part in re.split(r'(\d+)', text)]


# ----------------------------------------------------------------------------- statistics

def ignored_settings():
    """Settings that may differ between the runs of one experiment: the seed and main.py's run-only flags.

    Epochs may be raised on --resume (hence run-only for main.py), but runs of different lengths
    are different experiments.
    """
    return (flags.RUN_ONLY_FLAGS - {'epochs'}) | {'seed'}


def differing_settings(runs):
    """``{setting: {run folder name: value}}`` for settings that differ between ``runs``."""
    names = sorted({key for run in runs for key in run['config']['settings']} - ignored_settings())
    missing = object()
    differ = {}
    for key in names:
        values = [run['config']['settings'].get(key, missing) for run in runs]
        if any(value != values[0] for value in values[1:]):
            differ[key] = {os.path.basename(run['path']): ('(not recorded)' if value is missing else value)
                           for run, value in zip(runs, values)}
    return differ


def hardware(config):
    environment = config.get('environment') or {}
    device = environment.get('gpu')
    if device is not None and environment.get('gpu_count', 1) > 1:
        device = f'{environment["gpu_count"]}x {device}'
    device = device or str(environment.get('device', 'cpu')).split(':')[0].upper()
    return f'{device}, torch {environment.get("torch", "?")}'


DATA_FIELDS = ('dataset', 'folder', 'train_images', 'test_images', 'split')


def run_data(run):
    """The data a run read: ``{'dataset', 'folder', 'train_images', 'test_images', 'split'}``, None where unknown.

    config.json's ``"data": {"dataset": ..., "train_images": N, "test_images": N, "test_split": "test"}``
    where main.py records it (the training images after any --val_ratio hold-out, the evaluated ones);
    else the settings' dataset, and the evaluated images counted in log.json (images/s times time of
    an evaluation, which covers the whole split; the training images per epoch are not the set's size,
    as the last partial batch is dropped). ``folder`` is the last part of --dataset_dir.
    """
    config, settings = run['config'], run['config']['settings']
    recorded = config.get('data') if isinstance(config.get('data'), dict) else {}
    directory = settings.get('dataset_dir')
    data = {
        'dataset': recorded.get('dataset', settings.get('dataset')),
        'folder': os.path.basename(os.path.normpath(str(directory))) if directory else None,
        'train_images': _image_count(recorded.get('train_images')),
        'test_images': _image_count(recorded.get('test_images')),
        'split': recorded.get('test_split') or run['split'],
    }
    if data['test_images'] is None:
        split = run['split']
        counted = [record[f'{split}_images_per_sec'] * record[f'{split}_time'] for record in run['log']
                   if _is_number(record.get(f'{split}_images_per_sec')) and _is_number(record.get(f'{split}_time'))]
        data['test_images'] = round(max(counted)) if counted else None
    return data


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _image_count(value):
    return int(value) if _is_number(value) and value >= 0 else None


def data_text(data):
    """``CIFAR10 (c10k): 10,000 train, 2,000 test``; the parts not known are left out."""
    text = str(data['dataset'] or '?') + (f' ({data["folder"]})' if data['folder'] else '')
    counts = ([f'{data["train_images"]:,} train'] if data['train_images'] is not None else []) + (
        [f'{data["test_images"]:,} {data["split"]}'] if data['test_images'] is not None else [])
    return text + (': ' + ', '.join(counts) if counts else '')


def _same_data(a, b):
    return all(a[key] == b[key] for key in DATA_FIELDS if a[key] is not None and b[key] is not None)


def experiment_data(runs):
    """``(texts, differing)``: the one description of the runs' data, its parts merged over the runs (one run
    may record what another does not), or, where two runs disagree, every description and
    ``{run folder name: description}``."""
    described = [run_data(run) for run in runs]
    if all(_same_data(a, b) for i, a in enumerate(described) for b in described[i + 1:]):
        merged = {key: next((d[key] for d in described if d[key] is not None), None) for key in DATA_FIELDS}
        return [data_text(merged)], {}
    differing = {os.path.basename(run['path']): data_text(data) for run, data in zip(runs, described)}
    return sorted(set(differing.values())), differing


def _published(experiment, figures):
    """The published figure whose NAME is the longest tail of the experiment's folder path."""
    parts = os.path.realpath(experiment['path']).split(os.sep)
    best = None
    for name, figure in figures.items():
        tail = name.split('/')
        if parts[-len(tail):] == tail and (best is None or len(tail) > len(best[0].split('/'))):
            best = (name, figure)
    return best[1] if best else None


def summarize_experiment(experiment, figures):
    """One table row as data (numbers unformatted; errors in percent, times in seconds)."""
    runs = experiment['runs']
    finished = [run for run in runs if run['summary'] is not None]
    errors = [run['final_error'] for run in finished]
    done = [run['epochs_done'] for run in runs]
    planned = sorted({run['config']['settings'].get('epochs') for run in runs}, key=str)
    published = _published(experiment, figures)
    data, differing_data = experiment_data(runs)
    return {
        'experiment': experiment['name'],
        'path': experiment['path'],
        'group': experiment['group'],
        'finished': len(finished),
        'in_progress': len(runs) - len(finished),
        'split': '/'.join(sorted({run['split'] for run in runs})),
        'final_errors': errors,
        'error_median': statistics.median(errors) if errors else None,
        'error_mean': statistics.mean(errors) if errors else None,
        'error_std': statistics.stdev(errors) if len(errors) > 1 else None,
        'best_error_median': statistics.median(run['best_error'] for run in finished) if finished else None,
        'epochs_done_min': min(done),
        'epochs_done_max': max(done),
        'epochs_planned': planned[0] if len(planned) == 1 else planned,
        'wall_time_s': statistics.median(run['wall_time'] for run in finished) if finished else None,
        'hardware': sorted({hardware(run['config']) for run in runs}),
        'data': data,
        'differing_data': differing_data,
        'published_error': float(published[0]) if published else None,
        'published_text': published[0] if published else None,
        'published_runs': published[1] if published else None,
        'differing_settings': differing_settings(runs),
    }


# ----------------------------------------------------------------------------- output

def format_duration(seconds):
    if seconds is None:
        return '–'
    if seconds < 60:
        return f'{seconds:.0f} s'
    minutes = round(seconds / 60)
    if minutes < 60:
        return f'{int(seconds // 60)}m{int(seconds % 60):02d}s'
    return f'{minutes // 60}h{minutes % 60:02d}m'


def _percent(value):
    return '–' if value is None else f'{value:.2f}'


def markdown_cells(row):
    runs = f'{row["finished"]}' + (f' + {row["in_progress"]} in progress' if row['in_progress'] else '')
    mean_std = '–' if row['error_mean'] is None else (
        f'{row["error_mean"]:.2f}' + (f' ± {row["error_std"]:.2f}' if row['error_std'] is not None else ''))
    low, high = row['epochs_done_min'], row['epochs_done_max']
    planned = row['epochs_planned']
    planned = ', '.join(map(str, planned)) if isinstance(planned, list) else ('?' if planned is None else planned)
    published = '–' if row['published_text'] is None else (
        f'{row["published_text"]}' + (f' ({row["published_runs"]})' if row['published_runs'] else ''))
    experiment = row['experiment'] + (' (val split)' if 'val' in row['split'] else '')
    return {
        'experiment': experiment + (' *' if row['differing_settings'] or row['differing_data'] else ''),
        'runs': runs,
        'error_median': _percent(row['error_median']),
        'error_mean_std': mean_std,
        'best_error_median': _percent(row['best_error_median']),
        'epochs': f'{low if low == high else f"{low}-{high}"}/{planned}',
        'wall_time': format_duration(row['wall_time_s']),
        'hardware': '; '.join(row['hardware']),
        'data': ('differ: ' if row['differing_data'] else '') + '; '.join(row['data']),
        'published': published,
    }


def difference_lines(rows):
    lines = []
    for row in rows:
        if row['differing_settings']:
            described = '; '.join(
                f'{key} (' + ', '.join(f'{run}: {json.dumps(value, default=str)}' for run, value in values.items())
                + ')' for key, values in row['differing_settings'].items())
            lines.append(f'* {row["experiment"]}: settings differ between runs: {described}')
        if row['differing_data']:
            described = '; '.join(f'{run}: {text}' for run, text in row['differing_data'].items())
            lines.append(f'* {row["experiment"]}: data differ between runs: {described}')
    return lines


def markdown_table(rows, columns=COLUMNS):
    lines = ['| ' + ' | '.join(header for _, header in columns) + ' |',
             '|' + '---|' * len(columns)]
    for row in rows:
        cells = markdown_cells(row)
        lines.append('| ' + ' | '.join(cells[key].replace('|', '\\|') for key, _ in columns) + ' |')
    notes = difference_lines(rows)
    return '\n'.join(lines + ([''] + notes if notes else [])) + '\n'


CSV_FIELDS = ['experiment', 'path', 'group', 'finished', 'in_progress', 'split', 'error_median', 'error_mean',
              'error_std', 'best_error_median', 'epochs_done_min', 'epochs_done_max', 'epochs_planned', 'wall_time_s',
              'hardware', 'data', 'published_error', 'published_runs', 'final_errors', 'differing_settings',
              'differing_data']


def csv_table(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator='\n')
    writer.writeheader()
    for row in rows:
        cells = {}
        for key in CSV_FIELDS:
            value = row[key]
            if key == 'differing_settings':
                value = ' '.join(sorted(value))
            elif key == 'differing_data':
                value = '; '.join(f'{run}: {text}' for run, text in value.items())
            elif isinstance(value, list):
                value = '; '.join(map(str, value))
            cells[key] = '' if value is None else value
        writer.writerow(cells)
    return out.getvalue()


def json_table(rows):
    return json.dumps([{key: row[key] for key in CSV_FIELDS} for row in rows], indent=2, default=str) + '\n'


def readme_block(rows, command):
    """The generated block: one table per top-level results folder, headed by its hardware."""
    columns = [column for column in COLUMNS if column[0] != 'hardware']
    parts = [README_BEGIN, f'<!-- written by {command}; edits inside this block are overwritten -->', '']
    groups = {}
    for row in rows:
        groups.setdefault(row['group'], []).append(row)
    for group, members in groups.items():
        hardware_text = '; '.join(sorted({h for row in members for h in row['hardware']}))
        parts += [f'### `{group}`: {hardware_text}', '', markdown_table(members, columns)]
    parts.append(README_END)
    return '\n'.join(parts) + '\n'


def replace_readme_block(text, block):
    """``text`` with the marked block replaced by ``block`` (appended when there are no markers)."""
    begin = text.find(README_BEGIN)
    if begin < 0:
        separator = '' if not text or text.endswith('\n\n') else ('\n' if text.endswith('\n') else '\n\n')
        return text + separator + block
    end = text.find(README_END, begin)
    if end < 0:
        raise SummarizeError(f'has {README_BEGIN} but no {README_END} after it')
    end += len(README_END)
    if text.startswith('\r\n', end):
        end += 2
    elif text.startswith('\n', end):
        end += 1
    return text[:begin] + block + text[end:]


def write_readme(path, block):
    try:
        with open(path, newline='') as f:
            text = f.read()
    except FileNotFoundError:
        text = ''
    except (OSError, UnicodeDecodeError) as error:
        raise SummarizeError(f'--readme {path}: cannot read ({error})') from None
    try:
        text = replace_readme_block(text, block)
    except SummarizeError as error:
        raise SummarizeError(f'--readme {path}: {error}') from None
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp_path = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, 'w', newline='') as f:
            f.write(text)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


# ----------------------------------------------------------------------------- plots

def _curve(runs, key, scale=None):
    """Epochs, and the median, min, max and number of runs at each epoch of ``record[key]`` (``scale(value)``)."""
    by_epoch = {}
    for run in runs:
        for record in run['log']:
            if record['epoch'] > 0 and _is_number(record.get(key)):
                by_epoch.setdefault(record['epoch'], []).append(record[key] if scale is None else scale(record[key]))
    epochs = sorted(by_epoch)
    return (epochs, [statistics.median(by_epoch[e]) for e in epochs], [min(by_epoch[e]) for e in epochs],
            [max(by_epoch[e]) for e in epochs], [len(by_epoch[e]) for e in epochs])


def _error(accuracy):
    return 100 * (1 - accuracy)


def _legend_label(experiment):
    """The experiment's name inside its table (``plain`` of ``cpu_seeds/plain``), final error and runs."""
    runs = experiment['runs']
    prefix = _figure_name(experiment['group'], experiment['base']) + '/'
    name = experiment['name'][len(prefix):] if experiment['name'].startswith(prefix) else experiment['name']
    errors = [run['final_error'] for run in runs if run['summary'] is not None]
    running = len(runs) - len(errors)
    count = f'{len(runs)} run{"s" * (len(runs) > 1)}' + (f', {running} in progress' if running else '')
    final = f'{statistics.median(errors):.2f}%' + (' median' if len(errors) > 1 else '') if errors else 'no final'
    mixed = any(r.get('train_accuracy_kind') == 'lambda-weighted' for run in runs for r in run['log'])
    return f'{name}: {final} ({count})' + ('\n  train error on label-mixed targets' if mixed else '')


def overlay_figure(experiments, title, subtitle=''):
    """The experiments of a table in one figure, returned unsaved (needs matplotlib).

    Top panel: test (or val) error against epoch, a line per experiment through the median over its runs,
    its min-max band where two or more runs reached that epoch, train error dashed in the same colour.
    Bottom panel: the learning rate at each epoch's first step. Lines carry ``gid`` ``test:NAME``,
    ``train:NAME``, ``lr:NAME``. Epoch ticks are integers; short runs get markers.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    figure = Figure(figsize=(10, 6.4), dpi=100, layout='constrained')
    FigureCanvasAgg(figure)
    error_axes, lr_axes = figure.subplots(2, 1, sharex=True, gridspec_kw={'height_ratios': [2.4, 1]})
    colors = matplotlib.colormaps['tab10' if len(experiments) <= 10 else 'tab20']
    last_epoch, schedules, splits = 1, [], set()
    for index, experiment in enumerate(experiments):
        color = colors(index % colors.N)
        runs = experiment['runs']
        split = runs[0]['split']
        splits.add(split)
        epochs, median, low, high, counts = _curve(runs, f'{split}_accuracy', _error)
        marker = dict(marker='o', markersize=4) if len(epochs) <= 30 else {}
        if epochs:
            last_epoch = max(last_epoch, epochs[-1])
            error_axes.plot(epochs, median, color=color, linewidth=1.8, label=_legend_label(experiment),
                            gid=f'test:{experiment["name"]}', **marker)
            spread = [count > 1 for count in counts]
            if any(a and b for a, b in zip(spread, spread[1:])):
                error_axes.fill_between(epochs, low, high, where=spread, color=color, alpha=0.18, linewidth=0,
                                        gid=f'band:{experiment["name"]}')
            # an epoch whose neighbours have no spread makes no band: a min-max bar instead
            lone = [i for i, wide in enumerate(spread)
                    if wide and not (i > 0 and spread[i - 1]) and not (i + 1 < len(spread) and spread[i + 1])]
            if lone:
                error_axes.vlines([epochs[i] for i in lone], [low[i] for i in lone], [high[i] for i in lone],
                                  color=color, alpha=0.45, linewidth=5, gid=f'band:{experiment["name"]}')
        epochs, median, *_ = _curve(runs, 'train_accuracy', _error)
        if epochs:
            last_epoch = max(last_epoch, epochs[-1])
            error_axes.plot(epochs, median, color=color, linewidth=1.0, linestyle='--', alpha=0.6,
                            gid=f'train:{experiment["name"]}')
        epochs, median, *_ = _curve(runs, 'lr')
        if epochs:
            last_epoch = max(last_epoch, epochs[-1])
            schedules.append((epochs, median))
            lr_axes.plot(epochs, median, color=color, linewidth=1.4, gid=f'lr:{experiment["name"]}', **marker)
    split = '/'.join(sorted(splits, reverse=True)) or 'test'
    error_axes.set_ylabel('error (%)')
    error_axes.set_title(title + (f'\n{subtitle}' if subtitle else ''), fontsize=10, loc='left')
    lr_axes.set_ylabel('learning rate\n(epoch start)')
    lr_axes.set_xlabel('epoch')
    if len(schedules) > 1 and all(schedule == schedules[0] for schedule in schedules):
        for line in lr_axes.lines:
            line.set_color('0.35')
        lr_axes.text(0.99, 0.95, 'the same for every experiment', transform=lr_axes.transAxes, ha='right', va='top',
                     fontsize=8, color='0.3')
    lrs = [lr for _, median in schedules for lr in median]
    if not lrs:
        lr_axes.text(0.5, 0.5, 'no "lr" in log.json', transform=lr_axes.transAxes, ha='center', va='center',
                     fontsize=8, color='0.3')
        lr_axes.set_yticks([])
    elif min(lrs) > 0 and max(lrs) / min(lrs) >= 30:
        lr_axes.set_yscale('log')
    else:
        lr_axes.set_ylim(bottom=0, top=max(lrs) * 1.1 or None)
    if last_epoch <= 20:  # short runs: a tick per epoch, half an epoch of margin
        lr_axes.set_xticks(range(1, last_epoch + 1))
        lr_axes.set_xlim(0.5, last_epoch + 0.5)
    else:
        lr_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        lr_axes.set_xlim(0, last_epoch * 1.02)
    for axes in (error_axes, lr_axes):
        axes.grid(True, alpha=0.3)
    if error_axes.lines:
        handles, labels = error_axes.get_legend_handles_labels()
        handles += [Line2D([], [], color='0.3', linewidth=1.8), Line2D([], [], color='0.3', linestyle='--')]
        labels += [f'{split} error: median, band min-max over runs', 'train error: median']
        error_axes.legend(handles, labels, loc='upper left', bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    return figure


def _figure_name(group, base):
    relative = os.path.relpath(group, base)
    return os.path.basename(os.path.abspath(base)) if relative == '.' or relative.startswith('..') else relative


def plot_groups(experiments, folder=None):
    """``[(path, title, experiments)]``: one figure per top-level folder (a table of the README block),
    ``folder/<folder name>.png``, by default in ``plots/`` inside the results folder the names are relative to."""
    groups = {}
    for experiment in experiments:
        groups.setdefault(experiment['group'], []).append(experiment)
    planned, taken = [], set()
    for group, members in groups.items():
        base = members[0]['base']
        name = _figure_name(group, base).replace(os.sep, '_')
        directory = os.path.join(base, PLOTS_FOLDER) if folder is None else folder
        path, number = os.path.join(directory, name + '.png'), 1
        while path in taken:
            number += 1
            path = os.path.join(directory, f'{name}-{number}.png')
        taken.add(path)
        planned.append((path, group, members))
    return planned


def _subtitle(experiments):
    """The data and hardware of the figure's runs, as the table shows them."""
    data = sorted({text for experiment in experiments for text in experiment_data(experiment['runs'])[0]})
    machines = sorted({hardware(run['config']) for experiment in experiments for run in experiment['runs']})
    return '; '.join(data + machines)


def write_plots(experiments, folder, report):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        report('plots skipped: matplotlib is not installed (pip install matplotlib)')
        return []
    written = []
    for path, title, members in plot_groups(experiments, folder):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            overlay_figure(members, title, _subtitle(members)).savefig(path)
        except OSError as error:
            report(f'{path}: plot not written ({error})')
            continue
        written.append(path)
    return written


# ----------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SummarizeError(message)


def get_args_parser():
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', nargs='+', metavar='PATH',
                        help='results folders: every run folder (config.json + log.json) below them is read')
    output = parser.add_mutually_exclusive_group()
    output.add_argument('--csv', action='store_true', help='print the table as CSV instead of Markdown')
    output.add_argument('--json', action='store_true', help='print the table as a JSON list instead of Markdown')
    plots = parser.add_mutually_exclusive_group()
    plots.add_argument('--plots', metavar='DIR', default=None,
                       help=f'write one figure per top-level folder (its experiments overlaid: error and learning '
                            f'rate against epoch) to DIR/<folder>.png (default: {PLOTS_FOLDER}/ inside the results '
                            f'folder, ignored by git there)')
    plots.add_argument('--no-plots', dest='no_plots', action='store_true', help='write no plots')
    parser.add_argument('--readme', metavar='FILE',
                        help=f'rewrite the block between {README_BEGIN} and {README_END} in FILE '
                             f'(appended at the end when absent) with one table per top-level folder')
    return parser


def main(argv=None):
    """Run the summarizer; returns the exit status (2: bad arguments, one line on stderr; 1: no runs found)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return summarize(get_args_parser().parse_args(argv))
    except SummarizeError as error:
        print(f'summarize.py: error: {error}', file=sys.stderr)
        return 2


def summarize(args):
    for path in args.paths:
        if not os.path.isdir(path):
            raise SummarizeError(f'{path}: ' + ('not a folder' if os.path.exists(path) else 'no such folder'))
    if args.readme and not os.path.isdir(os.path.dirname(os.path.abspath(args.readme))):
        raise SummarizeError(f'--readme {args.readme}: its folder does not exist')

    def report(line):
        print(line, file=sys.stderr)

    experiments = collect(args.paths, report)
    if not experiments:
        report(f'no run folders (config.json + log.json) under {", ".join(args.paths)}')
        return 1
    figures = published_figures()
    rows = [summarize_experiment(experiment, figures) for experiment in experiments]
    if args.csv:
        sys.stdout.write(csv_table(rows))
    elif args.json:
        sys.stdout.write(json_table(rows))
    else:
        sys.stdout.write(markdown_table(rows))
    if not args.no_plots:
        written = write_plots(experiments, args.plots, report)
        if written:
            report(f'wrote {len(written)} plot{"s" * (len(written) > 1)}: {", ".join(written)}')
    if args.readme:
        command = ' '.join(['./summarize.py', *args.paths, '--readme', args.readme])
        write_readme(args.readme, readme_block(rows, command))
        report(f'rewrote the {README_BEGIN} block of {args.readme}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
