"""Bad input ends before any model loads: exit 2, one line on stderr, nothing written.

This table grows with every bug found: add a row, not a new test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file
from typer.testing import CliRunner

from hftk.cli import app
from hftk.recipe import load_recipe
from tests.conftest import ROOT, run_hftk, tiny_recipe, write_recipe


def _empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return str(path)


def _renamed_column(tmp_path):
    path = tmp_path / "renamed.jsonl"
    path.write_text(json.dumps({"document": "a text.", "abstract": "a summary."}) + "\n")
    return str(path)


def _not_text(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text(json.dumps({"document": 3, "summary": "a summary."}) + "\n")
    return str(path)


def _rows(tmp_path, name, rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _task(task, train, *extra):
    return lambda t: ({}, [f"task={task}", f"data.train={train(t) if callable(train) else train}",
                           f"data.validation={train(t) if callable(train) else train}", *extra])


QA_FILE = str(ROOT / "data/qa/validation.jsonl")
BAD_ANSWERS = lambda t: _rows(t, "qa", [{"question": "Who?", "context": "Ana spoke.", "answers": "Ana"}])
NO_ROLES = lambda t: _rows(t, "chat", [{"messages": [{"speaker": "user", "text": "hi"}]}])


def _output_is_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a directory")
    return str(path)


def _overrides(*items):
    return lambda t: ({}, list(items))


def _symlink_loop(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    return {}, [f"train.output_dir={loop}"]


def _dangling_parent(tmp_path):
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    return {}, [f"train.output_dir={tmp_path / 'gone' / 'run'}"]


def _scratch(**config):
    return lambda t: ({"model": {"config": config}}, [])


# The recipe file itself is the bad input: a case returns a writer(tmp_path, recipe) -> path as a third item.
def _recipe_file(write):
    return lambda t: ({}, [], write)


def _yaml_with(edit):
    def write(tmp_path, recipe):
        path = tmp_path / "recipe.yaml"
        path.write_text(edit(yaml.safe_dump(recipe)))
        return path
    return _recipe_file(write)


def _encoded(encoding, prefix=""):
    def write(tmp_path, recipe):
        path = tmp_path / "recipe.yaml"
        path.write_bytes((prefix + yaml.safe_dump(recipe)).encode(encoding))
        return path
    return _recipe_file(write)


def _recipe_is_folder(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.mkdir()
    return path


def _alias_bomb(indent=""):
    """Billion laughs: nine levels of nine aliases to the level below, 9**10 values once expanded."""
    lines = [f"{indent}lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{indent}lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


# Local model folders: a tiny T5 config.json plus whatever weights a case gives it.
def _model_dir(files):
    def make(tmp_path):
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32, "d_kv": 8, "num_heads": 4,
                                                        "d_ff": 64, "num_layers": 1}))
        for name, content in files(tmp_path).items():
            (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return {"model": {"name_or_path": str(folder), "config": None, "tokenizer": None}}, []
    return make


def _safetensors(tmp_path) -> bytes:
    path = tmp_path / "weights.tmp"
    save_file({"shared.weight": np.zeros((8, 4), dtype=np.float32)}, str(path))
    data = path.read_bytes()
    path.unlink()
    return data


def _index(*shards):
    return json.dumps({"metadata": {}, "weight_map": {f"w{i}": shard for i, shard in enumerate(shards)}})


NEEDS_REMOTE_CODE = lambda t: {"config.json": json.dumps({
    "model_type": "my-own-model", "auto_map": {"AutoConfig": "configuration_mine.MyConfig"}})}


PACKING_WHY = "train.packing: packed examples are kept apart only by a decoder-only model's causal mask built from position ids"


CASES = {
    "task on a family it cannot use": (_task("extractive_qa", QA_FILE), "task extractive_qa cannot use an encoder-decoder model (t5)"),
    "missing language key": (_task("translation", str(ROOT / "data/translate/validation.jsonl"), "data.source_lang=en",
                                   "data.target_lang=de"), "has no language 'de'"),
    "no languages given": (_task("translation", str(ROOT / "data/translate/validation.jsonl")), "needs data.source_lang"),
    "answers not in SQuAD shape": (_task("generative_qa", BAD_ANSWERS), "SQuAD shape"),
    "dialogue row without roles": (_task("dialogue", NO_ROLES), "every message needs a role"),
    "no room for the question": (_task("generative_qa", QA_FILE, "data.max_source_length=6"), "leaves no room for the context"),
    "empty output_dir": (_overrides("train.output_dir="), "train.output_dir: is empty; name the folder"),
    "whitespace output_dir": (_overrides("train.output_dir=' '"), "train.output_dir: is empty"),
    "output_dir a symlink loop": (_symlink_loop, "is a symbolic link that leads nowhere"),
    "output_dir under a dangling symlink": (_dangling_parent, "is a symbolic link that leads nowhere"),
    "vocab_size below the tokenizer's": (_overrides("model.config.vocab_size=10"),
                                         "model.config.vocab_size=10 is smaller than the tokenizer's"),
    "unknown key": (lambda t: ({}, ["train.learnig_rate=1e-3"]), "unknown key 'train.learnig_rate' (did you mean 'train.learning_rate'?)"),
    "unknown task": (lambda t: ({}, ["task=poetry"]), "task: must be one of"),
    "negative lr": (lambda t: ({}, ["train.learning_rate=-0.1"]), "train.learning_rate"),
    "zero length": (lambda t: ({}, ["data.max_target_length=0"]), "data.max_target_length"),
    "missing data file": (lambda t: ({"data": {"train": str(t / "missing.jsonl")}}, []), "file not found"),
    "empty data file": (lambda t: ({"data": {"train": _empty_file(t)}}, []), "is empty"),
    "missing column": (lambda t: ({"data": {"train": _renamed_column(t)}}, []), "missing column 'summary' (columns are: document, abstract); set data.target_column"),
    "column not text": (lambda t: ({"data": {"validation": _not_text(t)}}, []), "column 'document' must hold text"),
    "unreachable model id": (lambda t: ({"model": {"name_or_path": "no-such-user/no-such-model", "config": None,
                                                   "tokenizer": None}}, []),
                             "cannot be fetched from the Hugging Face Hub"),
    "unreachable hub dataset": (lambda t: ({"data": {"train": {"path": "no-such-user/no-such-data"}}}, []),
                                "give a local .json/.jsonl/.csv/.parquet file"),
    "unknown model type": (lambda t: ({"model": {"config": {"model_type": "t6"}}}, []), "unknown model type 't6' (did you mean 't5'?)"),
    "misspelt config field": (lambda t: ({"model": {"config": {"model_type": "t5", "num_layer": 2}}}, []),
                              "'model.config.num_layer' (did you mean 'model.config.num_layers'?)"),
    "output_dir is a file": (lambda t: ({"train": {"output_dir": _output_is_file(t)}}, []), "exists and is a file"),
    "output_dir under a file": (lambda t: ({"train": {"output_dir": _output_is_file(t) + "/run"}}, []),
                                "is a file, so"),
    "hub metrics offline": (lambda t: ({"eval": {"metric_source": "hub"}}, []), "HF_HUB_OFFLINE"),
    "gate on a start never scored": (lambda t: ({}, ["hub.require_better_than=start"]),
                                     "hub.require_better_than=start needs the step-0 score: set train.eval_on_start=true"),
    "gate against no run": (lambda t: ({}, ["hub.push=true", "hub.repo_id=me/tiny", f"hub.require_better_than={t}/none"]),
                            "/none holds no predictions.jsonl to compare the run with"),
    "start score with nothing to score": (lambda t: ({}, ["train.eval_on_start=true", "data.validation=null"]),
                                          "train.eval_on_start needs data.validation to evaluate on"),
    "resume from nowhere": (lambda t: ({"train": {"resume_from_checkpoint": str(t / "ckpt")}}, []), "no such checkpoint folder"),
    "lengths past positions": (lambda t: ({"model": {"config": {"model_type": "bart", "max_position_embeddings": 32,
                                                                 "d_model": 16}}}, []),
                               "exceeds the model's 32 positions"),
    # Numbers that validate, then crash once training runs.
    "infinite learning rate": (_overrides("train.learning_rate=.inf"), "train.learning_rate: Input should be a finite number"),
    "nan epochs": (_overrides("train.num_train_epochs=.nan"), "train.num_train_epochs: Input should be a finite number"),
    "nan beta": (_overrides("train.adam_beta2=.nan"), "train.adam_beta2: Input should be a finite number"),
    "eps overflows to inf": (_overrides("train.adam_epsilon=1e999"), "train.adam_epsilon: Input should be a finite number"),
    "infinite grad norm": (_overrides("train.max_grad_norm=.inf"), "train.max_grad_norm: Input should be a finite number"),
    "negative seed": (_overrides("train.seed=-1"), "train.seed: Input should be greater than or equal to 0"),
    "seed past 32 bits": (_overrides("train.seed=4294967296"), "train.seed: Input should be less than or equal to 4294967295"),
    "huge source length": (_overrides("data.max_source_length=100000000"), "data.max_source_length: Input should be less than or equal to"),
    "huge batch": (_overrides("train.per_device_train_batch_size=99999999999999999999"),
                   "train.per_device_train_batch_size: Input should be less than or equal to"),
    "huge step budget": (_overrides("train.max_steps=1000000000000"), "train.max_steps: Input should be less than or equal to"),
    "huge generation length": (_overrides("eval.max_new_tokens=100000000"), "eval.max_new_tokens: Input should be less than or equal to"),
    "huge tokenizer vocabulary": (_overrides("model.tokenizer.train.vocab_size=10000000000"),
                                  "model.tokenizer.train.vocab_size: Input should be less than or equal to"),
    "huge ddp timeout": (_overrides("train.ddp_timeout=1000000000000"), "train.ddp_timeout: Input should be less than or equal to"),
    # Recipe files that are not YAML text.
    "recipe not utf-8": (_encoded("latin-1", "# résumé\n"), "not UTF-8 text (byte 0xe9 on line 1)"),
    "recipe in utf-16": (_encoded("utf-16"), "not UTF-8 text"),
    "recipe is a folder": (_recipe_file(_recipe_is_folder), "is a directory, not a recipe file"),
    "control character in recipe": (_yaml_with(lambda text: text + "note: a\x07b\n"), "character #x0007 is not allowed"),
    "nested too deeply": (_yaml_with(lambda text: text + "deep: " + "[" * 5000 + "]" * 5000 + "\n"), "nested too deeply"),
    # YAML corners.
    "duplicate top-level key": (_yaml_with(lambda text: text + "task: translation\n"), "duplicate key 'task' (also at line"),
    "duplicate nested key": (_yaml_with(lambda text: text.replace("\ntrain:\n", "\ntrain:\n  seed: 1\n  seed: 2\n", 1)),
                             "duplicate key 'seed' (also at line"),
    "alias bomb": (_yaml_with(lambda text: text + _alias_bomb()), "aliases expand it to more than"),
    "alias bomb in model.config": (_yaml_with(lambda text: text.replace("  config:\n", "  config:\n" + _alias_bomb("    "), 1)),
                                   "aliases expand it to more than"),
    "alias inside itself": (_yaml_with(lambda text: text + "loop: &loop [1, *loop]\n"), "an alias refers to a collection that holds it"),
    "home of no such user": (_overrides("train.output_dir=~no-such-user-hftk/run"), "train.output_dir: cannot expand '~no-such-user-hftk/run'"),
    # Scratch model configs that transformers accepts, then cannot build or run.
    "gpt2 width not divisible by heads": (_scratch(model_type="gpt2", n_embd=30, n_head=4, n_layer=1),
                                          "model.config: cannot build a gpt2 model from these fields: `embed_dim` must be divisible by num_heads"),
    "bert width not divisible by heads": (_scratch(model_type="bert", hidden_size=30, num_attention_heads=4, num_hidden_layers=1),
                                          "is not a multiple of the number of attention heads (4)"),
    "bart encoder heads": (_scratch(model_type="bart", d_model=30, encoder_attention_heads=4, decoder_attention_heads=2),
                           "cannot build a bart model from these fields: embed_dim must be divisible by num_heads"),
    "bart decoder heads": (_scratch(model_type="bart", d_model=30, encoder_attention_heads=2, decoder_attention_heads=4),
                           "cannot build a bart model from these fields: embed_dim must be divisible by num_heads"),
    "llama width not divisible by heads": (_scratch(model_type="llama", hidden_size=30, num_attention_heads=4),
                                           "model.config: The hidden size (30) is not a multiple of the number of attention heads (4)"),
    "llama heads not grouped by kv heads": (_scratch(model_type="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=3),
                                            "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
    "zero layers": (_scratch(model_type="t5", d_model=32, d_kv=8, num_heads=4, num_layers=0), "model.config.num_layers: must be at least 1, not 0"),
    "negative width": (_scratch(model_type="gpt2", n_embd=-32), "model.config.n_embd: must be at least 1, not -32"),
    "zero heads": (_scratch(model_type="gpt2", n_head=0), "model.config.n_head: must be at least 1, not 0"),
    "zero vocabulary": (_scratch(model_type="bart", vocab_size=0), "model.config.vocab_size: must be at least 1, not 0"),
    "negative positions": (_scratch(model_type="bert", max_position_embeddings=-4), "model.config.max_position_embeddings: must be at least 1"),
    "too many layers": (_scratch(model_type="gpt2", n_layer=100000), "model.config.n_layer: at most 1024 layers, not 100000"),
    "width past int64": (_scratch(model_type="gpt2", n_embd=2**70, n_head=1),
                         "model.config: cannot build a gpt2 model from these fields"),
    "nan dropout in model.config": (_scratch(model_type="t5", dropout_rate=float("nan")), "model.config.dropout_rate: must be a finite number"),
    "unknown activation": (_scratch(model_type="llama", hidden_size=32, num_attention_heads=4, hidden_act="nope"),
                           "cannot build a llama model from these fields: unknown value 'nope'"),
    "config field of the wrong type": (_scratch(model_type="gpt2", n_embd="wide"), "model.config: Field 'n_embd' expected int, got str"),
    "transformers rejects a config value": (_scratch(model_type="t5", feed_forward_proj="gelu-x"),
                                            "model.config: `feed_forward_proj`: gelu-x is not a valid activation function"),
    # Local model folders that cannot be loaded.
    "model folder without weights": (_model_dir(lambda t: {}), "holds no weights"),
    "empty safetensors": (_model_dir(lambda t: {"model.safetensors": b""}), "model.safetensors is empty"),
    "truncated safetensors": (_model_dir(lambda t: {"model.safetensors": _safetensors(t)[:-20]}), "model.safetensors is truncated"),
    "safetensors cut in its header": (_model_dir(lambda t: {"model.safetensors": _safetensors(t)[:30]}), "model.safetensors is truncated"),
    "safetensors with bytes past its data": (_model_dir(lambda t: {"model.safetensors": _safetensors(t) + b"xx"}),
                                             "model.safetensors is damaged: 2 bytes follow"),
    "not safetensors at all": (_model_dir(lambda t: {"model.safetensors": "version https://git-lfs.github.com/spec/v1\n"}),
                               "model.safetensors is not a safetensors file"),
    "sharded index names a missing shard": (_model_dir(lambda t: {
        "model.safetensors.index.json": _index("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),
        "model-00001-of-00002.safetensors": _safetensors(t)}), "names shards that are not there: model-00002-of-00002.safetensors"),
    "truncated shard": (_model_dir(lambda t: {"model.safetensors.index.json": _index("model-00001-of-00001.safetensors"),
                                              "model-00001-of-00001.safetensors": _safetensors(t)[:-1]}),
                        "model-00001-of-00001.safetensors is truncated"),
    "unreadable shard index": (_model_dir(lambda t: {"model.safetensors.index.json": "{"}), "is not a readable shard index"),
    "empty pytorch_model.bin": (_model_dir(lambda t: {"pytorch_model.bin": b""}), "pytorch_model.bin is empty"),
    "model needs remote code": (_model_dir(NEEDS_REMOTE_CODE), "set model.trust_remote_code=true"),
    "model config not JSON": (_model_dir(lambda t: {"config.json": "{"}), "cannot read the config in"),
    # train.packing where packed examples would attend to each other.
    "packing an encoder-decoder family hftk does not route": (
        lambda t: ({"model": {"config": {"model_type": "pegasus", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                                         "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                                         "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}}}, ["train.packing=true"]),
        ("train.packing: packed examples are kept apart by block-diagonal masks and per-example positions that hftk "
        "routes in, which pegasus models do not take")),
    "packing extractive QA": (lambda t: ({"model": {"config": {"model_type": "bert", "hidden_size": 32,
                                                               "num_hidden_layers": 1, "num_attention_heads": 4}}},
                                         ["task=extractive_qa", f"data.train={QA_FILE}", f"data.validation={QA_FILE}",
                                          "train.packing=true"]),
                              ("train.packing: packing lays several examples in one row of a decoder-only or "
                              "encoder-decoder model; this bert model is encoder-only")),
    "packing a family whose mask ignores position ids": (
        lambda t: ({"model": {"config": {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 4, "word_embed_proj_dim": 32}}}, ["train.packing=true"]),
        PACKING_WHY + ", which opt models do not build"),
}


def _strip_none(section: dict) -> dict:
    return {k: v for k, v in section.items() if v is not None}


def _snapshot(root: Path) -> dict[str, str | None]:
    """Every folder and every file's content hash: a rewritten file shows, not only a new name."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
    make, expected = CASES[case]
    changes, overrides, *custom_writer = make(tmp_path)
    recipe = tiny_recipe(tmp_path)
    for section, values in changes.items():
        if section == "model" and "config" in values and values["config"] and "tokenizer" not in values:
            recipe["model"]["config"] = values["config"]
        else:
            recipe[section] = _strip_none({**recipe[section], **values})
    path = (custom_writer[0] if custom_writer else write_recipe)(tmp_path, recipe)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(app, ["finetune", str(path), *overrides])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hftk: error:"), result.stderr
    assert expected in lines[0]
    assert _snapshot(tmp_path) == before, "the run wrote or changed files despite bad input"


