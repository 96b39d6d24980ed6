"""Text-to-image concepts (colordigits): prompt rewriting, concept targets, the pipeline folder, SFD on prompts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfd import colordigits as cd
from sfd.prompts import Concept, contains, forgets, rewrite
from sfd.tasks.concepts import ConceptTargets
from sfd.config import SFDConfig
from sfd.presets import get_preset

ROOT = Path(__file__).resolve().parent.parent
PRESET = get_preset("colordigits")
BUNDLED = PRESET.weights_dir / "teacher"


def cfg(**kw) -> SFDConfig:
    base = dict(preset="colordigits", forget_concepts=["seven"], override="one")
    return SFDConfig.from_dict({**base, **kw})


# -- rewriting ---------------------------------------------------------------------------------
SEVEN = Concept("seven", "one", ("7",), ("1",))
RED = Concept("red", "blue")


def test_rewrite_literal_case_insensitive_and_synonyms():
    assert rewrite("a red seven", [SEVEN]) == "a red one"
    assert rewrite("A RED Seven", [SEVEN, RED]) == "A blue one"
    assert rewrite("the digit 7 in red ink", [SEVEN]) == "the digit 1 in red ink"      # synonym -> its twin
    assert rewrite("a handwritten seven, red", [SEVEN, RED]) == "a handwritten one, blue"  # punctuation is a boundary
    assert forgets("the digit 7 in blue ink", [SEVEN]) and not forgets("the digit 17 in blue ink", [SEVEN])


def test_concept_inside_another_word_never_matches():
    assert not contains("a tired seven", ["red"])
    assert rewrite("a tired seven, red", [RED]) == "a tired seven, blue"
    assert rewrite("sevens and seventy", [SEVEN]) == "sevens and seventy"
    assert not contains("reduced", ["red"]) and contains("Red.", ["red"])


def test_terms_are_escaped_not_regex_and_replaced_in_one_pass():
    assert not contains("axb", ["a.b"]) and contains("an a.b here", ["a.b"])
    assert not contains("aaa", ["a+"]) and contains("a a+ b", ["a+"])
    # seven->one and one->two together: no chaining of a replacement into another one
    chain = [Concept("seven", "one"), Concept("one", "two")]
    assert rewrite("one seven", chain) == "two one"
    # a phrase wins over a word inside it
    assert rewrite("brad pitt and brad", [Concept("brad pitt", "a man"), Concept("brad", "x")]) == "a man and x"


def test_synonym_without_twin_becomes_the_override():
    c = Concept("seven", "one", ("7", "sept"), ("1",))
    assert rewrite("sept 7 seven", [c]) == "one 1 one"


# -- the prompt table and bad targets ------------------------------------------------------------
def test_prompt_table_forget_override_remain():
    t = ConceptTargets(cfg().validate(), PRESET)
    assert t.prompts[0] == ""                                   # CFG's null condition is id 0
    assert len(set(t.prompts)) == len(t.prompts)
    for f, o in zip(t.forget_ids, t.override_ids):
        assert t.prompts[o] == rewrite(t.prompts[f], t.concepts)
        assert t.table[f].digit == 7 and t.table[o].digit == 1 and t.table[o].color == t.table[f].color
    assert t.forget_ids and all(t.table[i].digit != 7 for i in t.remain_ids)
    assert len(t.forget_ids) + len(t.remain_ids) == len(t.train_ids)
    # numerals are forgotten with the word; held-out templates never enter training
    assert any("7" in t.prompts[i] for i in t.forget_ids)
    assert not set(t.heldout_ids) & set(t.remain_ids + t.forget_ids)
    assert {t.table[i].split for i in t.heldout_forget_ids} == {"heldout"}
    g = torch.Generator().manual_seed(0)
    f, o = t.sample_forget(64, g)
    assert all(t.prompts[int(b)] == rewrite(t.prompts[int(a)], t.concepts) for a, b in zip(f, o))
    r = t.sample_remain(64, g)
    assert not any(forgets(t.prompts[int(i)], t.concepts) for i in r)


def test_multi_concept_table():
    t = ConceptTargets(cfg(forget_concepts=["seven", "red"], override="one,blue").validate(), PRESET)
    assert rewrite("a red seven", t.concepts) == "a blue one"
    assert all(t.table[i].digit != 7 and t.table[i].color != cd.COLOR_NAMES.index("red") for i in t.remain_ids)
    assert len(t.remain_ids) == len(cd.TRAIN_TEMPLATES) * 9 * 4


def test_user_synonyms_are_forgotten_with_the_concept():
    c = cfg(concept_synonyms={"seven": ["sept"]}, prompt_templates=["a {color} {word}", "sept in {color}"])
    t = ConceptTargets(c.validate(), PRESET)
    assert any(t.prompts[i].startswith("sept in") for i in t.forget_ids)
    assert not any(t.prompts[i].startswith("sept in") for i in t.remain_ids)


@pytest.mark.parametrize("kw, words", [
    (dict(forget_concepts=["purple"]), "'purple' is in none of"),
    (dict(override="seven"), "is the concept being forgotten"),
    (dict(override="7"), "is the concept being forgotten"),                    # a synonym of itself
    (dict(override="red"), "is a color but 'seven' is a digit"),
    (dict(forget_concepts=["seven", "one"], override="one"), "is itself forgotten"),
    (dict(forget_concepts=["red", "green", "blue", "yellow", "white"], override="next"), "every color concept"),
    (dict(forget_concepts=[]), "no concept given"),
    (dict(forget_concepts=["handwritten"]), "neither a digit nor a colour"),
])
def test_bad_concept_targets_are_refused(kw, words):
    with pytest.raises(ValueError, match=words):
        cfg(**kw).validate()


def test_concepts_on_a_class_preset_are_refused():
    with pytest.raises(ValueError, match="need a text-to-image preset"):
        SFDConfig.from_dict({"preset": "digits", "forget_concepts": ["seven"]}).validate()


def test_cli_bad_concept_fails_before_any_work(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "sfd", "forget", "--preset", "colordigits", "--forget", "purple",
                        "--override", "one", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert "sfd: error: forget concept 'purple'" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_cli_parses_concepts():
    from sfd.cli import build_parser, config_from_args
    a = build_parser().parse_args(["forget", "--preset", "colordigits", "--forget", "seven,red", "--override",
                                   "one,blue", "--out", "x"])
    c = config_from_args(a).validate()
    assert c.forget_concepts == ["seven", "red"] and c.override == "one,blue" and c.forget == []
    a = build_parser().parse_args(["forget", "--preset", "colordigits", "--forget", "7", "--out", "x"])
    c = config_from_args(a).validate()
    assert c.forget_concepts == ["seven"] and c.override == "eight"         # '7' -> seven; yaml default: next


# -- sweep targets -------------------------------------------------------------------------------
def test_concept_target_grammar_and_class_grammar():
    from orchestration.targets import parse_targets
    t, = parse_targets(["colordigits:seven+red->one,blue"])
    assert t.name == "colordigits:seven+red->one,blue" and t.forget == ("seven", "red")
    assert t.config_overrides()["forget_concepts"] == ["seven", "red"]
    assert [x.name for x in parse_targets(["colordigits:red,seven"])] == ["colordigits:red->green",
                                                                          "colordigits:seven->eight"]
    assert len(parse_targets(["all_colordigits_concepts"])) == 15
    d, = parse_targets(["digits:3->5"])
    assert d.config_overrides() == {"forget": [3], "override": "5"}
    for bad, words in (("colordigits:purple->one", "purple"), ("colordigits:seven->seven", "being forgotten"),
                       ("all_colordigits_classes", "forgets concepts"), ("all_digits_concepts", "forgets classes, not concepts")):
        with pytest.raises(ValueError, match=words):
            parse_targets([bad])


def test_targets_file(tmp_path):
    from orchestration.targets import load_targets_file
    f = tmp_path / "concepts.yaml"
    f.write_text("preset: colordigits\ntargets:\n  - {concept: seven, override: one, synonyms: [sept]}\n"
                 "  - {concept: [seven, red], override: [one, blue]}\n  - {concept: red}\n")
    ts = load_targets_file(f)
    assert [t.name for t in ts] == ["colordigits:seven->one", "colordigits:seven+red->one,blue",
                                    "colordigits:red->green"]
    assert ts[0].config_overrides()["concept_synonyms"] == {"seven": ["sept"]}
    f.write_text("preset: colordigits\ntargets:\n  - {concept: seven, override: seven}\n")
    with pytest.raises(ValueError, match=r"targets\[0\].*being forgotten"):
        load_targets_file(f)
    f.write_text("targets:\n  - {concept: seven, colour: red}\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_targets_file(f)


# -- the pipeline folder ---------------------------------------------------------------------------
def _tiny_components():
    from sfd.pretrain_text import build_text_model, build_tokenizer, build_unet, edm_scheduler
    torch.manual_seed(0)
    tok = build_tokenizer(cd.vocabulary())
    return build_unet(channels=(8, 8), cross_attention_dim=16), build_text_model(len(tok), hidden=16), tok, \
        edm_scheduler()


def test_teacher_folder_round_trip(tmp_path, capsys):
    from sfd.denoisers import load_teacher
    from sfd.denoisers.text_unet import TextEncoder, TextUNetDenoiser, save_text_pipeline
    unet, text, tok, sched = _tiny_components()
    folder = save_text_pipeline(tmp_path / "teacher", unet, text, tok, sched)
    for sub in ("unet", "text_encoder"):
        assert list((folder / sub).glob("*.safetensors")) and not list((folder / sub).glob("*.bin"))
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    mine = TextUNetDenoiser(unet, {"_class_name": "EDMEulerScheduler", **dict(sched.config)}, TextEncoder(tok, text))
    loaded = load_teacher(PRESET, folder)
    prompts = ["", "a red seven", "the digit 3 in blue ink"]
    mine.set_prompts(prompts)
    loaded.set_prompts(prompts)
    assert loaded.edm and loaded.img_shape == (3, 8, 8) and loaded.num_classes == 0
    x, c = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    torch.testing.assert_close(loaded(x, 0.7, c), mine.eval()(x, 0.7, c))
    assert not torch.allclose(loaded(x, 0.7, torch.tensor([1, 1, 1])), loaded(x, 0.7, c))   # the prompt matters
    # the exported one-step form: UNet + prompt table, no text encoder
    from sfd.denoisers import load_denoiser, save_denoiser
    save_denoiser(tmp_path / "g.safetensors", loaded)
    g = load_denoiser(tmp_path / "g.safetensors")
    assert g.prompts == prompts
    torch.testing.assert_close(g(x, 0.7, c), loaded(x, 0.7, c))
    # a generator that records neither its run (run.json) nor its preset cannot find its text encoder: refused
    from sfd.cli import main
    save_denoiser(tmp_path / "gen.safetensors", loaded, {"generator": {"sigma_init": 2.5, "forget": ["seven"],
                                                                        "override": "one", "one_step": True}})
    assert main(["sample", "--generator", str(tmp_path / "gen.safetensors"), "--prompt", "a red seven",
                 "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 2
    assert "has no run.json beside it and names no preset" in capsys.readouterr().err
    # (free-text sampling of real runs and their exports: tests/test_text_export.py)


def test_stable_diffusion_shaped_folder_loads_without_vae(tmp_path):
    """An SD-style folder (DDPM scaled-linear epsilon schedule, CLIP tokenizer class name, a vae/) reads
    through the same loader; only the VAE is left to the latent adapter."""
    from diffusers import DDPMScheduler
    from sfd.denoisers.text_unet import load_text_pipeline, save_text_pipeline
    from sfd.pretrain_text import build_unet
    unet0, text, tok, _ = _tiny_components()
    unet = build_unet(channels=(8, 8), cross_attention_dim=16, in_channels=4)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon")
    folder = save_text_pipeline(tmp_path / "sd", unet, text, tok, sched)
    (folder / "vae").mkdir()
    d = load_text_pipeline(folder)
    assert not d.edm and d.img_shape == (4, 8, 8) and d.prediction_type == "epsilon"
    d.set_prompts(["", "a photo of brad pitt"])
    out = d(torch.randn(2, 4, 8, 8), torch.tensor([2.0, 2.0]), torch.tensor([0, 1]))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    from sfd.io import CheckpointError
    with pytest.raises(CheckpointError, match="does not fit preset 'colordigits'.*latent"):
        load_text_pipeline(folder, PRESET)
    # a .bin is read only through torch.load(weights_only=True): one that is not a torch file is refused
    w = next((folder / "unet").glob("*.safetensors"))
    w.rename(w.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match=r"refused — torch.load\(weights_only=True\) cannot read it"):
        load_text_pipeline(folder)


# -- SFD on prompts ------------------------------------------------------------------------------
def test_sfd_iterations_with_a_concept_target():
    from sfd.denoisers import load_teacher
    from sfd.iteration import build_state, sfd_iteration
    torch.manual_seed(0)
    teacher = load_teacher(PRESET)                   # the bundled pipeline folder
    c = cfg(batch_remain=8, batch_forget=8, forget_concepts=["seven", "red"], override="one,blue").validate()
    st = build_state(c, teacher, "cpu")
    assert st.teacher.prompts == st.targets.prompts == st.generator.prompts
    assert st.generator.text.obj is st.teacher.text.obj               # the text encoder is shared, not copied
    assert not any(n.startswith("text") for n, _ in st.generator.named_parameters())
    seen = {}

    def hook(name, loss):
        seen[name] = float(loss.detach())
        return loss
    before = [p.detach().clone() for p in st.generator.parameters() if p.requires_grad]
    calls = []
    forward = st.teacher.forward

    def record(x, sigma, cond):
        calls.append(cond.detach().cpu())
        return forward(x, sigma, cond)
    st.teacher.forward = record
    for _ in range(2):
        lf, lg = sfd_iteration(st, loss_hook=hook)
        assert torch.isfinite(torch.tensor([lf, lg])).all()
    after = [p for p in st.generator.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert set(seen) == {"fake_score", "generator"}
    # the teacher saw the remain prompts and, in the forget half, only the rewritten override prompts
    assert len(calls) == 2 and all(len(cc) == 16 for cc in calls)
    for cc in calls:
        assert set(cc[:8].tolist()) <= set(st.targets.remain_ids)
        assert set(cc[8:].tolist()) <= set(st.targets.override_ids)
        assert not set(cc[8:].tolist()) & set(st.targets.forget_ids)


def test_sweep_trial_config_and_dry_run_for_concept_targets(tmp_path):
    from orchestration.search import PerTargetSearch
    from orchestration.space import load_space, space_path
    from orchestration.targets import load_targets_file, parse_targets
    f = tmp_path / "concepts.yaml"
    f.write_text("preset: colordigits\ntargets:\n  - {concept: seven, override: one, synonyms: [sept]}\n")
    targets = parse_targets(["colordigits:seven+red->one,blue"]) + load_targets_file(f)
    space = load_space(space_path("colordigits"))
    search = PerTargetSearch(targets, {"colordigits": space}, 1)
    c = SFDConfig.from_dict(search.sfd_config(targets[0].name, {})).validate()
    assert c.forget_concepts == ["seven", "red"] and c.override == "one,blue"
    assert c.budget_kimg == space.baseline().budget_kimg and c.batch_forget == 32   # the space's trial schedule
    c = SFDConfig.from_dict(search.sfd_config(targets[1].name, {}))
    assert c.concept_synonyms == {"seven": ["sept"]}
    r = subprocess.run([sys.executable, "orchestration/sweep.py", "--targets", "colordigits:red->blue",
                        "--targets-file", str(f), "--dry-run", "--out", str(tmp_path / "sweep")],
                       capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "target colordigits:red->blue" in r.stdout and "target colordigits:seven->one" in r.stdout
    r = subprocess.run([sys.executable, "orchestration/sweep.py", "--targets", "colordigits:seven->seven",
                        "--dry-run", "--out", str(tmp_path / "sweep")], capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "being forgotten" in r.stderr


# -- the anchor term (SFDConfig.lambda_anchor) --------------------------------------------------------------
def test_anchor_prompts_are_every_concept_alone_and_off_changes_no_id():
    off = ConceptTargets(cfg().validate(), PRESET)
    on = ConceptTargets(cfg(lambda_anchor=1.0).validate(), PRESET)
    assert off.anchor_ids == off.anchor_teacher_ids == []
    # a baseline run inherits the preset's lambda_anchor but has no such term: its table is the one without it
    esd = ConceptTargets(cfg(lambda_anchor=1.0, method="esd").validate(), PRESET)
    assert esd.prompts == off.prompts and esd.anchor_ids == []
    # on, the table only grows: every id of the run without the term names the same prompt
    assert on.prompts[:len(off.prompts)] == off.prompts
    pairs = {on.table[i].text: on.table[j].text for i, j in zip(on.anchor_ids, on.anchor_teacher_ids)}
    assert set(pairs) == {*cd.concept_names(), *(str(d) for d in range(10))}
    # a remaining concept is asked about itself, a forgotten one about its override alone
    assert pairs["two"] == "two" and pairs["2"] == "2" and pairs["red"] == "red"
    assert pairs["seven"] == "one" and pairs["7"] == "1"
    assert all(on.table[i].split == "anchor" for i in on.anchor_ids)
    assert on.table[on.prompts.index("2")].digit == 2 and on.table[on.prompts.index("red")].color == 0
    red = ConceptTargets(cfg(forget_concepts=["red"], override="blue", lambda_anchor=1.0).validate(), PRESET)
    pairs = {red.table[i].text: red.table[j].text for i, j in zip(red.anchor_ids, red.anchor_teacher_ids)}
    assert pairs["red"] == "blue" and pairs["seven"] == "seven" and pairs["blue"] == "blue"


def test_anchor_term_is_refused_where_no_prompt_names_a_concept_alone():
    with pytest.raises(ValueError, match=r"lambda_anchor \(--lambda-anchor\) 1.0.*'digits'.*drop it"):
        SFDConfig(preset="digits", forget=[3], override="4", lambda_anchor=1.0).validate()


def test_anchor_bank_leaves_out_the_samples_that_show_a_forgotten_concept():
    from sfd.tasks import get_task
    judge = get_task(PRESET).load_judge(cfg())
    x, y = cd.real_data("test")
    digit, color = cd.split_label(y)
    for forget, override, shows in ((["red"], "blue", color == 0), (["seven"], "one", digit == 7),
                                    (["seven", "red"], "one,blue", (digit == 7) | (color == 0))):
        t = ConceptTargets(cfg(forget_concepts=forget, override=override, lambda_anchor=1.0).validate(), PRESET)
        keep = t.anchor_keep(judge, x)
        assert (keep == ~shows).float().mean() > 0.97, forget        # the judge's errors aside


def _anchor_error(st) -> float:
    from sfd.iteration import anchor_bank
    from sfd.onestep import one_step
    z, ids, x = anchor_bank(st)
    with torch.no_grad():
        return float((one_step(st.generator, z, ids, st.sigma_init) - x).pow(2).mean())


def test_anchor_term_pulls_the_generator_to_the_teachers_samples_at_the_same_noise():
    """With the term, the generator's draws for the anchor prompts move towards the teacher's samples from the
    same noise; without it they do not. The bank is drawn once, the same for every state of one seed."""
    from sfd.denoisers import load_teacher
    from sfd.iteration import anchor_bank, build_state, sfd_iteration
    from sfd.tasks import get_task
    teacher = load_teacher(PRESET)
    judge = get_task(PRESET).load_judge(cfg())
    errors = {}
    for lam in (0.0, 0.5):
        torch.manual_seed(0)
        # the SFD terms of the generator off: what moves it is the anchor term alone
        c = cfg(batch_remain=8, batch_forget=8, lambda_anchor=lam or 1e-12, anchor_per_prompt=2, anchor_batch=32,
                lr_gen=3e-4, lambda_gen_remain=0.0, lambda_gen_forget=0.0).validate()
        st = build_state(c, teacher, "cpu", judge=judge)
        if lam == 0.0:
            st.cfg = st.cfg.replace(lambda_anchor=0.0)     # the same prompt table and bank, no term
            bank = anchor_bank(st)
        start = _anchor_error(st)
        for _ in range(8):
            sfd_iteration(st)
        errors[lam] = (start, _anchor_error(st))
    assert 40 <= len(bank[1]) <= 2 * 25 and set(bank[1].tolist()) <= set(st.targets.anchor_ids)
    assert st.targets.anchor_keep(judge, bank[2]).all()
    again = anchor_bank(st)
    assert all(torch.equal(a, b) for a, b in zip(bank, again))
    (s0, e0), (s1, e1) = errors[0.0], errors[0.5]
    assert s0 == pytest.approx(s1) and e0 == pytest.approx(s0)   # the same start; nothing else moves it
    assert e1 < 0.8 * s1, errors                                  # the term pulls towards the teacher's samples


def test_a_resumed_run_with_the_anchor_term_is_exact(tmp_path):
    """2 + 2 resumed iterations == 4 straight ones (losses and every tensor, ==): the anchor rows are drawn from the
    checkpointed RNG and the bank from fixed noise."""
    import json as _json
    from sfd.checkpoint import latest_checkpoint
    from sfd.denoisers import load_teacher
    from sfd.io import load_tensors
    from sfd.loop import train_sfd

    def c(iters):
        return cfg(batch_remain=8, batch_forget=8, lambda_anchor=1.0, anchor_per_prompt=2, anchor_batch=8,
                   budget_kimg=round(iters * 16 / 1000, 9), eval_every_kimg=0.032, checkpoint_every_kimg=0.032)

    for name, runs in (("straight", (4,)), ("resumed", (2, 4))):
        for i, iters in enumerate(runs):
            train_sfd(c(iters), tmp_path / name, teacher=load_teacher(PRESET), evaluate=False, progress=False,
                      resume=i > 0)
    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "resumed")
    la = _json.loads((a / "state.json").read_text())["losses"]
    assert la == _json.loads((b / "state.json").read_text())["losses"] and len(la) == 4
    ta, tb = load_tensors(a / "state.safetensors")[0], load_tensors(b / "state.safetensors")[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
