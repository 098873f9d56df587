"""Load a `Tokenizer` from a Hugging Face / MLX model folder (or a GGUF file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from kvgrove.tokenize.gguf import tokenizer_from_gguf
from kvgrove.tokenize.gguf_meta import read_gguf_metadata
from kvgrove.tokenize.tokenizer import (
    Backend,
    DecodeStyle,
    HFBackend,
    SentencePieceBackend,
    Tokenizer,
    end_of_turn_ids,
)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes tokens as "..." or {"content": "..."}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(
        template, list
    ):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model folder: tokenizer.json through `tokenizers`, else tokenizer.model
    through `sentencepiece`; a path to a .gguf file reads its metadata.

    BOS/EOS ids come from generation_config.json, then config.json, then tokenizer_config.json
    (the first that names them; `eos_token_id` may be a list), and the end-of-turn tokens of
    `END_OF_TURN_TOKENS` join the EOS set. The chat template comes from chat_template.jinja,
    tokenizer_config.json or chat_template.json.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return tokenizer_from_gguf(read_gguf_metadata(path))
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {path}")
    tok_config = _read_json(path / "tokenizer_config.json")
    backend: Backend
    if (path / "tokenizer.json").is_file():
        hf = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        backend = HFBackend(hf)
        added = backend.added_tokens()
        special = [i for i, t in added.items() if t.special]
        raw = [i for i, t in added.items() if not t.special]
        style, strip, byte_ids = _hf_decode_style(hf)
    elif (path / "tokenizer.model").is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        backend = SentencePieceBackend(sp)
        special = sorted(backend.control_ids)
        # User-defined pieces decode like normal ones (sentencepiece matches them itself).
        raw = []
        style = DecodeStyle.SENTENCEPIECE
        strip = _sp_adds_dummy_prefix(sp)
        byte_ids = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
    else:
        raise FileNotFoundError(f"{path} has neither tokenizer.json nor tokenizer.model")

    bos_ids, eos_ids = _special_ids(path, tok_config, backend)
    bos_id = bos_ids[0] if bos_ids else None
    eos_set = set(eos_ids or [])
    eos_set |= end_of_turn_ids(backend, [*special, *raw])
    add_bos = tok_config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds_bos(backend, bos_id)
    add_eos = tok_config.get("add_eos_token") is True
    return Tokenizer(
        backend,
        style=style,
        special_ids=special,
        raw_ids=raw,
        byte_ids=byte_ids,
        strip_leading_space=strip,
        bos_id=bos_id,
        eos_ids=eos_set,
        eos_id=eos_ids[0] if eos_ids else None,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=_chat_template(path, tok_config),
        name=path.name,
    )


def _special_ids(
    folder: Path, tok_config: dict[str, Any], backend: Backend
) -> tuple[list[int] | None, list[int] | None]:
    bos = eos = None
    for config in (
        _read_json(folder / "generation_config.json"),
        _read_json(folder / "config.json"),
    ):
        bos = bos or _ids(config.get("bos_token_id"))
        eos = eos or _ids(config.get("eos_token_id"))
    for key in ("bos_token", "eos_token"):
        text = _token_text(tok_config.get(key))
        token_id = None if text is None else backend.piece_to_id(text)
        if token_id is not None and key == "bos_token":
            bos = bos or [token_id]
        elif token_id is not None:
            eos = eos or [token_id]
    if bos is None and isinstance(backend, SentencePieceBackend) and backend.sp.bos_id() >= 0:
        bos = [backend.sp.bos_id()]
    if eos is None and isinstance(backend, SentencePieceBackend) and backend.sp.eos_id() >= 0:
        eos = [backend.sp.eos_id()]
    return bos, eos


def _post_processor_adds_bos(backend: Backend, bos_id: int | None) -> bool:
    if bos_id is None:
        return False
    if isinstance(backend, HFBackend):
        return backend.tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    return True  # SentencePiece models (Llama 1/2, Mistral) are trained with BOS


def _hf_decode_style(tok: tokenizers.Tokenizer) -> tuple[DecodeStyle, bool, list[int] | None]:
    """Infer from tokenizer.json's decoder how pieces map back to bytes."""
    config = json.loads(tok.to_str())
    decoder = config.get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {d.get("type") for d in steps if isinstance(d, dict)}
    if "ByteLevel" in types:
        return DecodeStyle.BYTE_LEVEL, False, None
    metaspace = [d for d in steps if d.get("type") == "Metaspace"]
    replaces_underline = any(
        d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "\u2581"
        for d in steps
    )
    if metaspace or replaces_underline or "ByteFallback" in types:
        if metaspace:
            m = metaspace[0]
            strip = m.get("prepend_scheme", "always") != "never" and m.get("add_prefix_space", True)
        else:
            strip = any(d.get("type") == "Strip" and d.get("start", 0) >= 1 for d in steps)
        return DecodeStyle.SENTENCEPIECE, bool(strip), None
    return DecodeStyle.OPAQUE, False, None


def _sp_adds_dummy_prefix(sp: Any) -> bool:
    """Whether the SentencePiece model prepends "▁" (its normalizer's add_dummy_prefix)."""
    ids = sp.encode("a")
    return bool(ids) and sp.id_to_piece(ids[0]).startswith("\u2581")
