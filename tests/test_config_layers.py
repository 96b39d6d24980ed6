"""Issue #21, one source per setting: each SFDConfig setting is declared once (sfd.config.setting) and
that declaration drives its flag, its --help section, its validation and the search-space checks;
`sfd forget --print-config` and `sweep.py --dry-run` name the layer every value came from."""
import dataclasses
import re

import pytest
import yaml

import sfd.cli as cli
import sfd.config as config
from orchestration.space import load_space, space_path
from sfd.cli import build_parser, config_from_args, main
from sfd.config import DEFAULT_LAYER, GROUPS, SETTINGS, SFDConfig, spaces_dir


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def _sections(text: str) -> dict:
    """argparse help -> section title -> its text (a title is an unindented line ending in ':')."""
    out, title = {}, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            title = line[:-1]
            out[title] = ""
        elif title is not None:
            out[title] += line + "\n"
    return out


def _flags(section: str) -> set:
    return {w.rstrip(",") for line in section.splitlines() for w in line.split()[:3] if w.startswith("--")}


def test_forget_help_reads_as_topic_sections(capsys):
    sections = _sections(_help(capsys, ["forget", "--help"]))
    titles = list(sections)
    want = ["output", *GROUPS.values(), "Ray Train (exactly what a sweep trial runs)"]
    assert [t for t in titles if t in want] == want, titles
    for s in SETTINGS.values():          # every flag sits in the section its declaration names, and only there
        if s.flag:
            where = [t for t, body in sections.items() if s.flag_name in _flags(body)]
            assert where == [GROUPS[s.group]], (s.name, where)
    assert {"--out", "--print-config", "--resume"} <= _flags(sections["output"])


# ---------------------------------------------------------------------------------------
# --print-config: the layer of every value

