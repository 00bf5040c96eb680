"""Benchmark: training and scoring speed on the CPU in the contiguous and the channels_last layout.

Training and scoring run in the contiguous layout; the latency runtimes already use
channels_last for eager torch. This script measures what channels_last would buy for training
and scoring per zoo model on real Fashion-MNIST batches: training steps per second (batch 128, SGD with momentum)
and scored images per second (batch 500, no grad), in interleaved rounds (contiguous,
channels_last, contiguous, ...) so a machine that slows down biases neither; the ratio is the
median of the per-round ratios, with the rounds' spread. Example::

    python benchmarks/layout.py
    python benchmarks/layout.py --models fashion_cnn,resnet20 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from _common import csv_list, load_average, run_header

from automl_prune.data import load_dataset
from automl_prune.models import ModelSpec, build_model

MODELS = ["fashion_cnn", "resnet20", "resnet56", "mobilenetv2", "vgg16_bn"]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", type=csv_list, default=MODELS, help="comma-separated zoo model names")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model")
    p.add_argument("--seconds", type=float, default=1.5, help="least time per measurement")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p.parse_args(argv)


def _rate(work, seconds: float) -> float:
    """Calls of ``work`` per second, after one warm-up call, over at least ``seconds``."""
    work()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        work()
        calls += 1
    return calls / (time.perf_counter() - start)


def measure(name: str, images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> dict[str, list]:
    """Per layout, the training steps/s and scored images/s of every round."""
    out: dict[str, list] = {f"{k}_{layout}": [] for k in ("train", "score") for layout in LAYOUTS}
    models = {}
    for layout, fmt in LAYOUTS.items():
        torch.manual_seed(0)
        model = build_model(ModelSpec(name, 1, 10)).to(memory_format=fmt)
        models[layout] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    x, y = images[:128], labels[:128]
    for _ in range(args.rounds):
        for layout, (model, optimizer) in models.items():

            def step(model=model, optimizer=optimizer) -> None:
                model.train()
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()

            def score(model=model) -> None:
                model.eval()
                with torch.inference_mode():
                    model(images[:500])

            out[f"train_{layout}"].append(_rate(step, args.seconds))
            out[f"score_{layout}"].append(500 * _rate(score, args.seconds))
    return out


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every model and print a markdown table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), load_average()
    data = load_dataset("fashion-mnist").train
    images, labels = data.images[:500], data.labels[:500]
    rows = []
    for name in args.models:
        m = measure(name, images, labels, args)
        ratios = {
            k: [b / a for a, b in zip(m[f"{k}_contiguous"], m[f"{k}_channels_last"], strict=True)]
            for k in ("train", "score")
        }
        rows.append(
            f"| {name} | {_spread(m['train_contiguous'])} | {_spread(m['train_channels_last'])} | "
            f"x{_spread(ratios['train'])} | {_spread(m['score_contiguous'])} | {_spread(m['score_channels_last'])} | "
            f"x{_spread(ratios['score'])} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    print(
        "| model | train steps/s contiguous | channels_last | ratio | scored images/s contiguous | channels_last | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print()
    print(run_header("layout.py", argv, args.threads, load_start, started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
