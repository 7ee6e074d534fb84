"""Run by tests/test_train.py under ``torchrun``: one short pretraining from a YAML config."""

import sys

import torch

from cdretrieval.config import RunConfig
from cdretrieval.train import pretrain

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg = RunConfig.load(sys.argv[1])
    pretrain(cfg, sys.argv[2], progress=False, feature_cache=sys.argv[3])
