"""Tokenizers: the interface the data pipeline and evaluation rely on, the byte-level tokenizer
and a Hugging Face tokenizer with its chat template.

The byte tokenizer needs no vocabulary files, so the tiny recipes run anywhere; its vocabulary
(256 bytes + pad, bos, eos = 259) is what recipes/tiny_cpu.yaml sets as model.vocab_size.

``HFTokenizer`` wraps a local Hugging Face tokenizer folder (``tokenizer.json``,
``tokenizer_config.json``, the chat template). Which tokens of a conversation are the assistant's
comes from the chat template itself: its ``{% generation %}`` blocks when it has them, otherwise
the conversation is rendered prefix by prefix, so each assistant turn's tokens are exactly those
a model produces after the prompt ``encode_prompt`` gives it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, FrozenSet, List, Optional, Protocol, Sequence, Tuple, Union

from jinja2.exceptions import TemplateError  # chat templates are Jinja (jinja2 comes with torch)

from nemo_anchored.errors import UserError

ROLES = ("system", "user", "assistant")

Messages = List[dict]
Prompt = Union[str, Messages]


class TokenizerError(ValueError, UserError):
    """The tokenizer cannot do what is asked at all (not loadable, no chat template for chat
    data, a template that breaks its own rules); the message names the tokenizer."""


class ConversationError(ValueError, UserError):
    """This conversation cannot be encoded: invalid messages, or a chat template that rejects
    or mis-renders it. The message says which message and why."""


class Tokenizer(Protocol):
    """What the data pipeline and evaluation need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> Optional[int]: ...  # None: the tokenizer has no bos

    @property
    def eos_id(self) -> int: ...

    @property
    def stop_ids(self) -> FrozenSet[int]:
        """Token ids that end an assistant turn: generation stops at any of them."""

    @property
    def chat_template(self) -> Optional[str]:
        """The Jinja chat template; None when there is none (the byte tokenizer's plain
        rendering is not a template)."""

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_prompt(self, prompt: Prompt) -> List[int]:
        """Ids a model continues to produce the next assistant turn; ``prompt`` is one user
        message (str) or a list of ``{"role", "content"}`` messages."""

    def encode_conversation(self, messages: Messages) -> Tuple[List[int], List[int]]:
        """(ids, loss_mask) of a whole conversation: the mask is 1 on the assistant turns'
        tokens, each turn's end-of-turn token included, and 0 elsewhere."""

    def encode_example(self, prompt: str, response: str) -> Tuple[List[int], List[int]]:
        """(ids, loss_mask) of a prompt/response example: the conversation of one user and one
        assistant message, or without a chat template ``encode_prompt(prompt) + response +
        [eos]``, the mask 1 on the response and eos."""


