"""Architecture metadata limits (sfd/limits.py): oversized sizes refused before anything is built, long
prompt tables (lists of strings) accepted."""
import pytest

from sfd.errors import CheckpointError
from sfd.limits import MAX_LIST, check_arch_metadata


def _meta(**config):
    return {"denoiser": {"arch": "x", "config": config, "img_shape": [3, 8, 8]}}


@pytest.mark.parametrize("config, needle", [
    ({"channels": 100_000}, "denoiser.config.channels = 100000"),
    ({"layers": [1] * (MAX_LIST + 1)}, f"denoiser.config.layers has {MAX_LIST + 1} entries"),
    ({"block_out_channels": [64, 8192]}, "block_out_channels[1] = 8192"),
])
def test_oversized_sizes_are_refused_naming_the_key(config, needle):
    with pytest.raises(CheckpointError, match="out of bounds") as e:
        check_arch_metadata(_meta(**config), "gen.safetensors")
    assert needle in str(e.value) and "gen.safetensors" in str(e.value)


def test_a_long_prompt_table_is_accepted():
    """A colordigits run trained on more templates keeps 1,051 prompts in its generator's metadata (it was
    refused at 1,024, so `sfd attack` could not load the run's own generator)."""
    meta = {"denoiser": {"arch": "x", "config": {}, "img_shape": [3, 8, 8],
                         "prompts": [f"a red {i}" for i in range(5000)]}}
    check_arch_metadata(meta, "gen.safetensors")
    meta["denoiser"]["prompts"][7] = 7                  # a number among them: the list is a size list again
    with pytest.raises(CheckpointError, match="prompts has 5000 entries"):
        check_arch_metadata(meta, "gen.safetensors")


def test_a_text_generator_with_more_than_1024_prompts_saves_and_loads(tmp_path):
    from sfd import colordigits as cd
    from sfd.denoisers import load_denoiser, load_teacher, save_denoiser
    from sfd.presets import get_preset
    net = load_teacher(get_preset("colordigits"))
    more = ["{word} {color}", "{color} {num}", "{num} {color}", "a {word} {color}", "{color} in {word}",
            "{num} number {color}", "a {word} digit {color}", "{color} number {word}", "the digit {word} in {color} ink",
            "a handwritten {num}, {color}", "{color} digit {num}", "{color} {word} digit"]
    prompts = [""] + list(dict.fromkeys(c.text for c in cd.captions([*cd.TRAIN_TEMPLATES, *cd.HELDOUT_TEMPLATES, *more])))
    assert len(prompts) > 1024
    net.set_prompts(prompts)
    save_denoiser(tmp_path / "g.safetensors", net)
    back = load_denoiser(tmp_path / "g.safetensors")
    assert list(back.prompts) == prompts
