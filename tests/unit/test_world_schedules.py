"""The world decoders' noise schedules: what a UNet is trained to predict is what its pipeline's sampler reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.world.pretrain.decoders import (
    SCHEDULES, denoising_target, inference_scheduler, training_scheduler,
)


@pytest.mark.parametrize("modality", sorted(SCHEDULES))
def test_a_perfect_prediction_of_the_training_target_recovers_the_clean_latent(modality: str) -> None:
    # At every timestep the sampler visits, the training target computed from (x0, noise) must make the
    # inference scheduler's step estimate exactly x0: a mismatch (epsilon learned, velocity read) fails here.
    train = training_scheduler(modality)
    sample = inference_scheduler(modality)
    sample.set_timesteps(25)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    for t in sample.timesteps:
        steps = torch.full((2,), int(t))
        noisy = train.add_noise(x0, noise, steps)
        target = denoising_target(train, x0, noise, steps)
        estimate = sample.step(target, t, noisy).pred_original_sample
        torch.testing.assert_close(estimate, x0, rtol=1e-3, atol=1e-3)


def test_clips_are_sampled_from_pure_noise_as_they_are_trained() -> None:
    # The clip UNet learns at zero terminal SNR: its last training step and its sampler's first step hold none of
    # the clean latent, so where a shape goes can only come from the caption, not from a leak of x0 it learned to
    # read during training and that pure noise never has.
    train = training_scheduler("video")
    assert float(train.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    sample = inference_scheduler("video")
    sample.set_timesteps(25)
    assert int(sample.timesteps[0]) == train.config.num_train_timesteps - 1
    # Stable Diffusion's own schedule (the pictures and sounds keep it) leaks sqrt(0.0047) of x0 at its last step.
    assert float(training_scheduler("image").alphas_cumprod[-1]) > 0.004


def test_the_clip_pipeline_is_saved_with_the_schedule_its_unet_learnt(tmp_path) -> None:
    # A UNet trained for velocity behind a scheduler that reads epsilon draws noise, silently: the saved pipeline
    # must carry the training schedule's prediction type and zero terminal SNR, and sample with it.
    from diffusers import TextToVideoSDPipeline

    from services.world.dataset import generate_split
    from services.world.pretrain.decoders import pretrain_video, world_vae
    from services.world.pretrain.loop import LoopConfig

    split = generate_split("video", 3, 4, progress=False)
    cfgs = {"clip": LoopConfig(steps=1, lr=1e-3, warmup=1), "unet": LoopConfig(steps=2, lr=1e-3, warmup=1)}
    pretrain_video(split, world_vae(3), cfgs, tmp_path / "work", tmp_path / "video", batch_size=2, progress=False)
    pipe = TextToVideoSDPipeline.from_pretrained(str(tmp_path / "video"))
    config = pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == \
        ("v_prediction", True, "trailing")
    frames = pipe("a big red circle moving left", num_inference_steps=2, height=64, width=64, num_frames=8,
                  output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape[-4:] == (8, 64, 64, 3)
    assert np.isfinite(frames).all()
