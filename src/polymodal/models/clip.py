"""CLIP-style contrastive model over any set of modalities: one tower per modality, one shared backbone.

Each tower is encoder -> projector (to ``dim``) -> + modality-type embedding (``models/encoding.py``)
-> the ONE shared transformer, run over that modality's tokens alone (bidirectional, padding
masked) -> masked mean pool -> optional linear head -> L2 normalisation. Every pair of modalities
present in a batch gets its own symmetric InfoNCE term (``clip_image_text`` ...) over the items that
carry both, with one shared learnable, clamped temperature (``tasks/contrastive.py``). The towers
never read each other, so embeddings can be computed offline per modality and searched later
(``polymodal embed`` / ``polymodal search``).

References: Radford et al. 2021, CLIP, arXiv:2103.00020; a single transformer shared by the
modalities' towers as in Akbari et al. 2021, VATT (modality-agnostic variant), arXiv:2104.11178.
"""

from __future__ import annotations

from torch import Tensor, nn

from polymodal.data.batch import Batch
from polymodal.modality import Modality
from polymodal.models.encoding import ModalityEncoder
from polymodal.models.output import StepOutput
from polymodal.models.routing import ModalityRouting
from polymodal.models.sequence import source_pass
from polymodal.tasks import ContrastiveTask

LOSS_PREFIX = "clip_"


class ClipModel(nn.Module):
    """Contrastive towers on one shared backbone. Wiring only (see ``polymodal.models.build``).

    Args:
        inputs: the encoders, projectors and type embedding of every modality.
        backbone: a transformer ``forward(tokens, *, mask, positions)`` over (B, N, D).
        contrastive: the embeddings and their pairwise InfoNCE (built with ``prefix="clip_"``).
    """

    def __init__(self, inputs: ModalityEncoder, backbone: nn.Module, contrastive: ContrastiveTask) -> None:
        super().__init__()
        self.inputs = inputs
        self.backbone = backbone
        self.contrastive = contrastive
        self.routing = ModalityRouting(backbone)  # per-token modalities for a mixture-of-experts backbone

    @property
    def modalities(self) -> list[Modality]:
        return self.inputs.modalities

    @property
    def pairs(self) -> list[tuple[Modality, Modality]]:
        return self.contrastive.pairs

    def encode(self, modality: Modality, inputs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inputs(modality, inputs, mask)

    def source_states(self, tokens: Tensor, valid: Tensor) -> Tensor:
        return source_pass(self.backbone, tokens, valid, routing=self.routing.options(*tokens.shape[:2], device=tokens.device))

    def embed(self, modality: Modality, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        """Unit-norm embeddings (B, embed_dim) float32 of one modality's inputs.

        Args:
            inputs: as the collator makes them (``Batch.inputs[modality]``): IMAGE (B, C, H, W),
                TEXT (B, L) ids, AUDIO (B, F, num_mels).
            mask: (B, L) or (B, F) bool, True on real tokens/frames; None: all real.
        """
        if modality not in self.modalities:
            raise ValueError(f"this model has no {modality} tower; it has {', '.join(map(str, self.modalities))}")
        return self.contrastive.embed(self, modality, inputs, mask)

    def forward(self, batch: Batch) -> StepOutput:
        """One symmetric InfoNCE term per trained pair present in the batch.

        Returns:
            StepOutput with losses ``clip_<a>_<b>`` (() each, over the items carrying both a and b)
            and metrics ``logit_scale`` and ``clip_<a>_<b>_acc`` (in-batch a -> b top-1 accuracy).
        """
        self.routing.start_step()
        losses, metrics = self.contrastive(self, batch)
        expert_losses, expert_stats = self.routing.finish_step()
        losses, metrics = {**losses, **expert_losses}, {**metrics, **expert_stats}
        if not losses:
            has = ", ".join(map(str, batch.inputs))
            raise ValueError(
                f"the batch has no item with both modalities of any trained pair ({self.contrastive.describe_pairs()}); it has {has}"
            )
        return StepOutput(losses, {"logit_scale": metrics.pop("logit_scale"), **metrics})
