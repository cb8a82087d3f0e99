"""The command line's vocabulary, without torch: the error of bad input, the argparse types of
settings and the domain of every flag.

A flag's domain (:class:`Int`, :class:`Real`, :class:`Choice`, :class:`Bool`, :class:`Text`,
:class:`ListOf`) is its argparse ``type``: called with the text of the command line it parses and
checks the value, and :meth:`Domain.check` checks a value read from a ``--config`` JSON file or an
architecture's defaults, so that one object states each flag's range. main.py imports this module
before torch, so that ``--help`` and a mistyped flag answer at once.
"""
import argparse
import json
import math
import os
import re
import sys


# Flags that never change what a run computes, so a resumed run may give them anew (runs.restore_args), and
# runs of one experiment may differ in (summarize.py).
RUN_ONLY_FLAGS = {'outdir', 'resume', 'device', 'gpu', 'num_workers', 'num_threads', 'tensorboard', 'dataset_dir',
                  'download', 'dry_run', 'evaluate', 'list_archs', 'predict', 'weights', 'topk', 'config',
                  'epochs', 'eval_every',
                  'save_every', 'compile', 'compile_mode', 'sync_bn', 'dist_backend', 'dist_timeout',
                  'find_unused_parameters', 'save_every_steps', 'skip_nonfinite'}
# Those of them that describe this machine or this command, resolved anew on resume; the others keep the
# saved run's value unless given (`--outdir X --resume` alone trains the saved --epochs, not the arch's).
RESOLVED_ANEW = {'outdir', 'resume', 'device', 'gpu', 'num_workers', 'num_threads', 'download', 'dry_run', 'evaluate',
                 'list_archs', 'predict', 'weights', 'topk', 'config', 'dist_backend', 'dataset_dir'}


class UsageError(ValueError):
    """Bad input (a flag, a file, a combination of settings): main.py's ``cli`` prints the message as one
    line and exits with 2. The libraries raise it where they check their own arguments (a ValueError, so
    that library callers may catch it as one), and ``models.ModelConfigError`` is one.

    ``str()`` gives that one line: line breaks become spaces and characters that cannot be printed
    as UTF-8 (the surrogate escapes of a non-UTF-8 path) are written as escapes, and a message
    longer than ``MAX_LENGTH`` (one that echoes a huge value) loses its middle, keeping its start,
    which names the flag, and its end, which says what was expected."""

    MAX_LENGTH = 1500

    def __str__(self):
        text = ' '.join(super().__str__().split('\n'))
        return _cut_middle(text, self.MAX_LENGTH).encode('utf-8', 'backslashreplace').decode('utf-8')


def _cut_middle(text, limit):
    """``text``, or its first and last parts with the number of characters left out between them."""
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 5, limit * 2 // 5
    return f'{text[:head]} ... [{len(text) - head - tail:,} characters] ... {text[-tail:]}'


