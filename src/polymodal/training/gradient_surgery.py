"""Gradient surgery over named loss terms: PCGrad and GradNorm, chosen by ``train.gradient_surgery``.

Both need each loss's own gradient, so instead of one backward of the weighted sum, every weighted
term is differentiated on its own (``torch.autograd.grad`` on the trainable parameters, the graph
kept until the last term) and summed per loss over the micro-batches of a step. Those per-loss sums
are averaged over the ranks of a data-parallel run before the surgery
(``distributed/term_gradients.py``), so every rank does the same surgery, the one a single process
would do on the whole batch; the surgery then writes one combined gradient into ``.grad``, where
clipping and the optimiser find it as usual. Cost: one
backward pass per loss term instead of one in all, and one gradient-sized buffer per term.

A parameter is *shared* when two or more of the step's terms reach it; the surgery acts on the
concatenation of the shared parameters' gradients. A parameter reached by one term keeps that
term's gradient. Terms left out by the ``losses`` setting are added plainly, like terms whose
weight is 0 this step (a schedule that has not opened them yet) are skipped.

PCGrad (Yu et al. 2020, Gradient Surgery for Multi-Task Learning, arXiv:2001.06782, Algorithm 1):
each term's gradient g_i is projected off every other g_j it conflicts with (g_i . g_j < 0),
g_i <- g_i - (g_i . g_j) / |g_j|^2 g_j, visiting the others in a random order, and the projected
gradients are summed. The order is drawn from the surgery's own seeded generator, whose state is
checkpointed, so a resumed run draws the same orders.

GradNorm (Chen et al. 2018, GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks, arXiv:1711.02257): learned weights w_i multiply the terms. With
G_i = |w_i g_i| on parameters W, r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)) the relative
inverse training rate, the weights descend L_grad = sum_i |G_i - mean(G) r_i^alpha| (the target
held constant, as in the paper) with their own Adam, then are renormalised to sum to the number of
terms (of the terms active this step, so a term a schedule has not opened yet keeps its weight and
does not count). G_i is linear in w_i, so dL_grad/dw_i = sign(G_i - target_i) |g_i| needs no second
backward. L_i(0) is a term's loss the first step it is active. The weights, initial losses and Adam
state are checkpointed. W, where the norms are taken, is the ``layer`` setting (the paper's last
shared layer): each term is then differentiated only down to W and the model by one backward pass
of the weighted sum, so GradNorm costs little more than the plain sum. Without ``layer``, W is
every shared parameter and GradNorm costs what PCGrad does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from polymodal.distributed.term_gradients import average_gradients_, average_term_gradients
from polymodal.errors import ConfigError
from polymodal.registry import Registry

log = logging.getLogger(__name__)

GRADIENT_SURGERIES: Registry[Any] = Registry("gradient surgery")
NO_SURGERY = "none"  # the plain weighted sum, one backward pass
# GradNorm keeps each weight above this floor: a weight at 0 would silence its term for good
# (its G_i would be 0 whatever its gradient); renormalisation then restores the sum.
MIN_GRADNORM_WEIGHT = 1e-3


class GradientSurgery(Protocol):
    """What the training loop calls: ``backward`` per micro-batch, ``apply`` once per step."""

    def backward(self, terms: Mapping[str, Tensor], weights: Mapping[str, float], *, scale: float) -> None: ...

    def apply(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def check_gradient_surgery(spec: Mapping[str, Any], where: str = "train.gradient_surgery") -> None:
    """Raise a :class:`ConfigError` unless ``spec`` is ``{"name": "none"}`` or a valid surgery spec."""
    if isinstance(spec, Mapping) and spec.get("name") == NO_SURGERY:
        if len(spec) > 1:
            raise ConfigError(f"{where}: 'none' takes no settings, got {sorted(k for k in spec if k != 'name')}")
        return
    if isinstance(spec, Mapping) and "name" in spec and spec["name"] not in GRADIENT_SURGERIES:
        valid = ", ".join([NO_SURGERY, *GRADIENT_SURGERIES.names()])
        raise ConfigError(f"{where}.name: unknown gradient surgery {spec['name']!r}; valid: {valid}")
    GRADIENT_SURGERIES.check(spec, where)


def build_gradient_surgery(spec: Mapping[str, Any], model: nn.Module) -> GradientSurgery | None:
    """The surgery ``spec`` names over ``model``'s trainable parameters; None for ``none``."""
    check_gradient_surgery(spec)
    if spec["name"] == NO_SURGERY:
        return None
    return GRADIENT_SURGERIES.build(spec, model, where="train.gradient_surgery")