def _exchange(prompt: str, response: str) -> Messages:
    """A prompt/response example as the conversation it is: one user and one assistant turn."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def check_messages(messages: Any, *, training: bool) -> Messages:
    """``messages`` as a list of ``{"role", "content"}`` dicts, or ConversationError naming the
    first problem. ``training``: also require at least one assistant turn and no empty
    assistant content (an empty turn would only teach the model to stop at once)."""
    if not isinstance(messages, list):
        raise ConversationError(f"'messages' is not a list (got {type(messages).__name__})")
    if not messages:
        raise ConversationError("'messages' is empty")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ConversationError(f"{where} is not a JSON object (got "
                                    f"{type(message).__name__})")
        for key in ("role", "content"):
            if key not in message:
                raise ConversationError(f"{where}: missing {key!r}")
        for key in message:
            if key not in ("role", "content"):
                # Passing it on would let the template use it or not: either way unchecked.
                raise ConversationError(f"{where}: unexpected key {key!r} (a message has only "
                                        f"'role' and 'content')")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ConversationError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ConversationError(f"{where}: 'content' is not a string (got "
                                    f"{type(content).__name__})")
        try:
            # JSON escapes can spell lone surrogates, which have no UTF-8 bytes.
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise ConversationError(f"{where}: 'content' contains a lone surrogate (invalid "
                                    f"Unicode)") from None
        if training and role == "assistant" and not content:
            raise ConversationError(f"{where}: assistant 'content' is empty")
    if training and not any(message["role"] == "assistant" for message in messages):
        raise ConversationError("no assistant turn")
    return messages


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then the special tokens pad=256, bos=257, eos=258.

    Conversations use a plain rendering, since the byte vocabulary has no role tokens: bos,
    then every message's content bytes in order, each assistant turn followed by eos. Role
    names are not rendered (put any separator you need into the contents). A user message
    followed by an assistant turn thus renders exactly as a prompt/response pair,
    ``[bos] + prompt + response + [eos]``, and ``encode_prompt`` is the rendering so far, the
    assistant turn starting right after it.
    """

    _NUM_BYTES = 256

    @property
    def vocab_size(self) -> int:
        return self._NUM_BYTES + 3

    @property
    def pad_id(self) -> int:
        return self._NUM_BYTES

    @property
    def bos_id(self) -> int:
        return self._NUM_BYTES + 1

    @property
    def eos_id(self) -> int:
        return self._NUM_BYTES + 2

    @property
    def stop_ids(self) -> FrozenSet[int]:
        return frozenset({self.eos_id})

    @property
    def chat_template(self) -> None:
        return None

    def encode(self, text: str) -> List[int]:
        """UTF-8 bytes of ``text``; UnicodeEncodeError for lone surrogates (no valid bytes)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte tokens in ``ids``: special tokens are skipped and invalid UTF-8 is
        replaced with U+FFFD. Ids outside the vocabulary raise ValueError: they come from a
        model whose padded vocabulary was not masked, which should not pass unnoticed."""
        data = bytearray()
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the byte vocabulary "
                                 f"[0, {self.vocab_size})")
            if token < self._NUM_BYTES:
                data.append(token)
        return data.decode("utf-8", errors="replace")

    def encode_prompt(self, prompt: Prompt) -> List[int]:
        """``[bos] + encode(prompt)`` for a str; the plain rendering of a message list."""
        if isinstance(prompt, str):
            return [self.bos_id, *self.encode(prompt)]
        return self._render(check_messages(prompt, training=False))[0]

    def encode_conversation(self, messages: Messages) -> Tuple[List[int], List[int]]:
        """The plain rendering (see the class) and its mask: each assistant turn's bytes and
        the eos that ends it."""
        return self._render(check_messages(messages, training=True))

    def encode_example(self, prompt: str, response: str) -> Tuple[List[int], List[int]]:
        """The plain rendering of the user and assistant turns: ``[bos] + prompt + response +
        [eos]``."""
        return self.encode_conversation(_exchange(prompt, response))

    def _render(self, messages: Messages) -> Tuple[List[int], List[int]]:
        ids, mask = [self.bos_id], [0]
        for message in messages:
            content = self.encode(message["content"])
            if message["role"] == "assistant":
                ids += [*content, self.eos_id]
                mask += [1] * (len(content) + 1)
            else:
                ids += content
                mask += [0] * len(content)
        return ids, mask


# A Jinja {% generation %} tag, as transformers detects it.
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Assistant content for finding what the template writes after a turn; plain ASCII words
# that no template rewrites.
_PROBE_CONTENT = "Probe reply"