def _printed(text: str) -> dict:
    """--print-config's lines -> setting -> (value, layer)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        setting, layer = line.split(" # ", 1)
        out.update({k: (v, layer.strip()) for k, v in yaml.safe_load(setting).items()})
    return out


def expected_layers(preset: str, override: str, flags: dict) -> dict:
    """Independently of sfd.config: setting -> (value, layer) by the documented order, a later layer
    winning: SFDConfig's field defaults < the YAML's `defaults` < its `override_defaults[<policy>]` < flags."""
    doc = yaml.safe_load((spaces_dir() / f"{preset}.yaml").read_text())
    out = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory(), DEFAULT_LAYER)
           for f in dataclasses.fields(SFDConfig)}
    layers = [(f"search_spaces/{preset}.yaml defaults", doc.get("defaults") or {}),
              (f"search_spaces/{preset}.yaml override_defaults[{override}]",
               (doc.get("override_defaults") or {}).get(override, {})),
              *[(f"--{k.replace('_', '-')}", {k: v}) for k, v in flags.items()]]
    for label, values in layers:
        out.update({k: (v, label) for k, v in values.items()})
    return out


def check_print_config(printed: dict, expected: dict) -> None:
    assert set(printed) == set(expected)
    for k, (value, layer) in expected.items():
        assert printed[k][1] == layer, (k, printed[k], layer)
        assert printed[k][0] == pytest.approx(value) if isinstance(value, float) else printed[k][0] == value, k


ARGS = ["forget", "--forget", "3", "--override", "random", "--lr-gen", "2e-4", "--print-config"]


def test_print_config_names_the_layer_of_each_value(capsys, tmp_path):
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists()                                   # nothing ran
    printed = _printed(text)
    # one value from each layer, spelled out
    assert printed["lr_gen"] == (2e-4, "--lr-gen")
    assert printed["forget"] == ([3], "--forget")
    assert printed["lr_fake"] == (3e-4, "search_spaces/digits.yaml override_defaults[random]")
    assert printed["batch_forget"] == (128, "search_spaces/digits.yaml override_defaults[random]")
    assert printed["precision"] == ("auto", "search_spaces/digits.yaml defaults")
    assert printed["alpha"] == (1.2, DEFAULT_LAYER)
    # every value and layer, against the documented order computed from the files themselves
    check_print_config(printed, expected_layers("digits", "random", {"forget": [3], "override": "random",
                                                                     "lr_gen": 2e-4}))
    # the printed file is the configuration the run uses (valid YAML, comments and all)
    run = config_from_args(build_parser().parse_args(ARGS[:-1] + ["--out", "x"])).validate()
    assert SFDConfig.from_dict(yaml.safe_load(text)) == run
    # a fixed override: no policy layer, the learning rate is the YAML defaults'
    assert main(["forget", "--forget", "3", "--override", "4", "--print-config"]) == 0
    assert _printed(capsys.readouterr().out)["lr_fake"] == (5e-4, "search_spaces/digits.yaml defaults")


def test_print_config_detects_a_swapped_layer_order(capsys, monkeypatch):
    """Negative control: with override_defaults applied *under* the YAML defaults on purpose, the check
    above fails (lr_fake comes out 5e-4 from the defaults instead of 3e-4 from the policy)."""
    real = config.preset_layers

    def swapped(preset, changes, label="config_for_preset"):
        layers = real(preset, changes, label)
        return [layers[1], layers[0], *layers[2:]]

    monkeypatch.setattr(config, "preset_layers", swapped)
    monkeypatch.setattr(cli, "preset_layers", swapped)             # the CLI's own name for it
    assert main(ARGS) == 0
    printed = _printed(capsys.readouterr().out)
    assert printed["lr_fake"] == (5e-4, "search_spaces/digits.yaml defaults")
    with pytest.raises(AssertionError):
        check_print_config(printed, expected_layers("digits", "random", {"forget": [3], "override": "random",
                                                                         "lr_gen": 2e-4}))


def test_print_config_of_a_text_preset_and_a_bad_value(capsys):
    assert main(["forget", "--preset", "colordigits", "--forget", "seven", "--print-config"]) == 0
    printed = _printed(capsys.readouterr().out)
    assert printed["preset"] == ("colordigits", "--preset")
    assert printed["forget_concepts"][0] == ["seven"] and printed["forget_concepts"][1].startswith("--forget")
    # --print-config validates like the run: a bad value is the usual error, exit 2
    assert main(["forget", "--lr-gen", "2", "--print-config"]) == 2
    assert "lr_gen (--lr-gen) 2.0 is out of range" in capsys.readouterr().err
    assert main(["forget", "--forget", "3"]) == 2                # no --out, no --print-config
    assert "--out is required" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# the sweep's dry run names the same layers, plus the trial block, the sweep's flags and Optuna

def _listing(text: str, target: str) -> dict:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("  baseline trial of") and target in ln)
    body = []
    for ln in lines[start + 1:]:
        if not ln.startswith("    "):
            break
        body.append(ln.strip())
    return _printed("\n".join(body))


def test_dry_run_lists_each_baseline_trials_layers(tmp_path, capsys):
    from orchestration.search import PerTargetSearch
    from orchestration.sweep import main as sweep
    from orchestration.targets import parse_targets

    assert sweep(["--targets", "digits:3", "digits:4->random", "--dry-run", "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    fixed, rnd = _listing(text, "digits:3->4"), _listing(text, "digits:4->random")
    assert rnd["batch_forget"] == (128, "search_spaces/digits.yaml override_defaults[random]")
    assert rnd["lr_fake"][1].startswith("search_spaces/digits.yaml override_defaults[random]; Optuna searches it")
    assert fixed["lr_fake"][1].startswith("search_spaces/digits.yaml defaults; Optuna searches it")
    assert fixed["budget_kimg"] == (20.0, "search_spaces/digits.yaml trial")
    assert fixed["seed"] == (0, "--seed")
    assert "forget" not in fixed and "batch_forget" not in fixed        # the target's; SFDConfig's default
    # the listing is the baseline trial the sweep runs
    space = load_space(space_path("digits"))
    for target, listing in (("digits:3", fixed), ("digits:4->random", rnd)):
        t = parse_targets([target], "next")[0]
        first = PerTargetSearch([t], {"digits": space}, 2).suggest("t0")
        assert first["baseline"]
        for k, (v, _) in listing.items():
            assert first["sfd"][k] == v, (target, k)
    # --budget long changes the trial block's budget: the listing says so
    assert sweep(["--targets", "digits:3", "--budget", "long", "--dry-run", "--out", str(tmp_path / "b")]) == 0
    assert _listing(capsys.readouterr().out, "digits:3->4")["budget_kimg"] == (80.0, "the sweep's --budget long")


# ---------------------------------------------------------------------------------------
# one declaration drives the flag, the validation and the search-space check

def _space_with(tmp_path, **search):
    doc = yaml.safe_load(space_path("digits").read_text())
    doc["search"].update(search)
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_a_searched_value_outside_the_declared_range_or_choices_is_rejected(tmp_path):
    fix = SETTINGS["lr_gen"].range[3]
    with pytest.raises(ValueError, match=r"search.lr_gen: high=2.0 is not a valid lr_gen: .*give " + re.escape(fix)):
        load_space(_space_with(tmp_path, lr_gen={"type": "loguniform", "low": 2e-4, "high": 2.0}))
    with pytest.raises(ValueError, match=r"search.sigma_dist: 'banana' is not a valid sigma_dist: .*must be one of"):
        load_space(_space_with(tmp_path, sigma_dist={"type": "choice", "values": ["edm", "banana"]}))
    with pytest.raises(ValueError, match=r"search.batch_forget: type uniform does not fit batch_forget, a int"):
        load_space(_space_with(tmp_path, batch_forget={"type": "uniform", "low": 32, "high": 128}))
    with pytest.raises(ValueError, match=r"search.adam_eps: not a tunable SFD setting"):
        load_space(_space_with(tmp_path, adam_eps={"type": "loguniform", "low": 1e-8, "high": 1e-6}))
    # control: inside the declarations, the same keys load
    s = load_space(_space_with(tmp_path, lr_gen={"type": "loguniform", "low": 2e-4, "high": 1.0},
                               sigma_dist={"type": "choice", "values": ["edm", "loguniform"]},
                               batch_forget={"type": "int", "low": 32, "high": 128}))
    assert {"lr_gen", "sigma_dist", "batch_forget"} <= set(s.params)


def test_one_declaration_drives_flag_validation_and_search_check(tmp_path, capsys, monkeypatch):
    """Widen lr_gen's declared range, move it to another section, rename its help and make adam_eps
    searchable, in the one declaration: the flag, SFDConfig.validate and load_space all follow."""
    space = _space_with(tmp_path, lr_gen={"type": "loguniform", "low": 2e-4, "high": 2.0},
                        adam_eps={"type": "loguniform", "low": 1e-8, "high": 1e-6})
    with pytest.raises(ValueError, match="out of range"):
        SFDConfig(lr_gen=2.0).validate()
    with pytest.raises(ValueError):
        load_space(space)
    assert main(["forget", "--lr-gen", "2", "--print-config"]) == 2
    capsys.readouterr()

    monkeypatch.setitem(SETTINGS, "lr_gen", dataclasses.replace(
        SETTINGS["lr_gen"], range=(0.0, 5.0, "(]", "a rate in (0, 5]"), group="loss", help="WIDENED LEARNING RATE"))
    monkeypatch.setitem(SETTINGS, "adam_eps", dataclasses.replace(SETTINGS["adam_eps"], searchable=True))
    SFDConfig(lr_gen=2.0).validate()
    assert {"lr_gen", "adam_eps"} <= set(load_space(space).params)
    assert main(["forget", "--lr-gen", "2", "--print-config"]) == 0
    assert _printed(capsys.readouterr().out)["lr_gen"] == (2.0, "--lr-gen")
    with pytest.raises(ValueError, match=r"lr_gen \(--lr-gen\) 6.0 is out of range — give a rate in \(0, 5\]"):
        SFDConfig(lr_gen=6.0).validate()
    sections = _sections(_help(capsys, ["forget", "--help"]))
    assert "--lr-gen" in _flags(sections[GROUPS["loss"]]) and "--lr-gen" not in _flags(sections[GROUPS["optim"]])
    assert "WIDENED LEARNING RATE" in sections[GROUPS["loss"]]
