"""Bad input, generated: malformed command lines from the declared flag domains (each flag's argparse
type, flags.domains(main.get_args_parser()); Domain.invalid), violated relations between flags, and broken --config files.

Every case runs main.cli in-process and must end with exit status 2, exactly one line on stderr
naming a flag, of a readable length, no traceback, and the disk as it was: no run directory
created, an existing run directory (and everything else in the working folder) unchanged byte for
byte. The damaged-file cases give the same command lines files that would run code (CIFAR pickles,
checkpoints), damaged CIFAR batches, images PIL refuses, a --config nested too deep, weights and
checkpoints that hold the wrong object or have a flipped bit, damaged config.json files beside weights,
folders --resume must not write into and a run folder another run holds locked; a file whose code ran
would leave a marker in the working folder. ``test_report`` prints how many cases ran
(``pytest -s``).
"""
import hashlib
import itertools
import json
import os
import warnings

import pytest

import torch

import hostile
import main
import models
import flags
import utils
from conftest import write_cifar10

# A small model and run: a case that passed every check would train for seconds, so none must.
BASE = ['--arch', 'resnet', '--depth', '8', '--base_channels', '4', '--epochs', '2', '--batch_size', '20',
        '--device', 'cpu', '--no-tensorboard', '--milestones', '[1]', '--no-download']
# Values a --config file may hold by mistake: each case uses those its flag's domain refuses.
JSON_CANDIDATES = ['x', '', 1.5, -1, 0, 10**30, True, None, [], [1, 2, 3], ['a'], {'a': 1}]


