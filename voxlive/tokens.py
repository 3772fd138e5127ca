"""The Tekken tokenizer (through mistral-common): special ids by name, the prompt, token bytes.

Text comes out as bytes per token: Tekken is byte-level BPE, so a multi-byte UTF-8 character can
be split across two tokens and must be joined as bytes before decoding.
"""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, path: Path):
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        self._tek = Tekkenizer.from_file(Path(path))
        self._ignore = SpecialTokenPolicy.IGNORE
        get = self._tek.get_special_token
        self.bos = get("<s>")
        self.eos = get("</s>")
        self.streaming_pad = get("[STREAMING_PAD]")
        self.streaming_word = get("[STREAMING_WORD]")
        self.num_special = self._tek.num_special_tokens

    def prompt(self, n_left_pad_tokens: int, n_delay_tokens: int) -> list[int]:
        """``[BOS] + [STREAMING_PAD] * (left pad + delay)``: one id per audio token of the prefill."""
        return [self.bos] + [self.streaming_pad] * (n_left_pad_tokens + n_delay_tokens)

    def is_text(self, token: int) -> bool:
        return token >= self.num_special

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes a token adds to the text (empty for special tokens)."""
        if token < self.num_special:
            return b""
        return self._tek.id_to_byte_piece(token, self._ignore)

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        return self._tek.encode(text, bos=False, eos=False)
