"""One kNN-monitor measurement in 1 or N processes (torchrun), for test_monitor.py.

    torchrun --nproc_per_node N tests/monitor_worker.py OUT.npz MONITOR_SHARDS [override ...]

Builds the debug config's model from its seed (the same weights in every process), measures with the
trainer's KnnMonitor, and checks on every rank that the measurement left the model's mode, state and the
global RNG as they were; rank 0 writes the gathered features and the metrics to OUT.npz.
"""

import sys

import numpy as np
import torch

from medssl_scale.augment.policy import policy_from_config
from medssl_scale.config import load_config
from medssl_scale.distributed.launch import init_process_group
from medssl_scale.train.builders import build_model
from medssl_scale.train.monitor import open_monitor

out, shards, *overrides = sys.argv[1:]
cfg = load_config("configs/debug_cpu.yaml", [f"monitor.shards={shards}", *overrides])
dist = init_process_group(False)
torch.manual_seed(cfg.seed)
model = build_model(cfg, "cpu")
model.train()
monitor = open_monitor(cfg, policy_from_config(cfg.augment), torch.device("cpu"))
state = {k: v.clone() for k, v in model.state_dict().items()}
rng = torch.get_rng_state()
bank, query = monitor.embed(model)
metrics = monitor.measure(model, run_seconds=1.0)
assert model.training, "the monitor left the model in eval mode"
assert torch.equal(torch.get_rng_state(), rng), "the monitor moved the global RNG"
for k, v in model.state_dict().items():
    assert torch.equal(v, state[k]), f"the monitor changed {k}"
if dist.rank == 0:
    np.savez(out, bank=bank.values, bank_present=bank.present, query=query.values, query_present=query.present,
             bank_labels=monitor.bank.labels, query_labels=monitor.query.labels,
             bank_ids=np.array([r.sample_id for r in monitor.bank.records]),
             **{k: np.nan if v is None else v for k, v in metrics.items()})
