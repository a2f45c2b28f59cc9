"""`gsd-wsi pretrain`: the loss falls, DDP agrees, resume is exact, bad input is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gsd_wsi.cli.main import app
from gsd_wsi.errors import ConfigError, RunFolderError, StoreError, TrainingDivergedError
from gsd_wsi.stages.pretrain import run_pretrain
from gsd_wsi.train.pretrain_config import PretrainConfig
from gsd_wsi.stages.tile_batch import run_tile
from gsd_wsi.stages.tile_config import TileConfig
from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide
from gsd_wsi.train.checkpoint import CheckpointError, list_checkpoints

FAST = dict(model="tiny", image_size=32, batch_size=8, num_workers=0, lr=1e-3, log_every=2, val_every=4,
            sample_every=1000, checkpoint_every=4, sample_steps=4, n_samples=2, val_patches=32)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two slides tiled at 32 px: two stores, so one slide is held out for validation."""
    root = tmp_path_factory.mktemp("pretrain-data")
    for seed in (1, 2):
        write_synthetic_slide(root / "slides" / f"s{seed}.svs",
                              SyntheticSlideSpec(width_px=2048, height_px=1536, mpp=0.5, seed=seed))
    results = run_tile([root / "slides"], root / "tiles", TileConfig(tile_px=32, stain="none"))
    assert all(r.status == "ok" for r in results)
    return root / "tiles"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _val_losses(run: Path) -> list[float]:
    return [m["val_loss"] for m in _metrics(run) if "val_loss" in m]


def test_loss_falls_and_run_folder_is_complete(stores: Path, tmp_path: Path) -> None:
    """The validation loss (fixed noise, fixed t, EMA model) falls within a few dozen steps."""
    config = PretrainConfig(**FAST | {"steps": 40, "sample_every": 40, "init": "pytorch"})
    paths = run_pretrain([stores], tmp_path / "run", config)
    val = _val_losses(paths.root)
    assert len(val) == 10 and val[-1] < 0.85 * val[0]
    assert len([m for m in _metrics(paths.root) if "loss" in m]) == 20
    assert (paths.root / "loss.png").is_file()
    assert (paths.samples / "samples-00000040.png").is_file() and (paths.samples / "denoise-00000040.png").is_file()
    assert (paths.model / "model.safetensors").is_file() and (paths.root / "checkpoints" / "best").is_dir()
    assert [s for s, _ in list_checkpoints(paths.root / "checkpoints")] == [32, 36, 40]  # keep_last 3
    saved = json.loads((paths.root / "config.json").read_text())
    assert saved["pretrain"]["steps"] == 40 and len(saved["val_slides"]) == 1


def test_loss_falls_with_the_reference_init_too(stores: Path, tmp_path: Path) -> None:
    """The faithful init (conv and GroupNorm weights ~ N(0, 0.01)) learns, but slowly."""
    paths = run_pretrain([stores], tmp_path / "run", PretrainConfig(**FAST | {"steps": 60, "lr": 3e-3, "init": "reference"}))
    val = _val_losses(paths.root)
    assert val[-1] < 0.98 * val[0] and val[-1] == min(val)


def test_checkpoint_rebuilds_the_model(stores: Path, tmp_path: Path) -> None:
    from gsd_wsi.nn.unet import UNet, UNetConfig
    from gsd_wsi.train.checkpoint import load_model_json, load_weights

    paths = run_pretrain([stores], tmp_path / "run", PretrainConfig(**FAST | {"steps": 4}))
    info = load_model_json(paths.model)
    model = UNet(UNetConfig.from_dict(info["model"]))
    model.load_state_dict(load_weights(paths.model))
    x = torch.zeros(1, 3, 32, 32)
    assert model(x, torch.zeros(1, dtype=torch.long)).shape == (1, 3, 32, 32)
    assert info["schedule"]["kind"] == "quadratic" and info["image_size"] == 32


