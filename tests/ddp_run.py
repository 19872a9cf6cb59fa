"""Runs moco.train.main under whatever launcher started it and saves this rank's final weights.

Usage: <launcher> tests/ddp_run.py OUT_FILE_PREFIX -- <moco.train arguments>
"""
import os
import sys

import torch

from moco.train import main

prefix, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
model = main(argv)
rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
torch.save(model.state_dict(), f"{prefix}{rank}.pt")
