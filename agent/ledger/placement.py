"""Pure placement: which card (or which node and cards) should a request go to?

Shared by in-node allocation (:func:`rank`, the cards of this node) and pool-wide ``place``
(:func:`rank_nodes`, whole nodes with host CPU and memory). No I/O, no clocks: data in,
ranking out, deterministic for equal inputs whatever their order.

``fragmentation`` follows FGD (Weng et al., ATC'23): the *fragmentation* of a card or node
for a typical request mix is the free compute that requests drawn from the mix could not
use, and a new request goes where fragmentation grows least. The node-level measure refines
FGD in three ways, each measured on the Alibaba trace in ``docs/benchmarks.md``:

* capacity, not a single fit: what a shape can use is what *copies of it* would fill, so a
  card with 94 % free leaves 13 % to an 81 % shape (FGD: "one fits, nothing wasted");
* stranding: card compute that the node's spare host CPU or memory could not feed, at the
  mix's average CPU and memory per unit of card compute (FGD only asks whether one more
  task's CPU fits, so CPU-hungry tasks drain GPU-dense nodes);
* lookahead: a gap that typical shared requests fill well counts for less than its size.

Ties (most nodes are unaffected by most placements) go to the node left fullest (best fit),
then to the lowest id, so free capacity stays together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Literal

Policy = Literal["fragmentation", "best-fit", "spread"]
POLICIES: tuple[Policy, ...] = ("fragmentation", "best-fit", "spread")

FULL_PCT = 100


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


@dataclass(frozen=True, slots=True)
class Demand:
    memory_mib: int
    compute_pct: int


@dataclass(frozen=True, slots=True)
class Candidate:
    node: str
    device: str
    score: float
    memory_free_after_mib: int
    compute_free_after_pct: int


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node as pool placement sees it: its cards and, where known, spare host resources
    (``None``: not tracked, never a constraint)."""

    id: str
    cards: tuple[CardState, ...]
    cpu_free_milli: int | None = None
    memory_free_mib: int | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """What one workload asks of a node: ``count`` cards each holding ``per_card`` (or, if
    ``exclusive``, ``count`` otherwise unused cards), plus host CPU and memory. ``count`` 0 is
    a host-only request. ``models`` limits the card models (empty: any)."""

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


@dataclass(frozen=True, slots=True)
class Shape:
    """One entry of a node-level request mix: a typical request and how common it is."""

    request: Request
    weight: float


@dataclass(frozen=True, slots=True)
class NodeCandidate:
    node: str
    devices: tuple[str, ...]
    score: float


#: Prior request mix used before a node has seen requests of its own: fractions of a card,
#: (compute share, memory share, weight). Shaped after public GPU-sharing traces, where
#: most shared requests ask for a quarter to a half of a card and whole cards are common.
DEFAULT_MIX: tuple[tuple[float, float, float], ...] = (
    (0.1, 0.1, 0.10),
    (0.2, 0.2, 0.10),
    (0.25, 0.25, 0.15),
    (0.3, 0.3, 0.10),
    (0.5, 0.5, 0.25),
    (0.7, 0.7, 0.05),
    (1.0, 1.0, 0.25),
)

#: Weight of "leave the card fullest" against fragmentation growth in :func:`score`: small
#: enough to only separate placements whose fragmentation growth is (nearly) equal.
_BEST_FIT_WEIGHT = 1e-3


@dataclass(frozen=True, slots=True)
class Weights:
    """How the node-level ``fragmentation`` policy weighs its terms. The defaults are the
    best measured on the Alibaba trace (docs/benchmarks.md); zeros give the ablations."""

    #: card compute the node's spare host CPU/memory could not feed, against per-shape
    #: leftovers (1 to 10 all beat FGD on the trace; 2 was best)
    stranding: float = 2.0
    #: a card's fill potential (see :func:`_card_potential`), against its waste
    lookahead: float = 1.0
    #: node (then card) left fullest: separates only placements of (nearly) equal growth
    best_fit: float = 1e-3
    card_fit: float = 1e-6


DEFAULT_WEIGHTS = Weights()


