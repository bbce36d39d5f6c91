"""Pretrained checkpoints as users bring them: folders laid out as the Hub's (tests/checkpoints.py builds
them offline, tokenizer files in their real formats, old layout without tokenizer.json and new layout
with it). Every family goes through finetune, then a reload in plain transformers and `hftk eval`, which
must give finetune's own predictions and metrics exactly; and the checkpoint's own settings (task
prefix, generation config, chat template) are used as they are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests import checkpoints
from tests.conftest import FAULTS, ROOT, results, run_hftk, write_recipe


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """hub(NAME) -> the folder of that checkpoint (checkpoints.NAMES), built on first use for the session."""
    root = tmp_path_factory.mktemp("hub")
    texts: list[str] = []

    def folder(name: str) -> Path:
        if not texts:
            texts.extend(checkpoints.corpus())
        return checkpoints.build(root, name, texts)

    return folder


def copy_of(hub, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(hub(name), target)
    return target


HUB_RECIPES = sorted((ROOT / "recipes" / "hub").glob("*.yaml"))


@pytest.mark.parametrize("path", HUB_RECIPES, ids=[p.stem for p in HUB_RECIPES])
def test_hub_recipes_load(path):
    """The README's recipes for pretrained Hub models pass the schema, offline (nothing is fetched)."""
    from hftk.recipe import load_recipe

    recipe = load_recipe(path)
    assert recipe.model.name_or_path and "/" in recipe.model.name_or_path and recipe.model.config is None
    assert not Path(recipe.model.name_or_path).exists()  # a Hub id, not a folder of this checkout


def test_every_family_has_a_hub_recipe():
    assert {p.stem for p in HUB_RECIPES} >= {"t5_summarize", "bart_summarize", "marian_translate", "gpt2_summarize",
                                             "llama_chat", "bert_qa"}


# --- tokenizers in every format ---------------------------------------------------------------------------

TEXTS = ["The child follows the old boat.", "L'enfant suit le bateau vieux, à 10h30 !", "  two  spaces\nand a line"]


@pytest.mark.parametrize("family", ["t5", "bart", "gpt2", "llama", "bert"])
def test_old_and_new_layouts_tokenize_alike(hub, family):
    from hftk.recipe import ModelSection
    from hftk.tokenizer import load_tokenizer

    old, new = (load_tokenizer(ModelSection(name_or_path=str(hub(f"{family}-{layout}")))) for layout in ("old", "new"))
    assert not (hub(f"{family}-old") / "tokenizer.json").exists() and (hub(f"{family}-new") / "tokenizer.json").exists()
    assert [old(t)["input_ids"] for t in TEXTS] == [new(t)["input_ids"] for t in TEXTS]
    assert old.pad_token_id is not None and old.pad_token_id == new.pad_token_id


def test_a_tokenizer_needing_a_package_not_installed_is_bad_input(hub, tmp_path):
    """tiktoken is not installed here: a folder whose tokenizer file is in tiktoken's format (as Llama 3's
    original/tokenizer.model) ends at validate with the package to install."""
    import base64
    import importlib.util

    assert importlib.util.find_spec("tiktoken") is None
    folder = copy_of(hub, "llama-old", tmp_path)
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    recipe = case_recipe(tmp_path, "dialogue", folder)
    run = run_hftk("validate", str(write_recipe(tmp_path, recipe)))
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].endswith("needs the tiktoken package, which is not installed: "
                                                        "pip install tiktoken"), run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name, task, needed", [("t5-old", "translation", True), ("marian-old", "translation", True),
                                                ("t5-new", "translation", False)])
