"""`accelerate launch` with 2 CPU processes (gloo) computes what one process with the combined batch does."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import make_dataset
from lora_train.network.files import load_lora

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def train_args(data, out, batch):
    # SGD, because Adam divides by the gradient's own size and so magnifies float-order noise in
    # near-zero gradients; with SGD the comparison is of the gradients themselves
    return ["-m", "lora_train", "train", "--set", "pretrained_model_name_or_path=builtin:tiny", "--set", f"train_data_dir={data}", "--set", f"output_dir={out}", "--set", "resolution=64",
            "--set", "max_train_steps=4", "--set", f"train_batch_size={batch}", "--set", "seed=3", "--set", "learning_rate=0.5",
            "--set", "optimizer_type=SGD", "--set", "shuffle_caption=true", "--set", "noise_offset=0.05"]


def test_two_processes_match_one_with_the_combined_batch(tmp_path):
    assert shutil.which(ACCELERATE), "accelerate is installed with the host's pins"
    data = make_dataset(tmp_path / "data", count=3, repeats=2)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    two = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", *train_args(data, tmp_path / "two", 1)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("LoRA:") == 1  # only rank 0 reports
    one = subprocess.run([sys.executable, *train_args(data, tmp_path / "one", 2)], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, ma = load_lora(tmp_path / "one" / "last.safetensors")
    b, mb = load_lora(tmp_path / "two" / "last.safetensors")
    assert a.keys() == b.keys() and ma["ss_steps"] == mb["ss_steps"] == "4"
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float(a[k].abs().max()) for k in a if k.endswith("lora_up.weight"))
    assert diff < 1e-6 and moved > 1e-3, (diff, moved)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_a_parameter_no_process_trained_keeps_no_gradient():
    """DyLoRA trains some ranks per step; summing across processes must not give the rest a zero
    gradient, which AdamW would turn into a step (momentum, weight decay)."""
    import torch

    from lora_train.train.distributed import Distributed

    class TwoRanks(Distributed):
        def __init__(self, other):
            super().__init__(0, 2)
            self.other = other  # what the other rank adds, per tensor

        def sum_(self, tensors):
            for t, o in zip(tensors, self.other):
                t.add_(o)

    a, b, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    a.grad = torch.full((3,), 2.0)
    TwoRanks([torch.ones(3), torch.zeros(3), torch.full((3,), 5.0)]).sum_grads([a, b, c])
    assert torch.equal(a.grad, torch.full((3,), 3.0))
    assert b.grad is None  # neither rank computed one
    assert torch.equal(c.grad, torch.full((3,), 5.0))  # only the other rank did
