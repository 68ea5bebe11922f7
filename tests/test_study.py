"""Tests of influence_nb.study: presets, config check, atomic writes, resume under crashes, per-unit RNG, registry."""
import json, os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from influence_nb import study as S


@dataclass
class ToyConfig(S.StudyConfig):
    "Fit lines to noisy points: a few sizes and seeds."
    sizes: tuple = (6, 9)
    seeds: int = 2
    steps: int = 40
    PRESETS: ClassVar[dict] = {"quick": S.Preset("small", dict(steps=20)), "paper": S.Preset("full")}


@dataclass
class Fit(S.Record):
    key: str
    slope: float
    noise: list
    extra: float | None = None


@dataclass
class Summary(S.Record):
    config: dict
    seconds: float
    runs: list[Fit]


class Toy(S.Study):
    "A whole study: config, data, model, evaluation."
    name, help, config, unit_result, summary = "toy-test", "a toy", ToyConfig, Fit, Summary
    def data(self, cfg): return torch.linspace(-1, 1, max(cfg.sizes))
    def units(self, cfg):
        return [S.Unit(f"n{n}-s{s}", n, group=f"n{n}") for n in cfg.sizes for s in range(cfg.seeds)]
    def prepare(self, cfg, x, units, folder):       # shared work of a group: one random draw per unit still to do
        return {u.key: float(torch.rand(())) for u in units}
    def evaluate(self, cfg, x, unit, prepared, folder):
        n = unit.spec
        e = 0.1 * torch.randn(n)
        w = torch.zeros(())
        for _ in range(cfg.steps): w = w - 0.5 * 2 * ((w * x[:n] - 2 * x[:n] - e) * x[:n]).mean()
        return Fit(unit.key, float(w), e.tolist())
    def summarise(self, cfg, x, results, seconds): return Summary(cfg.to_dict(), seconds, list(results.values()))


def _runs(summary): return [(r.key, r.slope, r.noise) for r in summary.runs]


def test_presets_and_overrides():
    c = ToyConfig.from_preset("quick", seeds=3)
    assert (c.preset, c.steps, c.seeds) == ("quick", 20, 3)
    assert ToyConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c      # tuples come back as tuples
    with pytest.raises(ValueError, match="unknown preset 'x': choose 'quick' or 'paper'"): ToyConfig.from_preset("x")
    with pytest.raises(ValueError, match="no field"): ToyConfig.from_preset("quick", step=1)


def test_config_check_refuses_and_keeps_the_stored_config(tmp_path):
    S.StudyDir(tmp_path, ToyConfig.from_preset("quick"))
    stored = (tmp_path / "config.json").read_bytes()
    with pytest.raises(S.ConfigMismatch, match=r"steps: stored 20, asked 40") as e:
        Toy().run(ToyConfig.from_preset("paper"), tmp_path, progress=False)
    assert "preset: stored 'quick', asked 'paper'" in str(e.value) and "sizes" not in str(e.value)
    assert (tmp_path / "config.json").read_bytes() == stored
    assert not (tmp_path / "runs").exists()                        # refused before any work


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4])
def test_crash_anywhere_then_rerun_gives_the_uninterrupted_numbers(tmp_path, monkeypatch, crash_at):
    cfg = ToyConfig.from_preset("paper")
    whole = Toy().run(cfg, tmp_path / "whole", progress=False)
    calls = {"n": 0}
    ev = Toy.evaluate
    def dying(self, *a):
        calls["n"] += 1
        if calls["n"] == crash_at: raise KeyboardInterrupt
        return ev(self, *a)
    monkeypatch.setattr(Toy, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt): Toy().run(cfg, tmp_path / "r", progress=False)
    monkeypatch.setattr(Toy, "evaluate", ev)
    assert len(list((tmp_path / "r" / "runs").glob("*.json"))) == crash_at - 1
    assert _runs(Toy().run(cfg, tmp_path / "r", progress=False)) == _runs(whole)


def test_crash_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    cfg = ToyConfig.from_preset("paper")
    whole = Toy().run(cfg, tmp_path / "whole", progress=False)
    real, calls = os.replace, {"n": 0}
    def dying(a, b):
        calls["n"] += 1
        if calls["n"] == 3: raise KeyboardInterrupt                # killed between writing and renaming a unit's file
        return real(a, b)
    monkeypatch.setattr(os, "replace", dying)
    with pytest.raises(KeyboardInterrupt): Toy().run(cfg, tmp_path / "r", progress=False)
    monkeypatch.setattr(os, "replace", real)
    assert not [p for p in (tmp_path / "r").rglob("*") if p.suffix == ".tmp"]
    assert _runs(Toy().run(cfg, tmp_path / "r", progress=False)) == _runs(whole)


def test_unit_numbers_do_not_depend_on_unit_order(tmp_path):
    cfg = ToyConfig.from_preset("paper")
    a = Toy().run(cfg, None, progress=False)
    class Reversed(Toy):
        def units(self, cfg): return super().units(cfg)[::-1]
    b = Reversed().run(cfg, None, progress=False)
    assert sorted(_runs(a)) == sorted(_runs(b))
    torch.manual_seed(0); x = torch.rand(3); torch.manual_seed(0)
    Toy().run(cfg, None, progress=False)
    assert torch.equal(torch.rand(3), x)                           # the caller's random stream is untouched


def test_results_round_trip(tmp_path):
    s = Toy().run(ToyConfig.from_preset("quick"), tmp_path, progress=False)
    back = Summary.from_dict(json.loads((tmp_path / "results.json").read_text()))
    assert back == s and isinstance(back.runs[0], Fit)
    d = s.runs[0].to_dict()
    assert "extra" not in d and s.runs[0]["slope"] == d["slope"] and "extra" not in s.runs[0]
    with pytest.raises(ValueError, match="no field"): Fit.from_dict({**d, "typo": 1})


def test_figure_width(tmp_path):
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    from PIL import Image
    for size in ((4, 3), (9, 3.5)):
        fig = plt.figure(figsize=size); fig.gca().plot([0, 1])
        p = S.save_figure(fig, tmp_path / f"f{size[0]}.png"); plt.close(fig)
        assert Image.open(p).size[0] == S.FIGURE_WIDTH


def test_registry_and_cli(tmp_path, capsys):
    from influence_nb import cli
    studies = S.load_studies()
    assert {"iris", "small-mnist"} <= set(studies)
    src = Path(cli.__file__).read_text()
    assert "iris" not in src and "small_mnist" not in src           # the CLI names no study
    for m in ("iris", "small_mnist"):
        src = Path(S.__file__).with_name(f"{m}.py").read_text()
        assert "influence_nb.cli" not in src and ".cli import" not in src      # studies never import the CLI
    toy = S.register_study(Toy())
    try:
        assert cli.main(["toy-test", "--preset", "quick", "--out", str(tmp_path), "--no-progress"]) == 0
        assert json.loads((tmp_path / "config.json").read_text())["steps"] == 20
        with pytest.raises(SystemExit) as e: cli.main(["toy-test", "--threads", "0"])
        assert e.value.code == 2
    finally:
        S.STUDIES.pop(toy.name); cli.COMMANDS.pop(toy.name, None)
