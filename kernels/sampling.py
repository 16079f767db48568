"""Temperature / top-k / top-p / min-p sampling without sorting the vocabulary.

Draws one token per row from runtime.reference.sampling_probs:

    l = logits / T,  p = softmax(l)
    kept = {l >= t_k} & {l >= t_p} & {p >= min_p * max p}
    t_k = the k-th largest l                       (ties with it kept)
    t_p = the largest l with  sum_{l_j >= t_p} p_j >= top_p * sum_{l_j >= t_k} p_j
          (a token is kept iff the mass of strictly more probable top-k tokens
           is < top_p of the top-k mass: top-p on the top-k-renormalized probs)
    token = argmax over kept of  e_i / E_i,   e_i = exp(l_i - max l),  E_i ~ Exp(1)

The last line is the exponential race: argmax p_i / E_i is an exact draw from
p restricted to the kept set, so no normalizer, prefix sum or sort is needed,
and no token outside `kept` can ever win (its score is -1, every kept score is
> 0 for the most probable token). E_i = -log(1 - u_i), evaluated by its series
for small u, where the race is decided; u_i comes from Philox (tl.rand4x: one
counter per 4 columns of a row, keyed by a seed that is drawn from the torch
generator as a device tensor, so there is no host sync).

Thresholds are found by search, not by sorting. Each search pass reads the row
once and counts, for NPIV pivots at once, how many tokens (top-k) or how much
mass (top-p) lies at or above each pivot, plus the smallest and largest value
inside the current bracket [lo, hi), which always holds the threshold. Pivots
are spread evenly over the bracket in value; after a pass that shrank it less
than 4-fold (or over an infinite span) they are spread evenly in the
order-preserving integer encoding of float32 instead, which shrinks any
bracket NPIV-1 fold, so no data makes the search crawl (< 20 passes in the
worst case; top-k and top-p together took 1-8 passes on 128k-vocabulary rows
of randn / Gumbel logits, 11 on contrived ones). The search ends as soon as
the bracket holds a single value or the counts pin the threshold to its
smallest or largest value. The last pivot sits on the bracket's largest value,
so a peaked row (its top token alone holds top_p) ends after one pass; top-p
starts at max l - log(V / (1 - top_p)) - 1, below which all tokens together
hold less than 1 - top_p. The masses of all pivots come from the same
summation order, so they are monotone in the pivot even in floating point,
and the kept set is always exactly {l >= threshold}. Ties in l are kept
together, as the reference keeps ties in p.

Rows with temperature 0 or top_k == 1 return argmax(logits) (the first index
among ties, a NaN counting as the largest, as torch.argmax). So do rows with no
distribution (a NaN or +inf logit, all -inf, logits / T overflowing), which the
reference cannot sample from; a kernel cannot raise without a host sync.

Bytes moved for B rows of V logits of e bytes: B*V*e per pass, read
(1 + search passes + 1) times: one pass (max and argmax) for greedy rows, two
(max, race) for plain temperature sampling, and a few more per top-k / top-p
search (for a single row they hit in L2). Per element: NPIV compares and adds
per search pass, one exp and a quarter of a Philox call in the race.

One program handles ROWS rows (ROWS * BLOCK = one tile; ROWS is 1 for real
vocabularies): a row's reduction order depends on V only, never on the batch.
"""
import os

import torch
import triton
import triton.language as tl

from .version import TRITON

