"""The core: selection by counting, its kernels, the rules and the masking engine; torch only, no TRL.

Pure where it can be: tensors in, thresholds out, with the all-reduce passed in
(:mod:`gmt_align.core.distributed` is the only caller of ``torch.distributed``).
"""
