"""The training glue inside MONAI's SupervisedTrainer (ignite): two real iterations, clipping, both modes."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.inferers import SimpleInferer

from diffseg.codecs import OneHotCodec
from diffseg.ddpm import DDPMSampler
from diffseg.losses import DiffusionSegLoss
from diffseg.training import DiffusionSegPrepareBatch, FeedForwardPrepareBatch, GradientClipping


def _loader(n=2):
    g = torch.Generator().manual_seed(0)
    return [
        {"image": torch.rand(1, 1, 8, 8, 4, generator=g), "label": torch.randint(0, 3, (1, 1, 8, 8, 4), generator=g)}
        for _ in range(n)
    ]


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize("recycling", [True, False])
def test_supervised_trainer_runs_and_updates(pointwise_denoiser, prediction_type, recycling):
    den = pointwise_denoiser(spatial_dims=3)
    sched = DDPMSampler(5, "respaced_beta", prediction_type=prediction_type)
    codec = OneHotCodec(3)
    logits = prediction_type == "sample"
    loss = DiffusionSegLoss(codec, sched, logits_output=logits, mse_weight=0.0 if logits else 0.1)
    before = [p.detach().clone() for p in den.parameters()]
    clip = GradientClipping(max_norm=1e-3)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=_loader(),
        network=den,
        optimizer=torch.optim.AdamW(den.parameters(), lr=1e-2, weight_decay=1e-8),
        loss_function=loss,
        inferer=SimpleInferer(),
        prepare_batch=DiffusionSegPrepareBatch(sched, codec, den, recycling=recycling, logits_output=logits),
        train_handlers=[clip],
    )
    trainer.run()
    assert trainer.state.iteration == 2
    assert torch.isfinite(torch.as_tensor(trainer.state.output[0]["loss"]))  # decollated per sample
    assert clip.last_norm is not None and clip.last_norm > 0
    total = torch.sqrt(sum(((p.grad) ** 2).sum() for p in den.parameters())).item()
    assert total == pytest.approx(1e-3, rel=1e-3)  # the step ran on clipped gradients
    assert any(not torch.equal(a, b) for a, b in zip(before, den.parameters(), strict=True))


def test_max_mode_draws_t_below_last():
    prep = DiffusionSegPrepareBatch(
        DDPMSampler(5), OneHotCodec(2), network=torch.nn.Identity(), recycling=True, recycling_mode="max"
    )
    torch.manual_seed(0)
    assert int(prep.get_timesteps(torch.zeros(1000, 1)).max()) == 3


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_final_step_fraction_puts_that_share_of_t_at_the_last_step(fraction):
    prep = DiffusionSegPrepareBatch(DDPMSampler(100), OneHotCodec(2), final_step_fraction=fraction)
    torch.manual_seed(0)
    t = prep.get_timesteps(torch.zeros(20000, 1))
    last = (t == 99).float().mean().item()
    assert last == pytest.approx(fraction + (1 - fraction) / 100, abs=0.01)  # the uniform draw also hits T-1
    assert int(t.min()) == (99 if fraction == 1.0 else 0)
    with pytest.raises(ValueError, match="final_step_fraction"):
        DiffusionSegPrepareBatch(DDPMSampler(100), OneHotCodec(2), final_step_fraction=1.5)


def test_missing_key_is_named():
    prep = DiffusionSegPrepareBatch(DDPMSampler(5), OneHotCodec(2))
    with pytest.raises(KeyError, match="'label'"):
        prep({"image": torch.zeros(1, 1, 4, 4)})


def test_feedforward_batch_is_noise_at_the_last_step_whatever_the_label():
    codec = OneHotCodec(3)
    prep = FeedForwardPrepareBatch(DDPMSampler(5, "respaced_beta", prediction_type="sample"), codec)
    image = torch.rand(2, 1, 8, 8, 4)
    outs = []
    for label in (torch.zeros(2, 1, 8, 8, 4, dtype=torch.long), torch.randint(0, 3, (2, 1, 8, 8, 4))):
        torch.manual_seed(0)
        outs.append((prep({"image": image, "label": label}), label))
    ((x, target, args, kwargs), label), ((x2, target2, _, _), _) = outs
    assert torch.equal(x, x2)  # same noise, different labels: the input holds no mask information
    assert torch.equal(x, target["noise"]) and torch.equal(x, target["x_t"]) and x.shape == (2, 3, 8, 8, 4)
    assert kwargs["timesteps"].tolist() == [4, 4] and torch.equal(target["timesteps"], kwargs["timesteps"])
    assert torch.equal(kwargs["image"], image) and args == ()
    assert torch.equal(target["x0"], codec.encode(label)) and not torch.equal(target["x0"], target2["x0"])
    with pytest.raises(ValueError, match="recycling=False"):
        FeedForwardPrepareBatch(DDPMSampler(5), codec, network=torch.nn.Identity(), recycling=True)