class HFTokenizer:
    """A Hugging Face tokenizer folder, loaded offline, with its chat template.

    ``vocab_size`` counts added tokens (``len(tokenizer)``); ``pad_id`` is eos when the
    tokenizer has no pad token; ``bos_id`` may be None (no bos is invented: with a chat
    template, the template decides how a sequence starts). ``stop_ids`` is eos plus the special
    token(s) the template writes right after an assistant turn's content (``<|im_end|>``,
    ``<|eot_id|>``, ...).

    Contents of chat messages may not contain the text of a special token: the tokenizer would
    turn it into the control token, and a literal ``<|im_end|>`` in the data would fake a turn
    boundary. Such a conversation raises ConversationError.
    """

    def __init__(self, folder: Union[str, os.PathLike]):
        # This project has no model hub; local_files_only below is what guarantees it, these
        # also keep any other transformers code in the process off the network.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        from transformers import AutoTokenizer

        self.name = str(folder)
        if not Path(folder).is_dir():
            raise TokenizerError(f"Hugging Face tokenizer {self.name!r}: not a directory")
        try:
            self._hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise TokenizerError(f"Hugging Face tokenizer {self.name!r} cannot be loaded: "
                                 f"{error}") from error
        if self._hf.eos_token_id is None:
            raise TokenizerError(f"Hugging Face tokenizer {self.name!r} has no eos token: "
                                 f"sequences could not end")
        self._special_ids = frozenset(self._hf.all_special_ids) | frozenset(
            index for index, token in self._hf.added_tokens_decoder.items() if token.special)
        special_texts = sorted((self._hf.convert_ids_to_tokens(index)
                                for index in self._special_ids), key=len, reverse=True)
        self._special_text = (re.compile("|".join(map(re.escape, special_texts)))
                              if special_texts else None)
        try:
            self._template: Optional[str] = self._hf.get_chat_template()
        except ValueError:  # transformers' answer for "no chat template"
            self._template = None
        self._generation_marked = bool(self._template and _GENERATION_TAG.search(self._template))
        self._stop_ids = frozenset({self.eos_id}) | self._end_of_turn_ids()

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"

    @property
    def vocab_size(self) -> int:
        return len(self._hf)

    @property
    def pad_id(self) -> int:
        pad = self._hf.pad_token_id
        return self.eos_id if pad is None else pad

    @property
    def bos_id(self) -> Optional[int]:
        return self._hf.bos_token_id

    @property
    def eos_id(self) -> int:
        return self._hf.eos_token_id

    @property
    def stop_ids(self) -> FrozenSet[int]:
        return self._stop_ids

    @property
    def chat_template(self) -> Optional[str]:
        return self._template

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` alone: no bos/eos added (special-token text is parsed as the
        special token, as the tokenizer does)."""
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens; ids outside the vocabulary raise ValueError
        (a model's padded vocabulary columns that were not masked)."""
        ids = [int(token) for token in ids]
        for token in ids:
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary of {self.name!r} "
                                 f"[0, {self.vocab_size})")
        return self._hf.decode(ids, skip_special_tokens=True)

    def encode_prompt(self, prompt: Prompt) -> List[int]:
        """The chat template's rendering with the generation prompt (the next assistant turn's
        header). Without a template a str prompt is ``[bos?] + encode(prompt)``, and a message
        list raises TokenizerError. Either way the text of a special token in it raises
        ConversationError."""
        if self._template is None:
            if isinstance(prompt, str):
                return [*self._bos(), *self.encode(self._plain_text(prompt, "the prompt"))]
            raise self._no_template_error()
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        messages = self._checked(messages, training=False)
        return self._render(messages, add_generation_prompt=True)

    def encode_conversation(self, messages: Messages) -> Tuple[List[int], List[int]]:
        """The template's rendering of the whole conversation (the ids
        ``apply_chat_template(messages)`` gives) and the mask of the assistant turns' tokens.

        With ``{% generation %}`` in the template, the mask is what those blocks enclose,
        extended through the stop tokens right after a block: a block around the content alone
        would otherwise never teach the model to end its turn. Otherwise each assistant turn is
        located by rendering the conversation up to it with the generation prompt, and through
        it: the first must be a prefix of the second and the second of the whole rendering
        (else ConversationError: the template rewrites earlier turns, or the content's tokens
        merge with the header's), and the turn's tokens are those in between, up to and
        including its last stop token (what follows it, such as ChatML's newline, is template
        glue the model is never asked to produce). A conversation that opens with an assistant
        turn has nothing before it to render (transformers renders no empty conversation),
        so there it raises ConversationError: what the template puts before the turn (a
        default system prompt, the role header) cannot be told from the turn.
        """
        if self._template is None:
            raise self._no_template_error()
        messages = self._checked(messages, training=True)
        if self._generation_marked:
            return self._generation_mask(messages)
        # Rendered first, so that a template that refuses the conversation says why itself.
        ids = self._render(messages, add_generation_prompt=False)
        if messages[0]["role"] == "assistant":
            raise ConversationError(
                f"messages[0] is an assistant turn: without {{% generation %}} blocks in the "
                f"chat template of tokenizer {self.name!r}, an assistant turn is found by "
                f"rendering the conversation before it, and there is none; start with a system "
                f"or user message, or add {{% generation %}} blocks to the template")
        mask = [0] * len(ids)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            header = self._render(messages[:index], add_generation_prompt=True)
            through = self._render(messages[:index + 1], add_generation_prompt=False)
            if through[:len(header)] != header or ids[:len(through)] != through:
                raise ConversationError(
                    f"the chat template of tokenizer {self.name!r} does not render "
                    f"messages[{index}] (assistant) as a continuation of the prompt before it: "
                    f"the ids up to that turn (with the generation prompt) are not a prefix of "
                    f"the ids through it, or those not a prefix of the whole conversation's. "
                    f"The template rewrites earlier turns, or the content's tokens merge with "
                    f"the template's text around it; add {{% generation %}} blocks to the "
                    f"template to mark assistant tokens explicitly")
            turn = range(len(header), len(through))
            stops = [position for position in turn if ids[position] in self._stop_ids]
            end = stops[-1] + 1 if stops else len(through)
            for position in range(len(header), end):
                mask[position] = 1
        if not any(mask):
            raise TokenizerError(f"the chat template of tokenizer {self.name!r} renders no "
                                 f"token for the assistant turns of this conversation")
        return ids, mask

    def encode_example(self, prompt: str, response: str) -> Tuple[List[int], List[int]]:
        """The chat template's user and assistant turns (``encode_conversation``); without a
        template ``[bos?] + prompt + response + [eos]``, refusing the text of a special token in
        either as the template path does."""
        if self._template is not None:
            return self.encode_conversation(_exchange(prompt, response))
        prompt_ids = self.encode_prompt(prompt)
        response_ids = [*self.encode(self._plain_text(response, "the response")), self.eos_id]
        return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)

    # ---------------------------------------------------------------------------- internals

    def _bos(self) -> List[int]:
        return [] if self.bos_id is None else [self.bos_id]

    def _no_template_error(self) -> TokenizerError:
        return TokenizerError(f"Hugging Face tokenizer {self.name!r} has no chat template: chat "
                              f"messages cannot be rendered (prompt/response data can)")

    def _checked(self, messages: Any, training: bool) -> Messages:
        messages = check_messages(messages, training=training)
        for index, message in enumerate(messages):
            self._plain_text(message["content"], f"messages[{index}]: 'content'")
        return messages

    def _plain_text(self, text: str, what: str) -> str:
        """``text``, or ConversationError when it contains the text of a special token."""
        found = self._special_text and self._special_text.search(text)
        if found:
            raise ConversationError(
                f"{what} contains {found.group()!r}, the text of a special token of tokenizer "
                f"{self.name!r} (it would be encoded as that control token)")
        return text

    def _render(self, messages: Messages, add_generation_prompt: bool) -> List[int]:
        try:
            return self._hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                return_dict=False)
        except TemplateError as error:  # the template's raise_exception(...) among others
            raise ConversationError(f"the chat template of tokenizer {self.name!r} rejects the "
                                    f"conversation: {error}") from None

    def _generation_mask(self, messages: Messages) -> Tuple[List[int], List[int]]:
        try:
            out = self._hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        except TemplateError as error:
            raise ConversationError(f"the chat template of tokenizer {self.name!r} rejects the "
                                    f"conversation: {error}") from None
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if not any(mask):
            raise TokenizerError(f"the chat template of tokenizer {self.name!r} has "
                                 f"{{% generation %}} blocks but marks no token of this "
                                 f"conversation's assistant turns")
        for position in range(1, len(ids)):  # through the stop tokens right after a block
            if mask[position - 1] and not mask[position] and ids[position] in self._stop_ids:
                mask[position] = 1
        return ids, mask

    def _end_of_turn_ids(self) -> FrozenSet[int]:
        """The special tokens the template writes right after an assistant turn's content,
        read off a rendered one-exchange probe conversation. Also proves at load time that the
        template renders at all."""
        if self._template is None:
            return frozenset()
        probe = [{"role": "user", "content": "Probe question"},
                 {"role": "assistant", "content": _PROBE_CONTENT}]
        try:
            text = self._hf.apply_chat_template(probe, tokenize=False)
        except TemplateError as error:
            raise TokenizerError(f"the chat template of tokenizer {self.name!r} cannot render "
                                 f"a user/assistant exchange: {error}") from error
        at = text.rfind(_PROBE_CONTENT)
        if at < 0:
            return frozenset()  # a template that rewrites contents: eos alone ends turns
        after = self.encode(text[at + len(_PROBE_CONTENT):])
        ends = []
        for token in after:
            if token not in self._special_ids or token == self.bos_id:
                break
            ends.append(token)
        return frozenset(ends)


TOKENIZERS = ("byte",)


def build_tokenizer(name: str) -> Tokenizer:
    """The tokenizer named by data.tokenizer: "byte", or the path of a Hugging Face tokenizer
    folder."""
    if name == "byte":
        return ByteTokenizer()
    if Path(name).is_dir():
        try:
            return HFTokenizer(name)
        except TokenizerError as error:
            raise ValueError(f"data.tokenizer: {error}") from error
    raise ValueError(f"data.tokenizer: unknown tokenizer {name!r} (expected one of: "
                     f"{', '.join(TOKENIZERS)}, or a Hugging Face tokenizer folder)")
