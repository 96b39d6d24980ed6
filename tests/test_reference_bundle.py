"""The digits teacher's reference samples ship with the package (like its stage 1), keyed by the
teacher's digest and sampler settings; the sweep copies them to its storage instead of sampling."""
import json

import torch

from orchestration.reference import SUBDIR, local_copy
from sfd.evaluate.forgetting import reference_name, teacher_chunk, teacher_fingerprint
from sfd.io import load_tensors
from sfd.presets import get_preset

import yaml

from sfd.evaluate.forgetting import teacher_samples

# what digits runs evaluate on (the sweep's trials and `sfd forget`'s defaults): the bundle must match it
_SPACE = yaml.safe_load((__import__("pathlib").Path(__file__).parents[1] / "search_spaces" / "digits.yaml").read_text())
PER_CLASS = max(_SPACE["trial"]["eval_forget_samples"], _SPACE["trial"]["eval_remain_per_class"],
                _SPACE["defaults"]["eval_forget_samples"])


def bundled(teacher):
    name = reference_name(teacher_fingerprint(teacher), 10, PER_CLASS)
    return get_preset("digits").weights_dir / SUBDIR / name


def test_bundled_reference_is_the_bundled_teachers_own_samples(teacher):
    path = bundled(teacher)
    assert path.is_file(), f"no bundled reference for this teacher's digest: {path.name}"
    t, _ = load_tensors(path)
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    assert torch.equal(t["labels"], labels)
    # the last rows, recomputed here from the teacher and the sampler settings in the name, are identical
    with torch.no_grad():
        x = teacher_chunk(teacher, labels, 10 * PER_CLASS - 6, 10 * PER_CLASS)
    assert torch.allclose(t["x"][-6:], x, atol=1e-5), (t["x"][-6:] - x).abs().max()   # batch-size rounding only
    manifest = json.loads((path.parent / "reference.json").read_text())
    assert manifest["file"] == path.name and manifest["rows"] == 10 * PER_CLASS


def test_local_copy_prefers_an_intact_cache_entry_then_the_bundled_file(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("SFD_CACHE", str(tmp_path))
    name = bundled(teacher).name
    assert local_copy("digits", name, 10 * PER_CLASS) == bundled(teacher)          # empty cache
    (tmp_path / name).write_bytes(b"not a safetensors file")                      # damaged cache entry
    assert local_copy("digits", name, 10 * PER_CLASS) == bundled(teacher)
    whole = bundled(teacher).read_bytes()                                         # truncated cache entry
    (tmp_path / name).write_bytes(whole[: len(whole) // 2])
    assert local_copy("digits", name, 10 * PER_CLASS) == bundled(teacher)
    assert local_copy("digits", name, 10 * PER_CLASS + 1) is None                 # wrong row count: not used
    assert local_copy("digits", name.replace(f"{PER_CLASS}x10", "999x10"), 9990) is None  # another key: nothing


def test_runs_read_the_bundled_reference_instead_of_sampling(teacher, tmp_path, monkeypatch):
    """`sfd forget` (no sweep store) on an empty cache: the evaluator's teacher samples come from the
    bundled file -- the teacher is never called -- and a file of that name with other rows is not used."""
    monkeypatch.setenv("SFD_CACHE", str(tmp_path))
    monkeypatch.delenv("SFD_REFERENCE_STORE", raising=False)
    calls = []
    real_forward = type(teacher).forward
    monkeypatch.setattr(type(teacher), "forward", lambda self, *a, **k: calls.append(1) or real_forward(self, *a, **k))
    x, labels = teacher_samples(teacher, 10, PER_CLASS, bundled=bundled(teacher).parent)
    assert calls == [] and len(x) == 10 * PER_CLASS
    t, _ = load_tensors(bundled(teacher))
    assert torch.equal(x, t["x"]) and torch.equal(labels, t["labels"])
    # a bundle folder whose file of this name holds other rows is skipped: the samples are computed
    other = tmp_path / "other"
    other.mkdir()
    from sfd.io import save_tensors
    small = reference_name(teacher_fingerprint(teacher), 10, 2)        # 2 per class: 20 rows
    save_tensors(other / small, {"x": torch.zeros(20, 1, 8, 8), "labels": torch.zeros(20, dtype=torch.long)})
    x2, l2 = teacher_samples(teacher, 10, 2, bundled=other)
    assert calls and torch.equal(l2, torch.arange(10).repeat_interleave(2)) and x2.abs().sum() > 0
