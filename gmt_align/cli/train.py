"""``gmt-align sft``, ``dpo`` and ``grpo``: train with GMT from a parsed recipe, as TRL's scripts do.

```bash
gmt-align sft --config recipes/quickstart/sft.yaml --max_steps 2 --gmt_mask_ratio 0.3
accelerate launch -m gmt_align.cli sft --config recipes/quickstart/sft.yaml
deepspeed --module gmt_align.cli dpo --config recipes/quickstart/dpo.yaml
gmt-align grpo --config recipes/quickstart/grpo.yaml
```

The recipe is read and checked by :func:`gmt_align.cli.recipe.parse_recipe` before this module runs: a
bad recipe fails in seconds with one line, not after minutes of loading. Here: data, model, trainer,
training, saving.
"""

from __future__ import annotations

import os

from gmt_align.core.contract import Contract

from .data import load_datasets

__all__ = ["CONTRACT", "end_processes", "ignore_bool_buffers", "model_kwargs", "release_process_groups", "train",
           "use_cpu_threads"]

# DDP's own helper for the names it leaves unsynchronised (what TRL's dpo script sets by hand), and the
# list in which ZeRO-3 keeps the model for the life of the process (release_process_groups).
CONTRACT = Contract(checked_with="torch 2.13, deepspeed 0.19.8", names=(
    "torch.nn.parallel:DistributedDataParallel._set_params_and_buffers_to_ignore_for_model",
    "deepspeed.runtime.zero.parameter_offload:FWD_MODULE_STACK"))


def model_kwargs(model_args) -> dict:
    """The trainer's ``peft_config`` and ``quantization_config``, built as ``trl sft`` builds them
    (after :func:`~gmt_align.cli.environment.machine_problems` has refused what this machine cannot run)."""
    from trl import get_peft_config, get_quantization_config

    return {"peft_config": get_peft_config(model_args), "quantization_config": get_quantization_config(model_args)}


def ignore_bool_buffers(model) -> list[str]:
    """``ignore_bias_buffers``, as TRL's ``dpo`` script applies it: DDP leaves the model's boolean
    buffers (e.g. causal masks of older architectures) unsynchronised across ranks."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    ignored = [name for name, buffer in model.named_buffers() if buffer.dtype == torch.bool]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)  # listed in CONTRACT
    return ignored


def use_cpu_threads(training_args) -> int | None:
    """On the CPU, torch's thread count as :func:`gmt_align.training.machine.cpu_threads` chooses it, stated
    in one line by each node's first process (None: training on a GPU)."""
    import sys

    import torch

    from gmt_align.training.machine import cpu_threads, cuda_available

    if not (training_args.use_cpu or not cuda_available()):
        return None
    threads, why = cpu_threads()
    torch.set_num_threads(threads)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"gmt-align: CPU threads: {threads} ({why}; set OMP_NUM_THREADS to change)", file=sys.stderr, flush=True)
    return threads


def train(method: str, script_args, training_args, model_args) -> None:
    """Load data and model, train with GMT, save model + tokenizer to ``output_dir``; on SIGTERM, stop with
    one line naming the last complete checkpoint (:mod:`gmt_align.training.preemption`). The process
    groups are destroyed on return, and under DDP and DeepSpeed their threads have ended
    (:func:`end_processes`, :func:`release_process_groups`)."""
    from gmt_align.training.preemption import StopOnSigterm

    with StopOnSigterm(f"gmt-align {method}", training_args) as stop:  # one line, and no half-written save
        _train(method, script_args, training_args, model_args, stop)
    release_process_groups()


def _train(method, script_args, training_args, model_args, stop):
    from gmt_align.core.distributed import ensure_deepspeed_comm
    from gmt_align.training.trainers import GMTDPOTrainer, GMTGRPOTrainer, GMTSFTTrainer

    use_cpu_threads(training_args)
    # Before the model: a bad file fails in seconds, with one line naming it (DataError).
    train_dataset, eval_dataset = load_datasets(script_args, training_args, method)
    if training_args.deepspeed:
        ensure_deepspeed_comm(training_args)

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer_class = {"sft": GMTSFTTrainer, "dpo": GMTDPOTrainer, "grpo": GMTGRPOTrainer}[method]
    extra = {}
    if method == "grpo":  # resolved (and checked) before anything loaded: gmt_align.cli.rewards
        from .rewards import reward_functions

        extra["reward_funcs"] = reward_functions(script_args)
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        **extra,
        **model_kwargs(model_args),
    )
    if script_args.ignore_bias_buffers:
        ignore_bool_buffers(trainer.model)
    trainer.add_callback(stop)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    with stop.saving(final=True):
        trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"gmt-align: model saved to {os.path.abspath(training_args.output_dir)}")
    end_processes(trainer)


def end_processes(trainer) -> None:
    """Take the run's engine and process groups down, once every rank is here; finish the trackers.

    A barrier first, so that no collective is still in flight on any rank; then the DeepSpeed engine
    is destroyed (``accelerator.free_memory()``: its hooks hold the model in a cycle that outlives
    the trainer), then DeepSpeed's own teardown (torch's groups and DeepSpeed's references to them),
    then ``trainer.end()`` (the trackers; the group, where DeepSpeed did not take it down).
    """
    import torch.distributed as dist
    import transformers
    from packaging.version import Version

    if dist.is_available() and dist.is_initialized():
        trainer.accelerator.wait_for_everyone()
        if trainer.is_deepspeed_enabled:
            from deepspeed import comm

            trainer.accelerator.free_memory()
            if comm.is_initialized():
                comm.destroy_process_group()
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()
    else:
        trainer.accelerator.end_training()


def release_process_groups() -> None:
    """Free what still holds a destroyed process group, so that its gloo threads end now.

    ZeRO-3 keeps the model (whose parameters hold a group) in ``parameter_offload.FWD_MODULE_STACK``
    for the life of the process. Left there, the groups' threads outlive the interpreter's shutdown,
    where a thread that touches a Python object aborts the process ("terminate called without an
    active exception") after a run that finished and saved.
    """
    import gc
    import sys

    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None:
        offload.FWD_MODULE_STACK.clear()
    gc.collect()
