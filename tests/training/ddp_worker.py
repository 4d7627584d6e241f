"""Run by test_distributed.py under `torchrun --nproc_per_node 2`: train, then save this rank's router biases."""

import json
import os
import sys

import torch
from accelerate import PartialState
from modeling_deepseek_v3.training.balancing import moe_layers
from modeling_deepseek_v3.training.pretrain import PretrainArguments, train

if __name__ == "__main__":
    output_dir, overrides = sys.argv[1], json.loads(sys.argv[2])
    model = train(PretrainArguments(output_dir=output_dir, **overrides))
    rank = PartialState().process_index  # torchrun and accelerate launch (GPU or CPU) alike
    biases = [m.gate.e_score_correction_bias.clone() for m in moe_layers(model)]
    torch.save(biases, os.path.join(output_dir, f"biases-rank{rank}.pt"))