def _raw_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def test_resume_is_exact(stores: Path, tmp_path: Path) -> None:
    """8 steps straight == 4 steps, stop, resume to 8 (same weights, to float tolerance)."""
    straight = run_pretrain([stores], tmp_path / "a", PretrainConfig(**FAST | {"steps": 8}))
    run_pretrain([stores], tmp_path / "b", PretrainConfig(**FAST | {"steps": 4}))
    resumed = run_pretrain([stores], tmp_path / "b", PretrainConfig(**FAST | {"steps": 8}), resume=True)
    a, b = _raw_weights(straight.root, 8), _raw_weights(resumed.root, 8)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    steps = [m["step"] for m in _metrics(resumed.root) if "loss" in m]
    assert steps == [2, 4, 6, 8]  # no duplicated lines after the resume
    # A resume in the middle of a logging window still logs the mean of the steps it ran.
    run_pretrain([stores], tmp_path / "c", PretrainConfig(**FAST | {"steps": 3, "log_every": 4, "checkpoint_every": 3}))
    run_pretrain([stores], tmp_path / "c", PretrainConfig(**FAST | {"steps": 8, "log_every": 4, "checkpoint_every": 3}),
                 resume=True)
    every = run_pretrain([stores], tmp_path / "d", PretrainConfig(**FAST | {"steps": 8, "log_every": 1,
                                                                            "checkpoint_every": 8}))
    per_step = {m["step"]: m["loss"] for m in _metrics(every.root) if "loss" in m}
    mid = {m["step"]: m["loss"] for m in _metrics(tmp_path / "c") if "loss" in m}
    assert mid[4] == pytest.approx(per_step[4], rel=1e-4)  # the window after the resume held step 4 alone
    assert mid[8] == pytest.approx(np.mean([per_step[s] for s in (5, 6, 7, 8)]), rel=1e-4)


def test_two_process_ddp_identical_weights_rank0_writes(stores: Path, tmp_path: Path) -> None:
    paths = run_pretrain([stores], tmp_path / "run", PretrainConfig(**FAST | {"steps": 6, "checkpoint_every": 3}),
                         nproc=2)
    logged = [m["step"] for m in _metrics(paths.root) if "loss" in m]
    assert logged == [2, 4, 6]  # one writer: no line twice
    # Every rank saved its own noise generator in the checkpoint; their weights are DDP-synchronised.
    state = torch.load(paths.root / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["noise_generators"]) == 2
    assert not torch.equal(state["noise_generators"][0], state["noise_generators"][1])


def test_ddp_ranks_hold_identical_weights(stores: Path, tmp_path: Path) -> None:
    from gsd_wsi.train.ddp import launch

    out = tmp_path / "weights"
    out.mkdir()
    launch(2, _train_and_dump, stores, tmp_path / "run", out)
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert not list((tmp_path / "run").glob("rank*"))


def _train_and_dump(stores: Path, run_dir: Path, out: Path) -> None:
    """Run in each of 2 processes: a few DDP steps, then each rank dumps its weights."""
    from gsd_wsi.nn.schedule import NoiseSchedule, ScheduleConfig
    from gsd_wsi.nn.unet import UNet, unet_config
    from gsd_wsi.stages.pretrain import model_json
    from gsd_wsi.train.data import find_stores, index_patches
    from gsd_wsi.train.ddp import init_distributed, teardown
    from gsd_wsi.train.pretrain_loop import PretrainLoop, RunPaths

    config = PretrainConfig(**FAST | {"steps": 3})
    ctx = init_distributed("cpu")
    try:
        torch.manual_seed(ctx.rank)  # different initial weights: DDP must make them equal
        model = UNet(unet_config("tiny"))
        run_dir.mkdir(parents=True, exist_ok=True)
        loop = PretrainLoop(ctx, config, model, NoiseSchedule(ScheduleConfig()),
                            index_patches(find_stores([stores]), config.val_fraction), RunPaths(run_dir),
                            model_json(config))
        loop.run(None)
        torch.save(loop.model.state_dict(), out / f"rank{ctx.rank}.pt")
    finally:
        teardown()


