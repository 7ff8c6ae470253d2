"""Start real ranks on this machine: separate processes, gloo, DS_ACCELERATOR=cpu, 127.0.0.1 (see gmt_align.testing)."""

from gmt_align.testing import ROOT, cpu_env, free_port, rank_env, run_ranks, run_together

__all__ = ["ROOT", "cpu_env", "free_port", "rank_env", "run_ranks", "run_together"]
