"""class_shift: every network of an SFD iteration sees the same relative move of each row's class embedding.

The networks' own tables are read back through a recording hook registered after the shift's hook, so the
test sees what the networks consumed."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import sfd.iteration
from sfd.config import SFDConfig
from sfd.denoisers.base import class_table, shifted_classes
from sfd.iteration import build_state, sfd_iteration

B = 8


def cfg(**kw) -> SFDConfig:
    return SFDConfig(preset="digits", forget=[3], override="4", batch_remain=B, batch_forget=B, budget_kimg=0.016,
                     device="cpu", init_from="none", **kw)


def record_passes(monkeypatch, st):
    """Wrap the iteration's shifted_classes: inside it, record (network, class ids, consumed embedding rows)."""
    seen = []
    real = sfd.iteration.shifted_classes
    names = {id(st.teacher): "teacher", id(st.fake_score): "fake_score", id(st.generator): "generator"}

    @contextlib.contextmanager
    def recording(nets, shift):
        with real(nets, shift):
            handles = []
            for net in (st.teacher, st.fake_score, st.generator):
                table = class_table(net)

                def hook(_m, inp, out, name=names[id(net)], table=table):
                    seen.append((name, inp[0].detach().clone(), out.detach().clone(), table.weight.detach().clone(),
                                 None if shift is None else shift.clone()))
                handles.append(table.register_forward_hook(hook))
            try:
                yield
            finally:
                for h in handles:
                    h.remove()
    monkeypatch.setattr(sfd.iteration, "shifted_classes", recording)
    return seen


def relative_moves(entry):
    _name, ids, out, weight, _shift = entry
    base = weight[ids]
    return (out - base) / base.norm(dim=1, keepdim=True)


def test_every_network_gets_the_same_relative_move_of_each_row(teacher, monkeypatch):
    torch.manual_seed(0)
    st = build_state(cfg(class_shift=0.5), teacher, "cpu")
    seen = record_passes(monkeypatch, st)
    sfd_iteration(st)
    names = [e[0] for e in seen]
    # fake-score step: generator then fake score; generator step: generator, fake score, teacher
    assert names == ["generator", "fake_score", "generator", "fake_score", "teacher"], names
    for step in (seen[:2], seen[2:]):
        shift = step[0][4]
        assert shift is not None and shift.shape == (2 * B, class_table(teacher).embedding_dim)
        for e in step:
            assert torch.allclose(relative_moves(e), shift, atol=1e-5), e[0]
        # remain rows and forget rows alike, each at most class_shift of its embedding's norm, none zero
        norms = shift.norm(dim=1)
        assert bool((norms <= 0.5 + 1e-6).all()) and bool((norms > 0).all())
    teacher_ids = seen[4][1]
    assert teacher_ids[B:].eq(4).all() and seen[2][1][B:].eq(3).all()    # the override for the teacher


def test_off_by_default_no_move_and_the_reference_stream(teacher, monkeypatch):
    torch.manual_seed(0)
    st = build_state(cfg(), teacher, "cpu")
    seen = record_passes(monkeypatch, st)
    sfd_iteration(st)
    assert len(seen) == 5 and all(e[4] is None for e in seen)
    for e in seen:
        assert torch.equal(e[2], e[3][e[1]])            # the table's own rows
    # the setting's draws come after the batch's own: turning it on changes no other number of the batch
    plain = sfd.iteration.draw_batch(build_state(cfg(), teacher, "cpu"), False, "loguniform")
    moved = sfd.iteration.draw_batch(build_state(cfg(class_shift=0.5), teacher, "cpu"), False, "loguniform")
    assert plain.shift is None and moved.shift is not None
    for k in ("c_r", "c_f", "c_o", "z", "sigma", "noise"):
        assert torch.equal(getattr(plain, k), getattr(moved, k)), k
    assert plain.dropout_seed == moved.dropout_seed


def test_guided_passes_move_only_their_conditional_half():
    table = nn.Embedding(4, 3)
    net = nn.Module()
    net.num_classes = 3
    net.table = table
    shift = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    ids = torch.tensor([0, 1, 3, 3])                                  # two conditional rows, two null rows
    with shifted_classes([net], shift):
        out = table(ids)
    w = table.weight.detach()
    assert torch.allclose(out[:2], w[:2] + shift * w[:2].norm(dim=1, keepdim=True))
    assert torch.equal(out[2:], w[[3, 3]])
    with shifted_classes([net], shift), pytest.raises(RuntimeError, match="3 rows inside a batch of 2"):
        table(ids[:3])
    assert torch.equal(table(ids), w[ids])                           # the hook is gone after the block


def test_a_backbone_without_a_class_table_is_refused_by_name(teacher):
    import copy
    odd = copy.deepcopy(teacher)
    table = class_table(odd)
    for name, m in odd.named_modules():               # a table of another size is no class table
        for child_name, child in m.named_children():
            if child is table:
                setattr(m, child_name, nn.Embedding(table.num_embeddings + 5, table.embedding_dim))
    with pytest.raises(ValueError, match=r"class_shift: .* no class-embedding table.*class_shift \(--class-shift\) "
                                         r"0.5 needs a class preset.* drop it"):
        build_state(cfg(class_shift=0.5), odd, "cpu")
    build_state(cfg(), odd, "cpu")                    # off, the same backbone is accepted
