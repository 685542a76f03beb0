"""Pure placement: where should a request go? The one scorer behind every decision.

In-node allocation (which card gets a local slice), the lender's card choice, preemption
(which lent slices to reclaim), ``xpuctl place`` across the pool and the borrower's choice
of lender all call :class:`Placer` through the core; the placement benchmark calls the same
object. No I/O, no clocks: data in, ranking out, deterministic for equal inputs whatever
their order.

``fragmentation`` follows FGD (Weng et al., ATC'23): the *fragmentation* of a node for a
typical request mix is the free card compute that requests drawn from the mix could not
use, and a request goes where fragmentation grows least. It refines FGD in four ways, each
measured on the Alibaba trace in ``docs/benchmarks.md``:

* capacity, not a single fit: what a shape can use is what *copies of it* would fill, so a
  card with 94 % free leaves 13 % to an 81 % shape (FGD: "one fits, nothing wasted");
* stranding: card compute that the node's spare host CPU or memory could not feed, at the
  mix's average CPU and memory per unit of card compute (FGD only asks whether one more
  task's CPU fits, so CPU-hungry tasks drain GPU-dense nodes);
* scarcity: a card whose model few cards in the pool share, and that constrained requests
  ask for, is worth more than its size (see :meth:`Placer.rank_nodes`);
* lookahead: a gap that typical shared requests fill well counts for less than its size.

The mix is learnt online from the requests this placer has been asked (:meth:`Placer.observe`),
the only history a live agent has; before it has seen any it uses :data:`PRIOR_MIX`.

Ties (most nodes are unaffected by most placements) go to the node left fullest (best fit),
then to the lowest id, so free capacity stays together.

Size: one module on purpose — the scorer, the mix it learns and its caches are one
algorithm sharing private state; split, that state would become an interface.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import weakref
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Policy = Literal["fragmentation", "best-fit", "spread"]
POLICIES: tuple[Policy, ...] = ("fragmentation", "best-fit", "spread")

FULL_PCT = 100


# --- model filter ------------------------------------------------------------------------------


def parse_models(text: str | Iterable[str] | None) -> frozenset[str]:
    """``"A100|H100"`` (or names) as the set of allowed models, lower case; empty: any."""
    if text is None:
        return frozenset()
    parts = text.split("|") if isinstance(text, str) else text
    return frozenset(p.strip().lower() for p in parts if p.strip())


@functools.lru_cache(maxsize=4096)
def model_matches(model: str, models: frozenset[str]) -> bool:
    """Whether a card of ``model`` is one of ``models`` (empty: any). A name matches a model
    that contains it, case-insensitively, where no digit follows: ``H100`` is
    ``NVIDIA H100 80GB HBM3`` and ``MockH100-80G``, ``V100M16`` is ``V100M16``, and ``A10`` is
    not ``A100``."""
    if not models:
        return True
    lower = model.lower()
    for wanted in models:
        name = wanted.lower()
        start = lower.find(name)
        while start >= 0:
            end = start + len(name)
            if end == len(lower) or not lower[end].isdigit():
                return True
            start = lower.find(name, start + 1)
    return False


# --- what placement sees -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardState:
    """Free capacity of one card as placement sees it."""

    id: str
    memory_total_mib: int
    memory_free_mib: int
    compute_free_pct: int
    slices: int
    max_slices: int
    model: str = ""
    node: str = ""
    healthy: bool = True

    @property
    def idle(self) -> bool:
        return (
            self.healthy
            and self.slices == 0
            and self.compute_free_pct >= FULL_PCT
            and self.memory_free_mib >= self.memory_total_mib
        )


#: Everything placement needs of a card: (compute free, memory free, memory total, slots
#: free, idle, model, healthy). Cards of equal kind are interchangeable.
CardKind = tuple[int, int, int, int, bool, str, bool]
#: A node without names: (host CPU free, host memory free, card kinds sorted).
Shape = tuple[int | None, int | None, tuple[CardKind, ...]]


class ShapeKey:
    """A node shape with its hash computed once: the placer's caches are keyed by shape, and
    a pool of thousands of nodes is looked up on every request."""

    __slots__ = ("__weakref__", "_hash", "shape")

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self._hash = hash(shape)

    @classmethod
    def of(cls, shape: Shape) -> ShapeKey:
        """The one key of ``shape`` while any node holds it (interned: equal shapes are the
        same object, so cache lookups never compare tuples)."""
        key = _SHAPES.get(shape)
        if key is None:
            key = _SHAPES[shape] = cls(shape)
        return key

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, ShapeKey) and self._hash == other._hash and self.shape == other.shape
        )


_SHAPES: weakref.WeakValueDictionary[Shape, ShapeKey] = weakref.WeakValueDictionary()


def _kind(card: CardState) -> CardKind:
    return (
        card.compute_free_pct,
        card.memory_free_mib,
        card.memory_total_mib,
        card.max_slices - card.slices,
        card.idle,
        card.model,
        card.healthy,
    )


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node as placement sees it: its cards and, where known, spare host resources
    (``None``: not tracked, never a constraint). Build it once per change of the node: it
    precomputes what the scorer keys on, so ranking a large pool stays cheap."""

    id: str
    cards: tuple[CardState, ...]
    cpu_free_milli: int | None = None
    memory_free_mib: int | None = None
    shape: Shape = field(init=False, compare=False, repr=False)
    key: ShapeKey = field(init=False, compare=False, repr=False)
    #: card positions of each kind, by card id
    positions: Mapping[CardKind, tuple[int, ...]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        by_kind: dict[CardKind, list[int]] = {}
        for i in sorted(range(len(self.cards)), key=lambda i: self.cards[i].id):
            by_kind.setdefault(_kind(self.cards[i]), []).append(i)
        kinds = tuple(sorted(k for k, ps in by_kind.items() for _ in ps))
        shape = (self.cpu_free_milli, self.memory_free_mib, kinds)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "key", ShapeKey.of(shape))
        object.__setattr__(self, "positions", {k: tuple(v) for k, v in by_kind.items()})


