"""Held-out problems and the metrics of ``gmt-align eval``: greedy accuracy, HumanEval, teacher-forced NLL
and DPO preference accuracy."""
