"""Tree speculation with a noise-aware draft: exact, and equal to plain AR token for token.

Plain AR draws code i as race(p_i, E_i): the exponential race of sampling/noise.py with the
row's noise E_i at position i, which is a pure function of (seed, index, i) and so is known
before p_i is. A round feeds the last committed code (the root) and a static tree of candidate
codes for the next positions in one target pass (tree attention: each node sees the committed
prefix and its own path), which gives p at the root and after every node's path. Then it walks
down: code n = race(p_n, E_n) exactly as AR draws it; if a child of the root holds that code,
its output is p_{n+1} given it, so code n + 1 = race(p_{n+1}, E_{n+1}), and so on until a drawn
code has no node. A round commits 1 + (matched depth) codes, all of them the codes AR would
have drawn: no accept test, no residual, nothing to prove beyond "the same p, the same noise".

Because E is known, the draft (sampling/tree_draft.py) ranks candidates by q / E, the race
it predicts, not by q: on the digits demo at guidance 3 its first candidate is AR's code 73 %
of the time (33 % ranked by q; `bench/sampling.py --tree-draft-ranks-only`). The tree's shape
is fixed (`TreeShape.build`: the nodes with the largest chance of lying on the path, from a
rank profile), so the whole round, draft, tree pass, CFG, walk and cache moves, is one
compiled graph with static shapes. The accepted path's keys and
values are moved from their scratch slots to their positions; the rest is never read again.
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sampling.autoregressive import batch_size, positions_of, row_noise
from sampling.engine import EngineBatch
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.noise import DRAW, RowNoise, race, uniform
from sampling.row_settings import RowSettings, guided_distribution
from sampling.stats import SpeculativeStats

if TYPE_CHECKING:
    from prior.conditioning import Condition
    from sampling.engine import DecodeEngine
    from sampling.tree_draft import TreeDraft

# chance that AR's code is the draft's k-th candidate (k = 1..6), measured with the digits
# demo's distilled draft at guidance 3 (k = 1..4; 5 and 6 extrapolated); only the tree's
# shape depends on it
DEFAULT_RANK_PROBS = (0.73, 0.15, 0.06, 0.025, 0.015, 0.01)


def _depths(parents: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Each node's depth (root 0) when every parent comes before its children."""
    depth = [0]
    for parent in parents[1:]:
        depth.append(depth[parent] + 1)
    return tuple(depth)


