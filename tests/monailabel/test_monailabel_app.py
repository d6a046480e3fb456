"""The MONAI Label app (scripts/monailabel_app) against a real ``monailabel start_server`` on 127.0.0.1.

Runs in the MONAI Label environment (``make test-monailabel`` builds ``.venv-monailabel`` from
requirements-monailabel.txt); in the main environment, which has no monailabel, the module is skipped.
Every bundle in ``bundles/`` is served: the 3D ones get a real CT crop (TotalSegmentator patient A, 64×64×24 at
3 mm, around liver and stomach) and an air volume, the 2D ones a real nuclei crop (stardist, 64²) and a blank image.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# only in .venv-monailabel; a submodule, since tests/monailabel is itself importable as a namespace "monailabel"
pytest.importorskip("monailabel.interfaces.app")

import nibabel as nib  # noqa: E402
import requests  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402
from monai.transforms import LoadImage  # noqa: E402
from requests_toolbelt import MultipartDecoder  # noqa: E402

from diffseg.bundles import bundle_imports, bundle_parser  # noqa: E402
from diffseg.data import data_path  # noqa: E402
from diffseg.io import CheckImaged  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.data]

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "scripts" / "monailabel_app"
sys.path.insert(0, str(APP))
from lib.bundles import discover_bundles  # noqa: E402

BUNDLES = discover_bundles(REPO / "bundles")
FAST = {"num_inference_steps": 2, "num_samples": 2, "seed": 0}  # every bundle gets those of its displayable_configs
CT_BOX = (slice(30, 94), slice(25, 89), slice(80, 104))  # voxels of patient A: liver, stomach, spleen, aorta
STUDIES = {3: ("ct_crop", "air"), 2: ("nuclei", "blank")}


def bundle_dims(root: Path) -> int:
    """Spatial dimensions the bundle's preprocessing accepts (its ``CheckImaged``)."""
    with bundle_imports(root):
        pre = bundle_parser(root).get_parsed_content("preprocessing")
    return next(t.spatial_dims for t in pre.transforms if isinstance(t, CheckImaged))


DIMS = {name: bundle_dims(root) for name, root in BUNDLES.items()}


def fast_params(name: str) -> dict:
    with bundle_imports(BUNDLES[name]):
        defaults = bundle_parser(BUNDLES[name]).get("displayable_configs") or {}
    return {k: v for k, v in FAST.items() if k in defaults}


