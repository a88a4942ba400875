"""The sampler against the original MAGE's recorded run (../shared/golden/mage-tiny): with the original's own random
draws fed in, every step's input ids, the final ids and the decoded images must match."""

from __future__ import annotations

import pytest
import torch

from mage_hf import MageForMaskedImageModeling, MageGenerationPipeline, MageScheduler

NUM_STEPS, CHOICE_TEMPERATURE, MASK_ID = 6, 4.5, 1064


class ReplayScheduler(MageScheduler):
    """A MageScheduler that takes each step's categorical draw and Gumbel noise from the golden recording instead of a
    generator. Everything else is the real scheduler."""

    def __init__(self, *args, recorded=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded = recorded

    def step(self, model_output, timestep, sample, **kwargs):
        i = int(timestep)
        kwargs.update(sampled_ids=self.recorded[f"gen_step{i}_sampled"], gumbel=self.recorded[f"gen_step{i}_gumbel"])
        return super().step(model_output, timestep, sample, **kwargs)


@pytest.mark.parametrize("rule", ["first", "per_sample"])
def test_scheduler_replays_recorded_logits(golden_reference, rule):
    """The scheduler alone, fed the original's log-probabilities and draws: identical decisions at every step."""
    ref = golden_reference
    scheduler = MageScheduler(mask_token_id=MASK_ID, choice_temperature=CHOICE_TEMPERATURE, mask_len_rule=rule)
    scheduler.set_timesteps(NUM_STEPS)
    ids = torch.full((2, 256), MASK_ID)
    for t in scheduler.timesteps:
        i = int(t)
        assert torch.equal(ids, ref[f"gen_step{i}_input_ids"]), f"input ids of step {i} differ"
        out = scheduler.step(
            ref[f"gen_step{i}_logits"], t, ids, sampled_ids=ref[f"gen_step{i}_sampled"], gumbel=ref[f"gen_step{i}_gumbel"]
        )
        # The number left masked is floor(256 * cos(pi/2 * (i+1)/6)), clamped to [1, unknown-1], except at the end.
        if i < NUM_STEPS - 1:
            assert int(out.remask[0].sum()) == max(1, min(int((ids[0] == MASK_ID).sum()) - 1, int(256 * scheduler.masked_fraction(i))))
        ids = out.prev_sample
    assert torch.equal(ids, ref["gen_final_ids"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pipeline_reproduces_golden_generation(converted, golden_reference, attn):
    """The whole pipeline (converted model, real loop, VQ decode) with the recorded draws replayed."""
    ref = golden_reference
    model = MageForMaskedImageModeling.from_pretrained(converted["pretrain"], attn_implementation=attn).eval()
    scheduler = ReplayScheduler(mask_token_id=model.config.mask_token_id, mask_len_rule="first", recorded=ref)
    pipe = MageGenerationPipeline(model=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    seen = {}

    def record(pipeline, step, timestep, tensors):
        seen[step] = (tensors["token_ids"].clone(), tensors["logits"].clone())
        return {}

    images = pipe(
        num_images=2, num_inference_steps=NUM_STEPS, choice_temperature=CHOICE_TEMPERATURE, output_type="pt",
        callback_on_step_end=record, callback_on_step_end_tensor_inputs=["token_ids", "logits"],
    ).images
    for i in range(NUM_STEPS):
        # Our model's log-probabilities at the recorded inputs, against the original's, wherever the sampler reads
        # them: at the masked positions (the pipeline computes no others and leaves zeros there).
        masked = ref[f"gen_step{i}_input_ids"] == MASK_ID  # (B, L)
        log_probs = torch.log_softmax(seen[i][1], dim=-1)
        assert (log_probs - ref[f"gen_step{i}_logits"])[masked].abs().max() < 1e-5, f"step {i} logits"
        assert not seen[i][1][~masked].any()
        if i + 1 < NUM_STEPS:
            assert torch.equal(seen[i][0], ref[f"gen_step{i + 1}_input_ids"]), f"input ids of step {i + 1} differ"
    assert torch.equal(seen[NUM_STEPS - 1][0], ref["gen_final_ids"])
    assert (images - ref["gen_images"].clamp(0, 1)).abs().max() < 1e-4

    # The latent output is the final ids, on the 16x16 grid.
    scheduler.set_timesteps(NUM_STEPS)
    ids = pipe(num_images=2, num_inference_steps=NUM_STEPS, choice_temperature=CHOICE_TEMPERATURE, output_type="latent").images
    assert torch.equal(ids.flatten(1), ref["gen_final_ids"])