@pytest.fixture(scope='module')
def tally():
    return {}


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A working folder with a dataset and a finished-looking run that no bad command may touch."""
    root = tmp_path_factory.mktemp('fuzz')
    work = root / 'work'
    write_cifar10(str(work / 'data'))
    existing = work / 'existing_run'
    existing.mkdir()
    (existing / 'config.json').write_text('{"settings": {"arch": "resnet"}}\n')
    (existing / 'log.json').write_text('[{"epoch": 1, "test_accuracy": 0.5}]\n')
    (existing / 'checkpoint.pth').write_bytes(b'not a real checkpoint' * 10)
    (existing / 'model_state.pth').write_bytes(os.urandom(256))
    configs = root / 'configs'
    configs.mkdir()
    return {'root': root, 'work': work, 'data': str(work / 'data'), 'existing': str(existing),
            'new': str(work / 'new_run'), 'configs': configs}


def tree_digest(folder):
    """A hash of every path (files, folders, links) under ``folder`` and of every file's bytes."""
    digest = hashlib.sha256()
    for directory, subdirs, files in sorted(os.walk(folder)):
        subdirs.sort()
        digest.update(os.fsencode(directory) + b'\0')
        for name in sorted(files):
            path = os.path.join(directory, name)
            digest.update(os.fsencode(name) + b'\0')
            with open(path, 'rb') as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def run_case(argv, workspace, capsys, monkeypatch):
    """main.cli(argv) in the working folder; '' when it failed as bad input must, else what went wrong."""
    monkeypatch.chdir(workspace['work'])
    before = tree_digest(workspace['work'])
    capsys.readouterr()
    try:
        main.cli(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    except BaseException as error:  # a traceback: the case fails, the loop goes on
        code = f'{type(error).__name__}: {error}'
    out, err = capsys.readouterr()
    problems = []
    if code != 2:
        problems.append(f'exit {code}')
    lines = err.splitlines()
    if len(lines) != 1 or not err.endswith('\n'):
        problems.append(f'{len(lines)} stderr lines')
    if len(err) > utils.UsageError.MAX_LENGTH + 100:
        problems.append(f'a line of {len(err):,} characters')
    if 'Traceback' in err:
        problems.append('traceback')
    if '--' not in err and 'unrecognized' not in err:
        problems.append('no flag named')
    if os.path.exists(workspace['new']):
        problems.append('outdir created')
    if tree_digest(workspace['work']) != before:
        problems.append('files changed')
    return f'{ascii(argv[len(BASE):] if argv[:len(BASE)] == BASE else argv)}: {", ".join(problems)}: ' \
           f'{ascii(err[-300:])}' if problems else ''


def run_cases(cases, workspace, capsys, monkeypatch, tally, kind):
    failures = [problem for argv in cases if (problem := run_case(argv, workspace, capsys, monkeypatch))]
    tally[kind] = len(cases)
    assert not failures, f'{len(failures)} of {len(cases)} cases misbehaved:\n' + '\n'.join(failures[:30])


def base(workspace, outdir=None):
    return [*BASE, '--dataset_dir', workspace['data'], '--outdir', outdir or workspace['new']]


def flag_actions():
    return [action for action in main.get_args_parser()._actions if action.option_strings and action.dest != 'help']


# ----------------------------------------------------------------------------- every flag has a domain

def test_every_flag_has_a_domain():
    """A flag's argparse type is its domain (a flags.Domain); a flag added with a plain type fails here."""
    domains = flags.domains(main.get_args_parser())
    dests = {action.dest for action in flag_actions()}
    missing = sorted((dests | set(models.model_flags())) - set(domains))
    assert not missing, f'give these flags a flags.Domain as their argparse type: {missing}'
    plain = sorted(action.dest for action in flag_actions()
                   if action.type is not None and not isinstance(action.type, flags.Domain))
    assert not plain, f'these flags parse with a plain type instead of their domain: {plain}'


def test_defaults_and_registered_settings_lie_in_their_domains():
    domains = flags.domains(main.get_args_parser())
    for action in main.get_args_parser()._actions:
        if action.option_strings and action.dest != 'help':
            domains[action.dest].check(action.default)
    for arch in models.list_models():
        for name, value in {**models.train_defaults(arch), **(models.get_test_config(arch) or {})}.items():
            domains[name].check(value)
        for name, value in models.model_params(arch).items():  # the builders' own defaults (tuples as lists)
            domains[name].check(list(value) if isinstance(value, tuple) else value)


@pytest.mark.parametrize('domain', [
    flags.Int(1), flags.Int(0, 10, optional=True), flags.Real(0, None, '(]'), flags.Real(0, 1, '[)'),
    flags.Choice(('a', 'b')), flags.Bool(), flags.Text(path=True),
    flags.ListOf(flags.Real(0, 1, '(]'), 2, ordered=True), flags.ListOf(flags.Int(1), (1, None))])
def test_domains_refuse_their_invalid_texts_and_accept_their_valid_ones(domain):
    def parse(text):
        try:
            return json.loads(text)
        except ValueError:
            return text
    for text in domain.valid():
        domain.check(parse(text))
    for text in domain.invalid():
        with pytest.raises(ValueError):
            domain.check(parse(text))


# ----------------------------------------------------------------------------- generated cases

def generated_flag_cases(workspace):
    """Each flag with each invalid text of its domain, as ``--flag TEXT`` and ``--flag=TEXT``, and
    without the value it needs."""
    cases, domains = [], flags.domains(main.get_args_parser())
    for action in flag_actions():
        option = action.option_strings[0]
        if action.nargs == 0:  # store_true / store_false: no value at all
            cases.append([*base(workspace), f'{option}=1'])
            continue
        for text in domains[action.dest].invalid():
            cases.append([*base(workspace), option, text])
            cases.append([*base(workspace), f'{option}={text}'])
        if action.nargs is None:
            cases.append([*base(workspace), option])
    return cases


def test_invalid_values_of_every_flag(workspace, capsys, monkeypatch, tally):
    cases = generated_flag_cases(workspace)
    assert len(cases) > 500
    run_cases(cases, workspace, capsys, monkeypatch, tally, 'flag values')


def test_invalid_values_against_an_existing_run(workspace, capsys, monkeypatch, tally):
    """The same values aimed at a finished run's directory (with --resume): it stays as it was."""
    cases = [[*argv, '--outdir', workspace['existing'], '--resume'] for argv in generated_flag_cases(workspace)[::3]
             if not argv[len(base(workspace))].startswith('--outdir')]  # not a bad --outdir given a good one
    run_cases(cases, workspace, capsys, monkeypatch, tally, 'flag values, existing run')


def config_cases(workspace):
    """--config files holding each flag with each JSON value its domain refuses, and broken files."""
    folder = workspace['configs']
    cases = []

    def write(name, content):
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    for name, domain in flags.domains(main.get_args_parser()).items():
        if name == 'config':
            continue
        for index, value in enumerate(JSON_CANDIDATES):
            try:
                domain.check(value)
                continue  # in the domain: not a bad value
            except ValueError:
                pass
            cases.append([*base(workspace), '--config', write(f'{name}-{index}.json', json.dumps({name: value}))])
    for name, text in [('nan', '{"epochs": NaN}'), ('inf', '{"base_lr": Infinity}'), ('trunc', '{"epochs": 3,'),
                       ('list', '[1, 2]'), ('string', '"epochs"'), ('number', '3'), ('null', 'null'),
                       ('empty', ''), ('unknown', '{"epoch": 3}'), ('nested', '{"config": "other.json"}'),
                       ('bom', '\ufeff{"epochs": 3}'), ('dupe_bad', '{"epochs": 3, "epochs": -1}')]:
        cases.append([*base(workspace), '--config', write(f'{name}.json', text)])
    cases.append([*base(workspace), '--config', write('latin1.json', '{"outdir": "caf\xe9"}'.encode('latin-1'))])
    cases.append([*base(workspace), '--config', write('binary.json', os.urandom(64).replace(b'{', b'('))])
    cases.append([*base(workspace), '--config', str(folder / 'missing.json')])
    cases.append([*base(workspace), '--config', str(folder)])  # a folder
    return cases


def test_bad_config_files(workspace, capsys, monkeypatch, tally):
    cases = config_cases(workspace)
    assert len(cases) > 300
    run_cases(cases, workspace, capsys, monkeypatch, tally, 'config files')


def relation_cases(workspace):
    """Values each in their domain that contradict each other, the disk or the launch."""
    data, new, existing = workspace['data'], workspace['new'], workspace['existing']
    plain = ['--device', 'cpu', '--no-tensorboard', '--no-download', '--dataset_dir', data, '--outdir', new,
             '--epochs', '2', '--batch_size', '20']
    mixing = ['--use_mixup', '--use_ricap', '--use_cutmix', '--use_dual_cutout']
    relations = [
        ['--subdivision', '3'], ['--subdivision', '40'], ['--batch_size', '10', '--subdivision', '4'],
        ['--warmup_epochs', '2'], ['--warmup_epochs', '5'], ['--total_steps', '4', '--warmup_epochs', '1'],
        ['--milestones', '[3]'], ['--milestones', '[1,2.5]'], ['--warmup_epochs', '1', '--milestones', '[1.5]'],
        ['--epochs', '1.5', '--milestones', '[1,2]'], ['--total_steps', '4', '--milestones', '[2]'],
        ['--lr_end_factor', '0.1', '--lr_min', '0.01'],
        ['--warmup_method', 'geometric', '--warmup_start_factor', '0', '--warmup_epochs', '1'],
        ['--use_sam', '--precision', 'fp16'], ['--use_sam', '--precision', 'O1'], ['--optimizer', 'muon', '--use_sam'],
        ['--compile_mode', 'default'], ['--use_dual_cutout', '--use_cutout'],
        ['--tta', 'flip_translate', '--dataset', 'MNIST'], ['--tta', 'flip_translate', '--dataset', 'KMNIST'],
        ['--data_pipeline', 'workers', '--padding_mode', 'reflect'],
        ['--data_pipeline', 'workers', '--alternating_flip'],
        ['--image_size', '32'], ['--dataset', 'MNIST', '--image_size', '28'],
        ['--evaluate', 'model_state.pth', '--resume'], ['--evaluate', 'model_state.pth', '--lr_finder'],
        ['--evaluate', 'model_state.pth', '--dry_run'], ['--lr_finder', '--dry_run'],
        ['--gpu', '0', '--device', 'cpu'], ['--sync_bn'], ['--arch', 'resnet', '--whiten_bias_epochs', '1'],
        ['--arch', 'airbench', '--whiten_bias_epochs', '3'], ['--arch', 'resnet', '--growth_rate', '12'],
        ['--arch', 'resnet', '--depth', '21'], ['--arch', 'resnet9', '--ghost_bn_splits', '3'],
        ['--arch', 'resnet9', '--subdivision', '2', '--ghost_bn_splits', '4'],
        ['--arch', 'resnet', '--depth', '8', '--block_type', 'bottleneck'],
        ['--outdir', existing], ['--outdir', os.path.join(existing, 'log.json')],
        ['--outdir', os.path.join(existing, 'log.json', 'sub')], ['--outdir', existing, '--resume'],
        ['--dataset_dir', os.path.join(data, 'nothing_here')], ['--dataset', 'MNIST'],
        ['--dataset', 'ImageFolder'], ['--dataset_dir', os.path.join(existing, 'log.json')],
        ['--evaluate', os.path.join(existing, 'model_state.pth')], ['--evaluate', 'no_such_file.pth'],
        ['--foo'], ['--foo', '3'], ['extra'], ['-x'], ['--use'], ['--no-download=1'], ['--dry_run=yes'],
        ['--outdir', 'bad\udcffname'], ['--outdir', '\udcff'], ['--dataset_dir', 'x\udce9y'],
        ['--config', 'c\udcff.json'], ['--evaluate', 'm\udcff.pth'], ['--arch', 'res\udcffnet'],
        ['--outdir', ''], ['--epochs', '1', '--outdir', 'a\0b'],
    ]
    relations += [[first, second] for first, second in itertools.combinations(mixing, 2)]
    # the arch first or last: its defaults must not hide a relation
    relations += [['--arch', 'resnet', '--depth', '8', '--base_channels', '4', *relation] for relation in relations]
    return [[*plain, *relation] for relation in relations]


def test_contradictory_flags(workspace, capsys, monkeypatch, tally):
    cases = relation_cases(workspace)
    run_cases(cases, workspace, capsys, monkeypatch, tally, 'relations')


# ----------------------------------------------------------------------------- damaged and hostile files

@pytest.fixture(scope='module')
def hostile_workspace(tmp_path_factory):
    """A working folder of its own (its files are hashed after every case): a sound CIFAR-10, damaged and
    hostile copies, weights of the BASE model and checkpoints that run code, images PIL refuses, an
    ImageFolder with a truncated training image, --config files nested too deep or holding a huge value."""
    work = tmp_path_factory.mktemp('hostile') / 'work'
    work.mkdir()
    files = {'work': work, 'new': str(work / 'new_run'), 'data': write_cifar10(str(work / 'data'))}
    for kind in hostile.damaged_cifar10_files():
        files[f'damaged {kind}'] = str(work / 'damaged' / kind)
        hostile.write_damaged_cifar10(files[f'damaged {kind}'], kind)
    for file_name in ('data_batch_1', 'test_batch', 'batches.meta'):
        files[f'payload {file_name}'] = str(work / 'payload' / file_name)
        hostile.write_payload_cifar10(files[f'payload {file_name}'], file_name, str(work / f'ran-{file_name}'))
    model = models.create_model('resnet', num_classes=10, depth=8, base_channels=4)
    files['weights'] = str(work / 'weights.pth')
    torch.save(model.state_dict(), files['weights'])
    files['payload checkpoint'] = str(work / 'payload.pth')
    torch.save({'model': model.state_dict(), 'code': hostile.CodeRunner(str(work / 'ran-checkpoint'))},
               files['payload checkpoint'])
    (work / 'payload_run').mkdir()
    torch.save({'args': {}, 'code': hostile.CodeRunner(str(work / 'ran-resume'))},
               work / 'payload_run' / 'checkpoint.pth')
    files['payload run'] = str(work / 'payload_run')
    files['images'] = hostile.write_bad_images(str(work / 'images'))
    files['good image'] = hostile.write_png(str(work / 'images' / 'good.png'))
    files['image folder'] = str(work / 'image_folder')
    hostile.write_image_folder_with_bad_image(files['image folder'], 'train')
    for name, text in (('deep', hostile.deeply_nested_json(100_000)), ('nested', hostile.deeply_nested_json(500)),
                       ('huge', json.dumps({'arch': 'x' * 5_000_000}))):
        files[f'{name} config'] = str(work / f'{name}.json')
        (work / f'{name}.json').write_text(text)
    files['wrong'] = hostile.write_wrong_run_files(str(work / 'wrong'), model.state_dict(), {
        'arch': 'resnet', 'depth': 8, 'base_channels': 4, 'dataset': 'CIFAR10'})
    return files


def hostile_base(files, dataset_dir):
    return [*BASE, '--dataset_dir', dataset_dir, '--outdir', files['new']]


def damaged_file_cases(files):
    """Training on each damaged or hostile CIFAR-10, --evaluate on those whose test split is at fault,
    checkpoints that run code (--evaluate, --resume, --predict --weights), refused images for --predict,
    an ImageFolder with a truncated image, and --config files nested too deep or echoing a huge value."""
    cases = []
    for kind, (file_name, _, _) in hostile.damaged_cifar10_files().items():
        cases.append(hostile_base(files, files[f'damaged {kind}']))
        if file_name == 'test_batch':
            cases.append([*hostile_base(files, files[f'damaged {kind}']), '--evaluate', files['weights']])
    cases.append(hostile_base(files, files['payload data_batch_1']))
    cases.append([*hostile_base(files, files['payload test_batch']), '--evaluate', files['weights']])
    cases.append([*hostile_base(files, files['payload test_batch']), '--evaluate', files['payload checkpoint']])
    cases.append([*BASE, '--dataset_dir', files['data'], '--outdir', files['payload run'], '--resume'])
    cases.append([*hostile_base(files, files['data']), '--predict', files['good image'],
                  '--weights', files['payload checkpoint']])
    for kind in ('truncated', 'not_an_image', 'folder'):
        cases.append([*hostile_base(files, files['data']), '--predict', files['images'][kind],
                      '--weights', files['weights']])
    cases.append([*hostile_base(files, files['image folder']), '--dataset', 'ImageFolder'])
    for name in ('deep', 'nested', 'huge'):
        cases.append([*hostile_base(files, files['data']), '--config', files[f'{name} config']])
    cases.append([*hostile_base(files, files['data']), '--arch', 'x' * 50_000_000])
    # weights holding the wrong object, a damaged config.json beside them, a flipped bit
    for kind, path in files['wrong'].items():
        if kind.startswith(('weights', 'config')):
            cases.append([*hostile_base(files, files['data']), '--evaluate', path])
            cases.append([*hostile_base(files, files['data']), '--predict', files['good image'], '--weights', path])
            cases.append([*hostile_base(files, files['data']), '--teacher', path])
        elif kind != 'run locked':  # run folders that --resume must refuse and leave as they are
            cases.append([*BASE, '--dataset_dir', files['data'], '--outdir', path, '--resume'])
    return cases


def locked_run_cases(files):
    """--resume, and a new run, into a folder whose lock another run holds."""
    locked = files['wrong']['run locked']
    return [[*BASE, '--dataset_dir', files['data'], '--outdir', locked, '--resume'],
            [*BASE, '--dataset_dir', files['data'], '--outdir', locked]]


def test_damaged_and_hostile_files(hostile_workspace, capsys, monkeypatch, tally):
    cases = damaged_file_cases(hostile_workspace)
    run_cases(cases, hostile_workspace, capsys, monkeypatch, tally, 'damaged files')
    assert not [name for name in os.listdir(hostile_workspace['work']) if name.startswith('ran-')]


def test_a_run_folder_in_use(hostile_workspace, capsys, monkeypatch, tally):
    """The lock of another run (this process's, on a file of its own: flock refuses a second open file)."""
    lock = utils.FileLock(os.path.join(hostile_workspace['wrong']['run locked'], '.lock'))
    assert lock.acquire()
    try:
        run_cases(locked_run_cases(hostile_workspace), hostile_workspace, capsys, monkeypatch, tally, 'locked folder')
    finally:
        lock.release(remove=True)


@pytest.mark.parametrize('kind', ['bomb', 'bomb_warning_size'])
def test_predict_refuses_a_decompression_bomb(hostile_workspace, capsys, monkeypatch, kind):
    files = hostile_workspace
    argv = [*hostile_base(files, files['data']), '--predict', files['images'][kind],
            '--weights', files['weights']]
    with warnings.catch_warnings(record=True) as caught:  # printed, a warning adds lines to stderr
        warnings.simplefilter('always')
        problem = run_case(argv, files, capsys, monkeypatch)
    assert not problem, problem
    assert not caught, [str(warning.message) for warning in caught]


def test_predict_refuses_class_names_that_run_code(hostile_workspace, capsys, monkeypatch):
    files = hostile_workspace
    marker = os.path.join(files['work'], 'ran-batches.meta')
    argv = [*hostile_base(files, files['payload batches.meta']), '--predict', files['good image'],
            '--weights', files['weights']]
    try:
        problem = run_case(argv, files, capsys, monkeypatch)
        assert not problem and not os.path.exists(marker), problem or 'the payload ran'
    finally:
        if os.path.exists(marker):  # the other cases would count it as their own
            os.remove(marker)


def test_report(tally):
    total = sum(tally.values())
    print(f'\ninput fuzzer: {total} generated bad command lines ('
          + ', '.join(f'{kind}: {count}' for kind, count in tally.items()) + ')')
    assert total >= 1000 or len(tally) < 5  # the whole module ran: a thousand cases or more


def test_a_non_utf8_path_on_a_real_command_line(tmp_path):
    """Bytes that are not UTF-8 in argv (Python passes them on as surrogate escapes)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outdir = os.fsencode(str(tmp_path)) + b'/run\xff'
    result = subprocess.run([sys.executable, os.path.join(root, 'main.py'), '--epochs', '1', '--outdir', outdir],
                            capture_output=True, timeout=120, cwd=tmp_path)
    err = result.stderr.decode('utf-8')
    assert result.returncode == 2 and len(err.splitlines()) == 1, err
    assert "run\\udcff': expected a path (UTF-8, not empty)" in err and err.startswith('main.py: error: --outdir ')
    assert os.listdir(tmp_path) == []
