"""Which structures each architecture offers to a search: groups found, pruned in multiples, left whole and why.

For every model (zoo names and torchvision ``tv:NAME`` models, random weights: structure only)
the :class:`~automl_prune.graph.LayerGraph` is built at a small input size; the table lists the
prunable groups, the groups a grouped convolution makes prunable only in multiples, the conv
and linear layers left whole besides the classifier head (grouped by reason), the share of the
model's FLOPs the prunable groups touch, the removable blocks (identity-shortcut residual blocks +
shape-preserving plain layers, ``search.skip_gates``), and a consistency check: for ``--plans`` random plans
(with random block and layer removals) at ``round_to`` 1 and 8, the cost the graph predicts equals the pruned
model's counted cost and the pruned model runs forward.

Example::

    python benchmarks/architectures.py
    python benchmarks/architectures.py --models tv:googlenet,tv:resnext50_32x4d --size 64 --plans 4
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Sequence

import torch
from _common import csv_list, load_average, run_header, setup_logging

from automl_prune.graph import LayerGraph, count_cost
from automl_prune.models import ModelSpec, build_model
from automl_prune.pruning import rebuild_structure
from automl_prune.types import Plan

logger = logging.getLogger("benchmarks.architectures")

MODELS = [
    "fashion_cnn",
    "resnet20",
    "resnet56",
    "vgg16_bn",
    "mobilenetv2",
    "tv:resnet18",
    "tv:googlenet",
    "tv:densenet121",
    "tv:shufflenet_v2_x0_5",
    "tv:resnext50_32x4d",
    "tv:regnet_x_400mf",
    "tv:efficientnet_b0",
    "tv:mobilenet_v3_small",
    "tv:mobilenet_v2",
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", type=csv_list, default=MODELS, help="comma-separated model names")
    p.add_argument("--size", type=int, default=32, help="input height and width (3 channels)")
    p.add_argument("--plans", type=int, default=3, help="random plans checked per model (each at round_to 1 and 8)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p.parse_args(argv)


def _reasons(graph: LayerGraph) -> str:
    counts: dict[str, int] = {}
    for name, why in graph.whole_layers():
        if name != graph.head:
            counts[why] = counts.get(why, 0) + 1
    return "; ".join(f"{n} x {why}" for why, n in counts.items()) or "-"


def check(model: torch.nn.Module, graph: LayerGraph, x: torch.Tensor, plans: int, seed: str) -> str:
    """``"ok"`` when every random plan prunes to the predicted cost and runs, else the first failure."""
    rng = random.Random(seed)
    for _ in range(plans):
        plan = Plan(
            {g: rng.uniform(0.05, 1.0) for g in graph.group_names()},
            skip={b: rng.random() < 0.3 for b in graph.blocks},
        )
        for round_to in (1, 8):
            try:
                pruned = rebuild_structure(model, graph, plan, round_to)
                counted, predicted = count_cost(pruned, x), graph.cost(plan, round_to)
                with torch.no_grad():
                    pruned(x)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                return f"FAILS: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            if (counted.flops, counted.params) != (predicted.flops, predicted.params):
                return f"COST MISMATCH: predicted {predicted.flops:,} FLOPs, counted {counted.flops:,}"
    return "ok"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (Markdown) for every model."""
    args = parse_args(argv)
    setup_logging(False)
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), load_average()
    header = (
        "| model | conv/linear layers | groups | in multiples | left whole (besides head) | FLOPs in groups "
        "| removable blocks + layers | graph s | random plans | why left whole |"
    )
    rows = [header, "|" + "---|" * 10]
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(ModelSpec(name, 3, 10)).eval()
        x = torch.randn(1, 3, args.size, args.size)
        t0 = time.perf_counter()
        graph = LayerGraph(model, x)
        seconds = time.perf_counter() - t0
        touched = {m for g in graph.groups for m in (*g.members, *g.consumers)}
        share = sum(info.flops for n, info in graph.layers.items() if n in touched) / graph.flops
        whole = sum(1 for n, _ in graph.whole_layers() if n != graph.head)
        status = check(model, graph, x, args.plans, name)
        logger.info("%s: %d groups, %s", name, len(graph.groups), status)
        rows.append(
            f"| {name} | {len(graph.layers)} | {len(graph.groups)} | {len(graph.divided_groups())} | {whole} "
            f"| {share:.0%} | {len(graph.residual_blocks)} + {len(graph.blocks) - len(graph.residual_blocks)} "
            f"| {seconds:.1f} | {status} ({args.plans} x 2) | {_reasons(graph)} |"
        )
    sys.stdout.write("\n".join(rows) + "\n\n" + run_header("architectures.py", argv, args.threads, load_start, started))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
