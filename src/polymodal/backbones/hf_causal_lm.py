"""A pretrained Hugging Face causal LM as the shared backbone, fed projected tokens as ``inputs_embeds``.

The LM's transformer body (``base_model``: GPT2Model, LlamaModel, ...) is loaded from a local
folder; its own token embedding and LM head are not used, because the model around it embeds the
text targets and predicts them itself (``AnyToAnyModel.text_embed`` / ``lm_head``). Modality tokens,
already projected to the LM width, enter through ``inputs_embeds`` as in LLaVA. Our boolean prefix-LM
mask becomes the additive float mask HF attention adds to its scores (0 where allowed, the dtype's
minimum elsewhere): transformers passes a 4-D mask through unchanged, and the float form is the one
every attention implementation (``eager`` adds it, ``sdpa`` accepts it) reads the same way.

Freezing policies (LLaVA's two stages and full fine-tuning):
    ``frozen``          the LM is frozen; encoders, projectors and the rest of the model train.
    ``projector_only``  the LM and every encoder are frozen; only the glue between them trains
                        (LLaVA stage 1, feature alignment): the input projectors, and the model's
                        own modality-type embedding and text embedding / LM head. LLaVA can freeze
                        the last two because they are the LM's pretrained ones; here they are new
                        and random, and frozen they would leave the text side unlearnable.
    ``full``            the LM trains too.
The backbone applies its own part of a policy when built; ``apply_freeze_policy(model, policy)``
applies the whole policy to an assembled model (the encoders are not the backbone's to freeze).

References: Liu et al. 2023, Visual Instruction Tuning (LLaVA), arXiv:2304.08485; the prefix-LM
mask of Raffel et al. 2019, T5, arXiv:1910.10683; Hugging Face transformers, Wolf et al. 2020,
arXiv:1910.03771.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from polymodal.backbones import BACKBONES
from polymodal.backbones.hf_common import import_transformers, load_pretrained, resolve_local_folder
from polymodal.backbones.transformer import BackboneIntermediates
from polymodal.errors import ConfigError

logger = logging.getLogger(__name__)

FREEZE_POLICIES = ("frozen", "projector_only", "full")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def _check_policy(policy: str, where: str) -> None:
    if policy not in FREEZE_POLICIES:
        raise ConfigError(f"{where}: unknown freezing policy {policy!r}; valid: {', '.join(FREEZE_POLICIES)}")


@BACKBONES.register("hf_causal_lm")
class HFCausalLMBackbone(nn.Module):
    """The body of a pretrained causal LM over already-embedded tokens.

    Args:
        dim: token width D; must equal the LM's hidden size.
        path: local folder written by ``save_pretrained`` (a ``*ForCausalLM`` checkpoint). Nothing
            is downloaded.
        freeze: freezing policy, one of ``frozen``, ``projector_only``, ``full`` (see the module
            docstring). The backbone freezes the LM for the first two; call
            ``apply_freeze_policy`` on the assembled model for the rest of the policy.
        attn_implementation: ``sdpa`` or ``eager`` (Hugging Face attention kernels; both read the
            same additive mask).
    """

    def __init__(self, dim: int, *, path: str, freeze: str = "frozen", attn_implementation: str = "sdpa") -> None:
        super().__init__()
        _check_policy(freeze, "model.backbone.freeze")
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"model.backbone.attn_implementation: {attn_implementation!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}"
            )
        folder = resolve_local_folder(path, what="model.backbone.path")
        transformers = import_transformers()
        lm = load_pretrained(transformers.AutoModelForCausalLM, folder, attn_implementation=attn_implementation)
        hidden_size = lm.config.hidden_size
        if hidden_size != dim:
            raise ConfigError(
                f"model.dim={dim} but the LM in {folder} has hidden size {hidden_size}; set model.dim={hidden_size}"
            )
        self.model = lm.base_model  # the transformer body; lm's head is dropped with ``lm``
        self.dim = dim
        self.freeze = freeze
        self.path = str(folder)
        self.num_layers = lm.config.num_hidden_layers
        self.max_positions = getattr(lm.config, "max_position_embeddings", None)
        self.set_trainable(freeze == "full")
        logger.info("loaded %s from %s (hidden size %d, policy %s)", type(self.model).__name__, folder, dim, freeze)

    def unused_parameters(self) -> list[nn.Parameter]:
        """The LM's token embedding: tokens arrive as ``inputs_embeds``, so it never gets a gradient."""
        embedding = self.model.get_input_embeddings()
        return [] if embedding is None else list(embedding.parameters())

    def set_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the LM; its unused token embedding stays frozen either way."""
        unused = {id(p) for p in self.unused_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(trainable and id(p) not in unused)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def train(self, mode: bool = True) -> HFCausalLMBackbone:
        """A frozen LM stays in eval mode (dropout off), so it computes the same function every step."""
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    def new_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype):
        """An empty Hugging Face ``DynamicCache`` (it grows as needed, so size, device and dtype only
        serve the check that ``max_len`` fits the LM's learned or trained positions)."""
        if self.max_positions is not None and max_len > self.max_positions:
            raise ValueError(
                f"a cache of {max_len} tokens exceeds the LM's max_position_embeddings={self.max_positions}"
            )
        return import_transformers().DynamicCache(config=self.model.config)

    def forward(
        self,
        tokens: Tensor,
        *,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache=None,
    ) -> Tensor:
        """Run the LM body.

        Args:
            tokens: (B, N, D) embedded tokens, given to the LM as ``inputs_embeds``.
            mask: (B, 1, N, N_kv) bool, True = may attend, with N_kv = cached length + N (a size-1
                query axis broadcasts). None means the LM's own causal mask.
            positions: (B, N) long position ids; default ``arange(N)`` offset by the cached length.
            cache: a cache from ``new_cache``; this call's keys/values are appended to it.

        Returns:
            (B, N, D) final-normed hidden states.
        """
        return self._run(tokens, mask=mask, positions=positions, cache=cache, with_hidden=False).output

    def forward_intermediates(
        self, tokens: Tensor, *, mask: Tensor | None = None, positions: Tensor | None = None
    ) -> BackboneIntermediates:
        """Like ``forward`` (without a cache), also returning each block's output.

        Returns:
            BackboneIntermediates with ``output`` (B, N, D) and ``hidden``: num_layers x (B, N, D).
            Hugging Face's convention: entries 0..L-2 are the residual stream after blocks 1..L-1;
            the last is after the final norm (equal to ``output``), not the last block's raw stream.
        """
        return self._run(tokens, mask=mask, positions=positions, cache=None, with_hidden=True)

    def _run(
        self, tokens: Tensor, *, mask: Tensor | None, positions: Tensor | None, cache, with_hidden: bool
    ) -> BackboneIntermediates:
        batch, n, _ = tokens.shape
        start = cache.get_seq_length() if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + n, device=tokens.device).expand(batch, n)  # (B, N)
        additive = None
        if mask is not None:
            mask = mask.expand(batch, 1, n, mask.shape[-1])  # (B, 1, N, N_kv)
            additive = torch.zeros(mask.shape, dtype=tokens.dtype, device=tokens.device)
            additive = additive.masked_fill(~mask, torch.finfo(tokens.dtype).min)
        out = self.model(
            inputs_embeds=tokens,
            attention_mask=additive,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
            output_hidden_states=with_hidden,
            return_dict=True,
        )
        hidden = list(out.hidden_states[1:]) if with_hidden else []
        return BackboneIntermediates(output=out.last_hidden_state, hidden=hidden)