def fits(card: CardState, demand: Demand) -> bool:
    return (
        card.healthy
        and card.slices < card.max_slices
        and demand.memory_mib <= card.memory_free_mib
        and demand.compute_pct <= card.compute_free_pct
    )


def _copies(compute_free: int, memory_free: int, slots: int, compute: float, memory: float) -> int:
    """How many copies of a (compute, memory) slice still fit on one card."""
    if slots <= 0 or compute_free <= 0:
        return 0
    n = slots
    for free, need in ((compute_free, compute), (memory_free, memory)):
        if need > 0 and (fit := free // need) < n:
            n = int(fit)
    return max(n, 0)


def fragmentation(
    memory_total_mib: int,
    memory_free_mib: int,
    compute_free_pct: int,
    slots_free: int,
    mix: Iterable[tuple[float, float, float]],
) -> float:
    """Expected free compute (in %) of one card that requests drawn from ``mix`` could not
    use: whatever is left over once the card is filled with copies of the request."""
    if compute_free_pct <= 0:
        return 0.0
    total_weight = 0.0
    unusable = 0.0
    for compute_share, memory_share, weight in mix:
        total_weight += weight
        need_compute = compute_share * FULL_PCT
        n = _copies(
            compute_free_pct,
            memory_free_mib,
            slots_free,
            need_compute,
            memory_share * memory_total_mib,
        )
        unusable += weight * max(compute_free_pct - n * need_compute, 0.0)
    return unusable / total_weight if total_weight else 0.0


def _after(card: CardState, demand: Demand) -> tuple[int, int]:
    return card.memory_free_mib - demand.memory_mib, card.compute_free_pct - demand.compute_pct


def score(
    card: CardState,
    demand: Demand,
    policy: Policy,
    mix: Sequence[tuple[float, float, float]] = DEFAULT_MIX,
) -> float:
    """Lower is better."""
    memory_after, compute_after = _after(card, demand)
    leftover = compute_after / 100.0 + memory_after / max(card.memory_total_mib, 1)
    if policy == "best-fit":
        return leftover
    if policy == "spread":
        return -leftover
    before = fragmentation(
        card.memory_total_mib,
        card.memory_free_mib,
        card.compute_free_pct,
        card.max_slices - card.slices,
        mix,
    )
    after = fragmentation(
        card.memory_total_mib, memory_after, compute_after, card.max_slices - card.slices - 1, mix
    )
    # Fragmentation growth dominates; best fit breaks ties (scaled well below one point).
    return (after - before) + leftover * _BEST_FIT_WEIGHT


def rank(
    cards: Iterable[CardState],
    demand: Demand,
    policy: Policy = "fragmentation",
    mix: Sequence[tuple[float, float, float]] = DEFAULT_MIX,
) -> list[Candidate]:
    """Every card the demand fits on, best first."""
    candidates = []
    for card in cards:
        if not fits(card, demand):
            continue
        memory_after, compute_after = _after(card, demand)
        candidates.append(
            Candidate(
                node=card.node,
                device=card.id,
                score=score(card, demand, policy, mix),
                memory_free_after_mib=memory_after,
                compute_free_after_pct=compute_after,
            )
        )
    candidates.sort(key=lambda c: (round(c.score, 9), c.node, c.device))
    return candidates


def round_up_compute(compute_pct: int, step_pct: int) -> int:
    """Requests are granted in steps of ``step_pct``; round up so a job gets what it asked."""
    steps = -(-compute_pct // step_pct)
    return min(100, steps * step_pct)


# --- node level (pool ``place``) -------------------------------------------------------------


def _card_ok(card: CardState, request: Request) -> bool:
    """Whether one card may serve one of the request's cards."""
    if not card.healthy or (request.models and card.model not in request.models):
        return False
    if request.exclusive:
        return _idle(card)
    return fits(card, request.per_card)


def _idle(card: CardState) -> bool:
    return (
        card.healthy
        and card.slices == 0
        and card.compute_free_pct >= FULL_PCT
        and card.memory_free_mib >= card.memory_total_mib
    )


def _host_ok(node: NodeState, request: Request) -> bool:
    return (node.cpu_free_milli is None or request.cpu_milli <= node.cpu_free_milli) and (
        node.memory_free_mib is None or request.memory_mib <= node.memory_free_mib
    )


def node_fits(node: NodeState, request: Request) -> bool:
    """Whether the node can take the request now (host resources and enough usable cards)."""
    if not _host_ok(node, request):
        return False
    return sum(1 for c in node.cards if _card_ok(c, request)) >= request.count


def prior_mix(node: NodeState) -> tuple[Shape, ...]:
    """:data:`DEFAULT_MIX` as node-level shapes, sized to this node's largest card."""
    memory = max((c.memory_total_mib for c in node.cards), default=0)
    return tuple(
        Shape(
            Request(
                Demand(int(memory_share * memory), int(compute_share * FULL_PCT)),
                exclusive=compute_share >= 1.0,
            ),
            weight,
        )
        for compute_share, memory_share, weight in DEFAULT_MIX
    )


def _copies_on_cards(node: NodeState, request: Request) -> int:
    """How many copies of ``request`` the node's cards could still take (usable cards, slice
    slots, and each card's free share and memory; host resources are left out)."""
    if request.count <= 0:
        return 0
    allowed = [
        c for c in node.cards if c.healthy and (not request.models or c.model in request.models)
    ]
    if request.exclusive:
        return sum(1 for c in allowed if _idle(c)) // request.count
    demand = request.per_card
    per_card = [
        _copies(
            c.compute_free_pct,
            c.memory_free_mib,
            c.max_slices - c.slices,
            demand.compute_pct,
            demand.memory_mib,
        )
        for c in allowed
    ]
    n = sum(per_card) // request.count
    # each copy needs ``count`` different cards: card i serves at most min(k_i, n) copies
    while n > 0 and sum(min(k, n) for k in per_card) < request.count * n:
        n -= 1
    return n


def node_fragmentation(
    node: NodeState,
    mix: Sequence[Shape],
    memo: MutableMapping[Hashable, float] | None = None,
    weights: Weights = DEFAULT_WEIGHTS,
) -> float:
    """How much of the node's free card compute (in % of a card) requests drawn from ``mix``
    could not use; lower is better, only differences between states matter.

    The weighted mean over shapes of what each leaves over once the cards are filled with
    copies of it (share, slots and card memory limit the copies; host-only shapes need no card
    and are left out), plus ``weights.stranding`` x the compute the node's spare host CPU or
    memory could not feed at the mix's average need, minus ``weights.lookahead`` x the cards'
    fill potential. ``memo`` caches per-card values (see :func:`place_on_node`).
    """
    free = sum(c.compute_free_pct for c in node.cards if c.healthy)
    if free <= 0:
        return 0.0
    total_weight = unusable = 0.0
    compute_need = cpu_need = memory_need = 0.0
    for shape in mix:
        request = shape.request
        if request.count <= 0:
            continue
        per_copy = FULL_PCT if request.exclusive else request.per_card.compute_pct
        usable = _copies_on_cards(node, request) * request.count * per_copy
        unusable += shape.weight * max(free - usable, 0)
        total_weight += shape.weight
        compute_need += shape.weight * request.count * per_copy
        cpu_need += shape.weight * request.cpu_milli
        memory_need += shape.weight * request.memory_mib
    if total_weight <= 0:
        return 0.0
    stranded = 0.0
    if node.cpu_free_milli is not None and cpu_need > 0:
        stranded = max(stranded, free - node.cpu_free_milli * compute_need / cpu_need)
    if node.memory_free_mib is not None and memory_need > 0:
        stranded = max(stranded, free - node.memory_free_mib * compute_need / memory_need)
    frag = unusable / total_weight + weights.stranding * stranded
    if weights.lookahead:
        frag -= weights.lookahead * sum(
            _card_potential(_card_key(c), mix, memo) for c in node.cards if c.healthy
        )
    return frag


_CardKey = tuple[int, int, int, bool, str]


def _card_key(card: CardState) -> _CardKey:
    return (
        card.compute_free_pct,
        card.memory_free_mib,
        card.max_slices - card.slices,
        _idle(card),
        card.model,
    )


def _card_waste(key: _CardKey, mix: Sequence[Shape]) -> float:
    """Free compute of one card that a request drawn from ``mix`` could not use (per-card
    view: a multi-card shape asks each card for its share, an exclusive one for an idle card)."""
    compute_free, memory_free, slots, idle, model = key
    total = waste = 0.0
    for shape in mix:
        r = shape.request
        if r.count <= 0:
            continue
        total += shape.weight
        if r.models and model not in r.models:
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
    key: _CardKey, mix: Sequence[Shape], memo: MutableMapping[Hashable, float] | None
) -> float:
    """Expected drop of a card's waste when the next request from ``mix`` is a shared one
    that lands on it: a gap that typical requests fill well is worth less than its size."""
    memo_key = ("card", key)
    if memo is not None and (cached := memo.get(memo_key)) is not None:
        return cached
    compute_free, memory_free, slots, _idle_now, model = key
    base = _card_waste(key, mix)
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
            or (r.models and model not in r.models)
            or _copies(compute_free, memory_free, slots, d.compute_pct, d.memory_mib) < 1
        ):
            continue
        after = (compute_free - d.compute_pct, memory_free - d.memory_mib, slots - 1, False, model)
        gain += shape.weight * max(0.0, base - _card_waste(after, mix))
    value = gain / total if total else 0.0
    if memo is not None:
        memo[memo_key] = value
    return value


