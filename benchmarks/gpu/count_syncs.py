"""Count host-device synchronizations of a main.py run (torch.cuda.set_sync_debug_mode('warn'))."""
import os, sys, warnings
import torch
sys.path.insert(0, sys.argv[1])
import main
torch.cuda.set_sync_debug_mode('warn')
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    main.cli(sys.argv[2:])
torch.cuda.set_sync_debug_mode(0)
syncs = [w for w in caught if 'synchroniz' in str(w.message)]
where = {}
for w in syncs:
    key = f'{os.path.basename(w.filename)}:{w.lineno}'
    where[key] = where.get(key, 0) + 1
print('SYNCS', len(syncs), sorted(where.items(), key=lambda kv: -kv[1])[:12])