def trainable(model: nn.Module, prefix: str | None = None) -> list[nn.Parameter]:
    """The parameters of ``model`` that require a gradient; only those under ``prefix`` when given."""
    if prefix is None:
        return [p for p in model.parameters() if p.requires_grad]
    found = [p for n, p in model.named_parameters() if p.requires_grad and (n == prefix or n.startswith(prefix + "."))]
    if not found:
        names = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()})[:8]  # owning modules
        raise ConfigError(f"gradient surgery: no trainable parameter is named {prefix!r} or under it; e.g. {', '.join(names)}")
    return found


class PerLossGradients:
    """Each loss term's gradient on each parameter, summed over the micro-batches of one step.

    Attributes:
        params: the trainable parameters, in a fixed order.
        grads: name -> one entry per parameter: the term's summed gradient, None where it never reached.
        values: name -> () the term's unweighted loss summed over micro-batches (times ``scale``).
        rest: the summed gradient of the terms outside ``losses``, one entry per parameter.
    """

    def __init__(self, params: Sequence[nn.Parameter], *, losses: Sequence[str] | None) -> None:
        self.params = list(params)
        self.losses = None if losses is None else frozenset(losses)
        self.reset()

    def reset(self) -> None:
        self.grads: dict[str, list[Tensor | None]] = {}
        self.values: dict[str, Tensor] = {}
        self.rest: list[Tensor | None] = [None] * len(self.params)

    def add(
        self, terms: Mapping[str, Tensor], weights: Mapping[str, float], scale: float, *, keep_graph: bool = False
    ) -> dict[str | None, Tensor]:
        """Differentiate ``scale * weight * term`` for each term of one micro-batch into its buffer.

        Terms of weight 0 are skipped; terms outside ``losses`` are summed and differentiated once.

        Returns:
            the () weighted terms by name (None: the sum of those outside ``losses``), their graph
            kept when ``keep_graph`` (for a backward pass of their sum).
        """
        groups: dict[str | None, Tensor] = {}  # None: the terms outside ``losses``
        for name, term in terms.items():
            weight = weights.get(name, 1.0)
            if weight == 0:
                continue
            key = name if self.losses is None or name in self.losses else None
            weighted = weight * term.float() * scale  # fp32, as the plain path sums the terms
            groups[key] = weighted if key not in groups else groups[key] + weighted
            if key is not None:
                value = term.detach().float() * scale
                self.values[name] = value if name not in self.values else self.values[name] + value
        keys = [key for key, loss in groups.items() if loss.requires_grad]
        for i, key in enumerate(keys):
            keep = keep_graph or i < len(keys) - 1
            grads = torch.autograd.grad(groups[key], self.params, retain_graph=keep, allow_unused=True)
            buffer = self.rest if key is None else self.grads.setdefault(key, [None] * len(self.params))
            for index, grad in enumerate(grads):
                if grad is not None:
                    buffer[index] = grad if buffer[index] is None else buffer[index] + grad
        return groups

    def shared(self) -> list[int]:
        """Indices of the parameters two or more named terms reached."""
        counts = [sum(grads[i] is not None for grads in self.grads.values()) for i in range(len(self.params))]
        return [i for i, count in enumerate(counts) if count >= 2]

    def flat(self, names: Sequence[str], indices: Sequence[int]) -> Tensor:
        """(T, S) each named term's gradient on the parameters ``indices``, zeros where it did not reach."""
        rows = []
        for name in names:
            grads = self.grads[name]
            parts = [grads[i] if grads[i] is not None else torch.zeros_like(self.params[i]) for i in indices]
            rows.append(torch.cat([part.reshape(-1) for part in parts]))
        return torch.stack(rows)

    def write(self, per_param: list[Tensor | None], flat: Tensor | None = None, indices: Sequence[int] = ()) -> None:
        """Add ``per_param`` plus the (S,) ``flat`` split over ``indices``, and ``rest``, into ``.grad``."""
        per_param = list(per_param)
        if flat is not None:
            sizes = [self.params[i].numel() for i in indices]
            for i, part in zip(indices, flat.split(sizes)):
                part = part.view_as(self.params[i])  # (S_i,) -> the parameter's shape
                per_param[i] = part if per_param[i] is None else per_param[i] + part
        for param, grad, rest in zip(self.params, per_param, self.rest):
            for piece in (grad, rest):
                if piece is not None:
                    param.grad = piece.detach().clone() if param.grad is None else param.grad + piece