@dataclass(frozen=True)
class TreeShape:
    """A static candidate tree: node 0 is the root; node i > 0 is its parent's ranks[i]-th
    candidate (0 = best) and parents[i] < i."""

    parents: tuple[int, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.parents or self.parents[0] != 0 or self.ranks[0] != 0:
            raise ValueError("node 0 must be the root (parents[0] = ranks[0] = 0)")
        if len(self.parents) != len(self.ranks):
            raise ValueError("parents and ranks must be one per node")
        for i, (parent, rank) in enumerate(zip(self.parents, self.ranks, strict=True)):
            if i and not 0 <= parent < i:
                raise ValueError(f"node {i}'s parent {parent} must be a node before it")
            if rank < 0:
                raise ValueError(f"node {i}'s rank must be >= 0, got {rank}")
        if list(self.depths) != sorted(self.depths):
            raise ValueError("nodes must be numbered level by level (TreeShape.level_order)")
        children = [(p, r) for p, r in zip(self.parents[1:], self.ranks[1:], strict=True)]
        if len(set(children)) != len(children):
            raise ValueError("two nodes are the same candidate of the same parent")

    @classmethod
    def build(cls, size: int, rank_probs: tuple[float, ...] = DEFAULT_RANK_PROBS) -> TreeShape:
        """The `size` non-root nodes with the largest chance of lying on AR's path (the product
        of rank_probs along the path): greedy, so every prefix of the choice is a tree."""
        return cls._build(size, tuple(rank_probs))

    @classmethod
    @functools.lru_cache(maxsize=64)  # shapes are immutable; a batch-1 call should not rebuild one
    def _build(cls, size: int, rank_probs: tuple[float, ...]) -> TreeShape:
        if size < 0:
            raise ValueError(f"tree size must be >= 0, got {size}")
        if not rank_probs or not all(0 < r <= 1 for r in rank_probs):
            raise ValueError(f"rank_probs must be in (0, 1], got {rank_probs}")
        parents, ranks = [0], [0]
        frontier = [(-r, 0, k) for k, r in enumerate(rank_probs)]  # (-chance, parent, rank)
        heapq.heapify(frontier)
        chance = [1.0]
        while len(parents) <= size:
            value, parent, rank = heapq.heappop(frontier)
            parents.append(parent)
            ranks.append(rank)
            chance.append(-value)
            node = len(parents) - 1
            for k, r in enumerate(rank_probs):
                heapq.heappush(frontier, (-chance[node] * r, node, k))
        return cls.level_order(parents, ranks)

    @classmethod
    def level_order(cls, parents: list[int], ranks: list[int]) -> TreeShape:
        """The same tree numbered level by level (a round builds its candidates that way)."""
        depth = _depths(parents)
        order = sorted(range(len(parents)), key=lambda i: (depth[i], i))
        new = {old: i for i, old in enumerate(order)}
        return cls(tuple(new[parents[i]] if i else 0 for i in order),
                   tuple(ranks[i] for i in order))  # fmt: skip

    @property
    def size(self) -> int:
        """Nodes besides the root (what the cache needs as scratch slots)."""
        return len(self.parents) - 1

    @functools.cached_property
    def depths(self) -> tuple[int, ...]:
        return _depths(self.parents)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @property
    def is_chain(self) -> bool:
        """Every node is its parent's best candidate and the only child: node i sits in the
        cache slot of its own position, so an accepted path needs no cache moves."""
        return all(p == i - 1 for i, p in enumerate(self.parents) if i) and not any(self.ranks)

    def ancestor(self, node: int, k: int) -> int:
        """The node k levels above `node` (k <= its depth; the root is depth 0)."""
        for _ in range(k):
            node = self.parents[node]
        return node

    def paths(self) -> list[list[int]]:
        """[i][d]: the node at depth d on the path root -> node i (node i itself past its depth)."""
        rows = []
        for i, depth in enumerate(self.depths):
            rows.append([self.ancestor(i, depth - d) if d <= depth else i
                         for d in range(self.max_depth + 1)])  # fmt: skip
        return rows

    def ancestors(self) -> list[list[bool]]:
        """[i][j]: node j is node i or one of its ancestors."""
        rows = []
        for i in range(len(self.parents)):
            row = [False] * len(self.parents)
            node = i
            row[node] = True
            while node:
                node = self.parents[node]
                row[node] = True
            rows.append(row)
        return rows


def tree_round(
    engine: DecodeEngine,
    shape: TreeShape,
    draft: TreeDraft,
    out: Tensor,
    n: Tensor,
    classes: Tensor,
    rounds: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One round on all R slots: out Long[R, N + D + 1] (committed codes), n Long[R] (codes
    committed; rows with n = N are done), classes Long[R] (the draft's), rounds Long[R] (rounds
    each row has run). Returns (out, n, rounds, finished): 1 + matched depth more codes per
    running row (at most N in all), its round counted, and Bool[] "every row is done" (the
    loop's one host read, so the bookkeeping costs no eager ops between rounds).

    Invariant (as in sampling/speculative.py): the cache holds positions < n - 1; code n - 1
    is committed but not fed. It feeds it as the root at position n - 1."""
    device, rows = out.device, out.shape[0]
    vocab, offsets = draft.config.vocab_size, draft.config.offsets
    num_tokens, model = engine.num_tokens, engine.model
    parents = torch.tensor(shape.parents, device=device)
    depths = torch.tensor(shape.depths, device=device)
    ranks = torch.tensor(shape.ranks, device=device)
    ancestors = torch.tensor(shape.ancestors(), device=device)
    path_of = torch.tensor(shape.paths(), device=device)  # [T, D+1]
    top = max(shape.ranks) + 1
    root_pos = n - 1  # [R]
    steps = torch.arange(shape.max_depth + 1, device=device)
    # AR's noise at positions n .. n + D, drawn once: the draft ranks by it, the walk races it
    u = uniform(engine.keys, n[:, None] + steps, DRAW, vocab)  # [R, D+1, V]
    nodes = out.gather(1, root_pos[:, None])  # [R, 1] the root

    # draft: level by level, each node is its parent's ranks[i]-th code by q / E at its position
    for level in range(1, shape.max_depth + 1):
        index = [i for i, d in enumerate(shape.depths) if d == level]
        where = root_pos + level  # [R] the position these candidates are for
        columns = []
        for k in offsets:  # the code k before each candidate: on its path, or committed
            if k <= level:
                columns.append(nodes[:, [shape.ancestor(i, k) for i in index]])  # [R, m]
            else:
                before = where - k
                code = out.gather(1, before.clamp_min(0)[:, None])  # [R, 1]
                code = torch.where(before[:, None] >= 0, code, vocab)
                columns.append(code.expand(rows, len(index)))
        context = torch.stack(columns, dim=-1)  # [R, m, K]
        at = where.clamp(max=num_tokens - 1)[:, None].expand(rows, len(index))  # [R, m]
        q = draft.round_logits(classes, at, context).softmax(-1)  # [R, m, V]
        e = -torch.log(u[:, level - 1])  # [R, V]
        if top == 1:  # every node is its parent's best: a fused argmax, no top-k call
            pick = (q / e[:, None]).argmax(-1)  # [R, m]
        else:
            order = (q / e[:, None]).topk(top, dim=-1).indices  # [R, m, top]
            pick = order.gather(-1, ranks[index][None, :, None].expand(rows, -1, 1))[..., 0]
        nodes = torch.cat([nodes, pick], dim=1)

    # one target pass over the tree (both CFG halves), distributions after every node
    fed, start = nodes, root_pos
    if engine.guided:
        fed, start = torch.cat([nodes, nodes]), torch.cat([root_pos, root_pos])
    logits = model.decode_tree(fed, start, depths, ancestors)  # [R or 2R, T, V]
    predicts = (n[:, None] + depths).clamp(max=num_tokens - 1)  # [R, T]
    probs = guided_distribution(logits, predicts, engine.settings, guided=engine.guided,
                                filtered=engine.filtered)  # fmt: skip  # [R, T, V]

    # walk, all nodes at once: after each node, draw the code AR draws there; a node is on AR's
    # path when every node from the root down to it holds the code drawn after its parent
    drawn = race(probs, u[:, depths])  # [R, T]
    hit = nodes == drawn.gather(1, parents[None].expand(rows, -1))  # [R, T] (root: its own)
    hit[:, 0] = True
    on_path = ~(ancestors & ~hit[:, None, :]).any(-1)  # [R, T]
    last = torch.where(on_path, depths + 1, 0).argmax(-1)  # [R] the deepest node on the path
    path = path_of[last]  # [R, D+1] the path's node at each depth (past its end: `last`)
    count = torch.minimum(depths[last] + 1, (num_tokens - n).clamp_min(0))

    # commit the drawn codes, move the matched path's cache entries to their positions
    index = n[:, None] + steps  # [R, D+1]
    keep = steps < count[:, None]
    out = out.scatter(1, index, torch.where(keep, drawn.gather(1, path), out.gather(1, index)))
    if shape.max_depth and not shape.is_chain:  # a chain's nodes already sit at their positions
        source = root_pos[:, None] + path[:, 1:]  # [R, D] slots of depths 1..D
        target = n[:, None] + steps[:-1]  # [R, D] their positions
        if engine.guided:
            source, target = torch.cat([source, source]), torch.cat([target, target])
        model.move_positions(source, target)
    n_next = n + count
    return out, n_next, rounds + (n < num_tokens).long(), (n_next >= num_tokens).all()


@torch.no_grad()
def generate_tree(
    model: torch.nn.Module,
    cond: Condition,
    uncond: Condition | None,
    num_tokens: int,
    draft: TreeDraft,
    classes: Tensor | None = None,
    tree_size: int = 4,
    sampling: SamplingConfig | None = None,
    guidance: GuidanceSchedule | None = None,
    generator: torch.Generator | None = None,
    *,
    shape: TreeShape | None = None,
    noise: RowNoise | None = None,
    compile: bool | str = False,
    compile_mode: str = "default",
) -> tuple[Tensor, SpeculativeStats]:
    """Sample codes Long[B, N] with tree speculation: the codes plain AR draws for the same
    noise, in fewer target passes. classes Long[B]: the rows' class ids for the draft (None:
    class 0, for a draft of a prior without classes). shape: the candidate tree (default
    `TreeShape.build(tree_size)`). Stats: drafted = tree nodes per running row and round,
    accepted = codes committed beyond the first of each round."""
    sampling = sampling if sampling is not None else SamplingConfig()
    guidance = guidance if guidance is not None else GuidanceSchedule()
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    shape = shape if shape is not None else TreeShape.build(tree_size)
    batch, device = batch_size(cond), cond.prefix.device
    config = model.config
    draft.check_fits(vocab_size=config.vocab_size, num_tokens=num_tokens,
                     num_classes=getattr(config, "num_classes", None))  # fmt: skip
    classes = draft.row_classes(classes, batch, device)
    noise = row_noise(noise, generator, batch, device)
    settings = RowSettings.build(batch, num_tokens, sampling, guidance, device)
    rows = EngineBatch(model, cond, uncond, settings, noise, num_tokens=num_tokens,
                       compile=compile, compile_mode=compile_mode, scratch=shape.size)  # fmt: skip
    stats = SpeculativeStats(rows=batch, num_tokens=num_tokens)
    out = torch.zeros(batch, num_tokens + shape.max_depth + 1, dtype=torch.long, device=device)
    out[:, 0] = noise.sample(rows.prefill(), positions_of(batch, 0, device))
    n = torch.ones(batch, dtype=torch.long, device=device)
    step = functools.partial(tree_round, rows.engine, shape, draft)
    rounds = torch.zeros(batch, dtype=torch.long, device=device)  # rounds each row ran
    out, n, classes, rounds = (rows.padded(x) for x in (out, n, classes, rounds))
    name = f"tree {id(draft)} {shape.parents} {shape.ranks}"  # one compiled round each
    finished = num_tokens == 1
    while not finished:  # padding slots repeat row 0, so they finish with it
        out, n, rounds, done = rows.run(name, step, out, n, classes, rounds)
        finished = bool(done)  # the one host sync of a round
        stats.iterations += 1
        stats.draft_lengths.append(shape.size)
    row_rounds = int(rounds[:batch].sum())
    stats.drafted = row_rounds * shape.size
    stats.accepted = batch * (num_tokens - 1) - row_rounds  # codes past each round's first
    stats.target_calls = rows.calls
    return out[:batch, :num_tokens], stats
