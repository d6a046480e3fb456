"""scripts/export.py and ``--runtime onnxruntime``: ONNX / TorchScript graphs of the recycling bundle's denoiser and
of its unrolled 5-step sampler agree with eager torch (tiny random network; parity bounds stated per test)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / "bundles"),
    str(Path(__file__).resolve().parents[1] / "common"),
    str(Path(__file__).resolve().parents[2] / "scripts"),
]
import export  # noqa: E402
import segment  # noqa: E402
from bundle_testing import BUNDLES, bundle_imports, load_config, random_ct, read_nifti, save_weights, write_nifti  # noqa: E402
from test_sdseg_latent_segmentation import TINY as SDSEG_TINY  # noqa: E402

from diffseg.deploy import load_bundle, segment_folder, use_onnxruntime  # noqa: E402
from diffseg.export import OrtDenoiser, UnrolledSampler, noisy_steps, sampler_noise  # noqa: E402

BUNDLE = BUNDLES / "recycling_ddpm_3d_segmentation"
PROB_ATOL = 1e-4  # max |Δ probability| allowed between ONNX Runtime and torch (float32, measured ~1e-6)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """(denoiser.onnx, denoiser_sampler.onnx) written by the CLI's main()."""
    out = tmp_path_factory.mktemp("onnx") / "denoiser.onnx"
    paths = export.main(str(BUNDLE), str(out), format="onnx", overrides=tiny, shape=(32, 32, 16))
    assert paths == [str(out), str(out.with_name("denoiser_sampler.onnx"))]  # 5 steps ≤ 10: the sampler too
    return out, out.with_name("denoiser_sampler.onnx")


