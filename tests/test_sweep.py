"""`dcgan sweep`: the space file's checks, the schedulers' noise rules, and a PBT sweep on a
real local Ray whose exploit resumes the worse trial from the better one's checkpoint.

The ASHA sweep that is SIGKILLed and resumed runs through launch/submit.sh on a real head
(tests/test_launch.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import cli
from pipeline.checkpoint import CheckpointManager, fetch
from tests.conftest import small_config
from tests.helpers import write_config

ray = pytest.importorskip("ray")
from pipeline.sweep.schedulers import CARD_KEY, METRIC, METRIC_STD, NoiseAwareASHA, NoiseAwarePBT  # noqa: E402

STOP, CONTINUE = "STOP", "CONTINUE"


def _config(tmp_path: Path, **sections) -> Path:
    sections.setdefault("eval", {"every": 50, "num_samples": 500, "resources": {"cpus": 0.5}})
    cfg = small_config(tmp_path, run={"name": "sweep"}, runtime={"runner": "ray"}, **sections)
    return write_config(tmp_path / "sweep.yaml", cfg)


@pytest.mark.parametrize(
    "space, names",
    [
        ("train.lrr: {loguniform: [1.0e-4, 1.0e-3]}", ["train.lrr", "unknown field"]),
        ("train.lr: {loguniform: [-1.0, 1.0e-3]}", ["train.lr", "loguniform needs a low bound above 0"]),
        ("train.beta1: {uniform: [0.5, 1.5]}", ["train.beta1", "1.5", "less than 1"]),
        ("train.lr: {uniform: [1.0e-3, 1.0e-4]}", ["train.lr", "low < high"]),
        ("model.ngf: {normal: [8, 16]}", ["model.ngf", "expected one of"]),
        ("model.ngf: {choice: []}", ["model.ngf", "non-empty list"]),
        ("eval.num_samples: {choice: [100, 1000]}", ["eval.*", "provenance card"]),
        ("data.image_size: {grid: [32, 64]}", ["data.*", "reference set"]),
        ("[1, 2]", ["expected a mapping"]),
    ],
)  # fmt: skip
def test_a_bad_space_file_exits_2_naming_the_field_before_anything_starts(tmp_path: Path, capsys, space: str, names: list[str]):
    config = _config(tmp_path)
    (tmp_path / "space.yaml").write_text(space + "\n")
    assert cli.main(["sweep", "--config", str(config), "--space", str(tmp_path / "space.yaml")]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in names), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "prepared").exists()


def test_a_sweep_needs_scores_and_pbt_needs_a_learning_rate_to_perturb(tmp_path: Path, capsys):
    (tmp_path / "space.yaml").write_text("model.ngf: {grid: [8, 16]}\n")
    space = ["--space", str(tmp_path / "space.yaml")]
    assert cli.main(["sweep", "--config", str(_config(tmp_path, eval={"every": 0})), *space]) == 2
    assert "set eval.every" in capsys.readouterr().err
    assert cli.main(["sweep", "--config", str(_config(tmp_path)), *space, "--scheduler", "pbt"]) == 2
    assert "put train.lr or train.lr_d in the space" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


class _Trial(SimpleNamespace):
    """What the schedulers read of Tune's Trial."""

    __hash__ = object.__hash__

    def is_finished(self) -> bool:
        return False


def _trial(name: str) -> _Trial:
    return _Trial(trial_id=name, experiment_tag=name, config={})


def _score(step: int, fid: float, std: float, card: str = "card-a") -> dict:
    return {"step": step, METRIC: fid, METRIC_STD: std, CARD_KEY: card}


def test_asha_stops_a_trial_only_beyond_its_noise_compares_equal_cards_and_keeps_its_rungs(tmp_path: Path):
    state = str(tmp_path / "rungs.json")
    asha = NoiseAwareASHA(max_t=400, grace_period=100, reduction_factor=2, margin=1.0, state=state)
    trials = {name: _trial(name) for name in ("a", "b", "c", "d", "e")}
    for trial in trials.values():
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, trials["a"], _score(100, 100.0, 1.0)) == CONTINUE  # the first sets the cutoff
    assert asha.on_trial_result(None, trials["b"], _score(100, 104.0, 5.0)) == CONTINUE  # trails by less than its noise
    assert asha.on_trial_result(None, trials["c"], _score(100, 130.0, 5.0)) == STOP  # trails by 6 of its std
    assert asha.on_trial_result(None, trials["d"], _score(100, 500.0, 1.0, card="card-b")) == CONTINUE  # not comparable
    recorded = dict(asha._brackets[0]._rungs)[100]
    assert recorded == {"a": -100.0, "b": -104.0, "c": -130.0}  # as measured, not as judged

    resumed = NoiseAwareASHA(max_t=400, grace_period=100, reduction_factor=2, margin=1.0, state=state)
    resumed.on_trial_add(None, trials["e"])
    assert dict(resumed._brackets[0]._rungs)[100] == recorded
    assert resumed.on_trial_result(None, trials["e"], _score(100, 140.0, 2.0)) == STOP


def test_pbt_exploits_a_trial_only_when_the_upper_quantile_beats_it_beyond_the_noise():
    from ray.tune.schedulers.pbt import _PBTTrialState

    def lower_quantile(noise: float) -> list[str]:
        pbt = NoiseAwarePBT(perturbation_interval=50, hyperparam_mutations={"train.lr": [1e-3, 2e-3]})
        for name, fid in (("a", 100.0), ("b", 101.0), ("c", 150.0), ("d", 151.0)):
            trial = _trial(name)
            pbt._trial_state[trial] = _PBTTrialState(trial)  # what on_trial_add keeps of a trial
            pbt._trial_state[trial].last_score = -fid
            pbt._noise[trial] = noise
        lower, upper = pbt._quantiles()
        assert [t.trial_id for t in upper] == ["a"]
        return [t.trial_id for t in lower]

    assert lower_quantile(noise=5.0) == ["d"]  # 51 apart, noise of the difference 7
    assert lower_quantile(noise=40.0) == []  # 51 apart, noise of the difference 57: a tie