def str2bool(value):
    """argparse type accepting true/false/1/0/yes/no (any case)."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ('true', '1', 'yes', 'y', 'on'):
        return True
    if lowered in ('false', '0', 'no', 'n', 'off'):
        return False
    raise ValueError(f'expected true/false/1/0/yes/no, got {value!r}')


str2bool.__name__ = 'boolean'


def number(value):
    """argparse type for a count that may be fractional: '160' -> 160, '9.9' -> 9.9."""
    parsed = float(value)
    return int(parsed) if parsed.is_integer() and '.' not in str(value) else parsed


number.__name__ = 'number'


def json_list(value):
    """argparse type for JSON lists such as '[80,120]' or '[true,false,false]'."""
    if isinstance(value, (list, tuple)):
        return list(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f'{value!r} is not valid JSON ({error.msg})') from None
    if not isinstance(parsed, list):
        raise ValueError(f'{value!r} is not a JSON list')
    return parsed


json_list.__name__ = 'JSON list'


# ----------------------------------------------------------------------------- domains of settings

SHOWN_LENGTH = 200


def show(value):
    """A setting's value as a user typed it: JSON for lists and booleans, repr for odd strings; a text
    longer than SHOWN_LENGTH characters is cut there, its length said (an error line stays readable)."""
    if isinstance(value, str):
        printable = value.isprintable() and value.strip() == value and value != '' and not _has_surrogates(value)
        text = value if printable else ascii(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError, RecursionError):
            text = repr(value) if not isinstance(value, (list, dict)) else f'a {type(value).__name__} nested too deep'
    if len(text) <= SHOWN_LENGTH:
        return text
    return f'{text[:SHOWN_LENGTH]}... ({len(text):,} characters)'


def _has_surrogates(text):
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        return True
    return False


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Domain:
    """The values one setting may take, and the argparse type of its flag.

    Called with a command-line text (as argparse calls a ``type``), it parses the text with
    ``parse`` (int, float, :func:`str2bool`, :func:`json_list`, str) and checks the value;
    ``check(value)`` raises ValueError if a value (from a --config JSON file or an arch's defaults)
    lies outside; ``describe()`` says what is expected in words, for the one-line error;
    ``invalid()`` and ``valid()`` give command-line texts outside and inside the domain, from which
    the tests generate malformed command lines. ``optional``: None (the flag left out) is in the
    domain too.
    """
    parse = str

    def __new__(cls, *args, **kwargs):
        domain = super().__new__(cls)
        domain._arguments = (args, kwargs)  # for spec(): the parser kept in a cache as JSON
        return domain

    def __init__(self, optional=False):
        self.optional = optional
        self.__name__ = type(self).__name__  # argparse names a type by it

    def spec(self):
        """The domain as JSON (:func:`domain_from_spec` builds it again)."""
        args, kwargs = self._arguments
        return {'domain': type(self).__name__, 'args': [_encode(value) for value in args],
                'kwargs': {name: _encode(value) for name, value in kwargs.items()}}

    def __call__(self, text):
        """The value of a command-line text; argparse turns the ArgumentTypeError into ``--flag <message>``."""
        try:
            value = self.parse(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f'{show(text)}: expected {self.describe()}') from None
        try:
            self.check(value)
        except ValueError:
            hint = self.suggestion(value)
            raise argparse.ArgumentTypeError(f'{show(value)}: expected {self.describe()}'
                                             + (f'; did you mean {hint}?' if hint else '')) from None
        return value

    def suggestion(self, value):
        """What the user may have meant by ``value`` (None: no guess)."""
        return None

    def check(self, value):
        if value is None and self.optional:
            return
        if value is None or not self._contains(value):
            raise ValueError(self.describe())

    def describe(self):
        return self._describe() + (' (or unset)' if self.optional else '')

    def _contains(self, value):
        raise NotImplementedError

    def _describe(self):
        raise NotImplementedError

    def _describe_many(self):
        """What each element of a list of these must be (plural)."""
        return self._describe()

    def invalid(self):
        return ['', 'x']

    def valid(self):
        return []


def format_number(value):
    """A number as an error names it: 5 for 5.0, 0.001 for 1e-3."""
    return f'{value:g}' if isinstance(value, float) else str(value)


class Int(Domain):
    """An integer in [low, high] (either end may be None: unbounded)."""
    parse = int

    def __init__(self, low=None, high=None, optional=False):
        super().__init__(optional)
        self.low, self.high = low, high

    def _contains(self, value):
        return _is_int(value) and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def _describe(self):
        if self.low is not None and self.high is not None:
            return f'an integer in [{self.low}, {self.high}]'
        if self.low is not None:
            return f'an integer >= {self.low}'
        if self.high is not None:
            return f'an integer <= {self.high}'
        return 'an integer'

    def _describe_many(self):
        return 'integers' + self._describe()[len('an integer'):]

    def invalid(self):
        texts = ['x', '1.5', '', 'nan', '1e3', '0x10']
        if self.low is not None:
            texts += [str(self.low - 1), str(self.low - 1000)]
        if self.high is not None:
            texts += [str(self.high + 1), str(self.high * 10 + 10)]
        return texts

    def valid(self):
        low = self.low if self.low is not None else 0
        return [str(low)] + ([str(self.high)] if self.high is not None else [str(low + 1)])


class Real(Domain):
    """A finite number between ``low`` and ``high``; ``closed`` says which ends belong to it, '[]',
    '[)', '(]' or '()' (an end that is None is unbounded)."""

    def __init__(self, low=None, high=None, closed='[]', optional=False, parse=float):
        super().__init__(optional)
        self.low, self.high, self.closed = low, high, closed
        self.parse = parse  # number: a count that may be fractional (--epochs 160 stays an int)

    def _contains(self, value):
        if not _is_number(value) or not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and self.closed[0] == '(')):
            return False
        if self.high is not None and (value > self.high or (value == self.high and self.closed[1] == ')')):
            return False
        return True

    def _describe(self):
        low, high = self.low, self.high
        if low is not None and high is not None:
            return f'a number in {self.closed[0]}{format_number(low)}, {format_number(high)}{self.closed[1]}'
        if low is not None:
            return f'a number {">" if self.closed[0] == "(" else ">="} {format_number(low)}'
        if high is not None:
            return f'a number {"<" if self.closed[1] == ")" else "<="} {format_number(high)}'
        return 'a finite number'

    def _describe_many(self):
        return 'numbers' + self._describe()[len('a number'):] if self.low is not None or self.high is not None \
            else 'finite numbers'

    def invalid(self):
        texts = ['x', '', 'nan', 'inf', '1,5']
        if self.low is not None:
            texts += [format_number(self.low - 1)] + ([format_number(self.low)] if self.closed[0] == '(' else [])
        if self.high is not None:
            texts += [format_number(self.high + 1)] + ([format_number(self.high)] if self.closed[1] == ')' else [])
        return texts

    def valid(self):
        if self.low is not None and self.high is not None:
            return [format_number((self.low + self.high) / 2)]
        if self.low is not None:
            return [format_number(self.low + 1)]
        return ['0.5']


class Choice(Domain):
    """One of ``choices``. ``what``: how to name them where they are too many to list (``--arch``: 'the archs
    that --list_archs prints'); ``number_flag``: a value that is a choice with a number appended means that
    choice and this flag (``--arch resnet56``: did you mean ``resnet --depth 56``)."""

    def __init__(self, choices, optional=False, what=None, number_flag=None):
        super().__init__(optional)
        self.choices = tuple(choices)
        self.what, self.number_flag = what, number_flag

    def _contains(self, value):
        return isinstance(value, str) and value in self.choices

    def _describe(self):
        return 'one of ' + (self.what or ', '.join(self.choices))

    def suggestion(self, value):
        if not isinstance(value, str):
            return None
        numbered = re.fullmatch(r'(.+?)[-_]?([0-9]+)', value)
        if self.number_flag and numbered and numbered.group(1) in self.choices:
            return f'{numbered.group(1)} --{self.number_flag} {numbered.group(2)}'
        import difflib
        close = difflib.get_close_matches(value, self.choices, n=1, cutoff=0.6)
        return close[0] if close else None

    def _describe_many(self):
        return 'strings from ' + ', '.join(self.choices)

    def invalid(self):
        return ['', 'none_of_these', self.choices[0].upper() + '_', self.choices[0] + ' ']

    def valid(self):
        return list(self.choices)


class Bool(Domain):
    parse = staticmethod(str2bool)

    def _contains(self, value):
        return isinstance(value, bool)

    def _describe(self):
        return 'true or false (1/0, yes/no)'

    def _describe_many(self):
        return 'booleans (true/false)'

    def invalid(self):
        return ['maybe', '2', '', 'truee']

    def valid(self):
        return ['true', 'false']


class Text(Domain):
    """A string; ``path``: a file-system path, which must be UTF-8 (JSON and the logs hold it) and
    free of NUL characters; ``pattern``: a regular expression the whole string matches, described
    to the user as ``what``."""

    def __init__(self, path=False, optional=False, pattern=None, what=None, examples=()):
        super().__init__(optional)
        self.path, self.pattern, self.what, self.examples = path, pattern, what, list(examples)

    def _contains(self, value):
        if not isinstance(value, str):
            return False
        if self.pattern is not None:
            return re.fullmatch(self.pattern, value) is not None
        return not self.path or (value != '' and '\0' not in value and not _has_surrogates(value))

    def _describe(self):
        if self.what:
            return self.what
        return 'a path (UTF-8, not empty)' if self.path else 'a string'

    def _describe_many(self):
        return 'paths (UTF-8, not empty)' if self.path else 'strings'

    def invalid(self):
        if self.pattern is not None:
            return ['', 'x', 'bad\udcff', ' ' + (self.examples or ['x'])[0]]
        return ['', 'bad\udcff', '\udcffx/y'] if self.path else []

    def valid(self):
        return self.examples


class ListOf(Domain):
    """A JSON list of ``element``s: ``length`` an int or (min, max) (max None: unbounded);
    ``increasing``: strictly increasing; ``ordered``: a [low, high] pair with low <= high."""
    parse = staticmethod(json_list)

    def __init__(self, element, length=None, increasing=False, ordered=False, example=None, optional=False):
        super().__init__(optional)
        self.element, self.increasing, self.ordered = element, increasing, ordered
        self.length = (length, length) if isinstance(length, int) else length
        self.example = example

    def _contains(self, value):
        if not isinstance(value, list):
            return False
        if self.length is not None:
            low, high = self.length
            if len(value) < low or (high is not None and len(value) > high):
                return False
        for item in value:
            try:
                self.element.check(item)
            except ValueError:
                return False
        if self.increasing and any(a >= b for a, b in zip(value, value[1:])):
            return False
        if self.ordered and any(a > b for a, b in zip(value, value[1:])):
            return False
        return True

    def _describe(self):
        if self.length is None:
            count = 'a JSON list of'
        elif self.length[0] == self.length[1]:
            count = f'a JSON list of {self.length[0]}'
        elif self.length[1] is None:
            count = f'a JSON list of {self.length[0]} or more'
        else:
            count = f'a JSON list of {self.length[0]} to {self.length[1]}'
        text = f'{count} {self.element._describe_many()} (e.g. {self._example()})'
        if self.increasing:
            text += ', strictly increasing'
        if self.ordered:
            text += ', [low, high] with low <= high' if self.length == (2, 2) else ', in non-decreasing order'
        return text

    def _example(self):
        if self.example is not None:
            return self.example
        items = []
        for text in (self.element.valid() or ['1'])[:self.length[0] if self.length else 2] or ['1']:
            items.append(text if not isinstance(self.element, Text) else json.dumps(text))
        while self.length and len(items) < self.length[0]:
            items.append(items[-1])
        return '[' + ','.join(items) + ']'

    def invalid(self):
        texts = ['', 'x', '[', '{}', '3', '["a"]', '[null]', '[NaN]', '[Infinity]']
        if self.length is not None:
            low, high = self.length
            if low > 0:
                texts.append('[]' if low == 1 else self._example()[:-1].rsplit(',', 1)[0] + ']')
            if high is not None:
                texts.append('[' + ','.join([self._example()[1:-1].split(',')[0]] * (high + 1)) + ']')
        for bad in self.element.invalid()[:3]:
            if bad:
                texts.append(f'[{json.dumps(bad) if isinstance(self.element, (Choice, Text)) else bad}]')
        if self.increasing or self.ordered:
            texts.append('[2,1]')
        return texts

    def valid(self):
        return [self._example()]


def first_line(error, limit=None):
    """The first line of an error's message ('' for none), cut at ``limit`` characters: what a one-line
    report quotes of an exception from torch, PIL or the network."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else ''


def json_kind(value):
    """The JSON type of a value read from a JSON file, as an error names it: 'number', 'list', 'null', ..."""
    return {bool: 'boolean', int: 'number', float: 'number', str: 'string', list: 'list', dict: 'object',
            type(None): 'null'}.get(type(value), type(value).__name__)


def check_setting(name, domain, value, source):
    """Raise UsageError unless ``value``, read from ``source`` (a --config file, an arch's defaults), lies in
    the ``domain`` of flag ``name``; the message names the JSON type that was found."""
    try:
        domain.check(value)
    except ValueError:
        expected = 'true or false' if isinstance(domain, Bool) else domain.describe()  # JSON's own booleans
        raise UsageError(f'{source}: "{name}": {json.dumps(value, default=str)} (a JSON {json_kind(value)}): '
                         f'expected {expected} (--{name})') from None


# ----------------------------------------------------------------------------- argparse

def choice(values, optional=False):
    """argparse keywords of a flag that takes one of ``values``: its Choice domain as the type, the
    values as argparse's choices (listed by --help)."""
    domain = Choice(values, optional=optional)
    return {'type': domain, 'choices': domain.choices}


def switch(group, name, help, default=False):
    """A boolean flag usable as a switch (``--use_cutout``) or with a value (``--use_cutout false``)."""
    group.add_argument(name, type=Bool(), nargs='?', const=True, default=default, metavar='BOOL', help=help)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with every flag's default ("(default: None)" left out) and the description's paragraphs kept."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or '%(default)' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse's errors as one line naming the flag and what it expects (the flag's domain), and a
    mistyped flag's nearest name. A flag's name may be spelled with ``-`` or ``_`` alike
    (``--batch-size``, ``--no_download``), and ``aliases`` maps the names other tools use to ours
    (``--lr``: ``--base_lr``)."""

    aliases = {}

    def _spelled(self, word):
        """``word`` with its flag name as this parser knows it, if it knows it under another spelling."""
        name, equals, value = word.partition('=')
        if not name.startswith('--') or name in self._option_string_actions:
            return word
        underscored = '--' + name[2:].replace('-', '_')
        for candidate in (self.aliases.get(underscored), underscored, '--' + name[2:].replace('_', '-')):
            if candidate in self._option_string_actions:
                return candidate + equals + value
        return word

    def error(self, message):
        match = re.fullmatch(r'argument (\S+?)(?:/\S+)?: (.*)', message, flags=re.DOTALL)
        action = self._option_string_actions.get(match.group(1)) if match else None
        if action is not None and isinstance(action.type, Domain):
            if match.group(2).startswith('expected one argument'):
                raise UsageError(f'{match.group(1)}: missing its value ({action.type.describe()})')
            raise UsageError(f'{match.group(1)} {match.group(2)}')  # the domain's own '<value>: expected ...'
        if message.startswith('unrecognized arguments: '):
            import difflib
            unknown = getattr(self, '_unrecognized', [])
            names = [name for name in self._option_string_actions if name.startswith('--')]
            hints = []
            for word in unknown:
                close = difflib.get_close_matches(word.partition('=')[0], names, n=1, cutoff=0.7)
                if word.startswith('--') and close:
                    hints.append(f'did you mean {close[0]}?')
            raise UsageError(f'unrecognized arguments: {" ".join(map(show, unknown))} ('
                             + ('; '.join(hints) or 'see --help for the flags') + ')')
        raise UsageError(message)

    def parse_known_args(self, args=None, namespace=None):
        args = [self._spelled(word) for word in (sys.argv[1:] if args is None else args)]
        parsed, extras = super().parse_known_args(args, namespace)
        self._unrecognized = extras
        return parsed, extras


def config_settings(from_config, domains, path):
    """The settings of the --config file ``path``, whose JSON value is ``from_config``: a flat object of flag
    names and values in their ``domains``."""
    source = f'--config {show(path)}'
    if not isinstance(from_config, dict):
        raise UsageError(f'{source}: expected a JSON object of flag values, e.g. {{"epochs": 200}}, '
                         f'not a JSON {type(from_config).__name__}')
    unknown = sorted(set(from_config) - set(domains))
    if unknown:
        raise UsageError(f'{source}: unknown setting(s) {", ".join(map(show, unknown))}')
    if 'config' in from_config:
        raise UsageError(f'{source}: a --config file cannot name another --config file')
    for name, value in from_config.items():
        check_setting(name, domains[name], value, source)
    return from_config


def domains(parser):
    """{setting: domain} of every flag of ``parser``: its argparse type (a list of them for ``nargs='+'``),
    and for the store_true/store_false flags a boolean (unset allowed where the default is None)."""
    found = {}
    for action in parser._actions:
        if action.dest in found or action.dest == 'help':
            continue
        if isinstance(action.type, Domain):
            found[action.dest] = (ListOf(action.type, (1, None), optional=True) if action.nargs == '+'
                                  else action.type)
        elif isinstance(action.const, bool):
            found[action.dest] = Bool(optional=action.default is None)
    return found


# ----------------------------------------------------------------------------- the launch

_TORCHRUN_VARIABLES = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')


def launched_by_torchrun(environ=None):
    """True in a process started by torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    environ = os.environ if environ is None else environ
    return all(name in environ for name in _TORCHRUN_VARIABLES)


def env_rank(environ=None):
    """This process's rank from torchrun's variables (0 outside torchrun), known before any setup (and
    before torch: the rank that prints a command line's error)."""
    environ = os.environ if environ is None else environ
    return int(environ.get('RANK', 0)) if launched_by_torchrun(environ) else 0


def exit_torchrun_rank(run):
    """Call ``run`` (main.py's cli) in a torchrun rank, then end the process at once, its output flushed,
    with run's exit status. A rank that had left its process group and written everything sometimes
    aborted while the interpreter shut down (gloo's threads on CPU, 'terminate called without an active
    exception': exit -6, and torchrun reported the run failed)."""
    try:
        run()
        exit_status = 0
    except SystemExit as stop:
        exit_status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_status)


# ----------------------------------------------------------------------------- the parser, cached

def code_files(folder):
    """The toolkit's Python files in ``folder`` and its models/: what :func:`cached` keys main.py's answers by."""
    import glob
    return sorted(glob.glob(os.path.join(folder, '*.py')) + glob.glob(os.path.join(folder, 'models', '*.py')))


def given_only(parser):
    """(``parser`` with its defaults suppressed, so that it returns only the flags given; its defaults)."""
    defaults = {action.dest: action.default for action in parser._actions if action.dest != 'help'}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser, defaults


def print_help(parser, defaults_of_archs, argv):
    """--help: every flag with the default a run of the --arch in ``argv`` (else of the parser's default
    arch) takes, ``defaults_of_archs[arch]``: its training defaults and its model flags' values; then exit."""
    import shutil
    import textwrap
    given = [argv[index + 1] for index, word in enumerate(argv[:-1]) if word == '--arch']
    given += [word.split('=', 1)[1] for word in argv if word.startswith('--arch=')]
    arch = given[-1] if given and given[-1] in defaults_of_archs else parser.get_default('arch')
    parser.set_defaults(arch=arch, **defaults_of_archs[arch])
    parser.description += '\n\n' + textwrap.fill(
        f'Defaults below are those of --arch {arch} (--arch NAME --help shows another\'s; --list_archs lists them '
        f'all); model flags without a default do not apply to it.', width=min(shutil.get_terminal_size().columns, 100))
    parser.print_help()
    raise SystemExit(0)


_PARSE_FUNCTIONS = {'int': int, 'float': float, 'str': str}


def _encode(value):
    if isinstance(value, Domain):
        return value.spec()
    if callable(value):
        return {'function': value.__name__ if value in _PARSE_FUNCTIONS.values() else value.__module__ + ':' +
                value.__qualname__}
    return list(value) if isinstance(value, tuple) else value


def _decode(value):
    if isinstance(value, dict) and 'domain' in value:
        return domain_from_spec(value)
    if isinstance(value, dict) and 'function' in value:
        name = value['function']
        return _PARSE_FUNCTIONS[name] if name in _PARSE_FUNCTIONS else globals()[name.split(':')[1]]
    return value


def domain_from_spec(spec):
    cls = {cls.__name__: cls for cls in (Int, Real, Choice, Bool, Text, ListOf)}[spec['domain']]
    return cls(*map(_decode, spec['args']), **{name: _decode(value) for name, value in spec['kwargs'].items()})


_ACTIONS = {argparse._StoreAction: 'store', argparse._StoreTrueAction: 'store_true',
            argparse._StoreFalseAction: 'store_false'}


def parser_spec(parser):
    """A :class:`Parser` of domains as JSON: its description and, per group, each flag's argparse keywords."""
    groups = []
    for group in parser._action_groups:
        flags = []
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction):
                continue
            keywords = {'dest': action.dest, 'action': _ACTIONS[type(action)], 'default': _encode(action.default),
                        'help': action.help}
            if keywords['action'] == 'store':
                keywords.update(type=_encode(action.type), nargs=action.nargs, const=action.const,
                                metavar=action.metavar, choices=_encode(action.choices))
            flags.append([action.option_strings, keywords])
        groups.append([group.title, flags])
    return {'description': parser.description, 'groups': groups}


