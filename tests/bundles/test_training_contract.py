"""What every bundle's training configs promise (issue 15): LR schedules that end at ``end_lr`` and never rise after
the warmup. (Budget, resume and curves: ``check_resumable_training`` in each bundle's tests; a real process killed
with ``kill -9`` and stopped by SIGTERM: the SegDiff tests.)"""

from __future__ import annotations

import pytest
from bundle_testing import bundle_imports, load_config

SCHEDULED = [
    ("recycling_ddpm_3d_segmentation", ("train.json",)),
    ("recycling_ddpm_3d_segmentation", ("train.json", "paper.json")),
    ("recycling_ddpm_3d_segmentation", ("train.json", "train_demo.json")),
    ("segdiff_2d_segmentation", ("train.json",)),
    ("segdiff_2d_segmentation", ("train.json", "train_demo.json")),
    ("sdseg_latent_segmentation", ("train.json",)),
    ("sdseg_latent_segmentation", ("train.json", "train_demo.json")),
    ("diffusion_probe_3d_segmentation", ("train.json",)),
    ("diffusion_probe_3d_segmentation", ("train.json", "paper.json")),
    ("diffusion_probe_3d_segmentation", ("train.json", "train_demo.json")),
]
DUMMY_OPTIMIZER = {
    "_target_": "torch.optim.SGD",
    "params": "$[torch.nn.Parameter(torch.zeros(1))]",
    "lr": "@learning_rate",
}


@pytest.mark.parametrize("bundle, configs", SCHEDULED, ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_lr_schedule_ends_at_end_lr_and_never_rises_after_warmup(bundle, configs):
    parser = load_config(bundle, configs, iterations_per_epoch=1, optimizer=DUMMY_OPTIMIZER)
    with bundle_imports(bundle):
        schedule = parser.get_parsed_content("lr_scheduler")
        run_length = parser.get_parsed_content("max_epochs") * parser.get_parsed_content("iterations_per_epoch")
        peak, end_lr = parser.get_parsed_content("learning_rate"), parser.get_parsed_content("end_lr")
    optimizer = schedule.optimizer
    lrs = []
    for _ in range(run_length):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    after_warmup = lrs[schedule.warmup_steps :]
    assert max(lrs) <= peak * (1 + 1e-12)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(after_warmup, after_warmup[1:], strict=False))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(end_lr, rel=1e-9)  # the LR the run ends with
    assert schedule.t_total <= run_length
