"""Ctrl-C during `chatforge sweep`: it ended with click's bare "Aborted!", nothing of what was kept or how to go on.
Now it exits 130 with one line: how many trials the study keeps and where (the same command continues it), and the
interrupted trial's incomplete run folder."""

from __future__ import annotations

from tests.training.sweep_helpers import write_tiny_sweep
from typer.testing import CliRunner

import chatforge.training.sweep as sweep_mod
from chatforge.cli import app


def test_ctrl_c_in_the_second_trial_says_what_the_study_keeps(tmp_path, monkeypatch):
    import optuna

    write_tiny_sweep(tmp_path, "h5-ctrl-c", "s.yaml")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    real = sweep_mod.run_experiment
    calls = []

    def interrupted_second(cfg, run_dir, **kw):
        calls.append(run_dir)
        if len(calls) == 2:
            run_dir.mkdir(parents=True)  # the trial had started writing its run
            raise KeyboardInterrupt
        return real(cfg, run_dir=run_dir, **kw)

    monkeypatch.setattr(sweep_mod, "run_experiment", interrupted_second)
    sweep_dir = tmp_path / "sw"
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "c.yaml"), "--space", str(tmp_path / "s.yaml"),
                                 "--trials", "3", "--storage", storage, "--out", str(sweep_dir)])
    assert r.exit_code == 130, (r.output, r.exception)
    out = " ".join(r.output.split())
    assert "interrupted; study 'h5-ctrl-c-sweep' keeps its 1 completed trial(s) in " in out
    assert "the same command continues it" in out and f"{sweep_dir / 'trial-1'} is the interrupted trial" in out
    study = optuna.load_study(study_name="h5-ctrl-c-sweep", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
