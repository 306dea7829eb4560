"""Linear CKA: the feature-space form against the Gram form, and against cka-pytorch.

Claims, at n = 10,000 examples of width d = 512 (the issue's size):
1. ``feature_cka`` (||Y^T X||_F^2 on centred features, O(n d^2), no n x n matrix) is at least 10x
   faster than ``gram_cka(linear_gram(x), linear_gram(y))`` (O(n^2 d) and two n x n Grams), with
   the same value to 1e-6. Both are float64 (the diagnostics' precision).
2. Against cka-pytorch (``cka_pytorch.utils.gram`` + ``cka_pytorch.hsic.hsic1``, which is what its
   ``CKACalculator`` runs on each batch: float32 Gram matrices and an n x n x n product per HSIC)
   on the same inputs, unbiased HSIC: once over all n examples in one batch, and as minibatch CKA
   over batches of ``--batch`` (its intended use) against our ``MinibatchCKA``.

    python benchmarks/bench_cka.py                      # n = 10,000, d = 512 (a few minutes)
    python benchmarks/bench_cka.py --n 4000 --repeats 1  # quicker

Needs ``pip install --no-deps cka-pytorch`` plus its imports (lightning, torchmetrics, matplotlib,
seaborn; all in the dev extras). Without it the peer rows are skipped.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from polymodal.diagnostics import MinibatchCKA, feature_cka, gram_cka, linear_gram


def best_time(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(fastest wall time in s over ``repeats`` calls, the value of the last call)."""
    best, value = float("inf"), float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def inputs(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 activations x (n, dim) and a related y (n, dim): a random layer of x plus noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen) + 0.5
    y = torch.tanh(x @ torch.randn(dim, dim, generator=gen) / dim**0.5) + 0.5 * torch.randn(n, dim, generator=gen)
    return x, y


def peer_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """cka-pytorch's unbiased CKA over one batch, as ``CKACalculator`` computes it per batch."""
    from cka_pytorch.hsic import hsic1
    from cka_pytorch.utils import gram

    k, l = gram(x)[None], gram(y)[None]  # (1, n, n) float32
    return (hsic1(k, l) / (hsic1(k, k) * hsic1(l, l)).sqrt()).item()


def peer_minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """cka-pytorch's minibatch CKA: per-batch hsic1 summed, then CKA (its ``_compute_final_cka``)."""
    from cka_pytorch.hsic import hsic1
    from cka_pytorch.utils import gram

    sums = torch.zeros(3)
    for start in range(0, x.shape[0], batch):
        k, l = gram(x[start : start + batch])[None], gram(y[start : start + batch])[None]
        sums += torch.cat([hsic1(k, l), hsic1(k, k), hsic1(l, l)])
    return (sums[0] / (sums[1] * sums[2]).sqrt()).item()


def ours_minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    acc = MinibatchCKA()
    for start in range(0, x.shape[0], batch):
        acc.update(x[start : start + batch], y[start : start + batch])
    return acc.compute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1000, help="minibatch size of the minibatch rows")
    parser.add_argument("--repeats", type=int, default=3, help="for the fast rows; the n^2 and n^3 rows run once")
    args = parser.parse_args()
    x, y = inputs(args.n, args.dim)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; n = {args.n}, d = {args.dim}")
    rows = []  # (what, ours name, ours s, ours value, other name, other s, other value)

    t_feat, v_feat = best_time(lambda: feature_cka(x, y), args.repeats)
    t_gram, v_gram = best_time(lambda: gram_cka(linear_gram(x), linear_gram(y)), 1)
    rows.append(("full, biased", "feature_cka", t_feat, v_feat, "gram_cka (ours)", t_gram, v_gram))
    t_ours_u, v_ours_u = best_time(lambda: feature_cka(x, y, unbiased=True), args.repeats)
    t_ours_mb, v_ours_mb = best_time(lambda: ours_minibatch_cka(x, y, args.batch), args.repeats)
    try:
        import cka_pytorch  # noqa: F401
    except ImportError:
        print("cka-pytorch is not installed: peer rows skipped")
    else:
        t_peer, v_peer = best_time(lambda: peer_cka(x, y), 1)
        rows.append(("full, unbiased", "feature_cka", t_ours_u, v_ours_u, "cka-pytorch", t_peer, v_peer))
        t_peer_mb, v_peer_mb = best_time(lambda: peer_minibatch_cka(x, y, args.batch), 1)
        what = f"minibatch {args.batch}, unbiased"
        rows.append((what, "MinibatchCKA", t_ours_mb, v_ours_mb, "cka-pytorch", t_peer_mb, v_peer_mb))

    header = f"{'CKA':<24} {'ours':<14} {'ours s':>9} {'other':<16} {'other s':>9} {'ratio':>8} {'|diff|':>9}  value"
    print(header)
    print("-" * len(header))
    for what, ours, t_o, v_o, other, t_p, v_p in rows:
        print(f"{what:<24} {ours:<14} {t_o:>9.3f} {other:<16} {t_p:>9.3f} {t_p / t_o:>7.1f}x {abs(v_o - v_p):>9.1e}  {v_o:.6f}")
    print("ratio = other s / ours s (how many times faster ours is); |diff| = |ours - other| in CKA")


if __name__ == "__main__":
    main()