def test_without_sentencepiece_validate_names_the_package(hub, tmp_path, name, task, needed):
    """sentencepiece hidden from the import system in a fresh interpreter (tests/faults/sitecustomize.py),
    as on a machine where it was never installed: spiece.model / *.spm folders are exit 2 at validate
    and at finetune, before any model loads; a folder with tokenizer.json does not need it."""
    recipe = write_recipe(tmp_path, case_recipe(tmp_path, task, hub(name)))
    env = {"PYTHONPATH": FAULTS, "HFTK_HIDE_PACKAGES": "sentencepiece"}
    commands = [("validate", str(recipe))] + ([("finetune", str(recipe))] if needed else [])
    for command in commands:
        run = run_hftk(*command, env=env)
        if not needed:
            assert run.returncode == 0, run.stderr[-2000:]
            continue
        assert run.returncode == 2, run.stderr[-2000:]
        last = run.stderr.strip().splitlines()[-1]
        assert "needs the sentencepiece package, which is not installed: pip install sentencepiece" in last
        assert "Traceback" not in run.stderr and not (tmp_path / "run").exists()


# --- what the checkpoint says ------------------------------------------------------------------------------

def test_checkpoint_prefix_is_used_when_the_recipe_names_none(hub, tmp_path):
    from hftk.preflight import plan_inputs
    from hftk.recipe import validate_recipe

    folder = hub("t5-new")
    for task, expected in (("summarization", "summarize: "), ("translation", "translate English to French: ")):
        plan = plan_inputs(validate_recipe(case_recipe(tmp_path, task, folder)), ["validation"])
        assert plan.recipe.data.source_prefix == expected
    chosen = case_recipe(tmp_path, "summarization", folder)
    chosen["data"]["source_prefix"] = ""
    assert plan_inputs(validate_recipe(chosen), ["validation"]).recipe.data.source_prefix == ""
    other = case_recipe(tmp_path, "translation", folder)
    other["data"].update(source_lang="fr", target_lang="en")  # the config has no fr->en prefix
    assert plan_inputs(validate_recipe(other), ["validation"]).recipe.data.source_prefix is None


def test_config_without_model_type(hub, tmp_path):
    folder = copy_of(hub, "bert-old", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, case_recipe(tmp_path, "extractive_qa", folder))
    run = run_hftk("validate", str(recipe))
    assert run.returncode == 0 and "an encoder-only bert model" in run.stdout + run.stderr, run.stderr[-2000:]
    assert "names no model_type; read as bert (its architectures: BertForMaskedLM)" in run.stdout + run.stderr
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    run = run_hftk("validate", str(recipe))
    assert run.returncode == 2
    assert "has no model_type and no architectures; add the family's name to it, e.g. \"model_type\": \"bert\"" \
        in run.stderr.strip().splitlines()[-1]


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And Chile?"},
        {"role": "assistant", "content": "Santiago is."}]


@pytest.mark.parametrize("name", ["llama-old", "llama-generation"])
def test_the_checkpoints_chat_template_is_used_as_it_is(hub, name):
    """The ids are apply_chat_template's; the loss falls on the assistant's tokens as the template marks
    them (generation blocks: transformers' assistant mask), and evaluation's prompt is the conversation up
    to the last reply with the template's generation prompt."""
    from transformers import AutoTokenizer

    from hftk.tasks import get_task
    from hftk.tasks.base import IGNORE_INDEX
    from hftk.tasks.dialogue import chat_tokens
    from hftk.tokenizer import with_pad_token

    tokenizer = get_task("dialogue").prepare_tokenizer(with_pad_token(AutoTokenizer.from_pretrained(hub(name))))
    template = json.loads((hub(name) / "tokenizer_config.json").read_text())["chat_template"]
    assert tokenizer.chat_template == template
    ids, labels = chat_tokens(tokenizer, CHAT, last_turn_only=False)
    assert ids == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if name == "llama-generation":
        mask = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)["assistant_masks"]
        assert learned == [i for i, m in enumerate(mask) if m]
    assert tokenizer.decode([ids[i] for i in learned]).split() == ["Lima.", "</s>", "Santiago", "is.", "</s>"]
    _, last = chat_tokens(tokenizer, CHAT, last_turn_only=True)
    first = next(i for i, label in enumerate(last) if label != IGNORE_INDEX)
    assert ids[:first] == tokenizer.apply_chat_template(CHAT[:-1], tokenize=True, add_generation_prompt=True,
                                                        return_dict=True)["input_ids"]


