"""What a trained flow image head's condition carries, and what guidance does with it (issue 18).

Two measurements on a run trained with a ``flow_matching`` image head (the ``metaquery`` preset):

1. Linear probes on the condition tokens the head's queries and connector make for a caption
   (mean-pooled, and flattened). Multinomial logistic regression (L-BFGS, a small L2 penalty)
   fitted on the train split's captions, scored on the test split's. The targets are read from
   the item's number: its digit count, first digit and last digit. High test accuracy means the number reaches the velocity network's input, so a
   sample that misses the number is the network's doing, not the text path's.
2. Text->image judged at several classifier-free guidance scales on the first test captions, with
   the Fréchet distance in the judge's features. Each scale starts from the same seed.

The number is the built-in data's, so this runs on built-in runs only.

    python benchmarks/probe_flow_condition.py runs/metaquery --train 3000 --test 1000 --guidance 1,2,4,7 --judged 256
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from polymodal.evaluation.run import flat_figures
from polymodal.evaluation.samples import generate_from_captions
from polymodal.modality import Modality
from polymodal.training.run import load_run

CPU = torch.device("cpu")


def flow_head(run) -> torch.nn.Module:
    """The run's image head that samples through learnable queries."""
    heads = [m for m in run.model.modules() if hasattr(m, "sampling") and hasattr(m, "queries")]
    if not heads:
        raise SystemExit("this run has no flow image head with queries (train the metaquery preset)")
    return heads[0]


def conditions(run, head, split: str, count: int) -> tuple[torch.Tensor, np.ndarray]:
    """(count, Q, C) condition tokens of the split's first captions and (count,) their numbers."""
    seen: list[torch.Tensor] = []
    handle = head.queries.register_forward_hook(lambda module, inputs, out: seen.append(out.condition.float().clone()))
    steps, sampler, guidance = head.sampling
    head.sampling = (1, "euler", 1.0)  # one cheap step: only the condition is wanted
    try:
        made = generate_from_captions(run, getattr(run.splits, split), Modality.IMAGE, limit=count, device=CPU)
    finally:
        handle.remove()
        head.sampling = (steps, sampler, guidance)
    return torch.cat(seen)[:count], made.labels[:count].numpy()


def digit_targets(numbers: np.ndarray) -> dict[str, np.ndarray]:
    written = [str(int(n)) for n in numbers]
    return {
        "digit count": np.array([len(w) for w in written]),
        "first digit": np.array([int(w[0]) for w in written]),
        "last digit": np.array([int(w[-1]) for w in written]),
    }


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3) -> torch.nn.Linear:
    """A linear softmax classifier of standardised features ``x`` (N, D) for labels ``y`` (N,)."""
    probe = torch.nn.Linear(x.shape[1], classes).double()
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def accuracy(probe: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((probe(x).argmax(1) == y).double().mean())


def probe_table(run, head, train_count: int, test_count: int) -> None:
    train_x, train_n = conditions(run, head, "train", train_count)
    test_x, test_n = conditions(run, head, "test", test_count)
    print(f"condition tokens {tuple(train_x.shape[1:])}; {len(train_n)} train and {len(test_n)} test captions")
    print(f"{'features':<12} {'target':<12} {'test acc':>8} {'majority':>8} {'train acc':>9}")
    for name, pool in (("mean-pooled", lambda c: c.mean(1)), ("flattened", lambda c: c.flatten(1))):
        train_f, test_f = pool(train_x).double(), pool(test_x).double()
        mean, std = train_f.mean(0), train_f.std(0) + 1e-6
        train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
        train_t, test_t = digit_targets(train_n), digit_targets(test_n)
        for target in train_t:
            y_train, y_test = torch.from_numpy(train_t[target]), torch.from_numpy(test_t[target])
            probe = fit_probe(train_f, y_train, classes=int(max(y_train.max(), y_test.max())) + 1)
            majority = max(float((y_test == v).double().mean()) for v in y_test.unique())
            print(f"{name:<12} {target:<12} {accuracy(probe, test_f, y_test):>8.3f} {majority:>8.3f} "
                  f"{accuracy(probe, train_f, y_train):>9.3f}")


def guidance_table(run, head, scales: list[float], count: int) -> None:
    steps, sampler, configured = head.sampling
    print(f"\ntext->image on the first {count} test captions, {sampler} {steps} steps")
    print(f"{'guidance':>8} {'judged':>7} {'held-out':>8} {'Frechet':>8} {'renderer':>8}")
    try:
        for scale in scales:
            head.sampling = (steps, sampler, scale)
            made = generate_from_captions(run, run.splits.test, Modality.IMAGE, limit=count, device=CPU, repeats=2)
            figures = flat_figures(run.source.evaluate_generation(run, run.splits.test, {"text_to_image": made}, limit=count))
            print(f"{scale:>8g} {figures['text_to_image/probe_correct']:>7.1%} {figures['text_to_image/heldout_probe_correct']:>8.1%} "
                  f"{figures['text_to_image/frechet_judge_features']:>8.2f} "
                  f"{figures['text_to_image/frechet_judge_features_reference_renderer']:>8.2f}", flush=True)
    finally:
        head.sampling = (steps, sampler, configured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--train", type=int, default=3000, help="train captions for the probes")
    parser.add_argument("--test", type=int, default=1000, help="test captions for the probes")
    parser.add_argument("--guidance", default="1,2,4,7", help="guidance scales to judge; empty: none")
    parser.add_argument("--judged", type=int, default=256, help="test captions judged per scale")
    args = parser.parse_args()
    run = load_run(args.run_dir)
    head = flow_head(run)
    probe_table(run, head, args.train, args.test)
    if args.guidance:
        guidance_table(run, head, [float(s) for s in args.guidance.split(",")], args.judged)


if __name__ == "__main__":
    main()