def parser_from_spec(spec):
    parser = Parser(description=spec['description'], formatter_class=HelpFormatter, allow_abbrev=False)
    for title, flags in spec['groups']:
        group = parser._optionals if title == parser._optionals.title else parser.add_argument_group(title)
        for option_strings, keywords in flags:
            if keywords['action'] == 'store':
                keywords = {**keywords, 'type': _decode(keywords['type'])}
            group.add_argument(*option_strings, **{key: value for key, value in keywords.items()
                                                   if value is not None or key == 'default'})
    return parser


def cached(name, sources, build, load=lambda value: value):
    """``load(build())``, ``build()`` (a JSON value) kept in the user's cache folder under the hash of the
    files ``sources``: built again when one of them changes, when the kept value does not load, and each
    time where nothing can be written there."""
    import hashlib
    digest = hashlib.sha256()
    for path in sources:
        with open(path, 'rb') as f:
            digest.update(f.read())
    folder = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'cifar-toolkit')
    path = os.path.join(folder, f'{name}-{digest.hexdigest()[:20]}.json')
    try:
        with open(path, encoding='utf-8') as f:
            return load(json.load(f))
    except Exception:  # absent, unreadable, or written by something else: build it
        pass
    value = build()
    try:
        os.makedirs(folder, exist_ok=True)
        temporary = f'{path}.{os.getpid()}.tmp'
        with open(temporary, 'w', encoding='utf-8') as f:
            json.dump(value, f)
        os.replace(temporary, path)
    except OSError:
        pass
    return load(value)