def apply_freeze_policy(model: nn.Module, policy: str) -> None:
    """Set ``requires_grad`` on an assembled model's encoders, projectors and backbone.

    ``full``: every parameter trains; ``frozen``: all but the backbone train; ``projector_only``:
    all but the backbone and the encoders train (projectors and the model's own embeddings / head,
    see the module docstring). Exceptions that hold under every policy: an encoder built with
    ``freeze=True`` (a pretrained encoder's own setting) stays frozen, an encoder with its own
    freezing policy (``apply_freeze()``) keeps it outside ``projector_only``, and parameters a backbone
    reports as unused (``unused_parameters()``) stay frozen. Parts that froze themselves elsewhere
    (a head's trained image tokenizer) are left as they are. Works with any backbone.

    Args:
        model: an ``AnyToAnyModel`` (``inputs``: encoders and projectors, and ``backbone``).
        policy: one of ``FREEZE_POLICIES``.
    """
    _check_policy(policy, "freezing policy")
    for p in model.inputs.parameters():
        p.requires_grad_(True)
    backbone = model.backbone
    if hasattr(backbone, "set_trainable"):
        backbone.set_trainable(policy == "full")
    else:
        for p in backbone.parameters():
            p.requires_grad_(policy == "full")
    for encoder in model.inputs.encoders.values():
        if policy == "projector_only" or getattr(encoder, "freeze", False) is True:
            for p in encoder.parameters():
                p.requires_grad_(False)
        elif hasattr(encoder, "apply_freeze"):
            encoder.apply_freeze()  # its own policy (hf_image / hf_audio: frozen, last_n or full)
    if hasattr(backbone, "freeze"):
        backbone.freeze = policy
    model.train(model.training)  # re-apply train/eval so newly frozen pretrained parts drop dropout