def test_the_fallback_chat_template_carries_bos_and_no_loss_on_separators(hub):
    from transformers import AutoTokenizer

    from hftk.tasks import get_task
    from hftk.tasks.base import IGNORE_INDEX
    from hftk.tasks.dialogue import CHAT_TEMPLATE, chat_tokens
    from hftk.tokenizer import with_pad_token

    tokenizer = get_task("dialogue").prepare_tokenizer(with_pad_token(AutoTokenizer.from_pretrained(hub("llama-base"))))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    ids, labels = chat_tokens(tokenizer, CHAT, last_turn_only=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    learned = [label for label in labels if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Lima.</s>Santiago is.</s>"  # content and eos; no newline, no role line


# --- every family: finetune, reload, eval -------------------------------------------------------------------

DATA = {
    "translation": {"train": "data/translate/train.jsonl", "validation": "data/translate/validation.jsonl",
                    "source_lang": "en", "target_lang": "fr", "max_source_length": 48, "max_target_length": 32},
    "summarization": {"train": "data/summarize/train.jsonl", "validation": "data/summarize/validation.jsonl",
                      "max_source_length": 64, "max_target_length": 16},
    "dialogue": {"train": "data/dialogue/train.jsonl", "validation": "data/dialogue/validation.jsonl",
                 "max_source_length": 128, "max_target_length": 32},
    "extractive_qa": {"train": "data/qa/train.jsonl", "validation": "data/qa/validation.jsonl",
                      "max_source_length": 96, "doc_stride": 32},
}


def case_recipe(tmp_path: Path, task: str, folder: Path, **data) -> dict:
    """A few optimizer steps on a slice of the bundled data; evaluated one example at a time, so a plain
    transformers reload at the same batch gives the same numbers bit for bit."""
    paths = {k: str(ROOT / v) if k in ("train", "validation") else v for k, v in DATA[task].items()}
    return {"task": task, "model": {"name_or_path": str(folder)},
            "data": {**paths, "max_train_samples": 48, "max_eval_samples": 10, **data},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "per_device_train_batch_size": 8,
                      "learning_rate": 1e-3, "logging_steps": 3, "seed": 7, "bf16": False,  # as the fp32 reload
                      "eval_on_start": False},  # its own tests (test_eval_on_start.py) cover the step-0 score
            "eval": {"per_device_eval_batch_size": 1, "max_new_tokens": 8}}


CASES = {  # id -> (folder, task, data overrides)
    "t5-old translation": ("t5-old", "translation", {}),
    "t5-new summarization": ("t5-new", "summarization", {}),
    "bart-old summarization": ("bart-old", "summarization", {}),
    "bart-new summarization": ("bart-new", "summarization", {}),
    "marian translation": ("marian-old", "translation", {"source_lang": "fr", "target_lang": "en"}),
    "gpt2-old summarization": ("gpt2-old", "summarization", {}),
    "gpt2-new summarization": ("gpt2-new", "summarization", {}),
    "llama-old dialogue": ("llama-old", "dialogue", {}),
    "llama-generation dialogue": ("llama-generation", "dialogue", {}),
    "bert-old qa": ("bert-old", "extractive_qa", {}),
    "bert-new qa": ("bert-new", "extractive_qa", {}),
}


def predictions(path: Path) -> list[str]:
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


def eval_rows(recipe: dict) -> list[dict]:
    rows = [json.loads(line) for line in Path(recipe["data"]["validation"]).read_text().splitlines()]
    return rows[:recipe["data"]["max_eval_samples"]]


def plain_predictions(run_dir: Path, recipe: dict) -> list[str]:
    """The saved folder reloaded by transformers alone and run as a user would: the prefix in its
    config, its chat template, greedy generation, one example at a time."""
    import transformers

    task, data, settings = recipe["task"], recipe["data"], recipe["eval"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir)
    config = transformers.AutoConfig.from_pretrained(run_dir)
    rows = eval_rows(recipe)
    if task == "extractive_qa":
        return qa_predictions(transformers.AutoModelForQuestionAnswering.from_pretrained(run_dir), tokenizer, rows, data)
    seq2seq = config.is_encoder_decoder
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(run_dir).eval()
    out = []
    for row in rows:
        if task == "dialogue":
            ids = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"][-data["max_source_length"]:]
        else:
            key = "summarization" if task == "summarization" else f"translation_{data['source_lang']}_to_{data['target_lang']}"
            prefix = (getattr(config, "task_specific_params", None) or {}).get(key, {}).get("prefix", "")
            source = row["document"] if task == "summarization" else row["translation"][data["source_lang"]]
            if seq2seq:
                ids = tokenizer(prefix + source, max_length=data["max_source_length"], truncation=True)["input_ids"]
            else:  # the document cut from its end so that it and the cue fit max_source_length
                bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id != tokenizer.eos_token_id else []
                ids = tokenizer(prefix + source + "\nSummary:", add_special_tokens=False)["input_ids"]
                room = data["max_source_length"] - len(bos)
                if len(ids) > room:
                    cue = tokenizer("\nSummary:", add_special_tokens=False)["input_ids"]
                    ids = tokenizer(prefix + source, add_special_tokens=False)["input_ids"][:room - len(cue)] + cue
                ids = bos + ids
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=settings["max_new_tokens"], num_beams=1, do_sample=False)
        tokens = generated[0] if seq2seq else generated[0, len(ids):]
        out.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return out


