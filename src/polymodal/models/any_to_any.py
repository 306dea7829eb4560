"""The any-to-any model: per-modality encoders and projectors with a modality-type embedding, ONE
shared transformer over source and target tokens in a prefix-LM layout, a head per target modality
and the tasks that use them.

Wiring only. Each task (``polymodal.tasks``) picks its items and inputs from a batch; the head of
its target modality (``polymodal.heads``) lays out ``[source][target]`` through the backbone
(``run``), names its losses and generates. One sequence per task and item, bidirectional over the
source, causal over the target, sources never see targets; so the source positions of any task's
pass hold exactly what a pass over the source alone would, and the contrastive task reuses them (their
masked mean, or a decoupler's shared summary) as that modality's embedding at no extra backbone cost.

Reference: seed 000 (modality encoders + shared backbone + modality decoders); the prefix-LM layout
of Raffel et al. 2019, T5, arXiv:1910.10683 (section 3.2.1).
"""

from __future__ import annotations

from torch import Tensor, nn

from polymodal.data.batch import Batch
from polymodal.modality import Modality
from polymodal.models.encoding import ModalityEncoder
from polymodal.models.output import StepOutput
from polymodal.models.routing import ModalityRouting
from polymodal.models.sequence import prefix_lm_pass, source_pass
from polymodal.tasks import ContrastiveTask, GenerationTask


