"""Count host-device synchronizations of a main.py run (torch.cuda.set_sync_debug_mode('warn')).

    python benchmarks/gpu/count_syncs.py SRC [--json FILE] MAIN_PY_FLAGS...

SRC is the folder holding main.py; main.py runs as a script (its command line is the interface),
in this process so that the warnings reach the counter. Besides the total and the places that
synchronize most, the count is split at main.py's ``epoch N/M:`` lines: the first figure holds
the setup and epoch 1 (and its checkpoint), each later one an epoch alone. Without CUDA the run
goes ahead and no count is taken (``SYNCS n/a``), so the command can be tried on a CPU.
"""
import collections
import itertools
import json
import os
import runpy
import sys
import warnings

import torch

source, argv = sys.argv[1], sys.argv[2:]
json_path = None
if argv[:1] == ['--json']:
    json_path, argv = argv[1], argv[2:]
counting = torch.cuda.is_available()
caught, at_epoch_end = [], []


class EpochMarks:
    """stdout, noting how many synchronizations had happened when each epoch line is printed."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        if text.startswith('epoch ') and '/' in text.split(':')[0]:
            at_epoch_end.append(len(caught))
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


sys.path.insert(0, source)
sys.argv = [os.path.join(source, 'main.py'), *argv]
status = 0
stdout, sys.stdout = sys.stdout, EpochMarks(sys.stdout)
if counting:
    torch.cuda.set_sync_debug_mode('warn')
try:
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        caught = records
        runpy.run_path(sys.argv[0], run_name='__main__')
except SystemExit as stop:
    status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
finally:
    if counting:
        torch.cuda.set_sync_debug_mode(0)
    sys.stdout = stdout
is_sync = ['synchroniz' in str(w.message) for w in caught]
syncs = [w for w, sync in zip(caught, is_sync) if sync]
where = collections.Counter(f'{os.path.basename(w.filename)}:{w.lineno}' for w in syncs).most_common(12)
syncs_before = [0, *itertools.accumulate(is_sync)]  # syncs_before[n]: among the first n warnings
marks = [syncs_before[n] for n in at_epoch_end]
per_epoch = [b - a for a, b in zip([0] + marks, marks)]
if counting:
    print('SYNCS', len(syncs), where)
    print('SYNCS_PER_EPOCH', per_epoch, '(the first with the setup)')
else:
    print('SYNCS n/a: no CUDA device, nothing counted')
if json_path:
    with open(json_path, 'w') as f:
        json.dump({'counted': counting, 'exit_status': status, 'total': len(syncs) if counting else None,
                   'per_epoch': per_epoch if counting else None, 'epochs': len(at_epoch_end),
                   'where': where}, f, indent=1)
sys.exit(status)
