"""One process (or one rank of a real DeepSpeed job) training one GRPO step with GMT on the tiny model.

``python grpo_worker.py OUTPUT_DIR DEEPSPEED_JSON|none|fsdp2 PER_DEVICE_BATCH`` (fsdp2: under ``accelerate
launch`` with recipes/accelerate_configs/fsdp2.yaml and tests/fsdp2_on_cpu): TRL's GRPOTrainer with GMT
(gmt_align.GMTGRPOTrainer), update mode, on the quickstart's GRPO prompts; the model is saved to
OUTPUT_DIR. The one thing replaced is the sampling: ``generate`` draws each completion's tokens from a
seed made of the prompt and the row's place in the global batch, so that 1 process x 4 rows and
2 ranks x 2 rows see the same completions (TRL seeds each rank apart, and a sampler's draws depend on
the batch it samples). Rewards, advantages, the loss, its gradient, ZeRO and the mask are the real ones.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset

from gmt_align import GMTGRPOConfig, GMTGRPOTrainer
from gmt_align.core.distributed import ensure_deepspeed_comm
from gmt_align.testing import ROOT, distinct_characters

COMPLETION_LENGTH = 8
RATIO = 0.3


def position_seeded_generate(model):
    """``model.generate`` replaced: completion tokens from a seed of (call, unpadded prompt, global row)."""
    calls = [0]

    def generate(input_ids=None, attention_mask=None, **kwargs):
        rank = dist.get_rank() if dist.is_initialized() else 0
        rows = []
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist(), strict=True)):
            place = rank * len(input_ids) + row  # the row's place in the batch one process would sample
            prompt = [token for token, real in zip(ids, mask, strict=True) if real]  # batches pad apart
            seed = hashlib.sha256(json.dumps([calls[0], prompt, place]).encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(seed[:8], "big"))
            rows.append(torch.randint(100, 5000, (COMPLETION_LENGTH,), generator=generator))  # no special token
        calls[0] += 1
        return torch.cat([input_ids, torch.stack(rows).to(input_ids.device)], dim=1)

    model.generate = generate


def main():
    output_dir, backend, per_device = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rows = [json.loads(line) for line in
            (ROOT / ".cache" / "quickstart" / "data" / "grpo_train.jsonl").read_text().splitlines()[:16]]
    args = GMTGRPOConfig(
        output_dir=output_dir, per_device_train_batch_size=per_device, num_generations=2,
        max_completion_length=COMPLETION_LENGTH, max_steps=1, learning_rate=1e-3, bf16=False,
        use_cpu=backend != "fsdp2",  # with use_cpu, accelerate gives CPU ranks DDP, not FSDP
        report_to="none", save_strategy="no", logging_steps=1, seed=0, data_seed=0,
        deepspeed=backend if backend.endswith(".json") else None,
        gmt_mask_ratio=RATIO, gmt_mode="update",
    )
    if args.deepspeed:
        ensure_deepspeed_comm(args)
    trainer = GMTGRPOTrainer(model=str(ROOT / ".cache" / "quickstart" / "tiny-SmolLM2"),
                             reward_funcs=distinct_characters, args=args, train_dataset=Dataset.from_list(rows))
    position_seeded_generate(trainer.model)
    trainer.train()
    trainer.save_model(output_dir)
    kept = trainer.mask_hooks.kept()  # summed over the ranks: every rank takes part
    if trainer.args.process_index == 0:  # what ran: the test checks the backend was the one asked for
        ran = {"world": trainer.args.world_size, "deepspeed": trainer.is_deepspeed_enabled,
               "fsdp": trainer.is_fsdp_enabled, "backend": trainer.mask_hooks.backend}
        Path(output_dir, "kept.json").write_text(json.dumps({"kept": kept, "ran": ran}))


if __name__ == "__main__":
    main()
