import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
DDP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK")


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DDP_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.ddp
@pytest.mark.parametrize("relearn_weight", [0.0, 1.0], ids=["default_objective", "relearn_term"])
def test_ddp_ranks_hold_identical_masks_and_keep_unmasked_entries(tmp_path, relearn_weight):
    script = [sys.executable, str(TESTS / "ddp_fit.py"), str(tmp_path), str(relearn_weight)]
    subprocess.run(script, env=clean_env(), check=True, timeout=300)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(rank0["masks"]) == set(rank1["masks"])
    for name, mask in rank0["masks"].items():
        assert torch.equal(mask, rank1["masks"][name]), f"masks differ between ranks for {name}"
    changed = 0
    for rank in (rank0, rank1):
        assert rank["verified"] and rank["restorations"] == 0, "the step gate alone must keep the entries"
        for name, mask in rank["masks"].items():
            final, original = rank["final"][name.removeprefix("model.")], rank["original"][name.removeprefix("model.")]
            assert torch.equal(final[~mask], original[~mask]), f"{name} changed outside its mask"
            changed += int((final[mask] != original[mask]).sum())
    assert changed > 0
    for name, value in rank0["final"].items():
        assert torch.equal(value, rank1["final"][name]), f"ranks diverged on {name}"