def test_validate_command_agrees(tmp_path):
    good = write_recipe(tmp_path, tiny_recipe(tmp_path))
    ok = CliRunner().invoke(app, ["validate", str(good)])
    assert ok.exit_code == 0 and "ok: summarization on an encoder-decoder t5 model" in ok.output
    bad = CliRunner().invoke(app, ["validate", str(good), "data.source_column=text"])
    assert bad.exit_code == 2 and "missing column 'text'" in bad.stderr
    assert not (tmp_path / "run").exists()


def test_real_command_prints_no_traceback(tmp_path):
    result = run_hftk("finetune", str(tmp_path / "missing.yaml"), fresh=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"hftk: error: recipe file not found: {tmp_path / 'missing.yaml'}"
    flag = run_hftk("eval", str(ROOT / "recipes/summarize.yaml"), "--split", "dev", fresh=True)
    assert flag.returncode == 2 and "--split must be train, validation or test" in flag.stderr


def test_usage_errors_are_one_line(tmp_path):
    missing = run_hftk("finetune", fresh=True)
    assert (missing.returncode, missing.stderr.strip(), missing.stdout) == (2, "hftk: error: Missing argument 'recipe'.", "")
    for args, expected in [(["eval", "r.yaml", "--bogus"], "hftk: error: No such option: --bogus"),
                           (["eval", "r.yaml", "--temperature", "hot"], "hftk: error: Invalid value for '--temperature'"),
                           (["push", str(tmp_path)], "hftk: error: Missing option '--repo-id'")]:
        result = run_hftk(*args, cwd=tmp_path, fresh=True)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert "Usage: hftk" in run_hftk(fresh=True).stdout  # no arguments still prints the help
    helped = run_hftk("finetune", "--help", fresh=True)
    assert helped.returncode == 0 and "finetune" in helped.stdout


def test_home_in_paths_is_expanded(tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(ROOT / "data/summarize", home / "data")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tmp_path, train={"output_dir": "~/runs/first"},
                         data={"train": "~/data/train.jsonl", "validation": "~/data/validation.jsonl"})
    path = write_recipe(tmp_path, recipe)
    assert load_recipe(path).train.output_dir == str(home / "runs/first")
    result = CliRunner().invoke(app, ["validate", str(path)])  # reads the data from the fake home
    assert result.exit_code == 0, result.output
    assert not any("~" in p.name for p in tmp_path.rglob("*")), "a literal ~ folder was made"


def test_valid_inputs_next_to_the_bad_ones_pass(tmp_path):
    # T5 projects heads to d_kv, so its width need not divide by the head count.
    t5 = tiny_recipe(tmp_path)
    t5["model"]["config"].update(d_model=30, num_heads=4, d_kv=8)
    assert CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path, t5, "t5.yaml"))]).exit_code == 0
    # A pickle-only model folder has no header to check: non-empty is accepted.
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32, "d_kv": 8, "num_heads": 4}))
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not checked further")
    saved = tiny_recipe(tmp_path)
    saved["model"] = {"name_or_path": str(folder)}
    result = CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path, saved, "saved.yaml"))])
    assert result.exit_code == 0, result.output