def _signature(node: NodeState) -> Hashable:
    """Everything fragmentation depends on, independent of ids and card order."""
    return (
        node.cpu_free_milli,
        node.memory_free_mib,
        tuple(
            sorted(
                (
                    c.compute_free_pct,
                    c.memory_free_mib,
                    c.memory_total_mib,
                    c.max_slices - c.slices,
                    c.slices == 0,
                    c.model,
                    c.healthy,
                )
                for c in node.cards
            )
        ),
    )


def _fragmentation_memo(
    node: NodeState,
    mix: Sequence[Shape],
    memo: MutableMapping[Hashable, float] | None,
    weights: Weights,
) -> float:
    if memo is None:
        return node_fragmentation(node, mix, None, weights)
    key = (weights, _signature(node))
    value = memo.get(key)
    if value is None:
        value = memo[key] = node_fragmentation(node, mix, memo, weights)
    return value


def _take(node: NodeState, request: Request, chosen: Sequence[int]) -> NodeState:
    """The node after ``request`` is placed on the cards at positions ``chosen``."""
    cards = list(node.cards)
    for i in chosen:
        c = cards[i]
        if request.exclusive:
            memory, compute = c.memory_total_mib, FULL_PCT
        else:
            memory, compute = request.per_card.memory_mib, request.per_card.compute_pct
        cards[i] = CardState(
            id=c.id,
            memory_total_mib=c.memory_total_mib,
            memory_free_mib=c.memory_free_mib - memory,
            compute_free_pct=c.compute_free_pct - compute,
            slices=c.slices + 1,
            max_slices=c.max_slices,
            model=c.model,
            node=c.node,
            healthy=c.healthy,
        )
    return NodeState(
        id=node.id,
        cards=tuple(cards),
        cpu_free_milli=_minus(node.cpu_free_milli, request.cpu_milli),
        memory_free_mib=_minus(node.memory_free_mib, request.memory_mib),
    )