NPIV = 16  # pivots per search pass: the bracket shrinks 15-fold per pass
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Elements per tile. The interpreter pays per operation, not per element, so
# it gets big tiles; on the GPU the [BLOCK, NPIV] partial sums stay in registers.
TILE = 16384 if _INTERPRET else 1024
# Short rows share a program in a smaller tile on the GPU: the per-row vectors
# and [ROWS, NPIV] search state of an 8 x 128 tile spill at 16 warps, a 4 x 128
# tile needs about 100 registers (sm_80 / sm_90, triton 3.9).
ROWS_TILE = TILE if _INTERPRET else 512
NUM_WARPS = 16  # 1024-wide tiles: 110-125 registers, no spills (sm_80 / sm_90, triton 3.9)
# Register allocation differs between triton versions. On 3.6 (checked for sm_80 / sm_90; 3.7 and
# 3.8 get its choice, unchecked) a 1024-wide float32 tile reaches the 128-register
# cap and spills 8 bytes per thread (16-bit logits do not); 512 wide takes ~96 registers. Untimed:
# 3.9 keeps the 1024-wide tile.
TILE_F32 = TILE if _INTERPRET or TRITON >= (3, 9) else 512
# 512 threads allow 128 registers each. Stated explicitly, because without it
# ptxas may trade spills for occupancy (64 registers and a stack on sm_80 for
# 256- and 512-wide tiles).
MAX_REGISTERS = 128
_BIG = tl.constexpr(2147483647)  # "no index" in first-index reductions


@triton.jit
def _key(v):
    """float32 -> int64 that orders like the float (-0.0 just below +0.0; no NaN)."""
    b = v.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.int64)


@triton.jit
def _value(key):
    """Inverse of _key."""
    b = key.to(tl.int32)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.float32, bitcast=True)


@triton.jit
def _col(x, j, col: tl.constexpr):
    """x[:, col] of a [ROWS, NPIV] tensor (j = arange over its columns)."""
    return tl.sum(tl.where(j[None, :] == col, x, 0), 1)


@triton.jit
def _load_scaled(X_ptr, row_off, stride_xc, cols, n_cols, active, tdiv):
    """[ROWS, BLOCK] float32 logits / temperature; -inf outside the row or for inactive rows."""
    mask = active[:, None] & (cols[None, :] < n_cols)
    x = tl.load(X_ptr + row_off[:, None] + cols[None, :].to(tl.int64) * stride_xc, mask=mask,
                other=float("-inf"))
    return x.to(tl.float32) / tdiv[:, None]


@triton.jit
def _pivots(lo_key, hi_key, base, by_key, j, NPIV: tl.constexpr):
    """[ROWS, NPIV] pivot keys: lo, then NPIV - 1 points over [base, hi) ending just below hi.

    Spread evenly in value, which suits logits, or evenly in key where `by_key`
    or the span is infinite: that shrinks the key range NPIV - 1 fold per pass
    whatever the data, so no input makes the search crawl.
    """
    base_key = tl.maximum(_key(base), lo_key)
    base_v = _value(base_key)
    span = _value(hi_key) - base_v
    by_key = by_key | (span == float("inf"))
    frac = j.to(tl.float32) / (NPIV - 1)
    by_value = _key(base_v[:, None] + tl.where(by_key, 0.0, span)[:, None] * frac[None, :])
    by_keys = base_key[:, None] + ((hi_key - base_key)[:, None] * j[None, :]) // (NPIV - 1)
    piv = tl.where(by_key[:, None], by_keys, by_value)
    piv = tl.minimum(tl.maximum(piv, lo_key[:, None]), hi_key[:, None] - 1)
    return tl.where(j[None, :] == 0, lo_key[:, None], piv)


