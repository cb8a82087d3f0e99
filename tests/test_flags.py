"""flags.py: one-line errors, did-you-mean, flag spellings and aliases, the parser kept as JSON."""
import json
import os

import pytest

import flags
import main
from flags import Choice, Int, ListOf, Real, UsageError


def make_parser():
    parser = flags.Parser(allow_abbrev=False)
    parser.add_argument('--use_cutout', action='store_true')
    parser.add_argument('--epochs', type=Int(1, None))
    parser.add_argument('--base_lr', type=Real(0, None, '(]'))
    parser.add_argument('--batch_size', type=Int(1, None))
    parser.add_argument('--no-download', dest='download', action='store_false')
    parser.add_argument('--arch', type=Choice(['resnet', 'resnet_preact', 'wrn'], what='the archs', number_flag='depth'))
    parser.aliases = {'--lr': '--base_lr'}
    return parser


@pytest.mark.parametrize('argv, hint', [
    (['--use_cutot'], 'did you mean --use_cutout?'),
    (['--epoch', '3'], 'did you mean --epochs?'),
    (['--base_lrr=0.1'], 'did you mean --base_lr?'),
])
def test_a_mistyped_flag_names_the_nearest_one(argv, hint):
    with pytest.raises(UsageError) as error:
        make_parser().parse_args(argv)
    assert str(error.value).startswith(f'unrecognized arguments: {argv[0]}') and str(error.value).endswith(f'({hint})')


def test_an_unknown_flag_with_nothing_near_points_to_help():
    with pytest.raises(UsageError, match=r'unrecognized arguments: --zzzz \(see --help for the flags\)'):
        make_parser().parse_args(['--zzzz'])


@pytest.mark.parametrize('argv, expected', [
    (['--batch-size', '64'], {'batch_size': 64}),
    (['--batch-size=64'], {'batch_size': 64}),
    (['--no_download'], {'download': False}),
    (['--lr', '0.3'], {'base_lr': 0.3}),
    (['--lr=0.3'], {'base_lr': 0.3}),
])
def test_dashes_underscores_and_other_tools_names_are_taken(argv, expected):
    parsed = vars(make_parser().parse_args(argv))
    assert {name: parsed[name] for name in expected} == expected


def test_values_are_not_respelled():
    """Only flag names are: a value that looks like a flag with dashes stays as it was."""
    parser = flags.Parser(allow_abbrev=False)
    parser.add_argument('--note', type=str)
    assert parser.parse_args(['--note=--batch-size']).note == '--batch-size'


@pytest.mark.parametrize('value, hint', [('resnet56', 'resnet --depth 56'), ('resnet-110', 'resnet --depth 110'),
                                         ('resnet_preac', 'resnet_preact'), ('wnr', 'wrn'), ('vgg', None)])
def test_a_choice_suggests_what_was_meant(value, hint):
    with pytest.raises(UsageError) as error:
        make_parser().parse_args(['--arch', value])
    message = str(error.value)
    assert message.startswith(f'--arch {value}: expected one of the archs')
    assert message.endswith(f'; did you mean {hint}?') if hint else 'did you mean' not in message


def test_domains_and_the_parser_come_back_from_json():
    domains = [Int(1, None), Real(0, 1, '[)', optional=True), Choice(['a', 'b'], what='letters'),
               ListOf(Int(0, 9), length=2)]
    for domain in domains:
        again = flags.domain_from_spec(json.loads(json.dumps(domain.spec())))
        assert type(again) is type(domain) and again.describe() == domain.describe()
    parser = make_parser()
    again = flags.parser_from_spec(json.loads(json.dumps(flags.parser_spec(parser))))
    assert again.format_help() == parser.format_help()


def test_main_s_cached_parser_is_the_parser():
    """What --help prints and what every flag accepts, from the cache, equal those of the parser main builds."""
    fresh = main.get_args_parser()
    again = flags.parser_from_spec(json.loads(json.dumps(flags.parser_spec(fresh))))
    assert again.format_help() == fresh.format_help()
    fresh_domains, kept_domains = flags.domains(fresh), flags.domains(again)
    assert fresh_domains.keys() == kept_domains.keys()
    for name, domain in fresh_domains.items():
        assert kept_domains[name].describe() == domain.describe(), name
    assert {action.dest: action.default for action in again._actions} == \
        {action.dest: action.default for action in fresh._actions}


def test_cached_builds_again_when_a_source_changes_or_the_kept_value_is_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    source = tmp_path / 'source.py'
    source.write_text('x = 1\n')
    builds = []

    def build():
        builds.append(1)
        return {'value': len(builds)}
    assert flags.cached('thing', [str(source)], build) == {'value': 1}
    assert flags.cached('thing', [str(source)], build) == {'value': 1} and len(builds) == 1
    source.write_text('x = 2\n')
    assert flags.cached('thing', [str(source)], build) == {'value': 2}
    for kept in (tmp_path / 'cache' / 'cifar-toolkit').glob('thing-*.json'):
        kept.write_text('{"other": 1}')
    assert flags.cached('thing', [str(source)], build, load=lambda value: value['value']) == 3


def test_cached_works_where_nothing_can_be_written(tmp_path, monkeypatch):
    blocked = tmp_path / 'a_file'
    blocked.write_text('')
    monkeypatch.setenv('XDG_CACHE_HOME', str(blocked))
    source = tmp_path / 'source.py'
    source.write_text('')
    assert flags.cached('thing', [str(source)], lambda: [1, 2]) == [1, 2]
    assert os.path.isfile(blocked)