def _minus(free: int | None, used: int) -> int | None:
    return None if free is None else free - used


def _fullness(node: NodeState) -> float:
    """Free capacity left on the node, in cards (compute and memory averaged): best fit
    prefers the smallest."""
    return sum(
        (c.compute_free_pct / FULL_PCT + c.memory_free_mib / max(c.memory_total_mib, 1)) / 2
        for c in node.cards
        if c.healthy
    )


def place_on_node(
    node: NodeState,
    request: Request,
    policy: Policy = "fragmentation",
    mix: Sequence[Shape] | None = None,
    memo: MutableMapping[Hashable, float] | None = None,
    weights: Weights = DEFAULT_WEIGHTS,
) -> NodeCandidate | None:
    """The best way to put ``request`` on this node, or None if it does not fit.

    ``mix`` is the typical request mix (see :func:`learn_mix`; default: :func:`prior_mix`).
    ``memo`` is an optional cache the caller owns, keyed by node resources: pass the same one
    only together with the same ``mix`` (it makes scoring many similar nodes cheap).
    """
    if not _host_ok(node, request):
        return None
    usable = [i for i, c in enumerate(node.cards) if _card_ok(c, request)]
    if len(usable) < request.count:
        return None
    shapes = prior_mix(node) if mix is None else mix
    # Candidate card sets. Equal cards are interchangeable: try one of each kind, lowest id.
    options: list[tuple[int, ...]] = []
    if request.count == 0:
        options.append(())
    elif request.exclusive:
        options.append(tuple(sorted(usable, key=lambda i: node.cards[i].id)[: request.count]))
    else:
        by_kind: dict[tuple[int, int, int, int, str], int] = {}
        for i in sorted(usable, key=lambda i: node.cards[i].id):
            c = node.cards[i]
            kind = (
                c.compute_free_pct,
                c.memory_free_mib,
                c.memory_total_mib,
                c.max_slices - c.slices,
                c.model,
            )
            by_kind.setdefault(kind, i)
        kinds = list(by_kind.values())
        if request.count == 1:
            options.extend((i,) for i in kinds)
        else:
            # several shared cards: the fullest that fit (best fit), ids breaking ties
            fullest = sorted(usable, key=lambda i: (_card_left(node.cards[i]), node.cards[i].id))
            options.append(tuple(fullest[: request.count]))
    before = 0.0
    if policy == "fragmentation":
        before = _fragmentation_memo(node, shapes, memo, weights)
    best: NodeCandidate | None = None
    best_key: tuple[float, tuple[str, ...]] | None = None
    for chosen in options:
        after = _take(node, request, chosen)
        left = _fullness(after)
        if policy == "best-fit":
            value = left
        elif policy == "spread":
            value = -left
        else:
            growth = _fragmentation_memo(after, shapes, memo, weights) - before
            value = (
                growth
                + weights.best_fit * left
                + weights.card_fit * sum(_card_left(after.cards[i]) for i in chosen)
            )
        devices = tuple(node.cards[i].id for i in chosen)
        key = (round(value, 9), devices)
        if best_key is None or key < best_key:
            best_key = key
            best = NodeCandidate(node=node.id, devices=devices, score=value)
    return best