class AnyToAnyModel(nn.Module):
    """Takes built parts (see ``polymodal.models.build``).

    Args:
        inputs: the encoders, projectors and type embedding of every source modality.
        backbone: the shared transformer (``forward(tokens, *, mask, positions, cache)``, ``new_cache``).
        heads: per target modality, the head its tasks share.
        tasks: by name, in training order: generation tasks and, optionally, ``contrastive``.
    """

    def __init__(
        self, inputs: ModalityEncoder, backbone: nn.Module, heads: dict[Modality, nn.Module], tasks: dict[str, nn.Module]
    ) -> None:
        super().__init__()
        for name, task in tasks.items():
            if isinstance(task, GenerationTask) and task.target not in heads:
                raise ValueError(f"task {name} needs a {task.target} head; heads: {', '.join(map(str, heads))}")
        self.inputs = inputs
        self.backbone = backbone
        self.heads = nn.ModuleDict({m.value: head for m, head in heads.items()})
        self.tasks = nn.ModuleDict(tasks)
        self.routing = ModalityRouting(backbone)  # per-token modalities for a mixture-of-experts backbone

    @property
    def generation_tasks(self) -> dict[str, GenerationTask]:
        return {name: task for name, task in self.tasks.items() if isinstance(task, GenerationTask)}

    @property
    def contrastive(self) -> ContrastiveTask | None:
        return next((task for task in self.tasks.values() if isinstance(task, ContrastiveTask)), None)

    def head(self, target: Modality) -> nn.Module:
        if target.value not in self.heads:
            raise ValueError(f"this model makes no {target} (its tasks: {', '.join(self.tasks)})")
        return self.heads[target.value]

    @property
    def image_tokenizer(self) -> nn.Module | None:
        """The frozen image tokenizer a head decodes with (trained in the run's first stage), if any."""
        return getattr(self.heads["image"], "tokenizer", None) if "image" in self.heads else None

    # ------------------------------------------------------------------ what heads and tasks call

    def encode(
        self, modality: Modality, inputs: Tensor, mask: Tensor | None = None, *, indices: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Projected source tokens (B, N, D) with the type embedding, and their mask (B, N);
        ``indices`` (B,) of training items let a cached encoder read its cache."""
        return self.inputs(modality, inputs, mask, indices)

    def type_embedding(self, modality: Modality, like: Tensor) -> Tensor:
        return self.inputs.type_embedding(modality, like)

    def run(self, source: Tensor, source_mask: Tensor, target: Tensor, target_mask: Tensor, *, cache=None) -> Tensor:
        """The backbone over ``[source][target]`` in the prefix-LM layout: (B, Ns + Lt, D)."""
        routing = self.routing.options(len(source), source.shape[1], target.shape[1], device=source.device)
        return prefix_lm_pass(self.backbone, source, source_mask, target, target_mask, cache=cache, routing=routing)

    def source_states(self, tokens: Tensor, valid: Tensor) -> Tensor:
        """The backbone over one source alone: (B, N, D) -> (B, N, D)."""
        return source_pass(self.backbone, tokens, valid, routing=self.routing.options(*tokens.shape[:2], device=tokens.device))

    def step(self, tokens: Tensor, *, mask: Tensor, positions: Tensor, cache) -> Tensor:
        """The backbone over new target tokens (B, n, D) that read a KV cache (one decoding step)."""
        return self.backbone(tokens, mask=mask, positions=positions, cache=cache, **self.routing.target_options(tokens))

    # ------------------------------------------------------------------ training

    def forward(self, batch: Batch) -> StepOutput:
        losses: dict[str, Tensor] = {}
        metrics: dict[str, float] = {}
        counts: dict[str, Tensor] = {}  # the units each task's term averages over (items by default)
        self.routing.start_step()
        states: dict[Modality, tuple[Tensor, Tensor]] = {}  # source states and mask, over batch.present[m] rows
        for name, task in self.generation_tasks.items():
            head = self.heads[task.target.value]
            chosen = task.select(batch, reads_references=head.reads_references)
            if chosen is None:
                continue
            source, source_mask = self.encode(task.source, chosen.inputs, chosen.mask, indices=chosen.indices)
            with self.routing.of(task.source, task.target):
                out = head.loss(self, source, source_mask, chosen.target)
            losses.update({name if not k else f"{name}_{k}": v for k, v in out.losses.items()})
            items = chosen.keep.sum()
            counts.update({name if not k else f"{name}_{k}": out.counts.get(k, items) for k in out.losses})
            metrics.update({f"{name}_{k}": v for k, v in out.metrics.items()})
            covers_all = chosen.own_source and bool((chosen.keep == batch.present[task.source]).all())
            if covers_all and task.source not in states:
                states[task.source] = (out.hidden[:, : source.shape[1]], source_mask)
        if self.contrastive is not None:
            pair_loss, pair_metrics = self.contrastive(self, batch, states)
            losses.update(pair_loss)
            metrics.update(pair_metrics)
        expert_losses, expert_stats = self.routing.finish_step()
        losses.update(expert_losses)
        metrics.update(expert_stats)
        if not losses:
            raise ValueError(f"the batch has none of the inputs the tasks {list(self.tasks)} need (has {list(batch.inputs)})")
        return StepOutput(losses, metrics, counts)

    # ------------------------------------------------------------------ use

    def embed(self, modality: Modality, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        """Unit-norm contrastive embeddings (B, embed_dim) float32 of one modality's inputs."""
        if self.contrastive is None:
            raise ValueError("this model has no contrastive embedding (add the task 'contrastive')")
        return self.contrastive.embed(self, modality, inputs, mask)

    def generate(self, source: Modality, target: Modality, inputs: Tensor, mask: Tensor | None = None, **options):
        """``target`` from a batch of ``source`` inputs (as the collator makes them; for a head that
        learns from references, the source text as ``Collator.source_texts`` makes it).

        Returns:
            what the target's head generates: text ids per item (text), images (B, C, H, W) in
            [-1, 1], or log-mel frames (B, F, M); ``options`` are the head's (sampling, lengths).
        """
        if not any(t.source is source and t.target is target for t in self.generation_tasks.values()):
            raise ValueError(f"this model was not trained for {source}_to_{target} (its tasks: {', '.join(self.tasks)})")
        tokens, valid = self.encode(source, inputs, mask)
        with self.routing.of(source, target):
            return self.head(target).generate(self, tokens, valid, **options)