@pytest.mark.integration
@pytest.mark.ray
def test_a_pbt_exploit_resumes_the_worse_trial_from_the_better_ones_checkpoint_with_a_perturbed_lr(tmp_path: Path):
    """Two trials side by side, one with a rate that diverges (3.0). PBT copies the sane
    one's scored checkpoint into the diverged one and perturbs its rate: the checkpoints it
    writes after say where they started from, and its Adam runs at the new rate. (One worker a
    trial: with two, this test took 326 s in the suite against 190; a trial's workers are its
    Ray Trainer's, as in any Ray run.)"""
    steps = 150
    config = _config(
        tmp_path, data={"source": "digits", "image_size": 32, "channels": 1}, model={"nz": 16, "ngf": 16, "ndf": 16},
        train={"steps": steps, "global_batch_size": 32, "seed": 0, "channels_last": False},
        checkpoint={"every": 50, "keep": 2, "stop_poll_seconds": 1, "stop_check_every": 2},
        logging={"every": 25, "samples_every": steps},
    )  # fmt: skip
    (tmp_path / "space.yaml").write_text("train.lr: {grid: [3.0e-3, 3.0]}\n")
    try:
        code = cli.main(["sweep", "--config", str(config), "--space", str(tmp_path / "space.yaml"), "--scheduler", "pbt"])
    finally:
        ray.shutdown()
    assert code == 0
    sweep_dir = tmp_path / "runs" / "sweep"
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    rows = {row["trial"]: row for row in summary["trials"]}
    assert len(rows) == 2
    donor = next(row for row in rows.values() if row["overrides"] == ["train.lr=0.003"])
    (recipient,) = [row for row in rows.values() if row is not donor]
    assert float(recipient["overrides"][0].partition("=")[2]) != 3.0  # its config at the end: a perturbed rate

    run = Path(recipient["run"])
    exploited = [
        m for m in (json.loads(p.read_text()) for p in sorted(run.glob("checkpoints/step-*/manifest.json")))
        if m.get("started_from", "").startswith(donor["run"] + "/checkpoints/step-")
    ]  # fmt: skip
    assert exploited, "no checkpoint of the worse trial grew from the better one's"
    for manifest in exploited:  # each exploit perturbs the donor's 3e-3: x0.8, x1.2, or a draw in [3e-3, 3]
        lr = manifest["config"]["train"]["lr"]
        assert lr != 3.0 and 0.8 * 3e-3 - 1e-12 <= lr <= 3.0, manifest["config"]["train"]
        optimizers = torch.load(run / "checkpoints" / f"step-{manifest['step']:08d}" / "optimizers.pt", weights_only=True)
        assert [g["lr"] for net in ("generator", "discriminator") for g in optimizers[net]["param_groups"]] == [lr, lr]
    assert list(run.glob("checkpoints/abandoned-*")), "its own steps past the donor's were set aside"

    # The sweep's result: the best trial's BEST, which verifies, and one TensorBoard session
    # per trial with its rate (HParams, pointed at trials/).
    best = CheckpointManager(Path(rows[summary["best_trial"]]["run"]) / "checkpoints", None)
    assert summary["best_checkpoint"] == str(Path(rows[summary["best_trial"]]["run"]) / "checkpoints" / best.best_name())
    assert fetch(summary["best_checkpoint"]).step == rows[summary["best_trial"]]["best_step"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    rates = set()
    for row in rows.values():
        accumulator = EventAccumulator(str(Path(row["run"]) / "tb"))
        accumulator.Reload()
        content = accumulator.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]
        rates.add(metadata.parse_session_start_info_plugin_data(content).hparams["train.lr"].number_value)
    assert rates == {0.003, 3.0}  # each session as the trial started


def test_the_shipped_spaces_load_against_the_config_their_comment_names():
    import re

    from pipeline import config
    from pipeline.sweep.run import check_sweep_config
    from pipeline.sweep.space import load_space
    from tests.conftest import ROOT

    spaces = sorted((ROOT / "configs" / "spaces").glob("*.yaml"))
    assert spaces
    for space in spaces:
        command = re.search(r"dcgan sweep --config (\S+) --space (\S+)", space.read_text())
        assert command and command.group(2) == str(space.relative_to(ROOT)), space
        cfg = config.load(ROOT / command.group(1), [])
        check_sweep_config(cfg, "pbt", load_space(space, cfg))


def test_resume_needs_a_sweep_to_continue_and_its_own_space(tmp_path: Path, capsys):
    config = _config(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {grid: [1.0e-3, 2.0e-3]}\n")
    args = ["sweep", "--config", str(config), "--space", str(space)]
    assert cli.main([*args, "--resume"]) == 2
    assert "there is no sweep to continue" in capsys.readouterr().err

    sweep_dir = tmp_path / "runs" / "sweep"
    (sweep_dir / "tune").mkdir(parents=True)
    (sweep_dir / "tune" / "tuner.pkl").write_bytes(b"")
    (sweep_dir / "space.yaml").write_text("train.lr: {grid: [1.0e-3, 5.0e-3]}\n")
    assert cli.main([*args, "--resume"]) == 2
    assert "is not the space the sweep" in capsys.readouterr().err
    assert cli.main(args) == 2  # a new sweep over it
    assert "holds a sweep or a run already: --resume" in capsys.readouterr().err
