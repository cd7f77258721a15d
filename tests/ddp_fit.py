"""Fit with ClassForgetting under DDP on 2 CPU processes; every rank saves what it ends with.

Run as a script (``python tests/ddp_fit.py OUT_DIR RELEARN_WEIGHT``), never inside pytest: Lightning
re-launches ``sys.argv`` for rank 1.
"""

import copy
import sys

import torch
from conftest import quiet_trainer, tiny_loader, tiny_net

from lightning_forget import ClassForgetting, ForgettingModule, ForgettingObjective

if __name__ == "__main__":
    out, relearn_weight = sys.argv[1], float(sys.argv[2])
    torch.manual_seed(0)
    net = tiny_net()
    original = copy.deepcopy(net.state_dict())
    module = ForgettingModule(net, [1], 4, optimizer="sgd", lr=0.1, weight_decay=0.1)
    callback = ClassForgetting([1], fraction=0.1, objective=ForgettingObjective(relearn_weight=relearn_weight))
    trainer = quiet_trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, accumulate_grad_batches=2, callbacks=[callback]
    )
    trainer.fit(module, tiny_loader(n_per_class=8))
    torch.save(
        {
            "masks": callback.masks,
            "original": original,
            "final": net.state_dict(),
            "verified": callback.verify(module).ok,
            "restorations": len(callback.restorations),
        },
        f"{out}/rank{trainer.global_rank}.pt",
    )
