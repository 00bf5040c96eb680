"""ABCPruner's artificial bee colony (Lin et al., "Channel Pruning via Automatic Structure Search", IJCAI 2020).

ABCPruner does not rank channels; it searches the *number* of channels each layer keeps.
Two ideas carry over:

1. **A shrunk, discrete space.** Each group keeps a fraction ``k / levels`` of its
   channels, ``k`` an integer from the group's smallest allowed level
   (``ceil(min_keep * levels)``) up to ``levels``. With ``levels = 10`` a group has at
   most ten choices instead of one per channel count.
2. **Artificial bee colony (ABC) search** (Karaboga's algorithm) over that grid. A colony
   holds ``n`` *food sources* (candidate plans, as vectors of integer levels) and runs
   cycles of three phases:

   - *employed bees*: each source ``x_i`` proposes a neighbour ``v`` by moving a few
     random coordinates ``j`` relative to a random other source ``x_k``:
     ``v_j = x_ij + phi * (x_ij - x_kj)``, ``phi ~ U(-1, 1)``, rounded to the nearest
     level and clipped to the grid. The neighbour replaces the source if it scores
     strictly better (greedy selection); otherwise the source's *trial counter* grows.
     Optionally (``gbest_weight = C > 0``) the move also pulls toward the best source
     ``g``: ``+ psi * (g_j - x_ij)``, ``psi ~ U(0, C)``, the gbest-guided ABC of Zhu and
     Kwong (2010); off by default, which is ABCPruner's move, but it converges markedly
     faster on smooth objectives (``C = 1.5`` is the value usually quoted);
   - *onlooker bees*: ``n_onlookers`` further neighbours, each made from a source drawn
     with probability proportional to its fitness, selected greedily in the same way, so
     good sources are explored more;
   - *scouts*: every source whose trial counter reached ``limit`` is abandoned and
     replaced by a fresh random plan (unconditionally, as in ABC; the best plan ever seen
     is kept by the search session regardless).

How this implementation maps ABC onto ask/tell and a hard budget:

- **Batches are phases.** All candidates of a phase are generated at once from the
  colony as it stood when the phase began; :meth:`ABCStrategy.ask` hands out up to ``n``
  of them and :meth:`ABCStrategy.tell` records their scores. Once every candidate of the
  phase is scored, the greedy selection is applied (onlookers in the order they were
  drawn, so two onlookers of one source compete) and the next phase is generated. With
  ``batch_size >= n_sources`` a whole phase is evaluated together (in parallel where the
  session can).
- **Budget.** Every candidate (random or perturbed) is made feasible before it is asked:
  if it overshoots the budget, all its keep ratios are scaled down by one common factor,
  found by bisection on the exact cost model, and floored to the level grid (never below
  the smallest level): :meth:`~automl_prune.search_spaces.SearchSpace.repair` given this
  strategy's grid, so repaired plans stay on the grid even when the search space itself is
  continuous. Random sources come from
  :meth:`~automl_prune.search_spaces.SearchSpace.sample` (AMC's feasible intervals, so
  they use most of the budget), floored to the grid and repaired.
- **No wasted evaluations.** A neighbour whose rounded move leaves it equal to its
  source is pushed one level up or down along one of the moved coordinates, and a
  candidate whose level vector was scored before takes that score from the strategy's
  memory instead of costing an evaluation (the trial counters still advance). Should the
  colony propose only known plans for ``_MAX_IDLE_PHASES`` phases in a row, the search
  stops early.
- **Fitness.** By default the fitness is the evaluation's ``accuracy``: top-1 accuracy on
  the evaluator's search-val subset, after BatchNorm recalibration and *without*
  fine-tuning. With ``fitness="reward"`` the evaluator's reward is used instead (with the
  ``acc`` reward the two rank plans identically). Greedy selection compares raw values;
  the onlookers' roulette uses ``max(accuracy, 0)`` or, for rewards (which may be
  negative), ABC's usual transform ``1 + r`` for ``r >= 0`` and ``1 / (1 - r)`` for
  ``r < 0``. A failed or infeasible evaluation has fitness zero and never wins.
- **Skip gates** of the search space are not searched: every ABC plan keeps all blocks.

ABCPruner fine-tunes every candidate for a fraction of an epoch before scoring it, so that
the fitness reflects how well a structure *recovers*. That is an option of the shared
:class:`~automl_prune.evaluator.EvaluatorConfig` (``finetune_steps``; CLI
``--search.fitness_finetune_steps``), not of this strategy, so that every strategy compared with
ABC can be scored under the same fitness and every fine-tuned evaluation is counted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from automl_prune.errors import InvalidValueError
from automl_prune.strategy import AskTellStrategy, SearchSession
from automl_prune.types import Evaluation, Plan

logger = logging.getLogger(__name__)

__all__ = ["ABCStrategy"]

_FITNESS = ("accuracy", "reward")
_MAX_IDLE_PHASES = 50
"""Consecutive phases that need no evaluation (all candidates already scored) before the search stops."""


@dataclass
class _Candidate:
    """One plan a phase wants scored.

    Attributes:
        levels: Integer level per group.
        plan: The plan those levels describe.
        source: Index of the food source it belongs to (the source it perturbs, or replaces).
        value: Its score once known (``-inf`` for a failed or infeasible evaluation).
        fitness: Its non-negative roulette weight once known.
    """

    levels: tuple[int, ...]
    plan: Plan
    source: int
    value: float | None = None
    fitness: float = 0.0


class ABCStrategy(AskTellStrategy):
    """Artificial bee colony over discrete keep levels, as in ABCPruner (see the module docstring).

    Args:
        n_sources: Food sources (colony size; also the employed bees per cycle), >= 2.
        n_onlookers: Onlooker bees per cycle; None for ``n_sources``.
        limit: Trials without improvement after which a source is abandoned (scout phase).
        levels: Keep levels ``k / levels`` when the search space is continuous; a space
            with its own ``levels`` overrides this.
        coordinates: Coordinates (groups) moved per neighbour; 1 is classic ABC, a few suit
            the 10-100 groups of a CNN better (default 2).
        gbest_weight: ``C`` of the gbest-guided move (GABC); 0 (default) is ABCPruner's
            plain move.
        fitness: ``"accuracy"`` (default) or ``"reward"``: what the colony maximises.
        batch_size: Plans asked for at a time; at most one phase's candidates are asked at once.

    Attributes:
        sources: The food sources (after the first phase), each with its levels, plan and score.
        trials: Per source, neighbours of it that failed to improve it since it last changed.
        phase: ``"init"``, ``"employed"``, ``"onlooker"`` or ``"scout"``.
        cycle: Employed phases begun so far.
        scouts: Sources abandoned so far.

    Raises:
        InvalidValueError: For an out-of-range hyper-parameter or an unknown ``fitness``.
    """

    def __init__(
        self,
        n_sources: int = 8,
        n_onlookers: int | None = None,
        limit: int = 10,
        levels: int = 10,
        coordinates: int = 2,
        gbest_weight: float = 0.0,
        fitness: str = "accuracy",
        batch_size: int = 8,
    ):
        super().__init__(batch_size=batch_size)
        if n_sources < 2:
            raise InvalidValueError(f"n_sources must be >= 2 (a move needs a partner source), got {n_sources}")
        if n_onlookers is not None and n_onlookers < 0:
            raise InvalidValueError(f"n_onlookers must be >= 0, got {n_onlookers}")
        if limit < 1:
            raise InvalidValueError(f"limit must be >= 1, got {limit}")
        if levels < 2:
            raise InvalidValueError(f"levels must be >= 2, got {levels}")
        if coordinates < 1:
            raise InvalidValueError(f"coordinates must be >= 1, got {coordinates}")
        if not 0.0 <= gbest_weight <= 10.0:
            raise InvalidValueError(f"gbest_weight must be in [0, 10], got {gbest_weight}")
        if fitness not in _FITNESS:
            raise InvalidValueError(f"unknown fitness '{fitness}'; valid: {', '.join(_FITNESS)}")
        self.n_sources = n_sources
        self.n_onlookers = n_sources if n_onlookers is None else n_onlookers
        self.limit = limit
        self.levels = levels
        self.coordinates = coordinates
        self.gbest_weight = gbest_weight
        self.fitness = fitness

    # ------------------------------------------------------------------ setup
    def setup(self, session: SearchSession) -> None:
        """Fix the level grid, check that its smallest plan fits the budget and start the colony."""
        space = session.space
        self.rng = session.rng
        self.space = space
        self.grid = space.levels if space.levels is not None else self.levels
        self.low = np.ceil(space.min_keep * self.grid - 1e-9).astype(int)
        self.low = np.clip(self.low, 1, self.grid)
        if not space.is_feasible(self._plan(self.low)):
            raise InvalidValueError(
                f"with {self.grid} keep levels the smallest plan (every group at its lowest level, "
                f"keep {', '.join(sorted({f'{k / self.grid:g}' for k in self.low}))}) exceeds the budget; "
                "use more levels, a lower min_keep or a looser budget"
            )
        if space.blocks:
            logger.info("abc searches keep ratios only; the %d skip gates stay off", len(space.blocks))
        self.sources: list[_Candidate] = []
        self.trials = np.zeros(self.n_sources, dtype=int)
        self.memory: dict[tuple[int, ...], tuple[float, float]] = {}
        self.phase = "init"
        self.cycle = 0
        self.scouts = 0
        self._asked: list[_Candidate] = []
        self._queue: list[_Candidate] = []
        self._start_phase([self._candidate(self._random_levels(), i) for i in range(self.n_sources)])
        logger.info(
            "abc: %d sources, %d onlookers, limit %d, %d levels over %d groups, fitness %s",
            self.n_sources,
            self.n_onlookers,
            self.limit,
            self.grid,
            space.dim,
            self.fitness,
        )

    # ------------------------------------------------------------------ grid helpers
    def _plan(self, levels: np.ndarray | tuple[int, ...]) -> Plan:
        return self.space.plan_from_keeps([int(k) / self.grid for k in levels])

    def _to_levels(self, plan: Plan) -> np.ndarray:
        """Floor a plan's keep ratios to the grid (never below a group's lowest level)."""
        raw = np.floor(self.space.keeps(plan) * self.grid + 1e-9).astype(int)
        return np.clip(raw, self.low, self.grid)

    def _repair(self, levels: np.ndarray) -> np.ndarray:
        """An over-budget level vector scaled down until it fits (:meth:`SearchSpace.repair` on this grid)."""
        levels = np.clip(np.asarray(levels, dtype=int), self.low, self.grid)
        return self._to_levels(self.space.repair(self._plan(levels), levels=self.grid))

    def _random_levels(self) -> np.ndarray:
        """A random feasible source: a :meth:`SearchSpace.sample` plan floored to the grid and repaired."""
        return self._repair(self._to_levels(self.space.sample(self.rng)))

    def _candidate(self, levels: np.ndarray, source: int) -> _Candidate:
        key = tuple(int(k) for k in levels)
        return _Candidate(key, self._plan(key), source)

    def _neighbour(self, i: int) -> np.ndarray:
        """ABC's move ``v_j = x_ij + phi (x_ij - x_kj) [+ psi (g_j - x_ij)]`` on a few coordinates, on the grid."""
        x = np.array(self.sources[i].levels)
        partner = int(self.rng.choice([k for k in range(self.n_sources) if k != i]))
        xk = np.array(self.sources[partner].levels)
        gbest = x
        if self.gbest_weight > 0:
            best = max(self.sources, key=lambda s: -math.inf if s.value is None else s.value)
            gbest = np.array(best.levels)
        dims = self.rng.choice(len(x), size=min(self.coordinates, len(x)), replace=False)
        v = x.copy()
        for j in dims:
            move = self.rng.uniform(-1.0, 1.0) * (x[j] - xk[j])
            if self.gbest_weight > 0:
                move += self.rng.uniform(0.0, self.gbest_weight) * (gbest[j] - x[j])
            v[j] = int(np.clip(np.rint(x[j] + move), self.low[j], self.grid))
        if np.array_equal(v, x):  # rounding (or an identical partner) left it in place: take one level step
            movable = [j for j in dims if self.low[j] < self.grid]
            if movable:
                j = int(self.rng.choice(movable))
                step = int(self.rng.choice([-1, 1]))
                if not self.low[j] <= x[j] + step <= self.grid:
                    step = -step
                v[j] = x[j] + step
        return self._repair(v)

    # ------------------------------------------------------------------ scoring
    def _score(self, evaluation: Evaluation) -> tuple[float, float]:
        """(value for greedy selection, non-negative roulette weight) of an evaluation."""
        raw = evaluation.accuracy if self.fitness == "accuracy" else evaluation.reward
        if not evaluation.feasible or not math.isfinite(raw):
            return -math.inf, 0.0
        if self.fitness == "accuracy":
            return raw, max(raw, 0.0)
        return raw, (1.0 + raw) if raw >= 0 else 1.0 / (1.0 - raw)

    # ------------------------------------------------------------------ phases
    def _finish_phase(self, candidates: list[_Candidate]) -> None:
        """Apply a fully scored phase to the colony."""
        if self.phase in ("init", "scout"):
            if self.phase == "init":
                self.sources = list(candidates)
            for cand in candidates:
                self.sources[cand.source] = cand
                self.trials[cand.source] = 0
            return
        for cand in candidates:  # employed or onlooker: greedy selection, in draw order
            current = self.sources[cand.source]
            if cand.value is not None and (current.value is None or cand.value > current.value):
                self.sources[cand.source] = cand
                self.trials[cand.source] = 0
            else:
                self.trials[cand.source] += 1

    def _next_phase(self) -> list[_Candidate]:
        """Advance the phase and generate its candidates (possibly none)."""
        order = {"init": "employed", "employed": "onlooker", "onlooker": "scout", "scout": "employed"}
        self.phase = order[self.phase]
        if self.phase == "employed":
            self.cycle += 1
            return [self._candidate(self._neighbour(i), i) for i in range(self.n_sources)]
        if self.phase == "onlooker":
            weights = np.array([s.fitness for s in self.sources], dtype=float)
            probs = weights / weights.sum() if weights.sum() > 0 else np.full(self.n_sources, 1.0 / self.n_sources)
            chosen = self.rng.choice(self.n_sources, size=self.n_onlookers, p=probs)
            return [self._candidate(self._neighbour(int(i)), int(i)) for i in chosen]
        exhausted = [i for i in range(self.n_sources) if self.trials[i] >= self.limit]
        if exhausted:
            self.scouts += len(exhausted)
            logger.debug("abc cycle %d: scouts replace sources %s", self.cycle, exhausted)
        return [self._candidate(self._random_levels(), i) for i in exhausted]

    def _start_phase(self, candidates: list[_Candidate]) -> None:
        """Queue the candidates that need an evaluation: one per level vector not scored before."""
        self._phase_candidates = candidates
        seen: set[tuple[int, ...]] = set()
        self._queue = []
        for cand in candidates:
            if cand.levels not in self.memory and cand.levels not in seen:
                seen.add(cand.levels)
                self._queue.append(cand)

    def _complete_phase(self) -> None:
        """Every level vector of the phase is scored: fill in the candidates' scores and apply the phase."""
        for cand in self._phase_candidates:
            cand.value, cand.fitness = self.memory[cand.levels]
        self._finish_phase(self._phase_candidates)
        if self.sources and all(s is not None for s in self.sources):
            best = max(s.value for s in self.sources if s.value is not None)
            logger.debug("abc cycle %d: %s phase done; best source %.4f", self.cycle, self.phase, best)

    def ask(self, n: int) -> list[Plan]:
        """Up to ``n`` not-yet-asked candidates of the current phase (starting the next phase when one is done)."""
        if self._asked:
            logger.debug("abc: ask() before the previous candidates were told; nothing new to ask")
            return []
        idle = 0
        while not self._queue:
            if idle >= _MAX_IDLE_PHASES:
                logger.info("abc: the colony proposes only plans scored before; stopping early")
                return []
            self._start_phase(self._next_phase())
            if not self._queue:
                idle += 1
                self._complete_phase()
        batch, self._queue = self._queue[:n], self._queue[n:]
        self._asked = list(batch)
        return [c.plan for c in batch]

    def tell(self, plans: list[Plan], evaluations: list[Evaluation]) -> None:
        """Record the scores of the asked candidates; apply the phase once all of it is scored."""
        for plan, evaluation in zip(plans, evaluations):
            index = next((k for k, c in enumerate(self._asked) if c.plan is plan), 0)
            cand = self._asked.pop(index)
            self.memory[cand.levels] = self._score(evaluation)
        self._asked = []  # anything asked but not evaluated (budget spent) is dropped
        if not self._queue and all(c.levels in self.memory for c in self._phase_candidates):
            self._complete_phase()