def test_nan_loss_stops_with_a_clear_error(stores: Path, tmp_path: Path, monkeypatch) -> None:
    from gsd_wsi.train import pretrain_loop

    original = pretrain_loop.PretrainLoop._loss

    def poisoned(self, model, x0, generator):
        loss = original(self, model, x0, generator)
        return loss * float("nan") if self.step >= 5 else loss

    monkeypatch.setattr(pretrain_loop.PretrainLoop, "_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="last good checkpoint is .*step-00000004"):
        run_pretrain([stores], tmp_path / "run", PretrainConfig(**FAST | {"steps": 10}))
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [4]


def test_run_folder_guards(stores: Path, tmp_path: Path) -> None:
    config = PretrainConfig(**FAST | {"steps": 2})
    run_pretrain([stores], tmp_path / "run", config)
    with pytest.raises(RunFolderError, match="--resume"):
        run_pretrain([stores], tmp_path / "run", config)
    with pytest.raises(RunFolderError, match="lr: run has 0.001, now 0.01"):
        run_pretrain([stores], tmp_path / "run", PretrainConfig(**FAST | {"steps": 4, "lr": 1e-2}), resume=True)
    run_pretrain([stores], tmp_path / "run", PretrainConfig(**FAST | {"steps": 2, "lr": 1e-2}), overwrite=True)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pretrain"]["lr"] == 1e-2


def test_corrupt_checkpoint_on_resume(stores: Path, tmp_path: Path) -> None:
    run_pretrain([stores], tmp_path / "run", PretrainConfig(**FAST | {"steps": 4}))
    (tmp_path / "run" / "checkpoints" / "step-00000004" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt training state"):
        run_pretrain([stores], tmp_path / "run", PretrainConfig(**FAST | {"steps": 8}), resume=True)


def test_bad_inputs(stores: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="gsd-wsi tile"):
        run_pretrain([empty], tmp_path / "run", PretrainConfig(**FAST))
    with pytest.raises(StoreError):
        run_pretrain([], tmp_path / "run", PretrainConfig(**FAST))
    with pytest.raises(ConfigError, match="CPU cores"):
        run_pretrain([stores], tmp_path / "run", PretrainConfig(**FAST), nproc=(os.cpu_count() or 1) + 1)
    with pytest.raises(ConfigError, match="unknown setting"):
        PretrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="model"):
        PretrainConfig(model="huge")  # type: ignore[arg-type]


def test_cli_end_to_end_with_yaml(stores: Path, tmp_path: Path) -> None:
    config = tmp_path / "pretrain.yaml"
    config.write_text("model: tiny\nimage-size: 32\nbatch_size: 8\nnum_workers: 0\nsample_steps: 4\nn_samples: 2\n")
    result = CliRunner().invoke(app, ["pretrain", str(stores), "-o", str(tmp_path / "run"), "--config", str(config),
                                      "--steps", "4", "--sample-every", "4"])
    assert result.exit_code == 0, result.output
    assert "pretrained model" in result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["pretrain"]
    assert saved["steps"] == 4 and saved["model"] == "tiny" and saved["image_size"] == 32
    again = CliRunner().invoke(app, ["pretrain", str(stores), "-o", str(tmp_path / "run"), "--config", str(config),
                                     "--steps", "4"])
    assert again.exit_code == 2 and "--resume" in again.output


def test_sigkill_then_resume(stores: Path, tmp_path: Path) -> None:
    """kill -9 in the middle of a run, then --resume: the run finishes from its last checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = [sys.executable, "-m", "gsd_wsi", "-q", "pretrain", str(stores), "-o", str(run), "--model", "tiny",
            "--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--checkpoint-every", "2",
            "--sample-every", "1000", "--steps", "400"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list_checkpoints(run / "checkpoints")) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list_checkpoints(run / "checkpoints"), "no checkpoint within 60 s"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = list_checkpoints(run / "checkpoints")[-1][0]
    assert killed_at < 400
    resumed = run_pretrain([stores], run, PretrainConfig(**FAST | {"steps": killed_at + 4, "checkpoint_every": 2,
                                                                   "lr": 1e-4}), resume=True)
    assert list_checkpoints(resumed.root / "checkpoints")[-1][0] == killed_at + 4
    assert (resumed.model / "model.safetensors").is_file()


def test_torchrun_two_processes(stores: Path, tmp_path: Path) -> None:
    """The same command under torchrun: rank 0 prepares the folder, one writer, one report."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    args = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "gsd_wsi", "pretrain", str(stores),
            "-o", str(tmp_path / "run"), "--model", "tiny", "--image-size", "32", "--batch-size", "4",
            "--num-workers", "0", "--steps", "4", "--sample-every", "4", "--checkpoint-every", "2"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("pretrained model:") + done.stdout.count("pretrained model:") == 1
    assert [m["step"] for m in _metrics(tmp_path / "run") if "loss" in m] == [4]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)
    assert state["world_size"] == 2
    again = subprocess.run(args[:-6] + ["--steps", "6", "--sample-every", "6", "--checkpoint-every", "2", "--resume"],
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [m["step"] for m in _metrics(tmp_path / "run") if "loss" in m] == [4, 6]