@triton.jit
def _search(X_ptr, row_off, stride_xc, n_cols, tdiv, m, lo, k, top_p, done,
            BY_MASS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, NPIV: tl.constexpr):
    """Threshold of each row that is not `done`, searched in [lo, max l].

    BY_MASS false: the k-th largest l (count(l >= t) >= k > count(l > t)).
    BY_MASS true:  the largest present t with mass(l >= t) >= top_p * mass(l >= lo).
    Invariant: the bracket's lo satisfies the condition and its hi does not.
    """
    j = tl.arange(0, NPIV)
    lo_key = _key(tl.where(done, 0.0, lo))           # finished rows get a harmless bracket
    hi_key = _key(m) + 1                             # just above the max: count 0, mass 0
    cnt_hi = tl.zeros([ROWS], tl.int32)              # count(l >= hi)
    target = tl.full([ROWS], -1.0, tl.float32)       # mass target, set by the first pass
    by_key = done                                    # spread pivots by key after a slow pass
    # top-p never cuts below max l - log(V / (1 - top_p)) - 1: all tokens below it
    # together hold less than 1 - top_p of the mass (the max token holds e = 1)
    floor = m - tl.log(n_cols / tl.maximum(1.0 - top_p, 1e-30)) - 1.0
    result = lo
    while tl.max((~done).to(tl.int32), 0) > 0:
        lo_v = _value(lo_key)
        hi_v = _value(hi_key)
        base = lo_v
        if BY_MASS:
            base = tl.where(target < 0, tl.maximum(lo_v, floor), lo_v)
        piv_key = _pivots(lo_key, hi_key, base, by_key, j, NPIV)                    # [ROWS, NPIV]
        piv = _value(piv_key)
        # per-lane partials, reduced once after the row (no block-wide reduction per tile)
        cnt = tl.zeros([ROWS, BLOCK, NPIV], tl.int32)
        mass = tl.zeros([ROWS, BLOCK, NPIV], tl.float32)
        vmin = tl.full([ROWS, BLOCK], float("inf"), tl.float32)
        vmax = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            l = _load_scaled(X_ptr, row_off, stride_xc, cols, n_cols, ~done, tdiv)  # [ROWS, BLOCK]
            ge = l[:, :, None] >= piv[:, None, :]                                    # [ROWS, BLOCK, NPIV]
            cnt += ge.to(tl.int32)
            if BY_MASS:
                e = tl.exp(l - m[:, None])
                mass += tl.where(ge, e[:, :, None], 0.0)
            inside = (l >= lo_v[:, None]) & (l < hi_v[:, None])
            vmin = tl.minimum(vmin, tl.where(inside, l, float("inf")))
            vmax = tl.maximum(vmax, tl.where(inside, l, float("-inf")))
        # every pivot's mass comes from the same summation order, so it is monotone in the pivot
        cnt = tl.sum(cnt, 1)                                                          # [ROWS, NPIV]
        mass = tl.sum(mass, 1)
        vmin = tl.min(vmin, 1)                                                        # [ROWS]
        vmax = tl.max(vmax, 1)
        if BY_MASS:
            target = tl.where(target < 0, top_p * _col(mass, j, 0), target)
            cond = mass >= target[:, None]
            found = tl.where(vmin == vmax, vmin, lo_v)
            pinned = vmin >= vmax                      # one value (or, defensively, none) in the bracket
        else:
            cond = cnt >= k[:, None]
            cnt_lo = _col(cnt, j, 0)
            # k-th largest is the bracket's largest value if k-1 tokens lie above it,
            # its smallest if exactly k lie at or above lo
            found = tl.where(cnt_hi == k - 1, vmax, vmin)
            pinned = (vmin >= vmax) | (cnt_hi == k - 1) | (cnt_lo == k)
        # narrow to the pivots around the threshold, then to the values present
        new_hi = tl.min(tl.where(cond, hi_key[:, None], piv_key), 1)
        new_lo = tl.max(tl.where(cond & (piv_key < new_hi[:, None]), piv_key, lo_key[:, None]), 1)
        cnt_at = tl.max(tl.where(piv_key >= new_hi[:, None], cnt, -1), 1)
        cnt_hi = tl.where(cnt_at >= 0, cnt_at, cnt_hi)
        new_lo = tl.maximum(new_lo, _key(vmin))
        new_hi = tl.minimum(new_hi, _key(vmax) + 1)
        single = new_hi - new_lo <= 1
        finish = ~done & (pinned | single)
        result = tl.where(finish, tl.where(pinned, found, _value(new_lo)), result)
        done = done | finish
        by_key = (new_hi - new_lo) * 4 > hi_key - lo_key
        lo_key = tl.where(done, lo_key, new_lo)        # finished rows keep a sane bracket
        hi_key = tl.where(done, hi_key, new_hi)
    return result