@dataclass(frozen=True, slots=True)
class Demand:
    memory_mib: int
    compute_pct: int


@dataclass(frozen=True, slots=True)
class Request:
    """What one workload asks of a node: ``count`` cards each holding ``per_card`` (or, if
    ``exclusive``, ``count`` otherwise unused cards), plus host CPU and memory. ``count`` 0 is
    a host-only request. ``models`` limits the card models (:func:`parse_models`; empty: any)."""

    per_card: Demand
    count: int = 1
    exclusive: bool = False
    cpu_milli: int = 0
    memory_mib: int = 0
    models: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.count < 0 or self.cpu_milli < 0 or self.memory_mib < 0:
            raise ValueError("count, cpu_milli and memory_mib must not be negative")
        if self.per_card.compute_pct < 0 or self.per_card.memory_mib < 0:
            raise ValueError("per-card demand must not be negative")

    @property
    def card_compute_pct(self) -> int:
        """Card compute the request takes, in % of a card."""
        return self.count * (FULL_PCT if self.exclusive else self.per_card.compute_pct)


@dataclass(frozen=True, slots=True)
class MixShape:
    """One entry of a request mix: a typical request and how common it is."""

    request: Request
    weight: float


Mix = tuple[MixShape, ...]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A way to place a request: on ``node``, using ``devices``; lower score is better."""

    node: str
    devices: tuple[str, ...]
    score: float
    memory_free_after_mib: int = 0
    compute_free_after_pct: int = 0


#: Prior request mix used before the placer has seen requests: fractions of a card
#: (compute share, memory share, weight). Shaped after public GPU-sharing traces, where
#: most shared requests ask for a quarter to a half of a card and whole cards are common.
PRIOR_MIX: tuple[tuple[float, float, float], ...] = (
    (0.1, 0.1, 0.10),
    (0.2, 0.2, 0.10),
    (0.25, 0.25, 0.15),
    (0.3, 0.3, 0.10),
    (0.5, 0.5, 0.25),
    (0.7, 0.7, 0.05),
    (1.0, 1.0, 0.25),
)


@dataclass(frozen=True, slots=True)
class Weights:
    """How the ``fragmentation`` policy weighs its terms. The defaults are the best measured
    on the tuning variants of the Alibaba trace (docs/benchmarks.md); zeros give ablations."""

    #: card compute the node's spare host CPU/memory could not feed
    stranding: float = 2.0
    #: a card's fill potential (see :func:`_card_potential`), against its waste
    lookahead: float = 1.0
    #: free compute of scarce models, per unit of the scarcity (see :func:`scarcity_of`)
    scarcity: float = 1.0
    #: how much copies the host could not feed count as unusable (see :func:`fragmentation`),
    #: at full CPU pressure; it ramps from 0 at ``host_fit_from`` to 1 at ``host_fit_full``
    #: (see :func:`cpu_pressure`): a pool with CPU to spare keeps its cards' view
    host_fit: float = 1.0
    host_fit_from: float = 0.8
    host_fit_full: float = 1.1
    #: the stranding weight at full CPU pressure (it ramps with the host-fit weight: the
    #: host-fit term then counts most of what stranding would)
    stranding_full: float = 0.5
    #: node (then card) left fullest: separates only placements of (nearly) equal growth
    best_fit: float = 1e-3
    card_fit: float = 1e-6


DEFAULT_WEIGHTS = Weights()


# --- fit ---------------------------------------------------------------------------------------


def fits(card: CardState, demand: Demand) -> bool:
    return (
        card.healthy
        and card.slices < card.max_slices
        and demand.memory_mib <= card.memory_free_mib
        and demand.compute_pct <= card.compute_free_pct
    )


def _kind_ok(kind: CardKind, request: Request) -> bool:
    """Whether one card of ``kind`` may serve one of the request's cards."""
    compute, memory, _total, slots, idle, model, healthy = kind
    if not healthy or not model_matches(model, request.models):
        return False
    if request.exclusive:
        return idle
    d = request.per_card
    return slots > 0 and d.memory_mib <= memory and d.compute_pct <= compute


