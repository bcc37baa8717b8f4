"""A run's folder, its files and the command line's checks: a checkpoint never runs code,
one run per folder, settings refused before any work, figures that leave matplotlib alone."""

import fcntl
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from maskformer_fast.cli import main
from maskformer_fast.train import Config, RunError, evaluate_run, load_checkpoint, train
from test_train import child_env

SMALL = dict(steps=2, batch_size=2, dim=16, layers=1, queries=4, eval_images=8, checkpoint_every=2)
SMALL_ARGS = ["--steps", "2", "--batch-size", "2", "--dim", "16", "--layers", "1", "--queries", "4",
              "--eval-images", "8"]


class RunsCode:
    """Unpickled, it runs a shell command: what a hostile checkpoint holds."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_checkpoint_never_runs_code(tmp_path, command):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    run.mkdir()
    path = run / ("evil.pt" if command == "eval" else "checkpoint.pt")
    torch.save({"config": {}, "model": RunsCode(f"touch {shlex.quote(str(marker))}")}, path)
    argv = ["eval", str(path)] if command == "eval" else ["train", "--out", str(run), "--resume"]
    with pytest.raises(SystemExit, match=rf"{re.escape(str(path))} is not a maskformer_fast checkpoint \(refused"):
        main(argv)
    assert not marker.exists()
    if command == "eval":
        assert os.listdir(run) == ["evil.pt"]  # no eval/ folder, nothing written


@pytest.mark.parametrize("content", ["text", "no config", "not a model", "missing", "folder"])
def test_eval_names_a_file_that_is_no_checkpoint(tmp_path, content):
    path = tmp_path / "file.pt"
    if content == "text":
        path.write_text("hello\n")
    elif content == "no config":
        torch.save({"model": {}}, path)
    elif content == "not a model":
        torch.save({"config": {}, "model": {"weight": torch.zeros(3)}}, path)
    elif content == "folder":
        path.mkdir()
    with pytest.raises(SystemExit, match=re.escape(str(path))):
        main(["eval", str(path)])
    assert sorted(os.listdir(tmp_path)) == (["file.pt"] if content != "missing" else [])


def test_a_folder_holds_one_run(tmp_path):
    """A fresh run into another run's folder is refused; --overwrite starts it clean."""
    out = tmp_path / "run"
    train(Config(**SMALL), str(out), evaluate_at_end=False, progress=False)
    log = (out / "log.jsonl").read_bytes()
    with pytest.raises(SystemExit, match=rf"{re.escape(str(out))} holds another run .*--overwrite"):
        main(["train", "--out", str(out), *SMALL_ARGS])
    assert (out / "log.jsonl").read_bytes() == log
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text("{}")  # an eval of the old run
    (out / ".checkpoint-old.tmp").write_bytes(b"torn")  # of a killed process
    main(["train", "--out", str(out), "--overwrite", *SMALL_ARGS, "--steps", "1"])
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1]
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 1
    assert json.load(open(out / "metrics.json"))["steps"] == 1
    assert sorted(os.listdir(out)) == sorted([".lock", "checkpoint.pt", "log.jsonl", "metrics.json",
                                              "queries.png", "instances.png", "loss.png", "eval"])
    assert os.listdir(out / "eval") == []
    with pytest.raises(SystemExit, match="not both"):
        main(["train", "--out", str(out), "--overwrite", "--resume", *SMALL_ARGS])


def test_a_second_process_is_kept_out(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running process holds it
    try:
        with pytest.raises(RunError, match="in use by another"):
            train(Config(**SMALL), str(out), progress=False)
    finally:
        os.close(fd)
    assert os.listdir(out) == [".lock"]


def test_eval_leaves_the_training_run_alone(tmp_path):
    run = tmp_path / "run"
    train(Config(**SMALL), str(run), progress=False)
    metrics = (run / "metrics.json").read_bytes()
    main(["eval", str(run / "checkpoint.pt"), "--eval-images", "4"])
    assert (run / "metrics.json").read_bytes() == metrics
    assert set(json.load(open(run / "eval" / "metrics.json"))) >= {"AP", "AP50", "AP75", "AR100"}
    assert (run / "eval" / "queries.png").exists()
    with pytest.raises(SystemExit, match="holds a training run"):
        main(["eval", str(run / "checkpoint.pt"), "--out", str(run)])
    assert (run / "metrics.json").read_bytes() == metrics


@pytest.mark.parametrize("args", [["--steps", "0"], ["--steps", "-5"], ["--queries", "0"],
                                  ["--checkpoint-every", "0"], ["--batch-size", "0"], ["--layers", "0"],
                                  ["--eval-images", "0"], ["--dim", "24"], ["--mask-loss", "dice"]])
def test_train_refuses_bad_settings_before_any_work(tmp_path, args):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=args[0]):
        main(["train", "--out", str(out), *SMALL_ARGS, *args])
    assert not out.exists()


def test_options_alone_go_to_train(tmp_path):
    """`maskformer-fast --steps 0` is `maskformer-fast train --steps 0` (scripts/main.sh passes
    its arguments on): refused as train refuses it, not as an unknown command."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--steps"):
        main(["--out", str(out), *SMALL_ARGS, "--steps", "0"])
    assert not out.exists()


def test_eval_refuses_no_images(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "checkpoint.pt"), "--eval-images", "0"])
    assert "--eval-images: must be >= 1" in capsys.readouterr().err


def test_fewer_held_out_images_than_the_figures_show(tmp_path):
    train(Config(**dict(SMALL, eval_images=2)), str(tmp_path), progress=False)
    for name in ("metrics.json", "queries.png", "instances.png", "loss.png"):
        assert (tmp_path / name).exists(), name


def test_metrics_are_written_before_the_figures(tmp_path, monkeypatch):
    import maskformer_fast.figures

    def fail(*args):
        raise RuntimeError("no figures today")

    monkeypatch.setattr(maskformer_fast.figures, "draw_all", fail)
    from maskformer_fast.model import MaskFormer

    model = MaskFormer(1, 4, 16, 4, 1)
    with pytest.raises(RuntimeError, match="no figures"):
        evaluate_run(model, Config(**dict(SMALL, eval_images=2)), str(tmp_path))
    assert set(json.load(open(tmp_path / "metrics.json"))) >= {"AP", "AR100"}


def test_figures_leave_the_users_backend_alone(tmp_path):
    code = ("import matplotlib, sys\n"
            "from maskformer_fast.figures import loss_curve\n"
            "loss_curve([1.0, 0.5], sys.argv[1])\n"
            "print(matplotlib.get_backend())\n")
    png = tmp_path / "loss.png"
    out = subprocess.run([sys.executable, "-c", code, str(png)], capture_output=True, text=True,
                         timeout=300, env=dict(child_env(), MPLBACKEND="svg"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
