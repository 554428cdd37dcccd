"""Run under torchrun on CPU processes (gloo): FSDP2 full shard of a STAMP model exactly as accelerate applies it
(the plugin Trainer builds from configs/fsdp_full_shard.json, accelerate's fsdp2_prepare_model), a few AdamW steps on
fixed global batches of 4 split over the processes, then the full state dict gathered as accelerate gathers it and
saved by stamp_hf.training.merge_and_save. Writes the loss per step and the sharded module classes to
OUTPUT/fsdp_run.json. tests/test_engines.py runs the same steps in one process without FSDP as the reference. On CPU processes accelerate does not turn FSDP on by itself (it runs it on accelerators only):
its state gets the plugin here, the one step it skips.

    python -m torch.distributed.run --nproc_per_node N tests/fsdp_worker.py BASE DATA FSDP_CONFIG OUTPUT
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from stamp_hf.data import STAMPCollator, STAMPDataset
from stamp_hf.training import TrainConfig, load_starting_point, merge_and_save

STEPS, BATCH, LEARNING_RATE = 4, 4, 3e-3


def fixed_batch_steps(model, processor, data, rank=0, world=1, add_up=lambda total: None) -> list[float]:
    """STEPS AdamW steps on fixed global batches of BATCH samples, process `rank` of `world` taking its share; the
    global loss per step (`add_up` sums a tensor over the processes in place)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    dataset, collate = STAMPDataset(data, processor), STAMPCollator(processor)
    losses = []
    for step in range(STEPS):
        samples = [dataset[(BATCH * step + k) % len(dataset)] for k in range(BATCH)]
        whole = collate(samples)  # the global batch's counts normalise each process's share, as STAMPTrainer does
        counts = {"num_items_in_batch": (whole["labels"] != -100).sum(),
                  "num_masks_in_batch": torch.tensor(sum(len(m) for m in whole["mask_labels"]))}
        share = collate(samples[rank * BATCH // world:(rank + 1) * BATCH // world])
        loss = model(**share, **counts).loss
        (loss * world).backward()  # FSDP averages the processes' gradients; the shares' losses add up
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        add_up(total)
        losses.append(total.item())
    return losses


def main(base, data, fsdp_config, output):
    torch.set_num_threads(1)
    config = TrainConfig(model=base, data=data, output_dir=output,
                         training={"fsdp": True, "fsdp_config": fsdp_config, "use_cpu": True, "ddp_backend": "gloo"})
    args = config.training_arguments()
    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)  # as Trainer builds it
    model, processor = load_starting_point(config)
    model.train()
    model = fsdp2_prepare_model(accelerator, model)
    sharded = sorted(type(module).__name__.removeprefix("FSDP") for module in model.modules()
                     if isinstance(module, FSDPModule))
    losses = fixed_batch_steps(model, processor, data, dist.get_rank(), dist.get_world_size(), dist.all_reduce)

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)  # accelerate's
    state_dict = get_model_state_dict(model, options=options)
    if dist.get_rank() == 0:
        merge_and_save(model, processor, output, state_dict)
        (Path(output) / "fsdp_run.json").write_text(json.dumps({"losses": losses, "sharded": sharded}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