@triton.jit
def _exponential(u):
    """Exp(1) from u in [0, 1]: -log(1 - u), by its series where u is small.

    The race is decided by the smallest E, so small E must keep full relative
    precision (1 - u would round it away). u is moved to the middle of its
    2^-31 step (never E = 0) and kept below 1 (never E = inf).
    """
    u = tl.minimum(u + 2.3283064e-10, 0.99999994)
    series = u * (1.0 + u * (0.5 + u * (0.33333334 + u * (0.25 + u * (0.2 + u * 0.16666667)))))
    return tl.where(u < 0.0625, series, -tl.log(1.0 - u))


@triton.jit
def _row_param(ptr, value, rows, row_ok, other, DTYPE: tl.constexpr, PER_ROW: tl.constexpr, ROWS: tl.constexpr):
    """A sampling parameter of each row: loaded from a [B] tensor, or the one value for all rows."""
    if PER_ROW:
        out = tl.load(ptr + rows, mask=row_ok, other=other).to(DTYPE)
    else:
        out = tl.full([ROWS], value, DTYPE)
    return out


@triton.jit
def _sample_kernel(
    X_ptr, stride_xr, stride_xc, n_rows, n_cols,
    T_ptr, t_val, K_ptr, k_val, P_ptr, p_val, MP_ptr, mp_val,
    Seed_ptr, Out_ptr,
    T_ROWS: tl.constexpr, K_ROWS: tl.constexpr, P_ROWS: tl.constexpr, MP_ROWS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, NPIV: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_off = rows.to(tl.int64) * stride_xr
    # per-row parameters: a [B] tensor or one value for all rows
    temp = _row_param(T_ptr, t_val, rows, row_ok, 1.0, tl.float32, T_ROWS, ROWS)
    k = _row_param(K_ptr, k_val, rows, row_ok, 0, tl.int32, K_ROWS, ROWS)
    top_p = _row_param(P_ptr, p_val, rows, row_ok, 1.0, tl.float32, P_ROWS, ROWS)
    min_p = _row_param(MP_ptr, mp_val, rows, row_ok, 0.0, tl.float32, MP_ROWS, ROWS)
    tdiv = tl.where(temp == 0, 1.0, temp)

    # pass 1: argmax of the raw logits (torch semantics), max and min of l = logits / T;
    # per-lane partials (a lane keeps its first maximum), reduced once after the row
    best = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([ROWS, BLOCK], tl.int32)
    nan_idx = tl.full([ROWS, BLOCK], _BIG, tl.int32)
    m = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
    lmin = tl.full([ROWS, BLOCK], float("inf"), tl.float32)  # smallest finite l
    n_fin = tl.zeros([ROWS, BLOCK], tl.int32)                  # tokens with finite l
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(X_ptr + row_off[:, None] + cols[None, :].to(tl.int64) * stride_xc, mask=inb,
                    other=float("-inf")).to(tl.float32)                             # [ROWS, BLOCK]
        isnan = inb & (x != x)
        nan_idx = tl.minimum(nan_idx, tl.where(isnan, cols[None, :], _BIG))
        take = x > best                                # NaN and padding never take
        best = tl.where(take, x, best)
        best_idx = tl.where(take, cols[None, :], best_idx)
        l = x / tdiv[:, None]
        m = tl.maximum(m, tl.where(isnan, float("-inf"), l))
        finite = inb & (l > float("-inf"))
        lmin = tl.minimum(lmin, tl.where(finite, l, float("inf")))
        n_fin += finite.to(tl.int32)
    # first index of the max (index 0 for an all -inf row), or of the first NaN
    top = tl.max(best, 1)
    best_idx = tl.min(tl.where(best == top[:, None], best_idx, _BIG), 1)
    nan_idx = tl.min(nan_idx, 1)
    m = tl.max(m, 1)
    lmin = tl.min(lmin, 1)
    n_fin = tl.sum(n_fin, 1)
    argmax = tl.where(nan_idx < _BIG, nan_idx, best_idx)
    valid = (nan_idx == _BIG) & (m > float("-inf")) & (m < float("inf"))
    greedy = ~row_ok | ~valid | (temp == 0) | (k == 1)
    m = tl.where(valid, m, 0.0)  # rows without a distribution are greedy; keeps later exps NaN-free

    # thresholds: top-k, then top-p over the top-k set (each skipped where off);
    # -inf logits have no mass, so the search starts at the smallest finite l
    thr = _search(X_ptr, row_off, stride_xc, n_cols, tdiv, m, lmin, k, top_p,
                  greedy | (k <= 0) | (k >= n_fin), False, ROWS, BLOCK, NPIV)
    thr = _search(X_ptr, row_off, stride_xc, n_cols, tdiv, m, thr, k, top_p,
                  greedy | (top_p >= 1.0), True, ROWS, BLOCK, NPIV)

    # race: argmax over kept tokens of e / E
    token = argmax
    if tl.max((~greedy).to(tl.int32), 0) > 0:
        seed = tl.load(Seed_ptr)
        win = tl.full([ROWS, BLOCK], -2.0, tl.float32)
        win_idx = tl.zeros([ROWS, BLOCK], tl.int32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            l = _load_scaled(X_ptr, row_off, stride_xc, cols, n_cols, ~greedy, tdiv)  # [ROWS, BLOCK]
            e = tl.exp(l - m[:, None])
            kept = (l >= thr[:, None]) & (e >= min_p[:, None]) & (cols[None, :] < n_cols)
            # one Philox call gives the uniforms of 4 adjacent columns; counters unique per row
            quarter = (rows.to(tl.int64)[:, None] * ((n_cols + 3) // 4) + start // 4
                       + tl.arange(0, BLOCK // 4)[None, :])                          # [ROWS, BLOCK / 4]
            u0, u1, u2, u3 = tl.rand4x(seed, quarter)
            u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), [ROWS, BLOCK])
            score = tl.where(kept, e / _exponential(u), -1.0)
            take = score > win
            win = tl.where(take, score, win)
            win_idx = tl.where(take, cols[None, :], win_idx)
        top = tl.max(win, 1)
        token = tl.where(greedy, argmax, tl.min(tl.where(win == top[:, None], win_idx, _BIG), 1))
    tl.store(Out_ptr + rows, token.to(tl.int64), mask=row_ok)


def _param(value, rows, dtype, device):
    """A number or a [B] / 0-dim tensor -> (tensor or None, scalar, per_row flag)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).to(dtype).expand(rows).contiguous(), 0, True
    return None, value, False


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    """One token per row of logits [B, V] -> [B] int64 on logits.device (see module docstring)."""
    B, V = logits.shape
    device = logits.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but logits are on {device}")
    out = torch.empty(B, dtype=torch.int64, device=device)
    if B == 0:
        return out
    # the seed stays on the device: no host sync, capturable in a CUDA graph
    seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=device, dtype=torch.int64)
    if isinstance(top_k, torch.Tensor):
        top_k = top_k.clamp(0, V)  # fits int32 whatever the caller passed
    else:
        top_k = min(int(top_k), V)
    t_ptr, t_val, t_rows = _param(temperature, B, torch.float32, device)
    k_ptr, k_val, k_rows = _param(top_k, B, torch.int32, device)
    p_ptr, p_val, p_rows = _param(top_p, B, torch.float32, device)
    mp_ptr, mp_val, mp_rows = _param(min_p, B, torch.float32, device)
    block = min(triton.next_power_of_2(V), TILE_F32 if logits.dtype == torch.float32 else TILE)
    block = max(block, 16)
    rows_per_program = max(ROWS_TILE // block, 1)
    grid = (triton.cdiv(B, rows_per_program),)
    _sample_kernel[grid](
        logits, logits.stride(0), logits.stride(1), B, V,
        t_ptr, float(t_val), k_ptr, int(k_val), p_ptr, float(p_val), mp_ptr, float(mp_val),
        seed, out,
        T_ROWS=t_rows, K_ROWS=k_rows, P_ROWS=p_rows, MP_ROWS=mp_rows,
        ROWS=rows_per_program, BLOCK=block, NPIV=NPIV, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
    )
    return out