def make_studies(folder: Path) -> dict[str, Path]:
    ct = nib.load(data_path("totalsegmentator/example_ct.nii.gz"))
    crop = np.asarray(ct.dataobj)[CT_BOX].astype(np.int16)
    affine = ct.affine.copy()
    affine[:3, 3] += ct.affine[:3, :3] @ [s.start for s in CT_BOX]
    paths = {"ct_crop": folder / "ct_crop.nii.gz", "air": folder / "air.nii.gz"}
    nib.save(nib.Nifti1Image(crop, affine), paths["ct_crop"])
    nib.save(nib.Nifti1Image(np.full(crop.shape, -1000, np.int16), affine), paths["air"])
    if 2 in DIMS.values():
        nuclei = tifffile.imread(data_path("stardist/img2d.tif"))[:64, :64]
        paths["nuclei"], paths["blank"] = folder / "nuclei.tif", folder / "blank.tif"
        tifffile.imwrite(paths["nuclei"], nuclei)
        tifffile.imwrite(paths["blank"], np.full_like(nuclei, int(np.median(nuclei))))
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, studies: dict[str, Path], proc: subprocess.Popen, log: Path) -> None:
        self.url, self.studies, self.proc, self.log = url, studies, proc, log

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=600, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=600, **kw)

    def put(self, path: str, **kw) -> requests.Response:
        return requests.put(self.url + path, timeout=600, **kw)

    def infer(self, model: str, image: str, params: dict) -> tuple[dict, np.ndarray, np.ndarray]:
        """POST /infer → (result JSON, label array, label affine); the multipart answer carries both."""
        r = self.post(f"/infer/{model}?image={image}", files={"params": (None, json.dumps(params))})
        assert r.status_code == 200, r.text
        parts = {}
        for part in MultipartDecoder.from_response(r).parts:  # Content-Disposition: form-data; name="image"; ...
            fields = dict(re.findall(r'(\w+)="([^"]*)"', part.headers[b"Content-Disposition"].decode()))
            parts[fields["name"]] = (fields.get("filename", ""), part.content)
        filename, content = parts["image"]
        out = self.log.parent / f"label_{model}_{image}{''.join(Path(filename).suffixes)}"
        out.write_bytes(content)
        label = LoadImage(image_only=True)(str(out))
        return json.loads(parts["params"][1]), np.asarray(label), np.asarray(label.affine)

    def tail(self) -> str:
        return self.log.read_text()[-6000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    studies_dir = root / "studies"
    studies_dir.mkdir()
    studies = make_studies(studies_dir)
    port, log = free_port(), root / "server.log"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # this venv's python
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",  # scoring runs when the test asks for it
    }
    cmd = ["monailabel", "start_server", "--app", str(APP), "--studies", str(studies_dir)]
    cmd += ["--conf", "models", ",".join(BUNDLES), "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", studies, proc, log)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{srv.tail()}"
            assert time.time() < deadline, f"server not ready after 180 s:\n{srv.tail()}"
            try:
                if requests.get(srv.url + "/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        yield srv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the monailabel script, uvicorn and any scoring/train subprocess
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    with pytest.raises(requests.ConnectionError):  # stopped: nothing listens on the port any more
        requests.get(srv.url + "/info/", timeout=5)


def channel_labels(name: str) -> dict[str, int]:
    meta = json.loads((BUNDLES[name] / "configs" / "metadata.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {v.lower(): int(k) for k, v in channels.items() if v.lower() != "background"}


def test_info_lists_every_bundle_with_its_labels(server):
    info = server.get("/info/").json()
    assert sorted(info["models"]) == sorted(BUNDLES)
    for name, model in info["models"].items():
        assert model["labels"] == channel_labels(name)
        assert model["dimension"] in (2, 3)
    assert sorted(info["trainers"]) == sorted(BUNDLES)
    assert "diffusion_uncertainty" in info["scoring"] and "diffusion_uncertainty" in info["strategies"]


@pytest.fixture(scope="module")
def inferred(server):
    """Every bundle on its real study with :data:`FAST` sampling: (result JSON, label, label affine)."""
    return {name: server.infer(name, STUDIES[DIMS[name]][0], fast_params(name)) for name in BUNDLES}


@pytest.mark.parametrize("name", list(BUNDLES))
def test_infer_returns_a_label_of_the_study_shape(server, inferred, name):
    result, label, affine = inferred[name]
    study = LoadImage(image_only=True)(str(server.studies[STUDIES[DIMS[name]][0]]))
    assert label.shape == tuple(study.shape)
    assert set(np.unique(label).astype(int)) <= {0, *channel_labels(name).values()}
    np.testing.assert_allclose(affine, np.asarray(study.affine), atol=1e-3)
    assert result["diffusion"]["sampling"] == {**result["diffusion"]["sampling"], **fast_params(name)}
    assert result["diffusion"]["weights"] == str(BUNDLES[name] / "models" / "model.pt")


@pytest.mark.parametrize("name", [n for n in BUNDLES if "num_inference_steps" in fast_params(n)])
def test_a_request_changing_steps_takes_effect(server, inferred, name):
    """1 step vs the fixture's 2 (same seed, same noise): the network reports 1 step and the label changes."""
    result, label, _ = server.infer(name, STUDIES[DIMS[name]][0], {**fast_params(name), "num_inference_steps": 1})
    assert result["diffusion"]["sampling"]["num_inference_steps"] == 1
    assert inferred[name][0]["diffusion"]["sampling"]["num_inference_steps"] == 2
    assert (label != inferred[name][1]).any()


def expected_score(name: str, study: Path, params: dict) -> float:
    """The bundle run in this process on ``study``: mean over voxels of the class-averaged std of the ensemble."""
    root = BUNDLES[name]
    with bundle_imports(root):
        defaults = bundle_parser(root).get("displayable_configs")
        n = params["num_samples"]
        seeds = [None] if "num_samples" in defaults else [params.get("seed", 0) + i for i in range(n)]
        probs, maps = [], []
        for seed in seeds:
            configs = {**defaults, **params, **({} if seed is None else {"seed": seed})}
            configs = {k: v for k, v in configs.items() if k in defaults}
            parser = bundle_parser(root, displayable_configs=configs, device="cpu")
            image = parser.get_parsed_content("preprocessing")({"image": str(study)})["image"][None]
            net = parser.get_parsed_content("network_def")
            net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
            net.eval()
            inferer = parser.get_parsed_content("inferer")
            if seed is not None:  # seed ensemble of a network that returns class logits
                with torch.no_grad():
                    probs.append(inferer(image, net)[0].float().softmax(0))
                continue
            hook = net.register_forward_hook(lambda m, a, o: maps.append(m.last_uncertainty.std.mean(1).flatten()))
            with torch.no_grad():
                inferer(image, net)
            hook.remove()
            if not maps:  # window-consistent: one call over the whole image, no forward()
                maps.append(net.last_uncertainty.std.mean(1).flatten())
    if probs:
        return float(torch.stack(probs).std(0, correction=0).mean())
    return float(torch.cat(maps).mean())


def test_active_learning_serves_the_study_with_the_highest_disagreement(server):
    params = {"num_samples": 2, "num_inference_steps": 2, "seed": 0}
    r = server.post("/scoring/diffusion_uncertainty", json=params)  # a background task, as clients start it
    assert r.status_code == 200, r.text
    deadline = time.time() + 600
    while (status := server.get("/scoring/").json())["status"] not in ("DONE", "ERROR"):
        assert time.time() < deadline, server.tail()
        time.sleep(2)
    assert status["status"] == "DONE", status
    info = {s: server.get(f"/datastore/image/info?image={s}").json()["diffusion_uncertainty"] for s in server.studies}
    for name in BUNDLES:
        own, other = STUDIES[DIMS[name]], STUDIES[5 - DIMS[name]]
        for study in other:
            if study in info:  # a study of the other dimensionality: recorded as not scorable
                assert info[study][name]["score"] is None and "cannot take this image" in info[study][name]["error"]
        ps = {k: v for k, v in params.items() if k in fast_params(name) or k == "num_samples"}
        expected = {s: expected_score(name, server.studies[s], ps) for s in own}
        got = {s: info[s][name]["score"] for s in own}
        for s in own:
            assert got[s] == pytest.approx(expected[s], rel=1e-4), (name, s, got, expected)
        hi, lo = sorted(own, key=expected.get, reverse=True)
        assert expected[hi] > 1.01 * expected[lo], (name, expected)  # a real gap, not a tie decided by noise
        answer = server.post("/activelearning/diffusion_uncertainty", json={"model": name})
        assert answer.status_code == 200, answer.text
        assert answer.json()["id"] == hi, (name, expected)
        assert answer.json()["score"] == pytest.approx(expected[hi], rel=1e-4)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, tmp_path):
    name = next(iter(BUNDLES))
    real = STUDIES[DIMS[name]][0]
    assert server.post(f"/infer/{name}?image=no_such_study").status_code == 404
    assert server.post(f"/infer/no_such_model?image={real}").status_code == 404
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not a NIfTI at all" * 10)
    with open(corrupt, "rb") as f:
        r = server.put("/datastore/image?image=corrupt", files={"file": ("corrupt.nii.gz", f)})
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"]
    assert "corrupt" not in server.get("/datastore/?output=all").json()["objects"]
    with open(corrupt, "rb") as f:
        r = server.post(f"/infer/{name}", files={"file": ("corrupt.nii.gz", f), "params": (None, "{}")})
    assert r.status_code == 422
    knobs = fast_params(name)
    if knobs:
        key = next(iter(knobs))
        r = server.post(f"/infer/{name}?image={real}", files={"params": (None, json.dumps({key: "many"}))})
        assert r.status_code == 422 and key in r.json()["detail"]
    wrong = STUDIES[5 - DIMS[name]][0]
    if wrong in server.studies:
        assert server.post(f"/infer/{name}?image={wrong}").status_code == 422
    assert server.post("/activelearning/diffusion_uncertainty", json={"model": "no_such_model"}).status_code == 422
    assert server.get("/info/").status_code == 200
    result, label, _ = server.infer(name, real, fast_params(name))  # still serving
    assert label.size > 0 and result["diffusion"]["bundle"] == name


TRAINED = "recycling_ddpm_3d_segmentation"


@pytest.mark.skipif(TRAINED not in BUNDLES, reason=f"{TRAINED} not in bundles/")
def test_training_fine_tunes_outside_the_bundle_and_inference_uses_it(server, tmp_path):
    """One epoch of the bundle's train.json on a real label (TotalSegmentator classes mapped by the bundle)."""
    root = BUNDLES[TRAINED]
    raw = nib.load(data_path("totalsegmentator/example_seg_fast_force_split.nii.gz"))
    affine = raw.affine.copy()
    affine[:3, 3] += raw.affine[:3, :3] @ [s.start for s in CT_BOX]
    nib.save(nib.Nifti1Image(np.asarray(raw.dataobj)[CT_BOX].astype(np.int16), affine), tmp_path / "raw.nii.gz")
    with bundle_imports(root):
        from scripts.prepare_data import remap  # the bundle's own TotalSegmentator → bundle class mapping

        counts = remap(tmp_path / "raw.nii.gz", tmp_path / "label.nii.gz")
    assert sum(counts.values()) > 1000, counts
    with open(tmp_path / "label.nii.gz", "rb") as f:
        r = server.put("/datastore/label?image=ct_crop&tag=final", files={"label": ("ct_crop.nii.gz", f)})
    assert r.status_code == 200, r.text
    shipped = torch.load(root / "models" / "model.pt", weights_only=True)
    r = server.post(f"/train/{TRAINED}?run_sync=true", json={"max_epochs": 1, "val_split": 0})
    assert r.status_code == 200, server.tail()
    tuned_path = server.studies["ct_crop"].parent / ".diffseg_finetune" / TRAINED / "model.pt"
    tuned = torch.load(tuned_path, weights_only=True)  # a plain state_dict
    assert tuned.keys() == shipped.keys()
    assert any(not torch.equal(tuned[k], shipped[k]) for k in shipped)
    assert all(torch.equal(v, shipped[k]) for k, v in torch.load(root / "models" / "model.pt").items())  # untouched
    result, _, _ = server.infer(TRAINED, "air", fast_params(TRAINED))
    assert result["diffusion"]["weights"] == str(tuned_path)
