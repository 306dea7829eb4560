"""Mel-spectrogram regression loss: L1 + L2 between predicted and target log-mel frames.

Tacotron regresses frames with L1 (Wang et al. 2017, arXiv:1703.10135) and Tacotron 2 with L2
(Shen et al. 2017, arXiv:1712.05884); ESPnet-TTS trains its Tacotron 2 on their sum, "L1+L2"
(Hayashi et al. 2019, ESPnet-TTS, arXiv:1910.10909). L1 keeps gradients alive on small
errors, L2 punishes the occasional large one. Padded frames are left out of the sum and of the count.
"""

from __future__ import annotations

from torch import Tensor


def mel_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute plus mean squared error over the real frames only.

    Both means run over every mel band of every real frame, so a batch's loss does not depend on
    how much padding it carries.

    Args:
        pred: (B, F, num_mels) predicted log-mel frames.
        target: (B, F, num_mels) target log-mel frames.
        mask: (B, F) bool, True at real frames.

    Returns:
        () float32; 0 when no frame is real.
    """
    if pred.shape != target.shape or pred.shape[:2] != mask.shape:
        raise ValueError(
            f"need pred and target (B, F, num_mels) and mask (B, F), got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}, {tuple(mask.shape)}"
        )
    # fp32 island: squared log-mel errors summed over many frames lose digits in bf16.
    keep = mask.unsqueeze(-1).float()  # (B, F, 1)
    # where, not multiply: a NaN or inf in a padded frame must not leak in as 0 * inf.
    diff = (pred.float() - target.float()).where(mask.unsqueeze(-1), 0.0)  # (B, F, M)
    count = (keep.sum() * pred.shape[-1]).clamp_min(1.0)
    return (diff.abs().sum() + diff.square().sum()) / count
