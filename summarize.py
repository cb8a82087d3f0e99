#!/usr/bin/env python
"""Summarize finished and running experiments: a table per experiment, error curves, README block.

    ./summarize.py results/                       # Markdown table of every experiment under results/
    ./summarize.py results/rp56 --csv             # the same table as CSV (--json: a list of objects)
    ./summarize.py results/ --plots figures/      # error curves in figures/<experiment>.png
    ./summarize.py results/ --readme results/README.md   # rewrite the generated block of that file

A run is a folder holding config.json and log.json (main.py's --outdir); it is finished when
summary.json is there too, else in progress (or stopped). An experiment is the run's parent
folder, named by its path relative to the given folder, so the seeds 0, 1, 2 of
results/rp56/cutout/ form the experiment rp56/cutout. Statistics of the final test error are
over finished runs; the best-epoch error is selected on the test set and so is optimistic.
Runs of one experiment whose settings differ (other than the seed and main.RUN_ONLY_FLAGS,
epochs excepted) are reported by name. Published figures come from run_experiments.sh lines
``# published: NAME ERROR_PERCENT RUNS_DESCRIPTION`` (NAME as in results/NAME/<seed>).
Without matplotlib the table still prints and the plots are skipped with one line.
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

EXPERIMENTS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'run_experiments.sh')
README_BEGIN = '<!-- summarize:begin -->'
README_END = '<!-- summarize:end -->'
PLOT_NAME = 'error_curves.png'
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
                                        runs=[])
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
    are different experiments. main is imported here, not at the top: it imports torch, which a
    bad command line need not wait for.
    """
    import main
    return (main.RUN_ONLY_FLAGS - {'epochs'}) | {'seed'}


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


def data_copy(config):
    """The data a run read: 'JPEG copy' only where config.json says so, else the dataset and its folder."""
    settings = config['settings']
    described = json.dumps({k: v for k, v in config.items() if k != 'settings'}, default=str)
    described += ' ' + str(settings.get('dataset_dir'))
    where = f'{settings.get("dataset", "?")} from {settings.get("dataset_dir")}'
    return f'JPEG copy ({where})' if 'jpeg' in described.lower() else where


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
        'data': sorted({data_copy(run['config']) for run in runs}),
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
        'experiment': experiment + (' *' if row['differing_settings'] else ''),
        'runs': runs,
        'error_median': _percent(row['error_median']),
        'error_mean_std': mean_std,
        'best_error_median': _percent(row['best_error_median']),
        'epochs': f'{low if low == high else f"{low}-{high}"}/{planned}',
        'wall_time': format_duration(row['wall_time_s']),
        'hardware': '; '.join(row['hardware']),
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
              'hardware', 'data', 'published_error', 'published_runs', 'final_errors', 'differing_settings']


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
            elif isinstance(value, list):
                value = '; '.join(map(str, value))
            cells[key] = '' if value is None else value
        writer.writerow(cells)
    return out.getvalue()


def json_table(rows):
    return json.dumps([{key: row[key] for key in CSV_FIELDS} for row in rows], indent=2, default=str) + '\n'


def readme_block(rows, command):
    """The generated block: one table per top-level results folder, headed by its hardware and data."""
    columns = [column for column in COLUMNS if column[0] != 'hardware']
    parts = [README_BEGIN, f'<!-- written by {command}; edits inside this block are overwritten -->', '']
    groups = {}
    for row in rows:
        groups.setdefault(row['group'], []).append(row)
    for group, members in groups.items():
        hardware_text = '; '.join(sorted({h for row in members for h in row['hardware']}))
        data_text = '; '.join(sorted({d for row in members for d in row['data']}))
        parts += [f'### `{group}`: {hardware_text}; data: {data_text}', '', markdown_table(members, columns)]
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

def _curve(runs, key):
    """Epochs and the median, min and max over runs of ``100 * (1 - record[key])`` at each epoch."""
    by_epoch = {}
    for run in runs:
        for record in run['log']:
            if record['epoch'] > 0 and record.get(key) is not None:
                by_epoch.setdefault(record['epoch'], []).append(100 * (1 - record[key]))
    epochs = sorted(by_epoch)
    return (epochs, [statistics.median(by_epoch[e]) for e in epochs],
            [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs])


def plot_experiment(experiment, path):
    """Train and test error against epoch: median over the runs, min-max band. Needs matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    runs = experiment['runs']
    split = runs[0]['split']
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    mixed = any(r.get('train_accuracy_kind') == 'lambda-weighted' for run in runs for r in run['log'])
    for key, label in (('train_accuracy', 'train' + (' (label-mixed targets)' if mixed else '')),
                       (f'{split}_accuracy', split)):
        epochs, median, low, high = _curve(runs, key)
        if not epochs:
            continue
        line, = axes.plot(epochs, median, marker='o' if len(epochs) < 20 else None, markersize=3, label=label)
        if len(runs) > 1:
            axes.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    running = sum(run['summary'] is None for run in runs)
    count = f'{len(runs)} run{"s" * (len(runs) > 1)}' + (f' ({running} in progress)' if running else '')
    summary = f'median of {count}, band: min-max' if len(runs) > 1 else count
    axes.set_title(f'{experiment["name"]}: {summary}', fontsize=10)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel('epoch')
    axes.set_ylabel('error (%)')
    axes.grid(True, alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)


def plot_path(experiment, folder, taken=()):
    """``PLOT_NAME`` in the experiment's folder, or ``folder/<experiment name>.png`` (its path if that is taken)."""
    if folder is None:
        return os.path.join(experiment['path'], PLOT_NAME)
    for name in (experiment['name'], experiment['path']):
        parts = [p for p in name.replace(os.sep, '/').split('/') if p not in ('', '.', '..')] or ['experiment']
        path = os.path.join(folder, *parts[:-1], parts[-1] + '.png')
        if path not in taken:
            break
    return path


def write_plots(experiments, folder, report):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        report('plots skipped: matplotlib is not installed (pip install matplotlib)')
        return []
    written = []
    for experiment in experiments:
        path = plot_path(experiment, folder, written)
        try:
            plot_experiment(experiment, path)
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
                       help=f'write each experiment\'s error curves to DIR/<experiment>.png '
                            f'(default: {PLOT_NAME} inside each experiment folder)')
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
