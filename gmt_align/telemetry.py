"""Mask telemetry: where the updates go — kept fractions per block and module kind, churn, coverage.

Figures are counts summed per parameter tensor on each process (over the fragments it holds,
padding never included) and reduced across processes with the engine's ``reduce``, so every
figure is the single-process figure: each entry is counted once.

* **kept fraction** (since the last log): kept entries / (entries × optimizer steps), overall (the
  engine's ``gmt/kept_fraction``), per transformer block (``gmt/kept_fraction/block_NN``) and per
  module kind (``gmt/kept_fraction/q_proj`` ... ``embed``, ``norm``, ``lm_head``, ``other``).
* **churn** (``gmt/churn``): mean per-step fraction of maskable entries whose kept/masked state
  differs from the step before, over the optimizer steps since the last log (the first step of a
  run has no step before it and is not counted).
* **coverage** (``gmt/coverage``): fraction of maskable entries kept at least once since training
  began; it survives checkpoint and resume (:meth:`MaskTelemetry.state_dict`).

Churn and coverage need per-entry state: two bit sets per fragment (the last kept mask, and the
union of all kept masks), packed 8 entries per byte: 2 bits per entry held by this process, 1/16
of its fp32 gradient bytes, on the gradient's device. The per-step cost is one vectorised pass
over the kept mask in chunks of 1 Mi entries (for magnitude selection the kept mask is simply
``grad != 0`` after masking), plus word-wise XOR/OR/popcount on the packed bits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .engine import Fragment, MaskEngine

__all__ = ["MaskTelemetry", "append_jsonl", "block_of", "kind_of", "pack_bits", "popcount"]

CHUNK = 1 << 20  # entries packed per pass: bounds the scratch memory; a multiple of 64
_BYTES_TO_BITS = 0x0102040810204080  # gathers the low bit of 8 bytes into the top byte (little-endian)
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_KINDS = (
    ("q_proj", r"q_proj"), ("k_proj", r"k_proj"), ("v_proj", r"v_proj"), ("o_proj", r"o_proj"),
    ("gate_proj", r"gate_proj"), ("up_proj", r"up_proj"), ("down_proj", r"down_proj"),
    ("lm_head", r"lm_head"), ("embed", r"embed|wte|wpe"), ("norm", r"norm|ln_"),
)


def block_of(name: str) -> int | None:
    """The transformer block a parameter belongs to (``...layers.N....``), or None."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def kind_of(name: str) -> str:
    """q/k/v/o_proj, gate/up/down_proj, embed, norm, lm_head, or other (first matching pattern)."""
    return next((kind for kind, pattern in _KINDS if re.search(pattern, name)), "other")


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor of a multiple of 64 entries as int64 words, 64 entries per word.

    The bools are read 8 at a time as one int64 (one byte each, 0 or 1); one multiplication moves
    their low bits into the top byte. The multiplication wraps modulo 2^64, as torch integer
    arithmetic does; the bit order only has to agree with itself.
    """
    eight = mask.view(torch.uint8).view(torch.int64)
    return ((eight * _BYTES_TO_BITS) >> 56).to(torch.uint8).view(torch.int64)


def popcount(words: torch.Tensor) -> int:
    """Number of set bits in int64 words (SWAR; the masks make arithmetic shifts harmless)."""
    x = words - ((words >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return int(((x * 0x0101010101010101) >> 56).sum())


def append_jsonl(path: str | Path, record: dict) -> None:
    """One line per logging step; appended (a resumed run continues the same file)."""
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


class MaskTelemetry:
    """Observes the engine's masks (an engine observer) and turns its counts into ``gmt/...`` figures.

    ``per_entry=False`` skips churn and coverage (no per-entry state, no per-step pass).
    """

    def __init__(self, engine: MaskEngine, per_entry: bool = True):
        self.engine = engine
        self.per_entry = per_entry
        names = [t.names[0] for t in engine.tensors]
        self.numel = torch.tensor([t.numel for t in engine.tensors], dtype=torch.int64)
        self.maskable = torch.tensor(engine.maskable, dtype=torch.bool)
        blocks = [block_of(name) for name in names]
        width = max(2, len(str(max((b for b in blocks if b is not None), default=0))))
        self.groups: dict[str, torch.Tensor] = {}  # figure key -> maskable tensors it sums over
        for key, ids in [
            *((f"block_{b:0{width}d}", [b == x for x in blocks]) for b in sorted({b for b in blocks if b is not None})),
            *((kind, [kind == kind_of(n) for n in names]) for kind, _ in (*_KINDS, ("other", ""))),
        ]:
            members = torch.tensor(ids, dtype=torch.bool) & self.maskable
            if members.any():
                self.groups[key] = members
        self.blocks = [key for key in self.groups if key.startswith("block_")]
        self.layouts: dict[tuple, _Layout] = {}  # one per observed set of fragments
        self.pending: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # loaded, used at first sight
        self.changed = 0  # entries whose state changed, summed over the steps since the last log
        self.compared = 0  # entries compared with the step before, likewise
        self._scratch: torch.Tensor | None = None
        engine.observers.append(self.observe)

    # --- every optimizer step ---------------------------------------------------------------------
    def observe(self, fragments: Sequence[Fragment], step: int) -> None:
        """Engine observer: fold this step's kept masks into the per-entry state.

        The fragments of one call (the same every step) are laid end to end, each from a 64-entry
        boundary, and processed in chunks of ``CHUNK`` entries: a few tensor operations per chunk
        and one copy per fragment, so the hundreds of small tensors of a model cost little.
        """
        if not self.per_entry or not fragments:
            return
        key = tuple((f.tensor_id, f.offset, f.grad.numel()) for f in fragments)
        layout = self.layouts.get(key)
        first = layout is None
        if first:
            layout = self.layouts[key] = _Layout(key, fragments[0].grad.device, self.pending.pop(key, None))
            first = not layout.restored
        if self._scratch is None or self._scratch.device != layout.previous.device:
            self._scratch = torch.empty(CHUNK, dtype=torch.bool, device=layout.previous.device)
        magnitude = self.engine.options.selection == "magnitude"
        kept: tuple[int, torch.Tensor] | None = None  # random: the kept mask of one fragment at a time
        changed = 0
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
                changed += popcount(layout.previous[w0:w1] ^ words)
            layout.previous[w0:w1] = words
            layout.covered[w0:w1] |= words
        if not first:
            self.changed += changed
            self.compared += layout.entries

    # --- logging steps (collective) ----------------------------------------------------------------
    def pop_stats(self) -> tuple[dict[str, float], list[float]]:
        """The engine's figures plus the telemetry's, and the per-block kept fractions in block order.

        Collective like :meth:`MaskEngine.pop_stats`: two all-reduces (the engine's and one of
        ``tensors + 3`` int64 here), on every process in the same order.
        """
        steps = self.engine.steps_since_log
        covered = sum(popcount(layout.covered) for layout in self.layouts.values())
        telemetry = torch.tensor([self.changed, self.compared, covered], dtype=torch.int64)
        counts = torch.cat([self.engine.kept_counts, telemetry])
        stats = self.engine.pop_stats()
        if self.engine.reduce is not None:
            counts = self.engine.reduce(counts)
        self.changed = self.compared = 0
        if steps == 0:
            return stats, []
        kept, (changed, compared, covered) = counts[:-3], counts[-3:].tolist()
        by_block = []
        for key, members in self.groups.items():
            fraction = float(kept[members].sum()) / max(int(self.numel[members].sum()) * steps, 1)
            stats[f"gmt/kept_fraction/{key}"] = fraction
            if key.startswith("block_"):
                by_block.append(fraction)
        if self.per_entry:
            if compared > 0:
                stats["gmt/churn"] = changed / compared
            stats["gmt/coverage"] = covered / max(int(self.numel[self.maskable].sum()), 1)
        return stats, by_block

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
    """

    def __init__(self, key: tuple, device: torch.device, saved: tuple[torch.Tensor, torch.Tensor] | None):
        bases, total = [], 0
        for _, _, n in key:
            bases.append(total)
            total += -(-n // 64) * 64
        self.entries = sum(n for _, _, n in key)
        chunks = -(-total // CHUNK)
        self.copies: list[list[tuple[int, int, int, int]]] = [[] for _ in range(chunks)]
        self.pads: list[list[tuple[int, int]]] = [[] for _ in range(chunks)]
        for index, ((_, _, n), base) in enumerate(zip(key, bases)):
            for lo, hi in _split(base, base + n):
                self.copies[lo // CHUNK].append((index, lo - base, hi - base, lo % CHUNK))
            for lo, hi in _split(base + n, base + -(-n // 64) * 64):
                self.pads[lo // CHUNK].append((lo % CHUNK, lo % CHUNK + hi - lo))
        self.restored = saved is not None and saved[0].numel() == total // 64
        if self.restored:
            self.previous, self.covered = (s.to(device) for s in saved)
        else:
            self.previous = torch.zeros(total // 64, dtype=torch.int64, device=device)
            self.covered = torch.zeros_like(self.previous)


def _split(lo: int, hi: int):
    """[lo, hi) cut at multiples of CHUNK."""
    while lo < hi:
        stop = min(hi, (lo // CHUNK + 1) * CHUNK)
        yield lo, stop
        lo = stop
