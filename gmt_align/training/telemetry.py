"""Mask telemetry: where the updates go and what masking costs, per block and module kind.

:class:`MaskTelemetry` watches the engine's masks (two engine observers: before and after each
masking call) and keeps, per parameter tensor and on each process, the sums of
:data:`gmt_align.training.figures.SUMS` over the fragments it holds (padding never included): kept
entries, entries whose kept/masked state changed and entries compared with the step before
(churn), entries ever kept (coverage), and the squared gradient norm before and after masking
(retained energy). At a logging step :meth:`MaskTelemetry.pop_figures` sums them across processes
in one all-reduce and turns them into the ``gmt/...`` figures (:func:`gmt_align.training.figures.figures`).

Churn and coverage need per-entry state: two bit sets per fragment (the last kept mask, and the
union of all kept masks), packed 64 entries per int64 word: 2 bits per entry held by this process,
1/16 of its fp32 gradient bytes, on the gradient's device. The per-step cost is one vectorised pass
over the kept mask in chunks of 1 Mi entries (for magnitude selection the kept mask is simply
``grad != 0`` after masking), word-wise XOR/OR/popcount on the packed bits, and two squared-norm
reads of the gradient (before and after masking). ``per_entry=False`` turns all of it off.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch

from gmt_align.core.contract import Contract
from gmt_align.core.engine import Fragment, MaskEngine
from gmt_align.core.selection import INF_BITS

from .figures import SUMS, TensorGroups, figures
from .stats_file import TelemetryStateError

__all__ = ["CONTRACT", "MaskTelemetry", "TelemetryStateError", "pack_bits", "popcount", "read_state", "squared_norms"]

# The per-tensor norms of short tails: one fused call, as torch.nn.utils.clip_grad_norm_ makes it.
CONTRACT = Contract(checked_with="torch 2.13", names=("torch:_foreach_norm",))

CHUNK = 1 << 20  # entries packed per pass: bounds the scratch memory; a multiple of 64
ROW = 1024  # entries per float32 partial sum of squares (the partial sums add up in float64)
_BYTES_TO_BITS = 0x0102040810204080  # gathers the low bit of 8 bytes into the top byte (little-endian)
_bitwise_count = getattr(np, "bitwise_count", None)  # numpy >= 2


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor of a multiple of 64 entries as int64 words, 64 entries per word (entry i of a
    word is bit i, little-endian: the same on every device). On the CPU numpy's packbits (SIMD,
    4-7x :func:`pack_bits_torch`)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.numpy(), bitorder="little")).view(torch.int64)
    return pack_bits_torch(mask)


def pack_bits_torch(mask: torch.Tensor) -> torch.Tensor:
    """:func:`pack_bits` on any device: the bools are read 8 at a time as one int64 (one byte each,
    0 or 1) and one multiplication moves their low bits into the top byte; it wraps modulo 2^64, as
    torch integer arithmetic does."""
    eight = mask.view(torch.uint8).view(torch.int64)
    return ((eight * _BYTES_TO_BITS) >> 56).to(torch.uint8).view(torch.int64)


def popcounts(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 word. On the CPU numpy's bitwise_count (numpy >= 2; 8x
    :func:`popcounts_torch`)."""
    if words.device.type == "cpu" and _bitwise_count is not None:
        return torch.from_numpy(_bitwise_count(words.numpy().view(np.uint64)))  # of |x| if signed
    return popcounts_torch(words)


