"""The grid file (runner.config) and its resolution against the network (runner.inputs.trials): one exact line per error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import ValidationError

from runner.config import Grid, TrainConfig, apply_override, load_grid, parse_grid
from runner.errors import InputError
from runner.inputs.train import RECIPES, recipe_of
from runner.inputs.trials import plan_trials

GRIDS = Path(__file__).resolve().parent / "grids"

CONV_NAMES = ("conv1, layer1.0.conv1, layer1.0.conv2, layer1.1.conv1, layer1.1.conv2, layer2.0.conv1, "
              "layer2.0.conv2, layer2.0.shortcut.conv, layer2.1.conv1, layer2.1.conv2, layer3.0.conv1, "
              "layer3.0.conv2, layer3.0.shortcut.conv, layer3.1.conv1, layer3.1.conv2, layer4.0.conv1, "
              "layer4.0.conv2, layer4.0.shortcut.conv, layer4.1.conv1, layer4.1.conv2")
K_INTS = "integers >= 1 (K = 0 is the baseline, always measured)"


def grid_error(raw, source: str = "grid.yaml") -> str:
    with pytest.raises(InputError) as err:
        parse_grid(raw, source)
    message = str(err.value)
    assert "\n" not in message
    return message


def plan_error(sweep: dict, width: float = 0.25) -> str:
    grid = parse_grid({"model": {"width": width}, "sweep": sweep}, "grid.yaml")
    with pytest.raises(InputError) as err:
        plan_trials(grid)
    return str(err.value)


# --- grid files with errors, one line each ---------------------------------------------------------------------

@pytest.mark.parametrize("file, message", [
    ("unknown_key_top.yaml",
     "modle: unknown key: got 'modle'; allowed: name, seed, model, data, checkpoint, sweep, resources, wandb, plan, "
     "output; fix: remove it or correct its spelling"),
    ("unknown_key_nested.yaml",
     "sweep.criterion: unknown key: got 'criterion'; allowed: layers, include_shortcuts, unit, k, criteria, "
     "target, calibration, random_repeats, random_seed, batch_size, retries, feature_map_points; "
     "fix: remove it or correct its spelling"),
    ("unknown_key_train.yaml",
     "checkpoint.train.learning_rate: unknown key: got 'learning_rate'; allowed: recipe, epochs, batch_size, "
     "optimizer, lr, momentum, nesterov, weight_decay, label_smoothing, schedule, normalise; "
     "fix: remove it or correct its spelling"),
    ("wrong_type_width.yaml",
     "model.width: wrong type: got 'x'; allowed: a valid number; "
     "fix: change model.width in the grid file (or --set model.width=...)"),
    ("wrong_type_batch_size.yaml",
     "sweep.batch_size: wrong type: got 3.5; allowed: a valid integer; "
     "fix: change sweep.batch_size in the grid file (or --set sweep.batch_size=...)"),
    ("target_both.yaml",
     "sweep.target: not allowed: got 'both'; allowed: 'output' or 'input'; "
     "fix: change sweep.target in the grid file (or --set sweep.target=...)"),
    ("k_negative.yaml", f"sweep.k[1]: out of range: got -3; allowed: {K_INTS}; fix: remove or correct that value"),
    ("k_empty.yaml", f"sweep.k: empty: got []; allowed: {K_INTS}; fix: give at least one value"),
    ("k_duplicates.yaml",
     "sweep.k: duplicate value 3: got [1, 3, 3, 5]; allowed: each value once; fix: remove the duplicate"),
    ("k_range_too_large.yaml",
     "sweep.k.range: 999,999 K values is too many: got [1, 1000000, 1]; allowed: at most 100,000; "
     "fix: use a larger step or a smaller stop"),
    ("k_two_forms.yaml",
     "sweep.k: give exactly one form of K: got {'fractions': [0.5], 'range': [1, 4, 1]}; allowed: a list of ints "
     "[1, 3, 5], {fractions: [0.25, 0.5]} or {range: [start, stop, step]}; fix: keep one of them"),
    ("not_a_mapping.yaml",
     "(top level): not a mapping: got [{'name': 'demo'}, {'seed': 0}]; allowed: a YAML mapping of sections "
     "(name, model, data, ...); fix: see sweeps/demo.yaml for the layout"),
])
def test_grid_file_errors(file, message):
    path = GRIDS / file
    with pytest.raises(InputError) as err:
        load_grid(path)
    assert str(err.value) == f"{path}: {message}"


def test_missing_grid_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(InputError) as err:
        load_grid(path)
    assert str(err.value) == (f"--grid: no such file: got '{path}'; allowed: a YAML grid file; "
                              "fix: check the path; see sweeps/")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "just a string\n", "42\n"])
def test_grid_file_that_is_not_a_mapping(tmp_path, text):
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_grid(path)
    assert str(err.value).startswith(f"{path}: (top level): not a mapping: got ")


def test_python_tag_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "pwned-by-yaml"
    with pytest.raises(InputError) as err:
        load_grid(GRIDS / "python_tag.yaml")
    assert not target.exists()
    assert str(err.value) == (
        "(file): not valid YAML (could not determine a constructor for the tag "
        f"'tag:yaml.org,2002:python/object/apply:os.system' at line 3): got '{GRIDS / 'python_tag.yaml'}'; "
        "allowed: plain YAML (no Python tags); fix: fix the syntax at that line")
    # control: an unsafe loader really would have run the command
    yaml.unsafe_load((GRIDS / "python_tag.yaml").read_text())
    assert target.exists()


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: demo\nsweep: {k: [1, 2}\n")
    with pytest.raises(InputError) as err:
        load_grid(path)
    assert str(err.value) == (f"(file): not valid YAML (expected ',' or ']', but got '}}' at line 2): got '{path}'; "
                              "allowed: plain YAML (no Python tags); fix: fix the syntax at that line")


# --- parse_grid errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, message", [
    ({"checkpoint": {"train": {"epoch": 3}}},
     "checkpoint.train.epoch: unknown key: got 'epoch'; allowed: recipe, epochs, batch_size, optimizer, lr, "
     "momentum, nesterov, weight_decay, label_smoothing, schedule, normalise; "
     "fix: remove it or correct its spelling"),
    ({"sweep": {"k": {"value": [1]}}},
     "sweep.k.value: unknown key: got 'value'; allowed: values, fractions, range; "
     "fix: remove it or correct its spelling"),
    ({"seed": 1.0},
     "seed: wrong type: got 1.0; allowed: a valid integer; fix: change seed in the grid file (or --set seed=...)"),
    ({"resources": {"cpus_per_trial": "2"}},
     "resources.cpus_per_trial: wrong type: got '2'; allowed: a valid integer; "
     "fix: change resources.cpus_per_trial in the grid file (or --set resources.cpus_per_trial=...)"),
    ({"data": {"download": "yes"}},
     "data.download: wrong type: got 'yes'; allowed: a valid boolean; "
     "fix: change data.download in the grid file (or --set data.download=...)"),
    ({"model": {"width": 0}},
     "model.width: out of range: got 0; allowed: greater than 0; "
     "fix: change model.width in the grid file (or --set model.width=...)"),
    ({"data": {"dataset": "mnist"}},
     "data.dataset: not allowed: got 'mnist'; allowed: 'synthetic', 'cifar10', 'npz' or 'imagefolder'; "
     "fix: change data.dataset in the grid file (or --set data.dataset=...)"),
    ({"data": {"dataset": "npz", "test": "t.npz"}},
     "data.train: required when data.dataset is npz: got None; allowed: a path to an .npz file with images and "
     "labels arrays; fix: set data.train: path/to/train.npz"),
    ({"name": "my sweep/1"},
     "name: not usable as a folder name: got 'my sweep/1'; allowed: letters, digits, '.', '_' and '-', starting "
     "with a letter or digit, 1-100 long; fix: rename the sweep"),
    ({"sweep": {"k": {"fractions": [0.5, 1.5]}}},
     "sweep.k.fractions[1]: out of range: got 1.5; allowed: numbers in (0, 1]; fix: remove or correct that value"),
    ({"sweep": {"k": {"range": [8, 1, 1]}}},
     "sweep.k.range: not a valid range: got [8, 1, 1]; allowed: [start, stop, step] with 1 <= start < stop and "
     "step >= 1 (stop excluded); fix: for K = 1, 3, ..., 127 write [1, 128, 2]"),
    ({"sweep": {"k": [0, 1]}},
     f"sweep.k[0]: out of range: got 0; allowed: {K_INTS}; fix: remove or correct that value"),
    ({"sweep": {"k": {"range": [1, 10**15, 1]}}},  # counted, never built
     "sweep.k.range: 999,999,999,999,999 K values is too many: got [1, 1000000000000000, 1]; allowed: at most "
     "100,000; fix: use a larger step or a smaller stop"),
    ({"sweep": {"layers": []}},
     "sweep.layers: empty: got []; allowed: all, or a list of layer names or glob patterns; "
     "fix: write layers: all, or name at least one layer"),
    ({"sweep": {"layers": 3}},
     "sweep.layers: wrong type: got 3; allowed: all, or a list of layer names or glob patterns; "
     "fix: write layers: all, or a list such as [layer1.0.conv1, \"layer4.*\"]"),
    ({"sweep": {"criteria": ["l1_norm", "random", "l1_norm"]}},
     "sweep.criteria: duplicate value l1_norm: got ['l1_norm', 'random', 'l1_norm']; allowed: each value once; "
     "fix: remove the duplicate"),
    ({"sweep": {"criteria": []}},
     "sweep.criteria: empty: got []; allowed: criterion names; fix: give at least one value"),
    ({"resources": {"gpus_per_trial": -0.5}},
     "resources.gpus_per_trial: out of range: got -0.5; allowed: auto, or a number >= 0; fix: use auto"),
])
def test_parse_grid_errors(raw, message):
    assert grid_error(raw) == f"grid.yaml: {message}"


@pytest.mark.parametrize("raw, message", [
    ({"sweep": {"k": {"fractions": [0.5, 0.25, 0]}}},
     "sweep.k.fractions[2]: out of range: got 0; allowed: numbers in (0, 1]; fix: remove or correct that value"),
    ({"sweep": {"k": {"values": [1, 2, -4]}}},  # written as k.values, so named k.values (a bare list is k)
     f"sweep.k.values[2]: out of range: got -4; allowed: {K_INTS}; fix: remove or correct that value"),
    ({"sweep": {"k": {"range": [1, 8, 2.0]}}},
     "sweep.k.range[2]: wrong type: got 2.0; allowed: a valid integer; "
     "fix: change sweep.k.range[2] in the grid file (or --set sweep.k.range=...)"),
    ({"sweep": {"layers": ["conv1", 3]}},  # one member of a union (a list, or all)
     "sweep.layers[1]: wrong type: got 3; allowed: a valid string; "
     "fix: change sweep.layers[1] in the grid file (or --set sweep.layers=...)"),
    ({"resources": {"cache_gb": "lots"}},  # the other member of a union (a number, or auto)
     "resources.cache_gb: wrong type: got 'lots'; allowed: a valid number; "
     "fix: change resources.cache_gb in the grid file (or --set resources.cache_gb=...)"),
    ({"resources": {"cache_gb": 1e9}},
     "resources.cache_gb: out of range: got 1000000000.0; allowed: auto, or a number >= 0; fix: use auto"),
    ({"checkpoint": {"train": {"recipe": "seed", "lr": 0}}},
     "checkpoint.train.lr: out of range: got 0; allowed: greater than 0; "
     "fix: change checkpoint.train.lr in the grid file (or --set checkpoint.train.lr=...)"),
    ({"checkpoint": {"train": {"recipe": "fast"}}},
     "checkpoint.train.recipe: not allowed: got 'fast'; allowed: 'standard' or 'seed'; "
     "fix: change checkpoint.train.recipe in the grid file (or --set checkpoint.train.recipe=...)"),
    ({"data": {"dataset": "npz", "train": "a.npz"}},
     "data.test: required when data.dataset is npz: got None; allowed: a path to an .npz file with images and "
     "labels arrays; fix: set data.test: path/to/test.npz"),
])
def test_errors_name_the_key_path(raw, message):
    assert grid_error(raw) == f"grid.yaml: {message}"


def test_key_paths_do_not_depend_on_pydantic_tags():
    """pydantic names validators and union members in its error locations ("function-after[...]",
    "literal['all']"); the key path must be computed from the models, not by matching those names."""
    source = (Path(__file__).resolve().parents[1] / "runner" / "config.py").read_text()
    assert "function-after" not in source and "literal[" not in source


def test_named_recipes_are_full_train_configs():
    assert set(get_args(TrainConfig.model_fields["recipe"].annotation)) == set(RECIPES)
    for name, recipe in RECIPES.items():
        assert isinstance(recipe, TrainConfig) and recipe.recipe == name
        assert None not in vars(recipe).values(), name


def test_recipe_of_is_a_full_frozen_train_config():
    grid = parse_grid({"checkpoint": {"train": {"recipe": "seed", "epochs": 4}}}, "g")
    recipe = recipe_of(grid.checkpoint.train)
    assert recipe == RECIPES["seed"].model_copy(update={"epochs": 4})
    assert recipe.epochs == 4 and RECIPES["seed"].epochs == 30  # the named recipe is untouched
    with pytest.raises(ValidationError, match="Instance is frozen"):
        recipe.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("raw", [
    {"sweep": {"batch_size": 3.5}},
    {"sweep": {"retries": 2.0}},
    {"data": {"calibration_size": 100.0}},
    {"checkpoint": {"train": {"epochs": 1.5}}},
    {"sweep": {"k": [1, 2.5]}},
    {"sweep": {"k": {"range": [1.0, 8, 2]}}},
])
def test_floats_are_refused_where_ints_are_required(raw):
    assert re.fullmatch(r"grid\.yaml: [\w.\[\]]+: wrong type: got [\d.]+; allowed: a valid integer; fix: .*",
                        grid_error(raw))


def test_ints_are_accepted_where_floats_are_required():
    grid = parse_grid({"model": {"width": 1}, "checkpoint": {"train": {"lr": 1}}}, "grid.yaml")
    assert grid.model.width == 1.0 and grid.checkpoint.train.lr == 1.0


def test_suggested_set_key_is_usable():
    message = grid_error({"sweep": {"k": [1, 2.5]}})
    key = re.search(r"--set ([^=]+)=", message).group(1)
    assert key == "sweep.k"
    assert parse_grid(apply_override({}, f"{key}=[1, 2]"), "grid.yaml").sweep.k.values == [1, 2]


# --- defaults, the example grid, resolution --------------------------------------------------------------------

def test_the_example_grid_loads(tmp_path):
    grid = load_grid(GRIDS / "demo.yaml", base=tmp_path)
    assert grid.name == "demo" and grid.seed == 0
    assert (grid.model.arch, grid.model.width, grid.model.num_classes) == ("resnet18", 0.25, 10)
    assert grid.data.dataset == "synthetic" and grid.data.calibration_size == 1000 and grid.data.eval_size is None
    assert grid.checkpoint.path == str(tmp_path / "checkpoints" / "demo.pt")
    assert (grid.checkpoint.train.epochs, grid.checkpoint.train.batch_size) == (8, 256)
    assert grid.sweep.k.fractions == [0.125, 0.25, 0.5, 0.75, 1.0]
    assert grid.sweep.criteria == ["mean_activation", "l1_norm", "random"]
    assert (grid.sweep.layers, grid.sweep.target, grid.sweep.calibration) == ("all", "output", "holdout")
    assert grid.output == str(tmp_path / "runs")
    assert grid.folder == tmp_path / "runs" / "demo"


def test_relative_paths_resolve_against_base(tmp_path):
    base = tmp_path / "work"
    grid = load_grid(GRIDS / "relative_paths.yaml", base=base)
    assert grid.data.root == str(base / "cache" / "cifar")
    assert grid.data.train == str(base / "arrays" / "train.npz")
    assert grid.data.test == str(tmp_path / "shared" / "test.npz")  # '..' is resolved
    assert grid.checkpoint.path == "/abs/model.pt"  # absolute paths are kept
    assert grid.output == str(base / "results")


def test_relative_paths_default_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = load_grid(GRIDS / "relative_paths.yaml")
    assert grid.data.train == str(tmp_path.resolve() / "arrays" / "train.npz")
    assert grid.output == str(tmp_path.resolve() / "results")


def test_home_is_expanded(tmp_path):
    grid = parse_grid({"checkpoint": {"path": "~/ck/m.pt"}}, "g").resolved(tmp_path)
    assert grid.checkpoint.path == str(Path.home().resolve() / "ck" / "m.pt")


@pytest.mark.parametrize("storage, root", [
    (None, "{tmp}/runs/sweep"),  # the output folder
    ("tune-state", "{tmp}/tune-state/sweep"),  # a folder, resolved like every path
    ("s3://bucket/prune-sweep/", "s3://bucket/prune-sweep/sweep"),  # a URI, kept as written
])
def test_tune_storage(tmp_path, storage, root):
    grid = parse_grid({"resources": {"tune_storage": storage}}, "g").resolved(tmp_path)
    assert grid.tune_root == root.format(tmp=tmp_path)


def test_tune_storage_that_is_neither_folder_nor_uri():
    assert grid_error({"resources": {"tune_storage": "s3:// bucket"}}) == (
        "grid.yaml: resources.tune_storage: not a folder or a URI: got 's3:// bucket'; allowed: null (the output "
        "folder), a folder, or a URI like s3://bucket/path; fix: fix the value or remove the key")


def test_grid_is_frozen():
    grid = Grid()
    with pytest.raises(ValidationError, match="Instance is frozen"):
        grid.model.width = 2.0  # type: ignore[misc]
    assert grid.model.width == 1.0


@pytest.mark.parametrize("raw", [
    {},
    {"sweep": {"k": [1, 3, 5], "layers": "layer*.conv2", "criteria": ["seed"], "target": "input"}},
    {"sweep": {"k": {"range": [1, 128, 2]}}, "resources": {"gpus_per_trial": 0.25, "cache_gb": 3}},
    {"data": {"dataset": "npz", "train": "a.npz", "test": "b.npz", "eval_size": 500},
     "checkpoint": {"train": {"recipe": "seed", "epochs": 2}}, "wandb": {"mode": "offline"}},
], ids=["defaults", "k list", "k range", "npz"])
def test_as_dict_round_trips(raw, tmp_path):
    grid = parse_grid(raw, "g").resolved(tmp_path)
    again = parse_grid(grid.as_dict(), "again")
    assert again == grid
    assert parse_grid(yaml.safe_load(yaml.safe_dump(grid.as_dict())), "yaml") == grid  # YAML-ready data


def test_as_dict_keeps_the_form_of_k():
    assert parse_grid({"sweep": {"k": [1, 3]}}, "g").as_dict()["sweep"]["k"] == [1, 3]
    assert parse_grid({"sweep": {"k": {"range": [1, 8, 2]}}}, "g").as_dict()["sweep"]["k"] == {"range": [1, 8, 2]}
    assert Grid().as_dict()["sweep"]["k"] == {"fractions": [0.125, 0.25, 0.5, 0.75, 1.0]}


# --- --set overrides -------------------------------------------------------------------------------------------

def test_apply_override_sets_nested_keys_without_touching_the_input():
    raw = {"name": "a", "sweep": {"k": [1], "target": "output"}}
    out = apply_override(raw, "sweep.target=input")
    assert out == {"name": "a", "sweep": {"k": [1], "target": "input"}}
    assert raw == {"name": "a", "sweep": {"k": [1], "target": "output"}}
    assert apply_override(raw, "checkpoint.train.epochs=3")["checkpoint"] == {"train": {"epochs": 3}}


@pytest.mark.parametrize("item, key, value", [
    ("sweep.criteria=[l1_norm, random]", "criteria", ["l1_norm", "random"]),
    ("sweep.k={range: [1, 8, 2]}", "k", {"range": [1, 8, 2]}),
    ("sweep.batch_size=64", "batch_size", 64),
    ("sweep.layers=layer*.conv2", "layers", "layer*.conv2"),
    ("sweep.include_shortcuts=true", "include_shortcuts", True),
    ("sweep.target=", "target", None),
    ("sweep.name=a=b", "name", "a=b"),  # only the first '=' splits
])
def test_apply_override_parses_yaml_values(item, key, value):
    assert apply_override({}, item) == {"sweep": {key: value}}


@pytest.mark.parametrize("item", ["sweep.criteria", "=l1_norm", "sweep..k=1", "1sweep=2", "sweep.k[0]=1"])
def test_apply_override_bad_form(item):
    with pytest.raises(InputError) as err:
        apply_override({}, item)
    assert str(err.value) == (f"--set: not KEY=VALUE: got '{item}'; allowed: a dotted key, '=', a YAML value; "
                              "fix: write for example --set sweep.criteria=[l1_norm]")


def test_apply_override_bad_yaml_value():
    with pytest.raises(InputError) as err:
        apply_override({}, "sweep.criteria=[l1_norm")
    assert str(err.value) == ("--set: the value is not valid YAML: got 'sweep.criteria=[l1_norm'; "
                              "allowed: a YAML value; fix: quote it, for example --set name='my-sweep'")


def test_load_grid_applies_overrides_in_order(tmp_path):
    grid = load_grid(GRIDS / "demo.yaml", base=tmp_path, overrides=[
        "sweep.criteria=[l1_norm]", "model.width=0.5", "model.width=0.125", "sweep.k=[1, 2]",
        "checkpoint.train.epochs=3", "data.eval_size=100"])
    assert grid.sweep.criteria == ["l1_norm"]
    assert grid.model.width == 0.125
    assert grid.sweep.k.values == [1, 2] and grid.sweep.k.fractions is None
    assert (grid.checkpoint.train.epochs, grid.checkpoint.train.batch_size) == (3, 256)  # sibling kept
    assert grid.data.eval_size == 100 and grid.name == "demo"


def test_overrides_are_validated():
    path = GRIDS / "demo.yaml"
    with pytest.raises(InputError) as err:
        load_grid(path, overrides=["sweep.batch_size=3.5"])
    assert str(err.value) == ("--set sweep.batch_size=3.5: sweep.batch_size: wrong type: got 3.5; allowed: a valid "
                              "integer; fix: change sweep.batch_size in the grid file (or --set sweep.batch_size=...)")
    with pytest.raises(InputError) as err:
        load_grid(path, overrides=["model.depth=18"])
    assert str(err.value).startswith("--set model.depth=18: model.depth: unknown key: got 'depth'; ")


# --- the plan: the grid against the network --------------------------------------------------------------------

def test_dry_counts_of_the_tiny_grid(tiny_grid):
    plan = plan_trials(tiny_grid)
    assert (len(plan.layers), len(plan.trials), plan.points) == (17, 34, 102)
    assert len(plan.convs) == 20
    assert {t.ks for t in plan.trials if t.channels == 8} == {(2, 4, 8)}
    assert [t.ks for t in plan.trials if t.layer == "layer4.1.conv2"] == [(16, 32, 64)] * 2
    lines = plan.describe()
    assert lines[0] == ("convs found in the graph: 20 (3 side branches: layer2.0.shortcut.conv, "
                        "layer3.0.shortcut.conv, layer4.0.shortcut.conv)")
    assert lines[1] == "target: output   criteria: mean_activation, l1_norm"
    assert lines[3] == "  conv1              3 -> 8    K: 2, 4, 8"
    assert lines[-1] == "trials: 34 points: 102"


# points per layer and K: mean_activation 1, l1_norm 1, random 3 (sweep.random_repeats) with the default criteria
@pytest.mark.parametrize("width, sweep, layers, trials, points", [
    (1.0, {}, 17, 51, 17 * 5 * 5),
    (1.0, {"include_shortcuts": True}, 20, 60, 20 * 5 * 5),
    (1.0, {"layers": ["layer*.conv2"]}, 8, 24, 8 * 5 * 5),
    (1.0, {"layers": ["layer*.conv2"], "include_shortcuts": True}, 8, 24, 8 * 5 * 5),
    (1.0, {"layers": ["*.shortcut.conv"], "include_shortcuts": True}, 3, 9, 3 * 5 * 5),
    (1.0, {"layers": ["*.shortcut.conv"], "include_shortcuts": True, "random_repeats": 1}, 3, 9, 45),
    (1.0, {"layers": "layer3.*", "criteria": ["l1_norm"]}, 4, 4, 20),
    (1.0, {"layers": "layer3.*", "criteria": ["random"], "random_repeats": 10}, 4, 4, 200),
    (0.25, {"layers": ["layer2.1.conv2"], "k": {"range": [1, 32, 2]}, "criteria": ["seed"], "target": "input"},
     1, 1, 16),
    (0.125, {"layers": ["conv1", "layer4.1.conv2"], "k": {"fractions": [0.1, 0.125, 0.2]}}, 2, 6, 5 * 5),
])
def test_dry_counts(width, sweep, layers, trials, points):
    plan = plan_trials(parse_grid({"model": {"width": width}, "sweep": sweep}, "g"))
    assert (len(plan.layers), len(plan.trials), plan.points) == (layers, trials, points)


def test_glob_selects_the_eight_conv2_in_forward_order():
    plan = plan_trials(parse_grid({"sweep": {"layers": ["layer*.conv2"]}}, "g"))
    assert [c.name for c in plan.layers] == [f"layer{s}.{b}.conv2" for s in range(1, 5) for b in range(2)]
    assert [c.out_channels for c in plan.layers] == [64, 64, 128, 128, 256, 256, 512, 512]


def test_include_shortcuts_gives_twenty_layers():
    plan = plan_trials(parse_grid({"model": {"width": 0.25}, "sweep": {"include_shortcuts": True}}, "g"))
    assert len(plan.layers) == 20
    assert sum(c.shortcut for c in plan.layers) == 3


def test_layers_follow_forward_order_not_grid_order():
    plan = plan_trials(parse_grid({"sweep": {"layers": ["layer4.1.conv2", "conv1", "layer2.0.shortcut.conv"]}}, "g"))
    assert [c.name for c in plan.layers] == ["conv1", "layer2.0.shortcut.conv", "layer4.1.conv2"]


def test_fractions_round_to_distinct_k_per_layer():
    plan = plan_trials(parse_grid({"model": {"width": 0.125}, "sweep": {
        "layers": ["conv1", "layer4.1.conv2"], "k": {"fractions": [0.1, 0.125, 0.2]}, "criteria": ["random"]}}, "g"))
    assert [(t.layer, t.ks) for t in plan.trials] == [("conv1", (1, 2)), ("layer4.1.conv2", (6, 8, 13))]


def test_unknown_layer_lists_the_valid_names():
    assert plan_error({"layers": ["layer1.0.conv1", "layer9.conv1"]}) == (
        f"sweep.layers[1]: no such layer: got 'layer9.conv1'; allowed: {CONV_NAMES}; "
        "fix: use one of those names or a glob pattern such as \"layer*.conv2\"")


def test_unknown_criterion_lists_the_valid_names():
    assert plan_error({"criteria": ["l1_norm", "l2_norm"]}) == (
        "sweep.criteria[1]: unknown criterion: got 'l2_norm'; allowed: mean_activation, mean_abs_activation, "
        "l1_norm, bn_scale, taylor, random, seed; fix: use one of those names")


def test_k_above_the_channel_count():
    assert plan_error({"k": [1, 17]}) == (
        "sweep.k: K = 17 is above the 16 output channels of conv1: got [1, 17]; allowed: K from 1 to 16 for that "
        "layer; fix: use k: {fractions: [...]} to scale K per layer, or leave that layer out")


def test_k_above_the_input_channel_count():
    assert plan_error({"k": {"range": [1, 5, 1]}, "target": "input", "layers": ["conv1"]}).startswith(
        "sweep.k: K = 4 is above the 3 input channels of conv1: got {'range': [1, 5, 1]}; allowed: K from 1 to 3 ")


def test_k_equal_to_the_channel_count_is_allowed():
    plan = plan_trials(parse_grid({"model": {"width": 0.25}, "sweep": {"k": [1, 16], "layers": ["layer1.*"]}}, "g"))
    assert plan.points == 4 * 2 * (1 + 1 + 3)  # 4 layers, 2 K, mean_activation + l1_norm + 3 random orders


CRITERION_FIX = ("allowed: criteria that apply to every swept layer; "
                 "fix: change sweep.target, or sweep that criterion on other layers in its own grid")


def test_bn_scale_needs_target_output():
    assert plan_error({"criteria": ["bn_scale"], "target": "input"}) == (
        f"sweep.criteria: criterion bn_scale works only with target output: got 'bn_scale'; {CRITERION_FIX}")


def test_seed_needs_target_input():
    assert plan_error({"criteria": ["seed"], "target": "output", "layers": ["layer2.1.conv2"]}) == (
        f"sweep.criteria: criterion seed works only with target input: got 'seed'; {CRITERION_FIX}")


@pytest.mark.parametrize("layer, cin, cout", [("conv1", 3, 16), ("layer2.0.conv1", 16, 32),
                                              ("layer3.0.shortcut.conv", 32, 64)])
def test_seed_needs_equal_in_and_out_channels(layer, cin, cout):
    assert plan_error({"criteria": ["seed"], "target": "input", "layers": [layer], "k": [1]}) == (
        "sweep.criteria: criterion seed ranks output channels and zeroes input channels, so it needs in == out "
        f"channels; {layer} has {cin} in, {cout} out: got 'seed'; {CRITERION_FIX}")
