"""Recipe validation: typed sections, dotted overrides, clear errors."""

import pytest

from qlora.train.recipe import Recipe, load_recipe, recipe_from_dict
from quant import InputError


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_sections(tmp_path):
    r = load_recipe(_write(tmp_path, "lora:\n  rank: 8\n  targets: [q_proj, v_proj]\nseq_len: 128\n"))
    assert isinstance(r, Recipe) and r.lora.rank == 8 and r.lora.targets == ["q_proj", "v_proj"]
    assert r.seq_len == 128 and r.micro_batch_size == "auto" and r.optimizer.name == "paged_adamw_8bit"


def test_overrides_are_dotted_and_typed(tmp_path):
    r = load_recipe(
        _write(tmp_path, "seq_len: 128\n"), ["lora.rank=auto", "optimizer.lr=1e-4", "micro_batch_size=4", "max_steps=7"]
    )
    assert r.lora.rank == "auto" and r.optimizer.lr == 1e-4 and r.micro_batch_size == 4 and r.max_steps == 7


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"lora": {"rnak": 8}}, "'lora.rnak'"),  # unknown key, with a suggestion
        ({"lora": {"rank": "big"}}, "'lora.rank'"),
        ({"lora": {"rank": 0}}, "> 0"),
        ({"seq_len": -5}, "'seq_len'"),
        ({"optimizer": {"name": "sgd"}}, "'paged_adamw_8bit'"),
        ({"quant": {"blocksize": 48}}, "valid choices"),
        ({"lora": {"dropout": 1.5}}, "[0, 1)"),
        ({"gradient_checkpointing": "yes"}, "true/false"),
        ({"data": ["a"]}, "must be a mapping"),
    ],
)
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(InputError) as e:
        recipe_from_dict(data)
    assert needle in str(e.value)


def test_unknown_key_suggests_close_match():
    with pytest.raises(InputError, match="Did you mean 'rank'"):
        recipe_from_dict({"lora": {"rnak": 8}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(InputError, match="key=value"):
        load_recipe(_write(tmp_path, "seq_len: 8\n"), ["lora.rank"])


def test_relative_paths_resolve_against_recipe_folder(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    r = load_recipe(_write(tmp_path, "data:\n  path: d.jsonl\n"))
    assert r.data.path == str(tmp_path / "d.jsonl")