def test_onnx_denoiser_step_matches_torch_at_other_batch_and_spatial_sizes(tiny, exported):
    model = load_bundle(BUNDLE, overrides=tiny)
    denoiser = model.network.denoiser
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x_t", "timesteps", "features"]
    for batch, spatial in ((1, (32, 32, 16)), (3, (48, 32, 32))):  # dynamic batch and spatial axes
        image = torch.rand(batch, 1, *spatial)
        features = denoiser.encode_condition(image)
        x_t = torch.randn(batch, model.network.sample_channels, *spatial)
        t = torch.full((batch,), 3, dtype=torch.long)
        with torch.no_grad():
            expected = denoiser.denoise(x_t, t, features).numpy()
        (got,) = session.run(None, {"x_t": x_t.numpy(), "timesteps": t.numpy(), "features": features.numpy()})
        assert got.shape == expected.shape == (batch, 8, *spatial)
        assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_onnx_unrolled_sampler_reproduces_the_torch_segmenter(tiny, exported):
    model = load_bundle(BUNDLE, overrides=tiny, seed=7)
    net = model.network
    image = torch.rand(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net.predict(image).samples[:, 0].numpy()  # the chain's probabilities (before the vote)
    noise, step_noise = sampler_noise(net, image, seed=7)
    assert step_noise.shape[0] == len(noisy_steps(net)) == 4  # 5 DDPM steps, the last adds no noise
    session = ort.InferenceSession(str(exported[1]), providers=["CPUExecutionProvider"])
    feed = {"image": image.numpy(), "noise": noise.numpy(), "step_noise": step_noise.numpy()}
    (probs,) = session.run(None, feed)
    assert probs.shape == expected.shape == (1, 8, 32, 32, 16)
    assert np.abs(probs - expected).max() < PROB_ATOL
    # the labels agree wherever the decision is not a tie within the parity bound (a tiny random network gives
    # near-uniform probabilities, so float round-off may flip a voxel whose top two classes differ by ~1e-7)
    top2 = np.sort(expected, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * PROB_ATOL
    assert decided.mean() > 0.9
    assert np.array_equal(probs.argmax(1)[decided], expected.argmax(1)[decided])
    with torch.no_grad():  # and the torch module itself is the same chain
        eager = UnrolledSampler(net, 5)(image, noise, step_noise).numpy()
    np.testing.assert_allclose(eager, expected, atol=1e-6)


def test_torchscript_denoiser_round_trip(tiny, tmp_path):
    (path,) = export.main(str(BUNDLE), str(tmp_path / "d.ts"), format="torchscript", sampler=False, overrides=tiny)
    loaded = torch.jit.load(path)
    model = load_bundle(BUNDLE, overrides=tiny)
    image = torch.rand(2, 1, 32, 32, 16)
    features = model.network.denoiser.encode_condition(image)
    x_t, t = torch.randn(2, 8, 32, 32, 16), torch.tensor([4, 1])
    with torch.no_grad():
        np.testing.assert_allclose(
            loaded(x_t, t, features).numpy(), model.network.denoiser.denoise(x_t, t, features).numpy(), atol=1e-5
        )


def test_folder_inference_through_onnxruntime_gives_the_torch_labels(tiny, exported, tmp_path):
    write_nifti(tmp_path / "in" / "a.nii.gz", random_ct((40, 36, 20)), np.diag([1.5, 1.5, 5.0, 1.0]))
    torch_model = load_bundle(BUNDLE, overrides=tiny)
    segment_folder(torch_model, tmp_path / "in", tmp_path / "torch", ("nifti",), progress=False)
    expected, _ = read_nifti(tmp_path / "torch" / "a" / "seg.nii.gz")
    assert len(np.unique(expected)) > 1
    ort_model = load_bundle(BUNDLE, overrides=tiny)  # with a given graph (scripts/export.py's file)
    use_onnxruntime(ort_model, exported[0], tmp_path / "cache")
    assert isinstance(ort_model.network.denoiser, OrtDenoiser)
    result = segment_folder(
        ort_model, tmp_path / "in", tmp_path / "ort", ("nifti",), progress=False, runtime="onnxruntime"
    )
    assert result["settings"]["runtime"] == "onnxruntime" and result["cases"][0]["status"] == "ok"
    label, _ = read_nifti(tmp_path / "ort" / "a" / "seg.nii.gz")
    assert (label == expected).mean() > 0.999  # float32 round-off may flip a voxel at an exact tie, no more
    # the CLI without --onnx exports the graph into <output>/.export, named by a digest of the weights
    code = segment.main(
        str(BUNDLE), str(tmp_path / "in"), str(tmp_path / "cli"), formats="nifti", runtime="onnxruntime",
        overrides=tiny, quiet=True,
    )  # fmt: skip
    assert code == 0
    (graph,) = (tmp_path / "cli" / ".export").glob("recycling_ddpm_3d_segmentation-denoiser-*.onnx")
    assert (read_nifti(tmp_path / "cli" / "a" / "seg.nii.gz")[0] == expected).mean() > 0.999


def test_export_of_a_bundle_without_a_denoiser_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="has no diffusion denoiser to export"):
        export.main(str(BUNDLES / "diffusion_probe_3d_segmentation"), str(tmp_path / "x.onnx"))
    with pytest.raises(SystemExit, match="expected one of"):
        export.main(str(BUNDLE), str(tmp_path / "x.onnx"), format="tflite")


SDSEG = BUNDLES / "sdseg_latent_segmentation"


@pytest.mark.slow
def test_sdseg_single_step_sampler_exports_with_the_latent_decoder(tmp_path):
    with bundle_imports(SDSEG):
        net = load_config(SDSEG.name, **SDSEG_TINY).get_parsed_content("network_def")
    tiny = {**SDSEG_TINY, "ckpt_path": save_weights(net, tmp_path / "tiny.pt")}
    paths = export.main(str(SDSEG), str(tmp_path / "sdseg.onnx"), overrides=tiny, shape=(64, 64))
    assert len(paths) == 2  # one step: the sampler graph too
    model = load_bundle(SDSEG, overrides=tiny)
    segmenter = model.network
    assert segmenter.num_inference_steps == 1 and noisy_steps(segmenter) == []  # SDSeg: x̂0 from t = 999, no noise
    image = torch.rand(1, 1, 96, 64)
    with torch.no_grad():
        expected = segmenter.predict(image).samples[:, 0].numpy()
    noise, step_noise = sampler_noise(segmenter, image, seed=segmenter.seed)
    assert noise.shape == (1, 4, 12, 8) and step_noise.shape[0] == 0  # latents at 1/8
    session = ort.InferenceSession(paths[1], providers=["CPUExecutionProvider"])
    feed = {"image": image.numpy(), "noise": noise.numpy()}
    feed.update({"step_noise": step_noise.numpy()} if "step_noise" in [i.name for i in session.get_inputs()] else {})
    (probs,) = session.run(None, feed)
    assert probs.shape == expected.shape == (1, 2, 96, 64)
    assert np.abs(probs - expected).max() < PROB_ATOL