def plain_seq2seq_loss(run_dir: Path, recipe: dict) -> float:
    """The saved encoder-decoder's mean loss per target token on the evaluated rows, in plain transformers."""
    import transformers

    data = recipe["data"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(run_dir).eval()
    key = "summarization" if recipe["task"] == "summarization" else \
        f"translation_{data['source_lang']}_to_{data['target_lang']}"
    prefix = (getattr(model.config, "task_specific_params", None) or {}).get(key, {}).get("prefix", "")
    total, count = 0.0, 0
    for row in eval_rows(recipe):
        if recipe["task"] == "summarization":
            source, target = row["document"], row["summary"]
        else:
            source, target = row["translation"][data["source_lang"]], row["translation"][data["target_lang"]]
        inputs = tokenizer(prefix + source, max_length=data["max_source_length"], truncation=True, return_tensors="pt")
        labels = tokenizer(text_target=target, max_length=data["max_target_length"], truncation=True,
                           return_tensors="pt")["input_ids"]
        with torch.no_grad():
            total += model(**inputs, labels=labels).loss.item() * labels.shape[1]
        count += labels.shape[1]
    return total / count


def qa_predictions(model, tokenizer, rows: list[dict], data: dict) -> list[str]:
    from hftk.tasks.extractive_qa import NO_OFFSET, best_answer

    model.eval()
    answers = []
    for row in rows:
        encoded = tokenizer(row["question"].lstrip(), row["context"], truncation="only_second",
                            max_length=data["max_source_length"], stride=data["doc_stride"],
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        windows = []
        for i in range(len(encoded["input_ids"])):
            inputs = {k: torch.tensor([encoded[k][i]]) for k in ("input_ids", "attention_mask", "token_type_ids")
                      if k in encoded}
            with torch.no_grad():
                output = model(**inputs)
            logits = torch.stack([output.start_logits[0], output.end_logits[0]]).float()
            offsets = torch.tensor([list(o) if s == 1 else [NO_OFFSET, NO_OFFSET]
                                    for o, s in zip(encoded["offset_mapping"][i], encoded.sequence_ids(i))])
            windows.append((logits, offsets))
        answers.append(best_answer(row["context"], windows, allow_empty=False))
    return answers


SCORES = ("eval_loss", "eval_bleu", "eval_chrf", "eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum",
          "eval_exact_match", "eval_f1", "eval_samples")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_family_finetunes_and_reloads_as_evaluated(hub, tmp_path, case):
    name, task, data = CASES[case]
    recipe = case_recipe(tmp_path, task, hub(name), **data)
    path = write_recipe(tmp_path, recipe)
    run = run_hftk("finetune", str(path))
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "run"
    finetuned = predictions(out / "predictions.jsonl")
    assert len(finetuned) == 10 and any(finetuned), finetuned
    assert plain_predictions(out, recipe) == finetuned  # the saved model is the evaluated model
    if task != "dialogue" and json.loads((out / "config.json").read_text()).get("is_encoder_decoder"):
        assert plain_seq2seq_loss(out, recipe) == pytest.approx(results(out)["eval_loss"], rel=1e-6)
    again = run_hftk("eval", str(path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert predictions(out / "eval" / "validation" / "predictions.jsonl") == finetuned
    evaluated = json.loads((out / "eval" / "validation" / "eval_results.json").read_text())
    trained = results(out)
    shared = [k for k in SCORES if k in trained]
    assert len(shared) >= 3 and {k: evaluated[k] for k in shared} == {k: trained[k] for k in shared}
    log = (out / "train.log").read_text()
    saved = json.loads((out / "tokenizer_config.json").read_text())
    if task != "extractive_qa":  # the saved generation config speaks of the saved tokenizer's tokens
        from transformers import AutoTokenizer

        generation = json.loads((out / "generation_config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert generation["pad_token_id"] == tokenizer.pad_token_id, generation
        stops = generation["eos_token_id"]
        assert tokenizer.eos_token_id in (stops if isinstance(stops, list) else [stops])
    if name.startswith("t5"):  # the checkpoint's own prefix, logged and written into the resolved recipe
        prefix = "summarize: " if task == "summarization" else "translate English to French: "
        assert f"using the checkpoint's own prefix {prefix!r}" in log
        assert f"source_prefix: '{prefix}'" in (out / "recipe.yaml").read_text()
    if name == "marian-old":
        assert "frozen model.encoder.embed_positions.weight, model.decoder.embed_positions.weight" in log
    if name.startswith("llama"):  # Llama-2's generation config pads with <unk> (0); the tokenizer pads with </s>
        assert generation["pad_token_id"] == 2 and "pad_token_id 0 -> 2 (</s>)" in log
        assert saved.get("chat_template") == json.loads((hub(name) / "tokenizer_config.json").read_text())["chat_template"] \
            or (out / "chat_template.jinja").read_text() == json.loads(
                (hub(name) / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.slow
def test_lora_extractive_qa_adapter_equals_merged(hub, tmp_path):
    """The adapter sees BERT's segment ids as the merged model does: the same logits, the same answers;
    adapter_config.json names the QA head once."""
    import transformers

    from hftk.adapters import load_adapter

    recipe = case_recipe(tmp_path, "extractive_qa", hub("bert-new"))
    recipe["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "merge": True}
    path = write_recipe(tmp_path, recipe)
    run = run_hftk("finetune", str(path))
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "run"
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["qa_outputs"]
    for model_dir, target in ((out, "adapter"), (out / "merged", "merged")):
        done = run_hftk("eval", str(path), "--model", str(model_dir), "--output-dir", str(tmp_path / target))
        assert done.returncode == 0, done.stderr[-3000:]
    adapter, merged = (predictions(tmp_path / t / "predictions.jsonl") for t in ("adapter", "merged"))
    assert adapter == merged == predictions(out / "predictions.jsonl")
    scores = [json.loads((tmp_path / t / "eval_results.json").read_text()) for t in ("adapter", "merged")]
    assert scores[0]["eval_f1"] == scores[1]["eval_f1"] == results(out)["eval_f1"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["Who is the minister?"], ["Lars Berg is the minister of Lisbon."], return_tensors="pt")
    assert batch["token_type_ids"].any()
    base = transformers.AutoModelForQuestionAnswering.from_pretrained(hub("bert-new"))
    with torch.no_grad():
        adapted = load_adapter(out, base).eval()(**batch).start_logits
        full = transformers.AutoModelForQuestionAnswering.from_pretrained(out / "merged").eval()(**batch).start_logits
    torch.testing.assert_close(adapted, full, rtol=1e-5, atol=1e-5)