def popcounts_torch(words: torch.Tensor) -> torch.Tensor:
    """:func:`popcounts` on any device (SWAR): the masks make arithmetic shifts harmless, and the
    count, at most 64, sits in the top byte without the sign bit."""
    x = words - ((words >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return (x * 0x0101010101010101) >> 56


def popcount(words: torch.Tensor) -> int:
    """Number of set bits in int64 words."""
    return int(popcounts(words).sum(dtype=torch.int64))


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ x² of each 1-D tensor, float64, on the device of the first.

    One float32 sum over tens of millions of squares is off by up to 1e-3 (measured: 28 M entries);
    here each run of :data:`ROW` entries gets a float32 norm and the squares of those add up in
    float64, so the relative error is about 1e-7 whatever the length. A different split of the
    same entries (other ranks, other fragments) moves the result by about that much.
    """
    device = tensors[0].device
    out = torch.zeros(len(tensors), dtype=torch.float64, device=device)
    heads, head_of, tails, tail_of = [], [], [], []
    for index, tensor in enumerate(tensors):
        cut = tensor.numel() - tensor.numel() % ROW
        if cut:
            heads.append(torch.linalg.vector_norm(tensor[:cut].view(-1, ROW), dim=1, dtype=torch.float32).to(device))
            head_of.append(index)
        if cut < tensor.numel():
            tails.append(tensor[cut:])
            tail_of.append(index)
    if heads:  # per tensor: sum of its rows' squares, from a running sum over all rows
        squares = torch.cat(heads).to(torch.float64).square_()
        ends = torch.tensor(list(accumulate(h.numel() for h in heads)), device=device) - 1
        totals = squares.cumsum(0)[ends]
        out.index_add_(0, torch.tensor(head_of, device=device), torch.diff(totals, prepend=totals.new_zeros(1)))
    if tails:  # shorter than a row: one fused norm per tensor, as clip_grad_norm_ does
        norms = torch.stack([n.to(device) for n in torch._foreach_norm(tails, 2, dtype=torch.float32)]).to(torch.float64)
        out.index_add_(0, torch.tensor(tail_of, device=device), norms.square_())
    return out


def read_state(path: str | Path) -> dict:
    """A saved ``gmt_telemetry_rank*.pt``; raises :class:`TelemetryStateError` (one line) if it
    cannot be read: a checkpoint whose telemetry was cut short is never taken as empty."""
    try:
        state = torch.load(io.BytesIO(Path(path).read_bytes()), weights_only=True)
    except Exception as error:  # torch raises several kinds for a damaged file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TelemetryStateError(f"{path}: unreadable ({reason[:120]}); truncated?") from None
    if not isinstance(state, dict) or "version" not in state:
        raise TelemetryStateError(f"{path}: not a gmt telemetry state")
    return state


class MaskTelemetry:
    """Turns the engine's masks into ``gmt/...`` figures: the one owner of the figures.

    ``per_entry=False`` keeps only the figures that come from the engine's own counts (kept
    fractions, thresholds): no per-entry state, no per-step pass.
    """

    def __init__(self, engine: MaskEngine, per_entry: bool = True):
        self.engine = engine
        self.per_entry = per_entry
        self.numel = torch.tensor([t.numel for t in engine.tensors], dtype=torch.int64)
        self.groups = TensorGroups([t.names[0] for t in engine.tensors], engine.maskable)
        self.layouts: dict[tuple, _Layout] = {}  # one per observed set of fragments
        self.pending: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # loaded, used at first sight
        self.compared = torch.zeros(len(engine.tensors), dtype=torch.float64)  # entries compared, per tensor
        self._sums: dict[torch.device, torch.Tensor] = {}  # per device: [changed, energy_kept, energy] x tensors
        self._energy_before: torch.Tensor | None = None  # of the masking call under way, per fragment
        self._scratch: torch.Tensor | None = None
        if per_entry:
            engine.before_mask.append(self.before_mask)
            engine.observers.append(self.observe)

    def _sums_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._sums:
            self._sums[device] = torch.zeros(3, len(self.engine.tensors), dtype=torch.float64, device=device)
        return self._sums[device]

    # --- every masking call ------------------------------------------------------------------------
    def before_mask(self, fragments: Sequence[Fragment], step: int) -> None:
        """Engine observer before masking: the gradient's energy, counted once the masking succeeds."""
        self._energy_before = squared_norms([f.grad for f in fragments]) if fragments else None

    def observe(self, fragments: Sequence[Fragment], step: int) -> None:
        """Engine observer after masking: energy kept, and this step's kept masks into the per-entry state.

        The fragments of one call (the same every step) are laid end to end, each from a 64-entry
        boundary, and processed in chunks of ``CHUNK`` entries: a few tensor operations per chunk
        and one copy per fragment, so the hundreds of small tensors of a model cost little. Bits
        are counted per 64-entry word and summed per fragment from a running sum of the words.
        """
        if not fragments:
            return
        key = tuple((f.tensor_id, f.offset, f.grad.numel()) for f in fragments)
        layout = self.layouts.get(key)
        first = layout is None
        if first:
            layout = self.layouts[key] = _Layout(key, len(self.engine.tensors), fragments[0].grad.device,
                                                 self.pending.pop(key, None))
            first = not layout.restored
        sums = self._sums_on(layout.previous.device)
        sums[1].index_add_(0, layout.ids, squared_norms([f.grad for f in fragments]).to(sums.device))
        if self._energy_before is not None:
            sums[2].index_add_(0, layout.ids, self._energy_before.to(sums.device))
            self._energy_before = None
        if self._scratch is None or self._scratch.device != layout.previous.device:
            self._scratch = torch.empty(CHUNK, dtype=torch.bool, device=layout.previous.device)
        magnitude = self.engine.rule.gradient_is_kept_mask  # else: the rule's kept mask, fragment by fragment
        kept: tuple[int, torch.Tensor] | None = None  # random: the kept mask of one fragment at a time
        for chunk, (copies, pads) in enumerate(zip(layout.copies, layout.pads)):
            w0 = chunk * CHUNK // 64
            w1 = min(w0 + CHUNK // 64, layout.previous.numel())
            buffer = self._scratch[: (w1 - w0) * 64]
            for index, src, stop, dst in copies:
                if magnitude:  # kept: |g| >= T > 0, masked: 0; a float -> bool copy is 10x torch.ne(out=)
                    source = fragments[index].grad
                else:
                    if kept is None or kept[0] != index:
                        kept = (index, self.engine.kept_mask(fragments[index]))
                    source = kept[1]
                buffer[dst : dst + stop - src].copy_(source[src:stop])
            for lo, hi in pads:
                buffer[lo:hi].fill_(False)
            words = pack_bits(buffer)
            if not first:
                layout.add_per_tensor(chunk, popcounts(layout.previous[w0:w1] ^ words), sums[0])
            layout.previous[w0:w1] = words
            layout.covered[w0:w1] |= words
        if not first:
            self.compared += layout.entries

    # --- logging steps (collective) ----------------------------------------------------------------
    def pop_figures(self) -> dict[str, float]:
        """The figures since the last call (:func:`gmt_align.training.figures.figures`); resets the sums.

        Collective when the engine has a ``reduce``: one all-reduce of ``6 × tensors`` float64 (every
        count is an integer below 2^53, so its sum is exact in any order), on every process at the
        same time (the Trainer calls ``log()`` on every process).
        """
        kept, steps = self.engine.take_counts()
        tensors = len(self.engine.tensors)
        local = torch.zeros(len(SUMS), tensors, dtype=torch.float64)
        local[SUMS.index("kept")] = kept.to(torch.float64)
        local[SUMS.index("compared")] = self.compared
        for device_sums in self._sums.values():
            changed, energy_kept, energy = device_sums.cpu()
            local[SUMS.index("changed")] += changed
            local[SUMS.index("energy_kept")] += energy_kept
            local[SUMS.index("energy")] += energy
            device_sums.zero_()
        if self.per_entry:
            covered = torch.zeros(tensors, dtype=torch.float64)
            for layout in self.layouts.values():
                covered += layout.covered_per_tensor(tensors)
            local[SUMS.index("covered")] = covered
        self.compared.zero_()
        total = self.engine.reduce(local) if self.engine.reduce is not None else local
        bits = self.engine.thresholds
        values = bits.to(torch.int32).view(torch.float32).tolist()
        finite = ((bits >= 0) & (bits < INF_BITS)).tolist()  # -1: never selected; inf: keep nothing
        per_tensor = [values[u] if u >= 0 and finite[u] else None for u in self.engine.unit_of]
        options = self.engine.options
        return figures(total, self.numel, steps, per_tensor, self.groups, options.granularity, options.mask_ratio,
                       self.per_entry)

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self, world_size: int) -> dict:
        """This process's per-entry state (its fragments only), on the CPU, for ``torch.save``."""
        return {
            "version": 1,
            "world_size": world_size,
            "layouts": [
                {"fragments": torch.tensor(key, dtype=torch.int64).view(-1, 3),
                 "previous": layout.previous.cpu(), "covered": layout.covered.cpu()}
                for key, layout in self.layouts.items()
            ],
        }

    def load_state_dict(self, state: dict, world_size: int) -> str | None:
        """Take back saved state; returns why it was not taken (then coverage starts afresh), or None.

        The fragments a process holds depend on the world size, so state saved with another world
        size cannot be matched to this process's fragments: it is dropped, not guessed.
        """
        if state.get("version") != 1:
            return f"unknown telemetry state version {state.get('version')!r}"
        if state["world_size"] != world_size:
            return f"saved with {state['world_size']} processes, resumed with {world_size}"
        self.pending = {
            tuple(tuple(row) for row in saved["fragments"].tolist()): (saved["previous"], saved["covered"])
            for saved in state["layouts"]
        }
        self.layouts = {}
        return None


class _Layout:
    """The fragments of one observe call, laid end to end in bit space, each from a 64-bit boundary.

    ``copies[c]`` lists, for chunk ``c``, the pieces of fragments to copy into it as (fragment index,
    start, stop, start in the chunk); ``pads[c]`` the padding ranges to clear (their bits stay 0).
    A fragment's words are contiguous, so per chunk the words split into runs, one per piece:
    ``starts[c]`` / ``ends[c]`` are the first / last word of each run in the chunk, ``owners[c]``
    its tensor.
    """

    def __init__(self, key: tuple, tensors: int, device: torch.device, saved: tuple[torch.Tensor, torch.Tensor] | None):
        self.ids = torch.tensor([tensor_id for tensor_id, _, _ in key], dtype=torch.int64, device=device)
        self.entries = torch.zeros(tensors, dtype=torch.float64)  # entries held, per tensor
        for tensor_id, _, n in key:
            self.entries[tensor_id] += n
        bases, total = [], 0
        for _, _, n in key:
            bases.append(total)
            total += -(-n // 64) * 64
        chunks = -(-total // CHUNK)
        self.copies: list[list[tuple[int, int, int, int]]] = [[] for _ in range(chunks)]
        self.pads: list[list[tuple[int, int]]] = [[] for _ in range(chunks)]
        for index, ((_, _, n), base) in enumerate(zip(key, bases)):
            for lo, hi in _split(base, base + n):
                self.copies[lo // CHUNK].append((index, lo - base, hi - base, lo % CHUNK))
            for lo, hi in _split(base + n, base + -(-n // 64) * 64):
                self.pads[lo // CHUNK].append((lo % CHUNK, lo % CHUNK + hi - lo))
        self.starts, self.ends, self.owners = [], [], []
        for copies in self.copies:  # a piece's words: from its start to the next piece's (pads included)
            self.starts.append([dst // 64 for *_, dst in copies])
            ends = [-(-(dst + stop - src) // 64) - 1 for _, src, stop, dst in copies]
            self.ends.append(torch.tensor(ends, dtype=torch.int64, device=device))
            self.owners.append(torch.tensor([key[index][0] for index, *_ in copies], dtype=torch.int64, device=device))
        self.copies_owner = [key[copies[0][0]][0] if copies else -1 for copies in self.copies]
        self.restored = saved is not None and saved[0].numel() == total // 64
        if self.restored:
            self.previous, self.covered = (s.to(device) for s in saved)
        else:
            self.previous = torch.zeros(total // 64, dtype=torch.int64, device=device)
            self.covered = torch.zeros_like(self.previous)

    def add_per_tensor(self, chunk: int, counts: torch.Tensor, into: torch.Tensor) -> None:
        """Add the chunk's per-word ``counts`` to ``into[tensor]``, summed per piece."""
        if len(self.copies[chunk]) <= 1:  # most chunks lie inside one big tensor
            if self.copies[chunk]:
                into[self.copies_owner[chunk]] += counts.sum(dtype=torch.int64).to(into.dtype)
            return
        if counts.device.type == "cpu":  # one numpy call sums every piece's words
            per_piece = torch.from_numpy(np.add.reduceat(counts.numpy(), self.starts[chunk], dtype=np.int64))
        else:
            totals = counts.cumsum(0)[self.ends[chunk]]
            per_piece = torch.diff(totals, prepend=totals.new_zeros(1))
        into.index_add_(0, self.owners[chunk], per_piece.to(into.device, into.dtype))

    def covered_per_tensor(self, tensors: int) -> torch.Tensor:
        out = torch.zeros(tensors, dtype=torch.float64, device=self.covered.device)
        for chunk in range(len(self.copies)):
            w0 = chunk * CHUNK // 64
            self.add_per_tensor(chunk, popcounts(self.covered[w0 : w0 + CHUNK // 64]), out)
        return out.cpu()


def _split(lo: int, hi: int):
    """[lo, hi) cut at multiples of CHUNK."""
    while lo < hi:
        stop = min(hi, (lo // CHUNK + 1) * CHUNK)
        yield lo, stop
        lo = stop