def _host_ok(shape: Shape, request: Request) -> bool:
    cpu, memory, _ = shape
    return (cpu is None or request.cpu_milli <= cpu) and (
        memory is None or request.memory_mib <= memory
    )


def short_of(node: NodeState, request: Request) -> str | None:
    """What stops the node from taking the request (``None``: it fits)."""
    cpu, memory, kinds = node.shape
    if cpu is not None and request.cpu_milli > cpu:
        return f"host CPU: {request.cpu_milli} milli-CPU asked, {cpu} free"
    if memory is not None and request.memory_mib > memory:
        return f"host memory: {request.memory_mib} MiB asked, {memory} MiB free"
    if sum(1 for k in kinds if _kind_ok(k, request)) < request.count:
        return "cards"
    return None


def node_fits(node: NodeState, request: Request) -> bool:
    """Whether the node can take the request now (host resources and enough usable cards)."""
    return short_of(node, request) is None


def round_up_compute(compute_pct: int, step_pct: int) -> int:
    """Requests are granted in steps of ``step_pct``; round up so a job gets what it asked."""
    steps = -(-compute_pct // step_pct)
    return min(100, steps * step_pct)


# --- fragmentation -----------------------------------------------------------------------------


def _copies(compute_free: int, memory_free: int, slots: int, compute: float, memory: float) -> int:
    """How many copies of a (compute, memory) slice still fit on one card."""
    if slots <= 0 or compute_free <= 0:
        return 0
    n = slots
    for free, need in ((compute_free, compute), (memory_free, memory)):
        if need > 0 and (fit := free // need) < n:
            n = int(fit)
    return max(n, 0)


def _copies_on_cards(kinds: Sequence[CardKind], request: Request) -> int:
    """How many copies of ``request`` the cards could still take (usable cards, slice slots,
    and each card's free share and memory; host resources are left out)."""
    if request.count <= 0:
        return 0
    allowed = kinds  # healthy cards of the request's models (the caller filters)
    if request.exclusive:
        return sum(1 for k in allowed if k[4]) // request.count
    d = request.per_card
    per_card = [_copies(k[0], k[1], k[3], d.compute_pct, d.memory_mib) for k in allowed]
    n = sum(per_card) // request.count
    # each copy needs ``count`` different cards: card i serves at most min(k_i, n) copies
    while n > 0 and sum(min(k, n) for k in per_card) < request.count * n:
        n -= 1
    return n


def _card_waste(kind: CardKind, mix: Mix) -> float:
    """Free compute of one card that a request drawn from ``mix`` could not use (per-card
    view: a multi-card shape asks each card for its share, an exclusive one for an idle card)."""
    compute_free, memory_free, _total, slots, idle, model, _healthy = kind
    total = waste = 0.0
    for shape in mix:
        r = shape.request
        if r.count <= 0:
            continue
        total += shape.weight
        if not model_matches(model, r.models):
            waste += shape.weight * compute_free
        elif r.exclusive:
            waste += 0.0 if idle else shape.weight * compute_free
        else:
            n = _copies(
                compute_free, memory_free, slots, r.per_card.compute_pct, r.per_card.memory_mib
            )
            waste += shape.weight * (compute_free - n * r.per_card.compute_pct)
    return waste / total if total else 0.0


def _card_potential(
    kind: CardKind, mix: Mix, memo: dict[object, float], mix_key: object = None
) -> float:
    """Expected drop of a card's waste when the next request from ``mix`` is a shared one
    that lands on it: a gap that typical requests fill well is worth less than its size.
    ``mix_key`` names the mix in ``memo`` (one memo may serve several mixes)."""
    memo_key = ("card", kind, mix_key)
    if (cached := memo.get(memo_key)) is not None:
        return cached
    compute_free, memory_free, total_mib, slots, _idle, model, healthy = kind
    base = _card_waste(kind, mix)
    total = gain = 0.0
    for shape in mix:
        r = shape.request
        if r.count <= 0:
            continue
        total += shape.weight
        d = r.per_card
        if (
            r.exclusive
            or r.count != 1
            or not model_matches(model, r.models)
            or _copies(compute_free, memory_free, slots, d.compute_pct, d.memory_mib) < 1
        ):
            continue
        after = (
            compute_free - d.compute_pct,
            memory_free - d.memory_mib,
            total_mib,
            slots - 1,
            False,
            model,
            healthy,
        )
        gain += shape.weight * max(0.0, base - _card_waste(after, mix))
    value = gain / total if total else 0.0
    memo[memo_key] = value
    return value


def fragmentation(
    shape: Shape,
    mix: Mix | _MixSummary,
    memo: dict[object, float],
    weights: Weights = DEFAULT_WEIGHTS,
    scarcity: Mapping[str, float] | None = None,
    mix_key: object = None,
    host_fit: float = 0.0,
) -> float:
    """How much of a node's free card compute (in % of a card) requests drawn from ``mix``
    could not use; lower is better, only differences between states matter.

    The weighted mean over shapes of what each leaves over once the cards are filled with
    copies of it (share, slots and card memory limit the copies; host-only shapes need no card
    and are left out; with ``host_fit`` > 0 the node's spare host CPU and memory limit them
    too, at that weight: copies the host could not feed count as ``host_fit`` x unusable),
    plus ``weights.stranding`` x the compute the node's spare host CPU or
    memory could not feed at the mix's average need, plus ``weights.scarcity`` x the free
    compute of cards whose model is scarce (``scarcity``: model -> value), minus
    ``weights.lookahead`` x the cards' fill potential. ``memo`` caches per-card values for
    the mix named ``mix_key``.
    """
    cpu_free, memory_free, kinds = shape
    healthy = [k for k in kinds if k[6]]
    free = sum(k[0] for k in healthy)
    if free <= 0:
        return 0.0
    summary = mix if isinstance(mix, _MixSummary) else _summary(mix)
    if summary.total_weight <= 0:
        return 0.0
    unusable = 0.0
    allowed: dict[frozenset[str], list[CardKind]] = {}
    for entry in summary.card_mix:
        request = entry.request
        models = request.models
        cards = allowed.get(models)
        if cards is None:
            cards = allowed[models] = [k for k in healthy if model_matches(k[5], models)]
        if not cards:
            unusable += entry.weight * free
            continue
        per_copy = FULL_PCT if request.exclusive else request.per_card.compute_pct
        copies = _copies_on_cards(cards, request)
        fed = copies
        if host_fit and copies:
            if cpu_free is not None and request.cpu_milli:
                fed = min(fed, max(cpu_free, 0) // request.cpu_milli)
            if memory_free is not None and request.memory_mib:
                fed = min(fed, max(memory_free, 0) // request.memory_mib)
        usable = (copies - host_fit * (copies - fed)) * request.count * per_copy
        unusable += entry.weight * max(free - usable, 0)
    stranded = 0.0
    if cpu_free is not None and summary.cpu_need > 0:
        stranded = max(stranded, free - cpu_free * summary.compute_need / summary.cpu_need)
    if memory_free is not None and summary.memory_need > 0:
        stranded = max(stranded, free - memory_free * summary.compute_need / summary.memory_need)
    frag = unusable / summary.total_weight + weights.stranding * stranded
    if weights.lookahead:
        card_mix = summary.card_mix
        frag -= weights.lookahead * sum(
            _card_potential(k, card_mix, memo, mix_key) for k in healthy
        )
    if weights.scarcity and scarcity:
        frag -= weights.scarcity * sum(scarcity.get(k[5], 0.0) * k[0] for k in healthy)
    return frag


@dataclass(frozen=True, slots=True)
class _MixSummary:
    """What fragmentation needs of a mix: its card shapes (requests that differ only in host
    CPU and memory merged, with their mean host needs) and the mix's average needs."""

    card_mix: Mix
    total_weight: float
    compute_need: float
    cpu_need: float
    memory_need: float


@functools.lru_cache(maxsize=64)
def _summary(mix: Mix) -> _MixSummary:
    merged: dict[Request, list[float]] = {}
    total = compute = cpu = memory = 0.0
    for entry in mix:
        r = entry.request
        if r.count <= 0:
            continue
        card = Request(r.per_card, r.count, r.exclusive, models=r.models)
        acc = merged.setdefault(card, [0.0, 0.0, 0.0])
        acc[0] += entry.weight
        acc[1] += entry.weight * r.cpu_milli
        acc[2] += entry.weight * r.memory_mib
        total += entry.weight
        compute += entry.weight * r.card_compute_pct
        cpu += entry.weight * r.cpu_milli
        memory += entry.weight * r.memory_mib
    # One shape per card demand, carrying the mean host CPU and memory of the requests merged
    # into it (what the host-fit term feeds): cards see no difference between them.
    card_mix = tuple(
        MixShape(Request(r.per_card, r.count, r.exclusive, round(c / w), round(m / w), r.models), w)
        for r, (w, c, m) in merged.items()
    )
    return _MixSummary(card_mix, total, compute, cpu, memory)


# --- options on one node -----------------------------------------------------------------------


def _card_left(kind: CardKind) -> float:
    return kind[0] / FULL_PCT + kind[1] / max(kind[2], 1)


def _fullness(kinds: Iterable[CardKind]) -> float:
    """Free capacity left, in cards (compute and memory averaged): best fit wants it small."""
    return sum(_card_left(k) / 2 for k in kinds if k[6])


def _used(kind: CardKind, request: Request) -> CardKind:
    compute, memory, total, slots, _idle, model, healthy = kind
    if request.exclusive:
        return (compute - FULL_PCT, memory - total, total, slots - 1, False, model, healthy)
    d = request.per_card
    return (compute - d.compute_pct, memory - d.memory_mib, total, slots - 1, False, model, healthy)


def _take(shape: Shape, request: Request, chosen: Sequence[CardKind]) -> Shape:
    """The node after ``request`` is placed on cards of the ``chosen`` kinds."""
    cpu, memory, kinds = shape
    left = list(kinds)
    for kind in chosen:
        left.remove(kind)
        left.append(_used(kind, request))
    return (
        None if cpu is None else cpu - request.cpu_milli,
        None if memory is None else memory - request.memory_mib,
        tuple(sorted(left)),
    )


def _options(shape: Shape, request: Request) -> list[tuple[CardKind, ...]]:
    """Candidate card sets, as kinds (equal cards are interchangeable)."""
    if request.count == 0:
        return [()]
    usable = [k for k in shape[2] if _kind_ok(k, request)]
    if len(usable) < request.count:
        return []
    if request.exclusive:
        return [tuple(sorted(usable)[: request.count])]
    if request.count == 1:
        return [(k,) for k in dict.fromkeys(usable)]
    # several shared cards: the fullest that fit (best fit)
    return [tuple(sorted(usable, key=lambda k: (_card_left(k), k))[: request.count])]


# --- the placer --------------------------------------------------------------------------------


#: Options of one node shape for one request: (score, kinds), best first.
_Scored = list[tuple[float, tuple[CardKind, ...]]]


class Placer:
    """The one scorer. Holds what a live agent knows — the requests it has been asked, as a
    request mix — and caches per node shape, so a pool of thousands of nodes (most of them in
    a few shapes) ranks in milliseconds. Not thread-safe: one owner (the core) calls it."""

    #: Requests the mix is learnt from (a sliding window).
    WINDOW = 10_000
    #: Re-learn the mix when the history has grown by this factor (or the window turned over
    #: by this share): often early, rarely once the mix has settled.
    RELEARN = 1.25
    #: Cached entries kept before the caches start afresh.
    MEMO_LIMIT = 400_000

    def __init__(
        self,
        policy: Policy = "fragmentation",
        weights: Weights = DEFAULT_WEIGHTS,
        window: int = WINDOW,
        mix: Mix | None = None,
    ) -> None:
        """``mix``: score against this mix always instead of learning one (for tests and
        ablations)."""
        self.policy = policy
        self.weights = weights
        self._history: deque[Request] = deque(maxlen=window)
        self._counts: Counter[Request] = Counter()
        self._seen = 0
        self._relearn_at = 1
        self._mix: Mix = mix or ()
        self._summary = _summary(self._mix)
        self._fixed = mix is not None
        self._memo: dict[object, float] = {}
        self._scored: dict[Request, dict[ShapeKey, _Scored]] = {}
        self._size = 0
        self._scarcity: dict[str, float] = {}
        self._supply = Supply()
        #: The host-fit weight in force (see :attr:`Weights.host_fit`), and the weights
        #: with the stranding weight that goes with it.
        self.host_fit = 0.0
        self._weights = weights
        #: Bumped whenever the mix (and so every score) changes.
        self.version = 0

    # -- what it knows ------------------------------------------------------------------------

    def observe(self, request: Request) -> None:
        """Count a request this agent has been asked (whether or not it fits anywhere)."""
        if len(self._history) == self._history.maxlen:
            old = self._history[0]
            self._counts[old] -= 1
            if self._counts[old] <= 0:
                del self._counts[old]
        self._history.append(request)
        self._counts[request] += 1
        self._seen += 1
        if not self._fixed and self._seen >= self._relearn_at:
            self._relearn_at = max(self._seen + 1, math.ceil(self._seen * self.RELEARN))
            self._set_mix(learn_mix(self._counts))

    def _set_mix(self, mix: Mix) -> None:
        if mix == self._mix:
            return
        self._mix = mix
        self._summary = _summary(mix)
        self._forget()
        self._rescore()

    def _forget(self) -> None:
        self._memo = {}
        self._scored = {}
        self._size = 0
        self.version += 1

    @property
    def mix(self) -> Mix:
        """The learnt mix (empty before any request: :func:`prior_mix` per node)."""
        return self._mix

    def _mix_for(self, shape: Shape) -> tuple[_MixSummary, object]:
        """The mix to score ``shape`` against, and its name in the memo."""
        if self._mix:
            return self._summary, None
        largest = max((k[2] for k in shape[2]), default=0)
        return _summary(prior_mix(largest)), largest

    def set_supply(self, supply: Supply) -> None:
        """Tell the placer what the pool has (see :func:`supply_of`): healthy cards per model
        (the scarcity term protects models that constrained requests need and few cards
        provide) and free card compute and host CPU (the host-fit term weighs in as the mix
        would need more of the CPU than there is)."""
        if supply != self._supply:
            self._supply = supply
            self._rescore()

    def _rescore(self) -> None:
        scarcity = scarcity_of(self._supply.cards, self._mix)
        pressure = cpu_pressure(self._supply, self._mix)
        w = self.weights
        ramp = (pressure - w.host_fit_from) / max(w.host_fit_full - w.host_fit_from, 1e-9)
        # in tenths: the caches start afresh only when the weight moves a step
        host_fit = round(w.host_fit * min(1.0, max(0.0, ramp)), 1)
        if scarcity != self._scarcity or host_fit != self.host_fit:
            self._scarcity = scarcity
            self.host_fit = host_fit
            share = host_fit / w.host_fit if w.host_fit else 0.0
            self._weights = dataclasses.replace(
                w, stranding=w.stranding + (w.stranding_full - w.stranding) * share
            )
            self._forget()

    # -- scoring ------------------------------------------------------------------------------

    def _fragmentation(self, shape: Shape, mix: _MixSummary, mix_key: object) -> float:
        key = ("node", shape, mix_key)
        value = self._memo.get(key)
        if value is None:
            value = fragmentation(
                shape, mix, self._memo, self._weights, self._scarcity, mix_key, self.host_fit
            )
            self._memo[key] = value
        return value

    def _cache(self, request: Request) -> dict[ShapeKey, _Scored]:
        """Scored options for ``request``, by node shape (look it up once per call)."""
        if self._size > self.MEMO_LIMIT or len(self._memo) > self.MEMO_LIMIT:
            self._memo, self._scored, self._size = {}, {}, 0
        cache = self._scored.get(request)
        if cache is None:
            cache = self._scored[request] = {}
        return cache

    def _score(self, node: NodeState, request: Request, cache: dict[ShapeKey, _Scored]) -> _Scored:
        """Every option on a node's shape, best first (cached per request and shape)."""
        cached = cache.get(node.key)
        if cached is not None:
            return cached
        shape = node.shape
        scored: _Scored = []
        if _host_ok(shape, request):
            mix, mix_key = self._mix_for(shape)
            fragmenting = self.policy == "fragmentation"
            before = self._fragmentation(shape, mix, mix_key) if fragmenting else 0.0
            for chosen in _options(shape, request):
                after = _take(shape, request, chosen)
                # the node, then the cards used, left fullest
                left = _fullness(after[2])
                cards_left = sum(_card_left(_used(k, request)) for k in chosen)
                if self.policy == "best-fit":
                    value = left + self.weights.card_fit * cards_left
                elif self.policy == "spread":
                    value = -left - self.weights.card_fit * cards_left
                else:
                    growth = self._fragmentation(after, mix, mix_key) - before
                    value = (
                        growth + self.weights.best_fit * left + self.weights.card_fit * cards_left
                    )
                scored.append((round(value, 9), chosen))
            scored.sort()
        cache[node.key] = scored
        self._size += 1
        return scored

    @staticmethod
    def _devices(node: NodeState, chosen: Sequence[CardKind], every: bool) -> list[tuple[int, ...]]:
        """Card positions on ``node`` for an option: the lowest ids of each kind (``every``:
        one option per card of a single-kind option)."""
        if every and len(chosen) == 1:
            return [(p,) for p in node.positions[chosen[0]]]
        taken: dict[CardKind, int] = {}
        out = []
        for kind in chosen:
            n = taken.get(kind, 0)
            out.append(node.positions[kind][n])
            taken[kind] = n + 1
        return [tuple(out)]

    def _candidate(
        self, node: NodeState, score: float, positions: tuple[int, ...], request: Request
    ) -> Candidate:
        cards = [node.cards[p] for p in positions]
        memory_after = compute_after = 0
        if cards and not request.exclusive:
            memory_after = min(c.memory_free_mib for c in cards) - request.per_card.memory_mib
            compute_after = min(c.compute_free_pct for c in cards) - request.per_card.compute_pct
        return Candidate(node.id, tuple(c.id for c in cards), score, memory_after, compute_after)

    def rank_cards(self, node: NodeState, request: Request) -> list[Candidate]:
        """Every way to put ``request`` on this node, best first (a one-card request: one
        candidate per card it fits on)."""
        out = [
            self._candidate(node, score, positions, request)
            for score, chosen in self._score(node, request, self._cache(request))
            for positions in self._devices(node, chosen, every=True)
        ]
        out.sort(key=lambda c: (c.score, c.devices))
        return out

    def place(self, node: NodeState, request: Request) -> Candidate | None:
        """The best way to put ``request`` on this node, or None if it does not fit."""
        scored = self._score(node, request, self._cache(request))
        if not scored:
            return None
        score, chosen = scored[0]
        return self._candidate(node, score, self._devices(node, chosen, every=False)[0], request)

    def rank_nodes(
        self,
        nodes: Iterable[NodeState],
        request: Request,
        limit: int | None = None,
        every_card: bool = False,
    ) -> list[Candidate]:
        """The best placement on every node the request fits on, best first (lower score;
        ties to the lower node id, then devices). ``every_card``: one candidate per card a
        one-card request fits on instead of one per node. ``limit``: the first so many."""
        cache = self._cache(request)
        rows: list[tuple[float, str, int, NodeState, tuple[CardKind, ...]]] = []
        # Nodes of one shape score alike: with a limit, only the first ``limit`` of them by
        # id can make the cut, so a fleet of identical nodes costs one row per card, not
        # one per card of every node (10,000 nodes x 8 cards: 80,000 rows).
        groups = _by_shape(nodes, limit)
        for members in groups:
            node = members[0]
            scored = cache.get(node.key)
            if scored is None:
                scored = self._score(node, request, cache)
            if not scored:
                continue
            picks = scored if every_card else scored[:1]
            for member in members:
                rows.extend(
                    (score, member.id, i, member, chosen) for i, (score, chosen) in enumerate(picks)
                )
        if limit is not None and limit < len(rows):
            rows = heapq.nsmallest(limit, rows, key=_row_order)
        else:
            rows.sort(key=_row_order)
        out: list[Candidate] = []
        for score, _id, _i, node, chosen in rows:
            for positions in self._devices(node, chosen, every=every_card):
                out.append(self._candidate(node, score, positions, request))
        return out if limit is None else out[:limit]


def _row_order(
    row: tuple[float, str, int, NodeState, tuple[CardKind, ...]],
) -> tuple[float, str, int]:
    return row[0], row[1], row[2]


def _by_shape(nodes: Iterable[NodeState], limit: int | None) -> list[list[NodeState]]:
    """``nodes`` grouped by shape, each group cut to its first ``limit`` nodes by id (all
    of them without a limit, in their given order, one group each)."""
    if limit is None:
        return [[node] for node in nodes]
    groups: dict[ShapeKey, list[NodeState]] = {}
    for node in nodes:
        group = groups.get(node.key)
        if group is None:
            groups[node.key] = [node]
        else:
            group.append(node)
    return [
        heapq.nsmallest(limit, group, key=_node_id) if len(group) > limit else group
        for group in groups.values()
    ]


def _node_id(node: NodeState) -> str:
    return node.id


@functools.lru_cache(maxsize=64)
def prior_mix(memory: int) -> Mix:
    """:data:`PRIOR_MIX` as request shapes, sized to a card of ``memory`` MiB."""
    return tuple(
        MixShape(
            Request(
                Demand(int(memory_share * memory), int(compute_share * FULL_PCT)),
                exclusive=compute_share >= 1.0,
            ),
            weight,
        )
        for compute_share, memory_share, weight in PRIOR_MIX
    )


def learn_mix(counts: Mapping[Request, int] | Iterable[Request], coverage: float = 1.0) -> Mix:
    """The typical request mix from past requests: the most frequent shapes, most common
    first, until they cover ``coverage`` of all requests (like FGD's "typical pods")."""
    if not isinstance(counts, Mapping):
        counts = Counter(counts)
    total = sum(counts.values())
    if total <= 0:
        return ()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], _request_order(kv[0])))
    chosen: list[tuple[Request, int]] = []
    covered = 0
    for request, n in ranked:
        if covered >= coverage * total:
            break
        chosen.append((request, n))
        covered += n
    return tuple(MixShape(request, n / covered) for request, n in chosen)


@dataclass(frozen=True, slots=True)
class Supply:
    """What the pool has, as the placer weighs it."""

    #: healthy cards per model
    cards: Mapping[str, int] = field(default_factory=dict)
    #: free card compute (% of a card, summed) and free host CPU (milli) where known
    compute_free_pct: int = 0
    cpu_free_milli: int = 0

    def __add__(self, other: Supply) -> Supply:
        cards = Counter(self.cards)
        cards.update(other.cards)
        return Supply(
            dict(cards),
            self.compute_free_pct + other.compute_free_pct,
            self.cpu_free_milli + other.cpu_free_milli,
        )

    def __sub__(self, other: Supply) -> Supply:
        cards = Counter(self.cards)
        cards.subtract(other.cards)
        return Supply(
            {m: n for m, n in cards.items() if n > 0},
            self.compute_free_pct - other.compute_free_pct,
            self.cpu_free_milli - other.cpu_free_milli,
        )


def supply_of(nodes: Iterable[NodeState]) -> Supply:
    """Healthy cards per model, free card compute and free host CPU of ``nodes``."""
    cards: Counter[str] = Counter()
    compute = cpu = 0
    for n in nodes:
        for c in n.cards:
            if c.healthy:
                cards[c.model] += 1
                compute += max(c.compute_free_pct, 0)
        if n.cpu_free_milli is not None:
            cpu += max(n.cpu_free_milli, 0)
    return Supply(dict(cards), compute, cpu)


def cpu_pressure(supply: Supply, mix: Mix) -> float:
    """How much of the pool's free host CPU the mix would need to fill its free cards: the
    mix's CPU (host-only requests included) per unit of card compute, times the free card
    compute, over the free CPU. Above 1, CPU runs out before the cards do."""
    compute = sum(s.weight * s.request.card_compute_pct for s in mix)
    cpu = sum(s.weight * s.request.cpu_milli for s in mix)
    if compute <= 0 or supply.cpu_free_milli <= 0:
        return 0.0
    return cpu / compute * supply.compute_free_pct / supply.cpu_free_milli


def scarcity_of(supply: Mapping[str, int], mix: Mix) -> dict[str, float]:
    """Per card model: how much constrained demand leans on it, per card of it. A shape that
    may use only models M spreads its card demand over the cards of M; a model's scarcity is
    the constrained demand it carries per card, relative to the pool's average demand per
    card (so it is 0 when no request is constrained)."""
    total_cards = sum(supply.values())
    if total_cards <= 0:
        return {}
    total_demand = sum(s.weight * s.request.card_compute_pct for s in mix)
    if total_demand <= 0:
        return {}
    load: dict[str, float] = {}
    for s in mix:
        r = s.request
        if not r.models or r.count <= 0:
            continue
        allowed = [m for m in supply if model_matches(m, r.models)]
        cards = sum(supply[m] for m in allowed)
        if cards <= 0:
            continue
        for m in allowed:
            load[m] = load.get(m, 0.0) + s.weight * r.card_compute_pct / cards
    per_card = total_demand / total_cards
    return {m: round(v / per_card, 6) for m, v in load.items() if v > 0}


def _request_order(r: Request) -> tuple[int, int, int, bool, int, int, tuple[str, ...]]:
    return (
        r.count,
        r.per_card.compute_pct,
        r.per_card.memory_mib,
        r.exclusive,
        r.cpu_milli,
        r.memory_mib,
        tuple(sorted(r.models)),
    )
