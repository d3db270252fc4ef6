"""Stage 1 -> stage 2: which pre-trained tensors the fine-tuning network takes over, and how much of each.

Kept apart from the diffusion objective (`model.diffusion`) because the takeover is about
two networks' state dicts, not about the loss that produced one of them: the same code warm
starts a network from a stage-1 run in this process or from a checkpoint on disk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Tensors a stage-1 network may carry that belong to its objective, not to the scorer (the
# learned field weights of `model.diffusion`): never transferred, so never trained or exported.
STAGE_ONE_ONLY = "stage1_"

# `RunConfig.pretrain_mode` -> what `transfer` copies ("none" transfers nothing).
MODE_OF_PRETRAIN = {"full": "all", "body": "body", "embedding": "embedding"}

# The partial transfer modes: which state-dict keys each one copies.
_PARTIAL_TRANSFER: dict[str, Callable[[str], bool]] = {
    "body": lambda k: not k.startswith("label_head."),
    "embedding": lambda k: k.startswith("embedding."),
}


def transfer(pretrained: dict[str, torch.Tensor], target: nn.Module, mode: str = "all") -> list[str]:
    """Copy pre-trained tensors into the fine-tuning network; returns the names copied.

    "all" copies every tensor (and insists the two networks match exactly); "body" copies all
    but the label head, whose stage-1 job (a click read off states with half the fields
    masked) differs from stage 2's; "embedding" copies only the value-embedding table (the
    embedding-only transfer ablation). Names starting with STAGE_ONE_ONLY are left behind in
    every mode.
    """
    pretrained = {k: v for k, v in pretrained.items() if not k.startswith(STAGE_ONE_ONLY)}
    if mode == "all":
        target.load_state_dict(pretrained, strict=True)
        return sorted(pretrained)
    keep = _PARTIAL_TRANSFER.get(mode)
    if keep is None:
        raise ValueError(f"unknown transfer mode '{mode}' (all, body or embedding)")
    keys = [k for k in pretrained if keep(k)]
    if not keys or len(keys) == len(pretrained):
        raise ValueError(f"pre-trained state cannot be split for '{mode}' transfer")
    missing, unexpected = target.load_state_dict({k: pretrained[k] for k in keys}, strict=False)
    missing = [k for k in missing if keep(k)]  # what the mode copies but the state lacks
    if unexpected or missing:
        raise ValueError(f"pre-trained state does not match the network: {sorted(unexpected or missing)[:5]}")
    return sorted(keys)


def shrink_toward(target: nn.Module, fresh: dict[str, torch.Tensor], names: list[str], keep: float) -> None:
    """Blend the transferred tensors with the network's fresh initialisation: keep * pre-trained
    + (1 - keep) * fresh ("shrink and perturb").

    A warm-started network trained on the same rows tends to settle in a worse optimum than
    one started fresh, and on Frappe_x1 every full transfer led early and then fell behind
    training from scratch. Shrinking the pre-trained weights and adding back a share of the
    random initialisation restores some of a fresh network's trainability while keeping the
    direction stage 1 learned. keep = 1 is the plain transfer; keep = 0 is exactly the
    from-scratch network, since stage 2 builds its network with the same seed.
    """
    if not 0 <= keep <= 1:
        raise ValueError(f"transfer keep {keep} must be in [0, 1]")
    state = target.state_dict()
    with torch.no_grad():
        for name in names:
            tensor = state[name]
            if tensor.is_floating_point():  # integer buffers (BatchNorm's batch count) stay as copied
                tensor.mul_(keep).add_(fresh[name].to(tensor.device, tensor.dtype), alpha=1 - keep)


def warm_start(pretrained: dict[str, torch.Tensor], fresh_network: nn.Module, mode: str, keep: float = 1.0) -> list[str]:
    """Turn a freshly built network into stage 2's starting point; returns the tensors taken over.

    `fresh_network` must be built exactly as a from-scratch run builds it (same seed), so that
    its initialisation is what `keep` < 1 blends towards and `keep` = 0 reproduces that run.
    """
    fresh = {k: v.detach().clone() for k, v in fresh_network.state_dict().items()} if keep < 1 else {}
    copied = transfer(pretrained, fresh_network, mode)
    if fresh:
        shrink_toward(fresh_network, fresh, copied, keep)
    return copied
