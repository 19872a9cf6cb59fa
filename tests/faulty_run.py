"""Runs moco.train's entry point with the faults a test asks for; exits with its status.

Usage: [launcher environment] python tests/faulty_run.py <moco.train arguments>

Faults, from the environment (read here only, never by the project's code):
- FSIZE_LIMIT=BYTES: no file this process writes may grow past BYTES; a write fails with EFBIG, as on a full disk.
- NAN_AT=RANK:CALL: the CALL-th forward pass (counting from 1) of rank RANK returns a NaN logit.
"""
import os
import resource
import signal
import sys

from moco import builder
from moco.train import main

if "FSIZE_LIMIT" in os.environ:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (int(os.environ["FSIZE_LIMIT"]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

if "NAN_AT" in os.environ:
    nan_rank, nan_call = map(int, os.environ["NAN_AT"].split(":"))
    forward, calls = builder.MoCo.forward, []

    def forward_with_nan(self, im_q, im_k):
        logits, labels = forward(self, im_q, im_k)
        calls.append(1)
        if int(os.environ.get("RANK", "0")) == nan_rank and len(calls) == nan_call:
            logits = logits.clone()
            logits[0, 1] = float("nan")
        return logits, labels

    builder.MoCo.forward = forward_with_nan

main(sys.argv[1:])
