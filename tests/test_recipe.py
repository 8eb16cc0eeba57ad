"""Recipes: built-in defaults < --config file < flags, and the files in configs/ stay valid."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_cli.training import recipe
from lora_cli.util.errors import LoraCliError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_builtin_recipe_is_the_books_run() -> None:
    cfg = recipe.resolve(None, {})
    assert (cfg.model, cfg.data, cfg.rank, cfg.alpha, cfg.scaling) == ("gpt2-small", "sms-spam", 16, 16.0, "alpha-over-rank")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.seed) == (5, 8, 8e-4, 0.1, 123)
    assert cfg.targets == ["blocks"]


def test_builtin_recipe_is_the_shipped_file() -> None:
    assert recipe.builtin_recipe_text() == (CONFIGS / recipe.DEFAULT_RECIPE).read_text()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_resolves(path: Path) -> None:
    cfg = recipe.resolve(path, {})
    assert cfg.rank >= 1
    known = {f.name for f in dataclasses.fields(recipe.TrainConfig)}
    assert set(yaml.safe_load(path.read_text())) <= known


def test_precedence(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("rank: 4\nepochs: 2\nlr: 0.001\n")
    cfg = recipe.resolve(path, {"rank": 32, "epochs": None})
    assert cfg.rank == 32  # flag beats file
    assert cfg.epochs == 2  # file beats built-in
    assert cfg.batch_size == 8  # built-in when neither says
    assert cfg.lr == 0.001


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = recipe.resolve(None, {"rank": 4, "targets": ["W_query", "W_value"], "label_names": ["a", "b"]})
    path = tmp_path / "config.yaml"
    path.write_text(recipe.to_yaml(cfg))
    assert recipe.resolve(path, {}) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("rnak: 4\n", "unknown option"),
        ("rank: four\n", "rank"),
        ("- 1\n- 2\n", "mapping"),
        ("rank: [\n", "not valid YAML"),
        ("epochs: 0\n", r"bad.yaml: epochs: expected an integer >= 1, got 0"),
        ("lr: -1\n", r"bad.yaml: lr: expected a number > 0, got -1"),
    ],
)
def test_bad_recipes(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LoraCliError, match=message):
        recipe.resolve(path, {})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(LoraCliError, match="not found"):
        recipe.resolve(tmp_path / "nope.yaml", {})


def test_template_lists_every_option() -> None:
    template = yaml.safe_load((CONFIGS / "template.yaml").read_text())
    assert set(template) == {f.name for f in dataclasses.fields(recipe.TrainConfig)}
    assert recipe.resolve(CONFIGS / "template.yaml", {}) == recipe.resolve(None, {})


def test_template_is_derived_from_the_declarations() -> None:
    """configs/template.yaml is what `python -m lora_cli.training.recipe` prints: regenerate it after changing an option."""
    assert (CONFIGS / "template.yaml").read_text(encoding="utf-8") == recipe.template_yaml()


def test_every_option_is_declared_once_with_a_flag_in_train_help() -> None:
    help_text = subprocess.run([sys.executable, "-m", "lora_cli", "train", "--help"], capture_output=True, text=True,
                               env=os.environ | {"COLUMNS": "200"}).stdout
    for name, opt in recipe.options():
        assert opt.help and opt.group in recipe.GROUPS, name
        assert f"{opt.flag_for(name)} " in help_text, name
    flags = [opt.flag_for(name) for name, opt in recipe.options()]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("name", [name for name, _ in recipe.options()])
def test_every_option_rejects_a_value_of_the_wrong_type(name: str) -> None:
    """The declared schema is what validates: a dict is never a valid value of any option."""
    with pytest.raises(LoraCliError, match=name.replace("_", "-")):
        recipe.resolve(None, {name: {"not": "valid"}})