def _card_left(card: CardState) -> float:
    return card.compute_free_pct / FULL_PCT + card.memory_free_mib / max(card.memory_total_mib, 1)


def rank_nodes(
    nodes: Iterable[NodeState],
    request: Request,
    policy: Policy = "fragmentation",
    mix: Sequence[Shape] | None = None,
    memo: MutableMapping[Hashable, float] | None = None,
    weights: Weights = DEFAULT_WEIGHTS,
) -> list[NodeCandidate]:
    """Every node the request fits on, with the cards it would use there, best first
    (lower score; ties to the lower node id)."""
    ranked = [
        candidate
        for node in nodes
        if (candidate := place_on_node(node, request, policy, mix, memo, weights)) is not None
    ]
    ranked.sort(key=lambda c: (round(c.score, 9), c.node, c.devices))
    return ranked


def learn_mix(
    history: Iterable[Request], coverage: float = 1.0, by_gpu: bool = False
) -> tuple[Shape, ...]:
    """The typical request mix from past requests: the most frequent shapes, most common
    first, until they cover ``coverage`` of all requests (like FGD's "typical pods").
    ``by_gpu`` weighs each request by the card compute it asked for instead of counting it."""
    counts: Counter[Request] = Counter()
    for request in history:
        if by_gpu:
            per = FULL_PCT if request.exclusive else request.per_card.compute_pct
            counts[request] += max(request.count * per, 0)
        else:
            counts[request] += 1
    total = sum(counts.values())
    if total <= 0:
        return ()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], _request_order(kv[0])))
    chosen: list[tuple[Request, float]] = []
    covered = 0.0
    for request, n in ranked:
        if covered >= coverage * total:
            break
        chosen.append((request, n))
        covered += n
    return tuple(Shape(request, n / covered) for request, n in chosen)


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
