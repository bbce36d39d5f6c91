"""What a saved tokenizer's files need besides the tokenizers library, read from the folder alone (no ML
library imported), so a missing package is bad input before any model loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from hftk.errors import UserError
from hftk.recipe import ModelSection

# Tokenizer classes that exist only as SentencePiece code (no tokenizers-library version), whatever files
# the folder holds.
SENTENCEPIECE_CLASSES = ("MarianTokenizer", "M2M100Tokenizer", "PLBartTokenizer", "BartphoTokenizer", "CpmTokenizer",
                         "BertGenerationTokenizer", "GPTSw3Tokenizer", "SiglipTokenizer", "Speech2TextTokenizer",
                         "SpeechT5Tokenizer")


def tokenizer_source(model: ModelSection) -> str | None:
    return (model.tokenizer and model.tokenizer.name_or_path) or model.name_or_path


def needed_packages(folder: Path) -> dict[str, list[str]]:
    """The packages a saved tokenizer's files need beyond tokenizers, each with the files that ask for it.
    A tokenizer.json is read by tokenizers alone; without one, transformers converts a SentencePiece
    model (spiece.model, tokenizer.model, *.spm) with sentencepiece, or a tiktoken file with tiktoken."""
    needs: dict[str, list[str]] = {}
    tokenizer_class = _tokenizer_class(folder)
    if tokenizer_class in SENTENCEPIECE_CLASSES:
        needs["sentencepiece"] = [f"tokenizer_class {tokenizer_class}"]
    if (folder / "tokenizer.json").is_file() or (folder / "tekken.json").is_file():
        return needs
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".model", ".spm") or not path.is_file():
            continue
        package = "tiktoken" if path.name == "tiktoken.model" or _is_tiktoken_text(path) else "sentencepiece"
        needs.setdefault(package, []).append(path.name)
    return needs


def _tokenizer_class(folder: Path) -> str | None:
    try:
        found = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return found.removesuffix("Fast") if isinstance(found, str) else None


def _is_tiktoken_text(path: Path) -> bool:
    """tiktoken's files are lines of `BASE64 RANK`; a SentencePiece model is a binary protobuf."""
    with path.open("rb") as handle:
        first = handle.readline(256).split()
    return len(first) == 2 and first[1].isdigit()


def check_packages(model: ModelSection) -> None:
    """A local tokenizer whose files need a package that is not installed is bad input, found before any
    model loads (transformers would fail on it deep inside loading, sometimes naming another package)."""
    name = tokenizer_source(model)
    folder = Path(name).expanduser() if name else None
    if folder is None or not folder.is_dir():
        return
    for package, files in needed_packages(folder).items():
        if importlib.util.find_spec(package) is None:
            raise UserError(f"model.name_or_path: the tokenizer in {name} ({', '.join(files)}) needs the {package} "
                            f"package, which is not installed: pip install {package}")
