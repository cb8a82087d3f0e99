"""Write airbench's cifar10/{train,test}.pt (uint8 NHWC images, int64 labels) from the unpacked JPEG copy."""
import os, pickle, sys
import numpy as np, torch
root, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
folder = os.path.join(root, 'cifar-10-batches-py')
classes = pickle.load(open(os.path.join(folder, 'batches.meta'), 'rb'), encoding='latin1')['label_names']
for split, files in (('train', [f'data_batch_{i}' for i in range(1, 6)]), ('test', ['test_batch'])):
    images, labels = [], []
    for name in files:
        batch = pickle.load(open(os.path.join(folder, name), 'rb'), encoding='latin1')
        images.append(np.asarray(batch['data'], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch['labels'])
    torch.save({'images': torch.from_numpy(np.ascontiguousarray(np.concatenate(images))),
                'labels': torch.tensor(labels), 'classes': classes}, os.path.join(out, f'{split}.pt'))
    print(split, sum(len(i) for i in images))
