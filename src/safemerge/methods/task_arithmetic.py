"""Task arithmetic and its sparsified, sign-consensus variants: one procedure, several small steps.

    θ = θ_base + λ · Σ_i m_i ⊙ w_i·τ̃_i / D,      τ_i = θ_i − θ_base,   τ̃_i = sparsify(τ_i)

- task_arithmetic (Ilharco et al., 2023): no sparsifier, m_i = 1, D = Σ w_i when normalising.
- ties (Yadav et al., 2023): τ̃ keeps the `density` share of largest |τ|; the sign of Σ w_i·τ̃_i is
  elected per element; m_i marks the entries that agree with it; D = Σ w_i·m_i (the disjoint mean).
- dare_linear / dare_ties (Yu et al., 2024): τ̃ drops each element with probability 1 − density and
  rescales survivors by 1/density (or, with rescale_mode="l1", to keep ‖τ‖₁ as mergekit does).
- breadcrumbs / breadcrumbs_ties (Davari & Belilovsky, 2023): τ̃ drops the `gamma` share of largest
  |τ| (outliers) and then the smallest, keeping a `density` share.
- della / della_linear (Deep et al., 2024, MagPrune): τ̃ keeps each element with a probability that grows
  with its magnitude rank within its row, from density − ε to density + ε, and rescales survivors by 1/p
  (or, with rescale_mode="l1", to keep ‖τ‖₁ as mergekit does); della adds TIES's sign election.
- `rescale: true` on ties and breadcrumbs (mergekit's option, off by default) rescales each trimmed τ̃ to
  keep ‖τ‖₁.
MergeAlign (Sun et al., 2025) is task_arithmetic with weights α (domain) and β (alignment).

`base` is a tensor of any float dtype; each of `deltas` is a precomputed τ_i (a tensor) or a
`TaskVector(model=θ_i)` whose τ_i is formed block by block. Everything is computed in float32, in
cache-sized blocks (see blocks.py); the result is written into `out` (any dtype) or returned as float32.
Sparsifiers that need a whole-tensor statistic (a magnitude threshold, an L1 norm) take it in a first
pass over the blocks and apply it in the final one. On the CPU the combine (with no sparsifier or the
magnitude trim) and the top-k bracket pass run as fused C kernels where native.py could build them,
with bit-identical results; the torch code below is the reference and the fallback.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable, Iterator, Literal, Sequence

import torch

from safemerge.methods import REQUIRED, native, register
from safemerge.methods.blocks import BLOCK, TaskVector, flat, output, spans, task_vectors

NBUCKETS = 1 << 15  # top 16 bits of a non-negative float32: sign (0), exponent, 7 mantissa bits
SAMPLE = 1 << 16   # entries sampled to bracket a top-k threshold
DIRECT = 1 << 14   # up to this many entries, one select over all of |τ| (a histogram's fixed cost is larger)
GPU_GROUP = 1 << 24  # elements DELLA ranks at once on a GPU (its sort keys and indices: 16 bytes each)
MEMO_TENSOR = 1 << 24  # the largest tensor a TrimMemo keeps (sorting one needs ~16 bytes per entry for a moment)
TRIM_MEMO_BYTES = 1 << 30  # what an in-memory search's TrimMemo may keep by default (float32: 268M entries)


# -- exact top-k: a sampled bracket, then a select on the few entries inside it ------------------------
class TopK:
    """Membership in the k largest |τ| entries, exact: entries equal to the threshold count in index order.

    Found without sorting the tensor (Floyd–Rivest style): the |τ| of a fixed random sample of
    SAMPLE entries bracket the threshold's rank within ±6 standard errors; one pass over the blocks
    counts the entries above the bracket and keeps those inside it (a few percent of the tensor), and
    `kthvalue` on those gives the exact threshold. When the bracket misses (odds below 1e-8), and for
    tensors of up to 4·SAMPLE entries, a radix select (a histogram of the top 16 bits of |τ|, which order
    like the floats) finds it instead; up to DIRECT entries, one select over all of |τ|. Inside
    `remembering(memo)`, a task vector a TrimMemo holds sorted is looked up there by binary search.
    `mask` must be called on the blocks in order (it counts the threshold ties it has admitted).
    """

    def __init__(self, base: torch.Tensor, tv: TaskVector, k: int):
        n = base.numel()
        self.all, self.none = k >= n, k <= 0
        self.thr, self.short, self.inclusive = 0.0, 0, False
        if self.all or self.none:
            return
        rank = n - k + 1  # the threshold is the rank-th smallest magnitude
        memo = _MEMO.get()
        found = memo.select(base, tv, rank) if memo is not None else None
        if found is None and n <= DIRECT:
            found = _direct_select(base, tv, rank)
        if found is None and n > 4 * SAMPLE:
            found = _bracket_select(base, tv, rank)
        thr, greater, equal = found if found is not None else _radix_select(base, tv, rank)
        self.thr, self.short = thr, k - greater
        self.inclusive = self.short == equal  # every entry equal to the threshold is kept: no counting

    def mask(self, mag: torch.Tensor) -> torch.Tensor:
        if self.all or self.none:
            return torch.full_like(mag, self.all, dtype=torch.bool)
        if self.inclusive:
            return mag >= self.thr
        return self._mask_counting_ties(mag)

    def _mask_counting_ties(self, mag: torch.Tensor) -> torch.Tensor:
        keep = mag > self.thr
        if self.short > 0:
            ties = mag == self.thr
            n_ties = int(ties.sum())
            if n_ties:
                if n_ties <= self.short:
                    keep |= ties
                else:
                    keep |= ties & (ties.cumsum(0) <= self.short)
                self.short -= min(n_ties, self.short)
        return keep


def _magnitudes(base: torch.Tensor, tv: TaskVector):
    b = flat(base)
    for s, e in spans(b.numel(), b):
        yield s, e, tv.block(b[s:e].to(torch.float32), s, e).abs_()


def _all_magnitudes(base: torch.Tensor, tv: TaskVector) -> torch.Tensor:
    """|τ| of the whole tensor, flat, float32."""
    return torch.cat([m for _, _, m in _magnitudes(base, tv)])


def _direct_select(base: torch.Tensor, tv: TaskVector, rank: int) -> tuple[float, int, int]:
    """(threshold, entries above it, entries equal to it) by one select over every |τ| (small tensors)."""
    mag = _all_magnitudes(base, tv)
    thr = _kth(mag, rank)
    return float(thr), int(((mag > thr) | mag.isnan()).sum()), int((mag == thr).sum())  # NaN ranks above all, as in radix


class TrimMemo:
    """What the sparsifiers of a fixed pool compute again for every candidate of a search (the in-memory search
    scores one pool at many densities), kept once, with the same results:

    - the sorted |τ| of a task vector (TIES and breadcrumbs trims): a threshold at any density is then a binary
      search, giving the selects' (threshold, entries above, entries equal), so the same masks. Only pairs of the
      `held` tensors are kept (matched by storage address and size, which stay theirs while the caller holds them:
      a temporary's address could be reused);
    - DARE's uniform draws of a tensor for a seed (the candidates of a search share the config's seed): the keep
      mask at any density is then a comparison with them, the draws the generator would have made.

    In float32, up to `budget` bytes in all, sorted magnitudes for tensors of up to `tensor_cap` entries (MEMO_TENSOR by
    default: sorting a larger one needs about 16 bytes per entry for a moment, gigabytes for a large model's MLP); what
    is not kept is computed as usual. A task vector with NaN is not kept (the binary search needs an order). Active
    inside `remembering(memo)`.
    """

    def __init__(self, held: Iterable[torch.Tensor], *, budget: int, tensor_cap: int = MEMO_TENSOR):
        self._held = {(t.data_ptr(), t.numel()) for t in held}
        self._sorted: dict[tuple, torch.Tensor | None] = {}  # None: a vector with NaN, left to the selects
        self._draws: dict[tuple, torch.Tensor] = {}
        self.budget = self.left = int(budget)
        self.tensor_cap = int(tensor_cap)

    def _room(self, n: int) -> bool:
        if 4 * n > self.left:
            return False
        self.left -= 4 * n
        return True

    def select(self, base: torch.Tensor, tv: TaskVector, rank: int) -> tuple[float, int, int] | None:
        src, minus_base = tv.source
        n = base.numel()
        key = (base.data_ptr(), src.data_ptr(), minus_base, n)
        if key in self._sorted:
            s = self._sorted[key]
            if s is None:  # refused before (NaN)
                return None
        else:
            if (key[0], n) not in self._held or (key[1], src.numel()) not in self._held or n > self.tensor_cap or not self._room(n):
                return None
            # |τ| ≥ 0 (NaN's bits above inf's): the int32 bits order as the floats do, and sort ~10× faster on a CPU
            s = _all_magnitudes(base, tv).view(torch.int32).sort().values.view(torch.float32)
            if bool(s[0].isnan() | s[-1].isnan()):  # not an order a binary search can count in; remembered as refused
                self.left += 4 * n
                self._sorted[key] = None
                return None
            self._sorted[key] = s
        thr = s[rank - 1:rank]
        # one read-back (a GPU sync): float64 holds the float32 threshold and the positions (< 2^53) exactly
        value, lo, hi = torch.cat([thr.double(), torch.searchsorted(s, thr).double(),
                                   torch.searchsorted(s, thr, right=True).double()]).tolist()
        return value, n - int(hi), int(hi) - int(lo)

    def draws(self, base: torch.Tensor, seed: int) -> torch.Tensor | None:
        """The uniform draws RandomDrop makes for a tensor like `base` from `seed`: one per entry, block by block."""
        b = flat(base)
        key = (seed, b.numel(), b.device)
        u = self._draws.get(key)
        if u is None:
            if not self._room(b.numel()):
                return None
            gen = torch.Generator(device=b.device).manual_seed(seed)
            u = self._draws[key] = torch.cat([torch.rand(e - s, generator=gen, device=b.device) for s, e in spans(b.numel(), b)])
        return u


_MEMO: ContextVar[TrimMemo | None] = ContextVar("safemerge_trim_memo", default=None)


@contextmanager
def remembering(memo: TrimMemo | None) -> Iterator[None]:
    """Trims and DARE drops inside this block read what `memo` keeps (None: computed as usual)."""
    token = _MEMO.set(memo)
    try:
        yield
    finally:
        _MEMO.reset(token)


def _bracket_select(base: torch.Tensor, tv: TaskVector, rank: int) -> tuple[float, int, int] | None:
    """(threshold, entries above it, entries equal to it) for the rank-th smallest |τ|, or None when the
    sampled bracket misses."""
    b = flat(base)
    n = b.numel()
    gen = torch.Generator(device=b.device).manual_seed(n)
    idx = torch.randint(0, n, (SAMPLE,), generator=gen, device=b.device)
    sample = tv.gather(b, idx).abs_().sort().values
    p = rank / n
    half = 6.0 * math.sqrt(p * (1.0 - p) / SAMPLE) + 2.0 / SAMPLE
    lo_i, hi_i = int((p - half) * SAMPLE), int((p + half) * SAMPLE)
    lo = float(sample[lo_i]) if lo_i > 0 else 0.0
    hi = float(sample[hi_i]) if hi_i < SAMPLE else math.inf
    fused = _native_bracket(b, tv, lo, hi, expected=(hi_i - lo_i) / SAMPLE)
    if fused is not None:
        above, within = fused
    else:
        above, inside = 0, []
        for s, e, mag in _magnitudes(base, tv):
            not_above = mag <= hi
            above += (e - s) - int(not_above.sum())
            inside.append(mag[not_above.logical_and_(mag >= lo)])
        within = torch.cat(inside)
    below = n - above - within.numel()
    if not below < rank <= below + within.numel():
        return None
    thr = _kth(within, rank - below)
    return float(thr), above + int((within > thr).sum()), int((within == thr).sum())


def _native_bracket(b: torch.Tensor, tv: TaskVector, lo: float, hi: float, expected: float):
    """The bracket pass in one fused loop (native.py), or None where it cannot run or the bracket holds more
    entries than its buffer (many equal magnitudes); the torch loop above does the same then."""
    src, minus_base = tv.source
    against = b if minus_base else None
    if src.numel() != b.numel() or not native.usable(src, against):
        return None
    n = b.numel()
    return native.bracket(src, against, lo, hi, cap=min(n, int(2 * expected * n) + n // 100 + 4096))


def _radix_select(base: torch.Tensor, tv: TaskVector, rank: int) -> tuple[float, int, int]:
    """(threshold, entries above it, entries equal to it) for the rank-th smallest |τ|: a 16-bit histogram locates the
    threshold's bucket; `kthvalue` runs on that bucket's entries only."""
    n = base.numel()
    counts = torch.zeros(NBUCKETS, dtype=torch.int64, device=base.device)
    for _, _, mag in _magnitudes(base, tv):
        counts += torch.bincount(mag.view(torch.int32) >> 16, minlength=NBUCKETS)
    cum = counts.cumsum_(0)
    bucket = int(torch.searchsorted(cum, torch.tensor(rank, device=cum.device)))
    below = int(cum[bucket - 1]) if bucket else 0
    inside = torch.cat([mag[(mag.view(torch.int32) >> 16) == bucket] for _, _, mag in _magnitudes(base, tv)])
    thr = _kth(inside, rank - below)
    return float(thr), (n - int(cum[bucket])) + int((inside > thr).sum()), int((inside == thr).sum())


def _kth(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-th smallest (1-based) of a 1-D tensor. `kthvalue` is a quickselect on the CPU; on a GPU it
    runs one slice in one thread block (made for many small slices), so sorting the values uses the whole GPU and is faster."""
    if values.device.type == "cpu":
        return values.kthvalue(rank).values
    return values.sort().values[rank - 1]


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries of a non-negative tensor (exactly k; ties in index order)."""
    m = flat(magnitude).to(torch.float32)
    sel = TopK(torch.zeros_like(m), TaskVector(delta=m), k)
    return torch.cat([sel.mask(m[s:e]) for s, e in spans(m.numel(), m)]).view(magnitude.shape)


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-th smallest (1-based) of non-negative `values`, by the same radix select."""
    v = flat(values).to(torch.float32)
    sel = TopK(torch.zeros_like(v), TaskVector(delta=v), v.numel() - rank + 1)
    return torch.tensor(sel.thr) if not (sel.all or sel.none) else v.min()


def kth_smallest_radix(values: torch.Tensor, rank: int) -> torch.Tensor:
    """`kth_smallest` by the radix select alone (the fallback of the sampled bracket; for tests)."""
    v = flat(values).to(torch.float32)
    return torch.tensor(_radix_select(torch.zeros_like(v), TaskVector(delta=v), rank)[0])


# -- sparsifiers: prepared once per tensor, applied block by block in order ---------------------------
class Magnitude:
    """TIES trim: keep the max(1, int(density·n)) entries of largest |τ| (at least one, as mergekit keeps)."""

    def __init__(self, base, tv, density: float):
        n = base.numel()
        k = n if density >= 1 else min(n, max(1, int(density * n)))
        self.top = TopK(base, tv, k)

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        return d if self.top.all else d.mul_(self.top.mask(d.abs()))


class Outliers:
    """Breadcrumbs: drop the int(gamma·n) largest |τ|, then the smallest, keeping int(density·n)."""

    def __init__(self, base, tv, density: float, gamma: float):
        n = base.numel()
        self.off = density >= 1
        keep_n = int(density * n)
        top_n = min(int(gamma * n), n - keep_n)
        self.lo, self.hi = TopK(base, tv, keep_n + top_n), TopK(base, tv, top_n)

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        if self.off:
            return d
        mag = d.abs()
        return d.mul_(self.lo.mask(mag) & ~self.hi.mask(mag))


def l1_factor(sums) -> float:
    """‖τ‖₁ / ‖τ̃‖₁ from (‖block of τ‖₁, ‖block of τ̃‖₁) pairs, summed in order; 1 when either is below 1e-7 (as
    mergekit leaves a tensor unscaled then). The one L1-rescale rule of DARE, DELLA and `rescale`."""
    before = after = 0.0
    for b, a in sums:
        before += b
        after += a
    return before / after if before > 1e-7 and after > 1e-7 else 1.0


class RandomDrop:
    """DARE: keep each element with probability `density`; rescale by 1/density or to keep ‖τ‖₁."""

    def __init__(self, base, tv, density: float, *, seed: int, rescale: bool, rescale_mode: str):
        self.density, self.off = density, density >= 1
        self.gen = torch.Generator(device=base.device).manual_seed(seed)
        memo = _MEMO.get()
        self._draws = memo.draws(base, seed) if memo is not None and not self.off else None  # else drawn from gen
        self._at = 0
        self.factor = 1.0
        if self.off or not rescale:
            return
        if rescale_mode == "density":
            self.factor = 1.0 / density
        elif rescale_mode == "l1":  # a dry run of the same random stream measures ‖τ‖₁ before and after
            state = self.gen.get_state()
            self.factor = l1_factor((float(mag.sum()), float((mag * self._keep(mag)).sum()))
                                    for _, _, mag in _magnitudes(base, tv))
            self.gen.set_state(state)
            self._at = 0
        else:
            raise ValueError(f"rescale_mode {rescale_mode!r} is not 'density' or 'l1'")

    def _keep(self, like: torch.Tensor) -> torch.Tensor:
        if self._draws is None:
            return torch.rand(like.shape, generator=self.gen, device=like.device) < self.density
        n = like.numel()
        self._at += n
        return self._draws[self._at - n:self._at].view(like.shape) < self.density

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        if self.off:
            return d
        d.mul_(self._keep(d))
        return d.mul_(self.factor) if self.factor != 1.0 else d


class L1Rescaled:
    """A deterministic sparsifier whose output is rescaled by one factor per tensor so that ‖τ̃‖₁ = ‖τ‖₁ (mergekit's
    `rescale` on ties and breadcrumbs); a copy of the sparsifier measures both norms in a first pass. As in mergekit,
    a norm below 1e-7 leaves τ̃ unscaled."""

    def __init__(self, sparsifier, base, tv):
        self.inner = sparsifier
        probe = copy.deepcopy(sparsifier)  # the masks count threshold ties as they go: measure on a copy
        # ‖τ‖₁ first, then the masked magnitudes |τ̃| (the probe masks the fresh `mag` in place)
        self.factor = l1_factor((float(mag.sum()), float(probe(mag).sum())) for _, _, mag in _magnitudes(base, tv))

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        d = self.inner(d)
        return d.mul_(self.factor) if self.factor != 1.0 else d


class MagPrune:
    """DELLA's MagPrune: within each row of τ (a 1-D tensor is one row; other tensors are rows of their first
    dimension), the entry of magnitude rank r (0 = smallest of n, ties in index order) is kept with probability
    p = density − ε + 2ε·r/(n − 1) (p = density for a one-element row). Survivors are rescaled by 1/p, the DELLA
    paper's rule (`rescale_mode: density`; keeps τ in expectation), or all by one factor that keeps ‖τ‖₁
    (`rescale_mode: l1`, mergekit's rule; a dry run of the same random stream measures it).
    Rows are ranked a group at a time (about one block of elements), in order, as the combine asks for blocks."""

    def __init__(self, base, tv, density: float, epsilon: float, *, seed: int, rescale: bool, rescale_mode: str):
        self.off = density >= 1
        if self.off:
            return
        if not 0 < density - epsilon or not density + epsilon < 1:
            raise ValueError(f"density ± epsilon must lie inside (0, 1); got density {density:g}, epsilon {epsilon:g} "
                             "(lower epsilon or move density away from 0 and 1)")
        if rescale and rescale_mode not in ("density", "l1"):
            raise ValueError(f"rescale_mode {rescale_mode!r} is not 'density' or 'l1'")
        self.base, self.tv = flat(base), tv
        self.rows = base.shape[0] if base.dim() >= 2 else 1
        self.lo, self.width = density - epsilon, 2.0 * epsilon
        self.per_p = rescale and rescale_mode == "density"
        self.gen = torch.Generator(device=base.device).manual_seed(seed)
        self.factor = 1.0
        if rescale and rescale_mode == "l1":  # a dry run of the same random stream measures ‖τ‖₁ before and after
            state = self.gen.get_state()
            self.factor = l1_factor((float(mag.sum()), float((mag * keep).sum())) for mag, keep, _ in self._groups())
            self.gen.set_state(state)
        self._pending = self._scales()
        self._buf, self._at = torch.empty(0, device=base.device), 0

    def _groups(self):
        """(|τ|, keep mask as float32, p) of each group of whole rows, flat, in row order."""
        n = self.base.numel()
        cols = n // self.rows if self.rows else 0
        group = BLOCK if self.base.device.type == "cpu" else GPU_GROUP  # a GPU pays a launch per group, not cache misses
        step = max(1, group // max(cols, 1))
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            s, e = r0 * cols, r1 * cols
            mag = self.tv.block(self.base[s:e].to(torch.float32), s, e).abs_().view(r1 - r0, cols)
            if cols > 1:
                # rank within each row by one stable sort of int64 keys (row index above |τ|'s float bits, which
                # order like the floats since |τ| ≥ 0): a radix sort, about 3× faster than a per-row argsort; ties
                # keep index order. The sorted position j holds the entry of rank j mod cols of its row.
                rows = torch.arange(r1 - r0, dtype=torch.int64, device=mag.device).unsqueeze(1) << 31
                key = mag.view(torch.int32).to(torch.int64).bitwise_or_(rows)
                order = torch.sort(key.view(-1), stable=True).indices
                within = torch.arange(cols, dtype=torch.float32, device=mag.device).mul_(self.width / (cols - 1)).add_(self.lo)
                p = torch.empty(mag.numel(), dtype=torch.float32, device=mag.device)
                p[order] = within.repeat(r1 - r0)
                p = p.view(r1 - r0, cols)
            else:
                p = torch.full_like(mag, self.lo + self.width / 2)
            keep = (torch.rand(p.shape, generator=self.gen, device=p.device) < p).to(torch.float32)
            yield mag.view(-1), keep.view(-1), p.view(-1)

    def _scales(self):
        for _, keep, p in self._groups():
            yield keep.div_(p) if self.per_p else keep

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        if self.off:
            return d
        need = d.numel()
        while self._buf.numel() - self._at < need:
            self._buf = torch.cat([self._buf[self._at:], next(self._pending)])
            self._at = 0
        d.mul_(self._buf[self._at:self._at + need])
        self._at += need
        return d.mul_(self.factor) if self.factor != 1.0 else d


# -- combination ------------------------------------------------------------------------------------
def combine(base, deltas, *, weights, consensus: bool, normalize: bool, lambda_: float, sparsifiers=None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """θ_base + λ · Σ m_i ⊙ w_i·τ̃_i / D (see the module docstring), block by block."""
    tvs = task_vectors(deltas)
    sparsifiers = sparsifiers or [None] * len(tvs)
    result = output(base, out)
    b, o = flat(base), flat(result)
    weights = [float(w) for w in weights]
    total = sum(weights)
    fixed_divisor = total if normalize and abs(total) >= 1e-8 else 1.0
    # positive weights: a disjoint-mean divisor is 0 only where nothing agrees (and the sum is 0 there too), and
    # otherwise at least the smallest weight, so clamping to that smallest weight replaces the 0 → 1 fill exactly
    # (in float32, as torch applies it: a weight that rounds to 0 has no floor)
    floor = min(weights) if weights and float(torch.tensor(min(weights), dtype=torch.float32)) > 0 else None
    if _native_combine(b, tvs, sparsifiers, o, weights=weights, consensus=consensus, normalize=normalize,
                       fixed_divisor=fixed_divisor, floor=floor, lambda_=lambda_):
        return result
    for s, e in spans(b.numel(), b):
        bb = b[s:e].to(torch.float32)
        ds = []
        for tv, w, sp in zip(tvs, weights, sparsifiers):
            d = tv.block(bb, s, e)
            if sp is not None:
                d = sp(d)
            ds.append(d.mul_(w) if w != 1.0 else d)
        mixed = ds[0].clone() if ds else torch.zeros_like(bb)
        for d in ds[1:]:
            mixed.add_(d)
        if consensus and ds:
            sign = torch.where(mixed >= 0, 1.0, -1.0)  # elected sign: +1 where Σ w_i·τ̃_i ≥ 0, else −1
            agree = (ds[0] * sign) > 0  # same sign as elected; trimmed zeros never agree
            torch.mul(ds[0], agree, out=mixed)  # the sums start from the first τ̃ (no zero fill)
            divisor = agree.to(torch.float32)
            if weights[0] != 1.0:
                divisor.mul_(weights[0])
            for d, w in zip(ds[1:], weights[1:]):
                agree = (d * sign) > 0
                mixed.addcmul_(d, agree)
                divisor.add_(agree, alpha=w)
            if normalize:
                mixed.div_(divisor.clamp_min_(floor) if floor is not None else divisor.masked_fill_(divisor == 0, 1))
        elif fixed_divisor != 1.0:
            mixed.div_(fixed_divisor)
        if lambda_ != 1:
            mixed.mul_(float(lambda_))
        torch.add(mixed, bb, out=o[s:e])  # the sum is cast once into the output's dtype
    return result


def _native_combine(b, tvs, sparsifiers, o, *, weights, consensus, normalize, fixed_divisor, floor, lambda_) -> bool:
    """`combine`'s block loop as one fused kernel (native.py), for task vectors that are all models or all
    precomputed deltas and sparsifiers that are none or a magnitude trim; False where it cannot run."""
    if not tvs or len(weights) != len(tvs) or any(sp is not None and not isinstance(sp, Magnitude) for sp in sparsifiers):
        return False
    srcs, minus_base = zip(*(tv.source for tv in tvs))
    if len(set(minus_base)) > 1:  # models and precomputed deltas mixed
        return False
    if not native.usable(b, o, *srcs):
        return False
    trims = []
    for sp in sparsifiers:
        top = sp.top if sp is not None else None
        trims.append(None if top is None or top.all else (top.thr, -1 if top.inclusive else top.short))
    divide = (2 if normalize else 0) if consensus else int(fixed_divisor != 1.0)
    return native.combine(b, list(srcs), has_base=minus_base[0], weights=weights, trims=trims, consensus=consensus,
                          divide=divide, fixed_divisor=fixed_divisor, floor=floor, lambda_=lambda_, out=o)


def _seeds(generator: torch.Generator | None, n: int) -> list[int]:
    """One seed per task vector, drawn from the method's generator (each τ_i gets its own stream)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return [int(x) for x in torch.randint(0, 2**62, (n,), generator=g, device=g.device)]


# -- the registered methods -------------------------------------------------------------------------
_COMMON = {"lambda": 1.0, "int8_mask": False}


@register("task_arithmetic", inputs="deltas", global_params={**_COMMON, "normalize": False, "rescale": False},
          model_params={"weight": REQUIRED}, elementwise=True)
def task_arithmetic(base, deltas, *, weights, lambda_=1.0, normalize=False, out=None, **_):
    """θ_base + λ·Σ w_i·τ_i (÷ Σ w_i when normalize); `rescale` is accepted as mergekit does and changes nothing
    (nothing is trimmed)."""
    return combine(base, deltas, weights=weights, consensus=False, normalize=normalize, lambda_=lambda_, out=out)


def _l1(rescale: bool, sparsifier, base, tv):
    return L1Rescaled(sparsifier, base, tv) if rescale else sparsifier


@register("ties", inputs="deltas", global_params={**_COMMON, "normalize": True, "rescale": False},
          model_params={"weight": REQUIRED, "density": 1.0})
def ties(base, deltas, *, weights, density, lambda_=1.0, normalize=True, rescale=False, out=None, **_):
    """TIES: trim to `density` by magnitude, elect signs, disjoint mean (normalize on by default)."""
    tvs = task_vectors(deltas)
    trims = [_l1(rescale, Magnitude(base, tv, rho), base, tv) for tv, rho in zip(tvs, density)]
    return combine(base, tvs, weights=weights, consensus=True, normalize=normalize, lambda_=lambda_,
                   sparsifiers=trims, out=out)


_DARE = {**_COMMON, "normalize": False, "rescale": True, "rescale_mode": "density"}


def _dare(base, deltas, *, weights, density, generator, rescale, rescale_mode, consensus, normalize, lambda_, out):
    tvs = task_vectors(deltas)
    drops = [RandomDrop(base, tv, rho, seed=sd, rescale=rescale, rescale_mode=rescale_mode)
             for tv, rho, sd in zip(tvs, density, _seeds(generator, len(tvs)))]
    return combine(base, tvs, weights=weights, consensus=consensus, normalize=normalize, lambda_=lambda_,
                   sparsifiers=drops, out=out)


@register("dare_linear", inputs="deltas", global_params=_DARE, model_params={"weight": REQUIRED, "density": 1.0}, random=True)
def dare_linear(base, deltas, *, weights, density, generator=None, lambda_=1.0, normalize=False,
                rescale=True, rescale_mode: Literal["density", "l1"] = "density", out=None, **_):
    """DARE then task arithmetic."""
    return _dare(base, deltas, weights=weights, density=density, generator=generator, rescale=rescale,
                 rescale_mode=rescale_mode, consensus=False, normalize=normalize, lambda_=lambda_, out=out)


@register("dare_ties", inputs="deltas", global_params=_DARE, model_params={"weight": REQUIRED, "density": 1.0}, random=True)
def dare_ties(base, deltas, *, weights, density, generator=None, lambda_=1.0, normalize=False,
              rescale=True, rescale_mode: Literal["density", "l1"] = "density", out=None, **_):
    """DARE then TIES's sign election and disjoint mean."""
    return _dare(base, deltas, weights=weights, density=density, generator=generator, rescale=rescale,
                 rescale_mode=rescale_mode, consensus=True, normalize=normalize, lambda_=lambda_, out=out)


_CRUMBS = {"weight": REQUIRED, "density": 1.0, "gamma": 0.01}


def _crumbs(base, deltas, *, weights, density, gamma, consensus, normalize, rescale, lambda_, out):
    tvs = task_vectors(deltas)
    trims = [_l1(rescale, Outliers(base, tv, rho, g), base, tv) for tv, rho, g in zip(tvs, density, gamma)]
    return combine(base, tvs, weights=weights, consensus=consensus, normalize=normalize, lambda_=lambda_,
                   sparsifiers=trims, out=out)


@register("breadcrumbs", inputs="deltas", global_params={**_COMMON, "normalize": False, "rescale": False},
          model_params=_CRUMBS)
def breadcrumbs(base, deltas, *, weights, density, gamma, lambda_=1.0, normalize=False, rescale=False, out=None, **_):
    """Model Breadcrumbs: drop outliers and small entries, then task arithmetic."""
    return _crumbs(base, deltas, weights=weights, density=density, gamma=gamma, consensus=False,
                   normalize=normalize, rescale=rescale, lambda_=lambda_, out=out)


@register("breadcrumbs_ties", inputs="deltas", global_params={**_COMMON, "normalize": False, "rescale": False},
          model_params=_CRUMBS)
def breadcrumbs_ties(base, deltas, *, weights, density, gamma, lambda_=1.0, normalize=False, rescale=False, out=None, **_):
    """Model Breadcrumbs with TIES's sign election and disjoint mean."""
    return _crumbs(base, deltas, weights=weights, density=density, gamma=gamma, consensus=True,
                   normalize=normalize, rescale=rescale, lambda_=lambda_, out=out)


_DELLA = {"weight": REQUIRED, "density": 1.0, "epsilon": 0.15}


def _della(base, deltas, *, weights, density, epsilon, generator, rescale, rescale_mode, consensus, normalize, lambda_, out):
    tvs = task_vectors(deltas)
    prunes = [MagPrune(base, tv, rho, eps, seed=sd, rescale=rescale, rescale_mode=rescale_mode)
              for tv, rho, eps, sd in zip(tvs, density, epsilon, _seeds(generator, len(tvs)))]
    return combine(base, tvs, weights=weights, consensus=consensus, normalize=normalize, lambda_=lambda_,
                   sparsifiers=prunes, out=out)


@register("della", inputs="deltas", global_params={**_DARE, "normalize": True}, model_params=_DELLA, random=True)
def della(base, deltas, *, weights, density, epsilon, generator=None, lambda_=1.0, normalize=True, rescale=True,
          rescale_mode: Literal["density", "l1"] = "density", out=None, **_):
    """DELLA: MagPrune (magnitude-ranked keep probabilities), then TIES's sign election and disjoint mean."""
    return _della(base, deltas, weights=weights, density=density, epsilon=epsilon, generator=generator, rescale=rescale,
                  rescale_mode=rescale_mode, consensus=True, normalize=normalize, lambda_=lambda_, out=out)


@register("della_linear", inputs="deltas", global_params=_DARE, model_params=_DELLA, random=True)
def della_linear(base, deltas, *, weights, density, epsilon, generator=None, lambda_=1.0, normalize=False, rescale=True,
                 rescale_mode: Literal["density", "l1"] = "density", out=None, **_):
    """MagPrune, then task arithmetic."""
    return _della(base, deltas, weights=weights, density=density, epsilon=epsilon, generator=generator, rescale=rescale,
                  rescale_mode=rescale_mode, consensus=False, normalize=normalize, lambda_=lambda_, out=out)


@register("sce", inputs="deltas", global_params={"select_topk": 1.0, "int8_mask": False})
def sce(base, deltas, *, select_topk=1.0, out=None, **_):
    """SCE (Wan et al., 2024, FuseChat), as mergekit 0.1.5 computes it: Select the `select_topk` share of elements
    (of those whose variance across the τ_i is not zero) with the largest variance and zero τ elsewhere; Calculate
    each model's weight w_i = mean(τ̃_i²) / Σ_j mean(τ̃_j²) (1/n each when that sum is below 1e-6, as mergekit does);
    Erase the entries whose sign disagrees with sign(Σ_j τ̃_j); θ = θ_base + Σ w_i·m_i·τ̃_i / max(Σ w_i·m_i, 1e-6).
    Whole-tensor statistics (variance top-k, mean squares) take a pass each before the combining one."""
    tvs = task_vectors(deltas)
    result = output(base, out)
    b, o = flat(base), flat(result)
    n = b.numel()
    if not tvs:
        for s, e in spans(n, b):
            o[s:e] = b[s:e]
        return result

    def blocks():
        for s, e in spans(n, b):
            bb = b[s:e].to(torch.float32)
            yield s, e, bb, [tv.block(bb, s, e) for tv in tvs]

    keep = None
    if select_topk < 1:
        var = torch.empty(n, dtype=torch.float32, device=b.device)
        for s, e, _, ds in blocks():  # the population variance across the τ_i (torch.var over a stack is ~20× slower)
            mean = ds[0].clone()
            for d in ds[1:]:
                mean.add_(d)
            mean.div_(len(ds))
            acc = (ds[0] - mean).square_()
            for d in ds[1:]:
                acc.add_((d - mean).square_())
            var[s:e] = acc.div_(len(ds))
        # k as mergekit computes it: the count (a tensor) times the share is a float32 product
        k = int(torch.count_nonzero(var) * float(select_topk)) if select_topk > 0 else 0
        keep = topk_mask(var, k) if k > 0 else torch.zeros(n, dtype=torch.bool, device=b.device)
        del var
    squares = [0.0] * len(tvs)
    for s, e, _, ds in blocks():
        for i, d in enumerate(ds):
            if keep is not None:
                d.mul_(keep[s:e])
            squares[i] += float(d.to(torch.float64).square_().sum())
    means = [q / n for q in squares]
    total = sum(means)
    weights = [1.0 / len(tvs)] * len(tvs) if abs(total) < 1e-6 else [m / total for m in means]
    for s, e, bb, ds in blocks():
        if keep is not None:
            for d in ds:
                d.mul_(keep[s:e])
        sign = torch.where(torch.stack(ds).sum(dim=0) >= 0, 1.0, -1.0)
        mixed = torch.zeros_like(bb)
        divisor = torch.zeros_like(bb)
        for d, w in zip(ds, weights):
            m = (torch.sign(d) == sign).to(torch.float32).mul_(w)
            mixed.addcmul_(d, m)
            divisor.add_(m)
        o[s:e] = bb + mixed.div_(divisor.clamp_min_(1e-6))  # bb may be the base itself (float32): no in-place
    return result


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim of one τ, in place (a convenience over `Magnitude` for whole tensors)."""
    tv = TaskVector(delta=flat(delta))
    trim = Magnitude(torch.zeros_like(delta), tv, density)
    f = flat(delta)
    for s, e in spans(f.numel(), f):
        f[s:e] = trim(f[s:e].to(torch.float32))
    return delta


def random_drop(delta: torch.Tensor, density: float, *, generator: torch.Generator | None, rescale: bool = True,
                rescale_mode: str = "density") -> torch.Tensor:
    """DARE of one τ, in place (a convenience over `RandomDrop` for whole tensors)."""
    (seed,) = _seeds(generator, 1)
    tv = TaskVector(delta=flat(delta))
    drop = RandomDrop(torch.zeros_like(delta), tv, density, seed=seed, rescale=rescale, rescale_mode=rescale_mode)
    f = flat(delta)
    for s, e in spans(f.numel(), f):
        f[s:e] = drop(f[s:e].to(torch.float32))
    return delta
