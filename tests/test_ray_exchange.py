"""The data stages on a cluster node that cannot see the project folder, through the S3 exchange.

The two-node cluster of tests/test_ray_cluster.py, but its worker node (the only one with
CPUs, so every task runs there) sees the project folder empty, as a node on another machine
would: harmonize, encode-latents, extract-factors and synthesize then get their inputs and
return their outputs only through ``ray.exchange`` on the moto S3 endpoint (one site's raw
cases are on S3 itself, and its tasks read them there). Their outputs must
equal a run of the same stages in one process, and without the exchange the node cannot read a case.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from meduet.artifacts.synthesis import read_synthesis
from meduet.artifacts.vae import save_vae
from meduet.config import MeduetConfig, Paths
from meduet.data.latents import read_manifest as read_latents
from meduet.data.latents import read_scale
from meduet.harmonize.manifest import read_manifest
from meduet.io.images import sha256_file
from meduet.models.architectures import VAE_PRESETS
from meduet.models.vae import build_vae
from meduet.stages import encode_latents, extract_factors, harmonize, synthesize
from tests.harmonize.synth import phantom, write_msd
from tests.stages.test_factors import _save_tiny_model
from tests.stages.test_synthesize import _config as synthesis_config
from tests.stages.test_synthesize import _project as synthesis_project
from tests.test_ray_cluster import REPO, TIMEOUT_S, can_hide, ray_cluster

CASES = 6
SITES = ("site_a", "site_b")
HARMONIZE = {"target_spacing": [2.0, 2.0, 2.0], "min_size": [16, 16, 16], "divisible_by": 16}


def _project(root: Path, params: dict[str, Any]) -> tuple[MeduetConfig, Paths]:
    """Raw cases of two sites (one of them truncated) and ``params.yaml``."""
    datasets = []
    for index, site in enumerate(SITES):
        cases = {f"case_{i}": phantom(seed=10 * index + i) for i in range(CASES // 2)}
        write_msd(root / "raw" / site, cases)
        datasets.append({"name": site, "root": f"raw/{site}", "domain": site})
    broken = root / "raw" / SITES[0] / "imagesTr" / "case_0.nii.gz"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 3])
    tree = {"harmonize": {**HARMONIZE, "datasets": datasets, **params.pop("harmonize", {})}, **params}
    (root / "params.yaml").write_text(yaml.safe_dump(tree))
    cfg = MeduetConfig.model_validate(tree)
    return cfg, Paths.resolve(cfg, root)


def _save_vae(paths: Paths) -> None:
    torch.manual_seed(0)
    save_vae(paths.models / "vae" / "vae.pt", state=build_vae(VAE_PRESETS["tiny"]).state_dict(),
             architecture=VAE_PRESETS["tiny"], config={}, train_cases=[], held_out_cases=["site_b__case_2"])


def _after_encoding(paths: Paths) -> None:
    _save_tiny_model(paths, list(SITES), read_scale(paths.latents))


@pytest.mark.services
def test_data_stages_on_a_node_without_the_project_folder_match_a_local_run(s3_server: Any, tmp_path: Path) -> None:
    if not can_hide():
        pytest.skip("this machine allows no unprivileged user and mount namespaces to hide a folder from a node")
    exchange = f"s3://{s3_server.bucket}/exchange"
    on_cluster = {"ray": {"exchange": exchange}, "storage": {"s3_endpoint_url": s3_server.endpoint_url},
                  "harmonize": {"executor": "ray", "workers": 2},
                  "encode_latents": {"workers": 2}, "extract_factors": {"workers": 2}}
    _, paths = _project(tmp_path / "cluster", on_cluster)
    # The cluster project's second site lives on S3: its tasks read the raw cases there, not from the exchange.
    fs = s3_server.filesystem()
    on_s3 = paths.root / "raw" / SITES[1]
    fs.put(f"{on_s3}/", f"{s3_server.bucket}/raw/{SITES[1]}/", recursive=True)
    raw_on_s3 = {sha256_file(file) for file in (on_s3 / "imagesTr").glob("*.nii.gz")}  # (labels: same bytes)
    raw_local = {sha256_file(file) for file in (paths.root / "raw" / SITES[0] / "imagesTr").glob("*.nii.gz")}
    shutil.rmtree(on_s3)
    tree = yaml.safe_load((paths.root / "params.yaml").read_text())
    tree["harmonize"]["datasets"][1]["root"] = f"s3://{s3_server.bucket}/raw/{SITES[1]}"
    (paths.root / "params.yaml").write_text(yaml.safe_dump(tree))
    blind, blind_paths = _project(tmp_path / "blind", {"harmonize": {"executor": "ray", "workers": 2}})
    local_cfg, local = _project(tmp_path / "local", {"harmonize": {"workers": 1}, "encode_latents": {"workers": 1},
                                                     "extract_factors": {"workers": 1}})

    # A project with a (random) DiT for synthesize; params.yaml hands its tasks over through the exchange.
    synthesis = synthesis_project(tmp_path / "synthesis", synthesis_config())
    tree = synthesis_config().model_dump(mode="json")
    tree["ray"].update(exchange=exchange)
    tree["storage"].update(s3_endpoint_url=s3_server.endpoint_url)
    (synthesis.root / "params.yaml").write_text(yaml.safe_dump(tree))

    with ray_cluster(s3_server.env, hidden=tmp_path) as cluster:
        env = {**cluster.driver_env, **s3_server.env}

        def stage(name: str, project: Path) -> None:
            args = [sys.executable, "-m", "meduet.cli", name, "--params", str(project / "params.yaml")]
            done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
            assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

        stage("harmonize", paths.root)
        _save_vae(paths)
        stage("encode-latents", paths.root)
        _after_encoding(paths)
        stage("extract-factors", paths.root)
        stage("synthesize", synthesis.root)
        # The same cases without the exchange: the node cannot open one (a node of another machine).
        args = [sys.executable, "-m", "meduet.cli", "harmonize", "--params", str(blind_paths.root / "params.yaml")]
        subprocess.run(args, cwd=REPO, env=env, capture_output=True, timeout=TIMEOUT_S)
    blind_metrics = json.loads((blind_paths.reports / "harmonize" / "metrics.json").read_text())
    assert (blind_metrics["ok"], blind_metrics["executor"]) == (0, "ray"), blind_metrics
    assert all("No such file" in r.reason or "not found" in r.reason or "cannot" in r.reason
               for r in read_manifest(blind_paths.harmonized / "manifest.csv")), "the node saw the project folder"
    del blind

    # The same stages in this process, on the same inputs.
    harmonize.run(local_cfg.harmonize, local)
    _save_vae(local)
    encode_latents.run(local_cfg.encode_latents, local, local_cfg.ray)
    _after_encoding(local)
    extract_factors.run(local_cfg.extract_factors, local, local_cfg.ray)

    records = {r.key: r for r in read_manifest(paths.harmonized / "manifest.csv")}
    want = {r.key: r for r in read_manifest(local.harmonized / "manifest.csv")}
    assert sorted(records) == sorted(want) and sum(r.status == "ok" for r in records.values()) == CASES - 1
    exchanged = {key.rsplit("/", 1)[1] for key in fs.find(f"{s3_server.bucket}/exchange")}
    assert raw_local <= exchanged and not raw_on_s3 & exchanged  # a local site's raw cases went through it
    for key, record in records.items():
        assert (record.status, record.image_sha256, record.label_sha256) == \
            (want[key].status, want[key].image_sha256, want[key].label_sha256), key
        if record.status == "ok":
            assert (paths.harmonized / record.image).read_bytes() == (local.harmonized / record.image).read_bytes()
            assert record.image_sha256 in exchanged
        else:
            assert str(paths.root / "raw" / SITES[0]) in record.reason  # named as the driver knows it
    latents = read_latents(paths.latents)
    assert [r.key for r in latents] == [r.key for r in read_latents(local.latents)] and len(latents) == CASES - 1
    for record in latents:
        assert np.array_equal(np.load(paths.latents / record.latent), np.load(local.latents / record.latent))
    assert read_scale(paths.latents) == read_scale(local.latents)
    with np.load(paths.factors / "factors.npz") as got, np.load(local.factors / "factors.npz") as expected:
        assert sorted(got.files) == sorted(expected.files)
        for name in expected.files:
            if expected[name].dtype.kind == "f":
                np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(got[name], expected[name], err_msg=name)

    # synthesize: the images of one process (each image has its own seed, whatever runs it).
    single = synthesis_config(workers=1)
    reference = synthesis_project(tmp_path / "synthesis_local", single)
    synthesize.run(single.synthesize, reference, single.ray)
    made, _ = read_synthesis(synthesis.synthesis)
    assert [r.key for r in made] == [r.key for r in read_synthesis(reference.synthesis)[0]] and len(made) == 6
    for record in made:
        np.testing.assert_allclose(np.load(synthesis.synthesis / record.latent),
                                   np.load(reference.synthesis / record.latent), rtol=1e-5, atol=1e-5)
        assert (synthesis.synthesis / record.image).is_file()
