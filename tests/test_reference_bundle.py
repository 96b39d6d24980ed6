"""The digits teacher's reference samples ship with the package (like its stage 1), keyed by the
teacher's digest and sampler settings; the sweep copies them to its storage instead of sampling."""
import json

import torch

from orchestration.reference import SUBDIR, local_copy
from sfd.evaluate.forgetting import reference_name, teacher_chunk, teacher_fingerprint
from sfd.io import load_tensors
from sfd.presets import get_preset

PER_CLASS = 1000


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
    assert local_copy("digits", name.replace("1000x10", "999x10"), 9990) is None  # another key: nothing
