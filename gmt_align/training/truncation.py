"""What ``max_length`` cuts off the answers, counted on the rows TRL has already tokenized.

TRL's SFT and DPO trainers tokenize the whole dataset in ``__init__`` and then, quietly, drop the
rows that truncation leaves without a single answer token (SFT: "Dropping fully masked examples";
DPO with ``keep_start``: a prompt that alone fills ``max_length``) and cut the rest at train time.
A dataset whose rows are all longer than ``max_length`` then trains on nothing, or stops later
with an empty data loader. :func:`check_truncation` says it before training starts:

- no row keeps an answer token: :class:`DataTruncationError` (one line);
- some rows lose all or part of their answer: one warning line with both counts.

"Answer" is what the loss covers: SFT's labels that are not -100 (the completion of prompt/completion
rows, the assistant turns with ``assistant_only_loss``, else the whole conversation or text, whose
cut prompt then counts as a partial loss); DPO's chosen and rejected. An SFT row counts as losing
part of it when it fills ``max_length`` with an answer token at the cut (an answer that ends
exactly there is counted too: the tokenized rows hold no trace of what was cut). Cost: the
sequence lengths and one label per row, read from the Arrow columns TRL wrote (no second
tokenization). Streamed (iterable) datasets and ``packing`` are not checked.
"""

from __future__ import annotations

__all__ = ["DataTruncationError", "check_truncation", "truncation_counts"]


class DataTruncationError(ValueError):
    """Training data that ``max_length`` leaves without any answer token (one line)."""


def truncation_counts(dataset, max_length: int, mode: str) -> tuple[int, int] | None:
    """``(rows left without an answer token, rows that lose part of their answer)`` of a dataset as
    TRL prepared it (SFT: ``input_ids`` and ``labels``, truncated; DPO: ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``, untruncated), the rows TRL dropped not included; None for another layout."""
    import numpy as np
    import pyarrow.compute as pc

    columns = set(dataset.column_names or ())
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns:  # DPO: the collator truncates
        table = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).with_format("arrow")[:]
        prompt, chosen, rejected = (pc.list_value_length(table.column(c)).to_numpy() for c in table.column_names)
        answer = np.maximum(chosen, rejected)
        if mode == "keep_end":  # the ends are kept: an answer longer than max_length loses its start
            none, part = np.zeros_like(answer, dtype=bool), answer > max_length
        else:
            none, part = prompt >= max_length, prompt + answer > max_length
        return int(none.sum()), int((part & ~none).sum())
    if {"input_ids", "labels"} <= columns:  # SFT: truncated already
        labels = dataset.select_columns(["labels"]).with_format("arrow")[:].column("labels").combine_chunks()
        lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False)
        offsets = labels.offsets.to_numpy()
        values = labels.values.to_numpy(zero_copy_only=False)
        full = lengths >= max_length
        at_cut = np.zeros_like(full)
        index = offsets[:-1] + (lengths - 1 if mode != "keep_end" else 0)
        at_cut[full] = values[index[full]] != -100
        return 0, int(at_cut.sum())
    return None


def check_truncation(dataset, rows_before: int | None, max_length: int | None, mode: str, packing: bool = False,
                     where: str = "train") -> str | None:
    """The one-line warning for ``dataset`` (None when nothing is lost), or :class:`DataTruncationError`
    when no row keeps an answer token. ``rows_before``: its rows before TRL prepared it."""
    from datasets import Dataset

    if max_length is None or packing or not isinstance(dataset, Dataset):
        return None
    counts = truncation_counts(dataset, max_length, mode)
    if counts is None:
        return None
    none, part = counts
    dropped = max(0, (rows_before or len(dataset)) - len(dataset))
    total = len(dataset) + dropped
    none += dropped
    fix = "raise max_length or shorten the rows"
    if total and none >= total:
        raise DataTruncationError(
            f"{where} data: every one of its {total} rows loses all of its answer (the tokens the loss covers) to "
            f"max_length={max_length} truncation ({mode}): nothing would be learnt; {fix}")
    if not none and not part:
        return None
    return (f"{where} data: max_length={max_length} ({mode}) cuts answers (the tokens the loss covers): {none} of "
            f"{total} rows lose all of theirs{' (TRL drops them)' if dropped else ''} and {part} lose part; {fix}")
