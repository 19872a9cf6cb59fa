"""Datasets for tests/test_workers.py. A forkserver worker imports the module that defines its dataset: this one
costs only torch, where the test module would also load torchvision and the detector."""
import os
import time

import torch


class SlowItems(torch.utils.data.Dataset):
    """Item i is (i, pid of the worker that loaded it), a few milliseconds each."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        time.sleep(0.02)
        return torch.tensor([i, os.getpid()])


class SlowToStart(SlowItems):
    """Unpickled in each forkserver worker before its worker_init_fn runs: a start-up that takes a while."""

    def __setstate__(self, state):
        time.sleep(1.5)
        self.__dict__.update(state)