def pcgrad_project(grads: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad's projection: each row projected off the other rows it conflicts with.

    Args:
        grads: (T, S) one gradient per term, flattened over the shared parameters.
        generator: draws each row's random order of the others.

    Returns:
        (T, S) the projected gradients (their sum is the update direction).
    """
    num_terms = grads.shape[0]
    # Clamped so that a zero gradient (which conflicts with nothing) never divides 0 by 0.
    sq_norms = grads.square().sum(dim=1).clamp_min(torch.finfo(grads.dtype).tiny)  # (T,)
    projected = grads.clone()
    for i in range(num_terms):
        for j in torch.randperm(num_terms, generator=generator).tolist():
            if j == i:
                continue
            dot = projected[i] @ grads[j]
            # Only conflicts are removed: min(dot, 0) leaves agreeing pairs alone without a branch.
            projected[i] -= dot.clamp_max(0) / sq_norms[j] * grads[j]
    return projected


def conflict_fraction(grads: Tensor) -> float:
    """The fraction of pairs of rows of (T, S) ``grads`` whose dot product is negative."""
    num_terms = grads.shape[0]
    dots = grads @ grads.T  # (T, T)
    upper = torch.triu(torch.ones_like(dots, dtype=torch.bool), diagonal=1)
    return float((dots[upper] < 0).float().mean()) if num_terms > 1 else 0.0


@GRADIENT_SURGERIES.register("pcgrad")
class PCGrad:
    """Projecting conflicting gradients (see the module docstring).

    Args:
        model: the model whose trainable parameters it acts on.
        seed: seeds the random order of the projections.
        losses: the terms the surgery acts on; None: every term. Others are added plainly.
    """

    def __init__(self, model: nn.Module, *, seed: int = 0, losses: list[str] | None = None) -> None:
        self.collected = PerLossGradients(trainable(model), losses=losses)
        self.generator = torch.Generator().manual_seed(seed)  # CPU: the orders are drawn on the host

    def backward(self, terms: Mapping[str, Tensor], weights: Mapping[str, float], *, scale: float) -> None:
        self.collected.add(terms, weights, scale)

    def apply(self) -> dict[str, float]:
        """Write the projected, summed gradient into ``.grad``; return the share of conflicting pairs."""
        average_term_gradients(self.collected)  # over ranks: every rank projects the global gradients
        collected, names = self.collected, sorted(self.collected.grads)
        shared = collected.shared()
        plain = [_sum_present(grads[i] for grads in collected.grads.values()) for i in range(len(collected.params))]
        for i in shared:
            plain[i] = None  # these come from the projection
        metrics: dict[str, float] = {}
        flat = None
        if shared:
            per_term = collected.flat(names, shared)  # (T, S)
            metrics["pcgrad/conflicts"] = conflict_fraction(per_term)
            flat = pcgrad_project(per_term, generator=self.generator).sum(dim=0)  # (S,)
        collected.write(plain, flat, shared)
        collected.reset()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _sum_present(grads: Any) -> Tensor | None:
    """The sum of the tensors among ``grads`` that are not None; None when all are."""
    present = [g for g in grads if g is not None]
    return torch.stack(present).sum(dim=0) if present else None


@GRADIENT_SURGERIES.register("gradnorm")
class GradNorm:
    """Learned loss weights that equalise the terms' relative training rates (see the module docstring).

    Args:
        model: the model whose trainable parameters it acts on.
        alpha: the paper's restoring force towards a common training rate (0: equal gradient norms).
        lr: the learning rate of the weights' own Adam; a weight moves by about ``lr`` per step.
        losses: the terms that get learned weights; None: every term. Others are added plainly.
        layer: the paper's W, a parameter name or module prefix (e.g. ``backbone.blocks.3``): the
            norms |g_i| are taken there only, so each term is differentiated down to that layer
            and the model once, by one backward pass of the weighted sum. None: W is every shared
            parameter, and each term is differentiated through the whole model.
    """

    def __init__(
        self, model: nn.Module, *, alpha: float = 1.5, lr: float = 0.025, losses: list[str] | None = None,
        layer: str | None = None,
    ) -> None:  # fmt: skip
        if alpha < 0 or lr <= 0:
            raise ConfigError(f"gradnorm: needs alpha >= 0 and lr > 0, got alpha={alpha}, lr={lr}")
        self.collected = PerLossGradients(trainable(model, layer), losses=losses)
        self.updated = trainable(model) if layer is not None else []  # .grad written by backward, with a layer
        self.alpha, self.lr, self.layer = alpha, lr, layer
        self.names: list[str] = []
        self.weights: dict[str, nn.Parameter] = {}
        self.initial_losses: dict[str, Tensor] = {}
        self.optimizer: torch.optim.Adam | None = None

    def backward(self, terms: Mapping[str, Tensor], weights: Mapping[str, float], *, scale: float) -> None:
        groups = self.collected.add(terms, weights, scale, keep_graph=self.layer is not None)
        if self.layer is not None:  # the update's gradient: one backward of sum_i w_i * term_i
            total = sum(self._weight(name, loss) * loss for name, loss in groups.items() if loss.requires_grad)
            if isinstance(total, Tensor):
                total.backward()

    def _weight(self, name: str | None, like: Tensor) -> Tensor | float:
        """The current weight of ``name``: 1 for a term not seen before or outside ``losses`` (None)."""
        return self.weights[name].detach().to(like.device) if name in self.weights else 1.0

    def _weighted_sum(self, index: int) -> Tensor | None:
        """sum_i w_i g_i on parameter ``index``, over the terms that reached it."""
        grads = [(name, grads[index]) for name, grads in self.collected.grads.items() if grads[index] is not None]
        return _sum_present(self._weight(name, grad) * grad for name, grad in grads)

    def _register(self, name: str, weight: Tensor, initial_loss: Tensor) -> None:
        """A new term: its () weight (a parameter in a new Adam group) and its () L_i(0)."""
        param = nn.Parameter(weight.detach().float().cpu().clone())
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam([param], lr=self.lr)
        else:
            self.optimizer.add_param_group({"params": [param]})
        self.names.append(name)
        self.weights[name] = param
        self.initial_losses[name] = initial_loss.detach().cpu().clone()

    def apply(self) -> dict[str, float]:
        """Write sum_i w_i g_i into ``.grad`` (with a ``layer``, backward did), then step the weights.
        The gradients are averaged over ranks first, so the weights stay the same on every rank."""
        average_term_gradients(self.collected)
        average_gradients_(self.updated)  # with a layer, the update's gradient is in .grad already
        collected, names = self.collected, sorted(self.collected.grads)
        per_param = None if self.layer is not None else [self._weighted_sum(i) for i in range(len(collected.params))]
        for name in names:
            if name not in self.weights:
                self._register(name, torch.ones(()), collected.values[name])
        at = collected.shared() if self.layer is None else list(range(len(collected.params)))
        if len(names) >= 2 and at:
            norms = collected.flat(names, at).norm(dim=1)  # (T,) |g_i| on W
            losses = torch.stack([collected.values[name] for name in names])  # (T,)
            self._update(names, norms.cpu(), losses.cpu())
        if per_param is not None:
            collected.write(per_param)
        collected.reset()
        return {f"gradnorm/{name}": self.weights[name].item() for name in names}

    def _update(self, names: list[str], norms: Tensor, losses: Tensor) -> None:
        """One Adam step of the weights of ``names`` on L_grad, then the floor and renormalisation."""
        if not (torch.isfinite(norms).all() and torch.isfinite(losses).all()):
            log.warning("gradnorm: a non-finite loss or gradient; the weights keep their values this step")
            return
        weights = torch.stack([self.weights[name].detach() for name in names])  # (T,)
        initial = torch.stack([self.initial_losses[name] for name in names])
        ratios = losses / initial.clamp_min(torch.finfo(initial.dtype).tiny)  # L_i(t) / L_i(0)
        relative_rate = ratios / ratios.mean()  # r_i
        scaled = weights * norms  # G_i
        target = scaled.mean() * relative_rate.pow(self.alpha)  # a constant in L_grad
        grads = torch.sign(scaled - target) * norms  # dL_grad / dw_i
        for name, grad in zip(names, grads):
            self.weights[name].grad = grad.clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            floored = torch.stack([self.weights[name].clamp_min(MIN_GRADNORM_WEIGHT) for name in names])
            renormalised = floored * len(names) / floored.sum()  # the paper: sum_i w_i = T
            for name, value in zip(names, renormalised):
                self.weights[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "weights": torch.stack([self.weights[n].detach() for n in self.names]) if self.names else torch.zeros(0),
            "initial_losses": torch.stack([self.initial_losses[n] for n in self.names]) if self.names else torch.zeros(0),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.names, self.weights, self.initial_losses, self.optimizer = [], {}, {}, None
        for name, weight, initial in zip(state["names"], state["weights"], state["initial_losses"]):
            self._register(name, weight, initial)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
