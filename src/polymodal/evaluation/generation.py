"""Figures of generated images and speech that need no judge of the dataset: how far the samples'
distribution lies from the real items', how much samples of one caption differ, and whether the
run's own contrastive embedding matches each sample to its caption.

* ``frechet_pooled_pixels`` (images): the Fréchet distance (``frechet.py``) between generated and
  real images of the same captions, each image average-pooled ``POOL`` x ``POOL`` (a 32 x 96 grey
  image gives 192 features). Pixels are a crude feature space (no network sees them), but they
  need nothing trained and a dataset-specific judge is not always there; the built-in data adds
  the same distance in its judge's feature space.
* ``frechet_mel_statistics`` (speech): the Fréchet distance between the per-clip mean and standard
  deviation of every mel band over the voiced frames, of generated speech (as heard, after the
  vocoder) and of the real clips of the same captions; ``length_ratio``: the generated clips'
  voiced frames over the real clips'.
* ``variety_l2``: the mean pairwise L2 distance between ``Generated.repeats`` samples of one
  caption (images in [-1, 1], or log-mels), averaged over captions; ``real_pairwise_l2`` the same
  over real items of any caption, for scale. A decoder that ignores its noise scores 0.
* ``own_retrieval_R@1`` (with a ``contrastive`` task): the share of samples whose caption, among
  the distinct captions asked for, is the nearest by the run's own embeddings (a CLIP score
  without an outside CLIP; it shares the run's blind spots, so it is a consistency figure).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.evaluation.frechet import frechet_distance, mean_pairwise_distance
from polymodal.evaluation.retrieval import recall_at_k
from polymodal.evaluation.samples import Generated, voiced_frames
from polymodal.evaluation.zero_shot import embed_texts
from polymodal.modality import Modality

POOL = 4  # image features: POOL x POOL average pooling
REAL_PAIRS_ITEMS = 64  # real items whose pairwise distances give the scale of ``variety_l2``
EMBED_BATCH = 250


def generation_figures(run, target: Modality, generated: Generated, *, device) -> dict[str, float]:
    """The figures of the module's docstring that ``generated`` allows (each needs at least two
    items of what it compares)."""
    figures: dict[str, float] = {"count": len(generated.captions)}
    if target is Modality.IMAGE and generated.images is not None:
        if generated.real is not None and len(generated.real) >= 2 and len(generated.images) >= 2:
            pool = nn.functional.avg_pool2d
            figures["frechet_pooled_pixels"] = frechet_distance(pool(generated.images, POOL).flatten(1), pool(generated.real, POOL).flatten(1))
    elif generated.heard is not None and generated.real is not None and len(generated.real) >= 2:
        asked = generated.heard[generated.real_index]  # the generated clips of the items with real speech
        heard = mel_statistics(asked, generated.heard_mask[generated.real_index])
        real_frames = voiced_frames(generated.real.masked_fill(~generated.real_mask[:, :, None], -torch.inf))
        real_mask = torch.arange(generated.real.shape[1])[None, :] < real_frames[:, None]
        figures["frechet_mel_statistics"] = frechet_distance(heard, mel_statistics(generated.real, real_mask))
        figures["length_ratio"] = float(generated.heard_mask[generated.real_index].sum() / real_mask.sum().clamp(min=1))
    if generated.repeats is not None and generated.repeats.shape[1] >= 2:
        figures["variety_l2"] = sum(mean_pairwise_distance(r) for r in generated.repeats) / len(generated.repeats)
    if target is Modality.IMAGE and generated.real is not None and len(generated.real) >= 2:
        figures["real_pairwise_l2"] = mean_pairwise_distance(generated.real[:REAL_PAIRS_ITEMS])
    figures.update(own_retrieval(run, target, generated, device=device))
    return figures


def mel_statistics(log_mels: Tensor, mask: Tensor) -> Tensor:
    """(N, F, M) log-mels, (N, F) frames to count -> (N, 2M): each band's mean and standard
    deviation over the counted frames (float64)."""
    weights = mask[:, :, None].double()  # (N, F, 1)
    count = weights.sum(1).clamp(min=1)  # (N, 1)
    values = log_mels.double().where(mask[:, :, None], 0.0)
    mean = values.sum(1) / count  # (N, M)
    variance = ((values - mean[:, None]).square() * weights).sum(1) / count
    return torch.cat([mean, variance.sqrt()], dim=1)


@torch.no_grad()
def own_retrieval(run, target: Modality, generated: Generated, *, device) -> dict[str, float]:
    """``own_retrieval_R@1``: samples -> their caption among the distinct captions, by the run's
    contrastive embeddings; {} without a contrastive task that embeds ``target`` and text."""
    model = run.model
    contrastive = getattr(model, "contrastive", None)
    if contrastive is None or target not in contrastive.modalities or Modality.TEXT not in contrastive.modalities:
        return {}
    if target is Modality.IMAGE:
        samples = [(generated.images[i : i + EMBED_BATCH], None) for i in range(0, len(generated.images), EMBED_BATCH)]
    else:
        samples = [(generated.heard[i : i + EMBED_BATCH], generated.heard_mask[i : i + EMBED_BATCH]) for i in range(0, len(generated.heard), EMBED_BATCH)]
    was_training = model.training
    model.eval()
    embedded = torch.cat([model.embed(target, x.to(device), None if m is None else m.to(device)).cpu() for x, m in samples])
    distinct = list(dict.fromkeys(generated.captions))
    index = {caption: i for i, caption in enumerate(distinct)}
    texts = embed_texts(model, distinct, run.tokenizer, max_tokens=run.config.data.max_text_tokens, device=device)
    model.train(was_training)
    asked = torch.tensor([index[c] for c in generated.captions[: len(embedded)]])
    recall = recall_at_k(embedded, texts, asked, torch.arange(len(distinct)), ks=(1,))
    return {"own_retrieval_R@1": recall["R@1"]}
