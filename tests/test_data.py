"""The SFT data pipeline: byte tokenizer, Hugging Face tokenizers with chat templates, JSONL
loading (prompt/response and chat messages; masks, padding, length policies, bad data) and the
data-parallel batch order. Expectations are built here from the raw bytes, from transformers'
own apply_chat_template, or by hand from a tiny word-level vocabulary, not from the code under
test."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from nemo_anchored.data import (BatchOrder, ByteTokenizer, ConversationError,  # noqa: E402
                                DataError, HFTokenizer, TokenizerError, build_tokenizer,
                                load_sft_dataset)

REPO = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()
PAD, BOS, EOS = 256, 257, 258


def write_jsonl(tmp_path, lines, name="data.jsonl"):
    """A JSONL file from dicts (serialised) and strings (written verbatim)."""
    path = tmp_path / name
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def example(prompt, response):
    return {"prompt": prompt, "response": response}


def assert_every_line_accounted_for(report):
    assert report.lines_read == (report.examples_kept + len(report.skipped)
                                 + len(report.dropped_overlong)
                                 + len(report.dropped_no_response))


# --- tokenizer --------------------------------------------------------------------------------

def test_byte_tokenizer_ids_and_round_trip():
    assert (TOK.vocab_size, TOK.pad_id, TOK.bos_id, TOK.eos_id) == (259, PAD, BOS, EOS)
    for text in ["", "Reverse: sable\n", "naïve café — 東京 🚀", "\x00\x7f"]:
        ids = TOK.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert TOK.decode(ids) == text


def test_byte_tokenizer_decode_skips_specials_and_replaces_invalid_utf8():
    assert TOK.decode([BOS, *TOK.encode("hé"), EOS, PAD, PAD]) == "hé"
    assert TOK.decode([0xC3]) == "\ufffd"  # a lone UTF-8 lead byte
    with pytest.raises(ValueError, match="259"):
        TOK.decode([259])


def test_build_tokenizer():
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="data.tokenizer.*'gpt2'"):
        build_tokenizer("gpt2")


# --- examples, masks and padding --------------------------------------------------------------

def test_mask_selects_exactly_response_and_eos(tmp_path):
    prompt, response = "Add: 2+2\n", "4é"
    path = write_jsonl(tmp_path, [example(prompt, response), example("", "x")])
    data = load_sft_dataset(path, TOK, seq_length=20)
    full = [BOS, *prompt.encode(), *response.encode("utf-8"), EOS]
    n = len(full) - 1
    assert data.tokens[0, :n].tolist() == full[:-1]
    assert data.labels[0, :n].tolist() == full[1:]
    mask = data.loss_mask[0].bool()
    assert data.labels[0][mask].tolist() == [*response.encode("utf-8"), EOS]
    assert TOK.decode(data.labels[0][mask].tolist()) == response
    # The mask starts where the input is the last prompt byte (it predicts the first response
    # byte) and covers one position per response byte plus the eos.
    first = mask.nonzero()[0].item()
    assert data.tokens[0, first].item() == prompt.encode()[-1]
    assert int(mask.sum()) == len(response.encode("utf-8")) + 1
    # An empty prompt is allowed: bos predicts the first response token.
    assert data.tokens[1, :2].tolist() == [BOS, ord("x")]
    assert data.loss_mask[1, :3].tolist() == [1.0, 1.0, 0.0]


def test_padding_and_tensor_layout(tmp_path):
    path = write_jsonl(tmp_path, [example("ab", "cd")])
    data = load_sft_dataset(path, TOK, seq_length=10)
    assert len(data) == 1 and data.seq_length == 10
    assert data.tokens.dtype == data.labels.dtype == torch.int64
    assert data.loss_mask.dtype == torch.float32
    # [bos a b c d eos]: 5 positions, then padding.
    assert data.tokens[0].tolist() == [BOS, 97, 98, 99, 100] + [PAD] * 5
    assert data.labels[0].tolist() == [97, 98, 99, 100, EOS] + [PAD] * 5
    assert data.loss_mask[0].tolist() == [0, 0, 1, 1, 1] + [0] * 5


def test_recipe_data_set_loads_cleanly():
    data = load_sft_dataset(REPO / "recipes/data/tiny_sft.jsonl", TOK, seq_length=48)
    report = data.report
    assert report.lines_read == report.examples_kept == len(data) == 96
    assert not (report.skipped or report.truncated or report.dropped_overlong
                or report.dropped_no_response)
    assert (data.loss_mask.sum(dim=1) >= 2).all()  # every example trains a response and eos


# --- length policies --------------------------------------------------------------------------

def length_cases(tmp_path):
    """Line 1 fits exactly (5 positions), line 2 is overlong with room for some of its
    response, line 3's prompt alone fills the window."""
    return write_jsonl(tmp_path, [example("ab", "cd"), example("abc", "defghij"),
                                  example("abcdefgh", "xy")])


def test_exact_fit_is_not_truncated(tmp_path):
    data = load_sft_dataset(write_jsonl(tmp_path, [example("ab", "cd")]), TOK, seq_length=5)
    assert data.labels[0].tolist() == [97, 98, 99, 100, EOS]
    assert data.report.truncated == []


def test_truncate_keeps_the_first_positions(tmp_path):
    data = load_sft_dataset(length_cases(tmp_path), TOK, seq_length=5, overlong="truncate")
    report = data.report
    assert (report.lines_read, report.examples_kept) == (3, 2)
    assert report.truncated == [2]
    assert report.dropped_no_response == [3]
    full = [BOS, *b"abcdefghij", EOS]
    assert data.tokens[1].tolist() == full[:5]
    assert data.labels[1].tolist() == full[1:6]  # the eos is cut off
    assert data.loss_mask[1].tolist() == [0, 0, 0, 1, 1]  # labels d, e
    assert "1 truncated" in report.summary() and "(line 3)" in report.summary()
    assert_every_line_accounted_for(report)


def test_drop_overlong(tmp_path):
    data = load_sft_dataset(length_cases(tmp_path), TOK, seq_length=5, overlong="drop")
    assert len(data) == 1
    assert data.report.dropped_overlong == [2, 3]
    assert data.report.truncated == data.report.dropped_no_response == []
    assert "2 dropped as longer than seq_length" in data.report.summary()
    assert_every_line_accounted_for(data.report)


def test_raise_on_overlong(tmp_path):
    path = length_cases(tmp_path)
    with pytest.raises(DataError, match=rf"^{path}:2: .*11 positions.*seq_length=5"):
        load_sft_dataset(path, TOK, seq_length=5, overlong="raise")


def test_invalid_policies():
    with pytest.raises(ValueError, match="data.on_error"):
        load_sft_dataset("unused.jsonl", TOK, 8, on_error="ignore")
    with pytest.raises(ValueError, match="data.overlong"):
        load_sft_dataset("unused.jsonl", TOK, 8, overlong="wrap")


# --- bad data ---------------------------------------------------------------------------------

BAD_LINES = {
    "malformed JSON": '{"prompt": "a", "response": ',
    "not a JSON object": '["a", "b"]',
    "missing 'prompt'": '{"response": "b"}',
    "missing 'response'": '{"prompt": "a"}',
    "'prompt' is not a string": '{"prompt": 3, "response": "b"}',
    "'response' is not a string": '{"prompt": "a", "response": null}',
    "'response' is empty": '{"prompt": "a", "response": ""}',
    "lone surrogate": '{"prompt": "\\ud800", "response": "b"}',
    # json.loads alone would keep the last value and drop the first without a word.
    "key 'response' given twice": '{"prompt": "a", "response": "b", "response": "c"}',
    "key 'role' given twice": '{"messages": [{"role": "user", "content": "a", "role": '
                              '"assistant"}]}',
    # Python's parser recurses per level: a RecursionError, no line number, if not caught.
    "nested too deeply": '{"prompt": ' + "[" * 100_000,
}


@pytest.mark.parametrize("reason", BAD_LINES)
def test_bad_line_raises_with_file_and_line(tmp_path, reason):
    path = write_jsonl(tmp_path, [example("a", "b"), BAD_LINES[reason], example("c", "d")])
    with pytest.raises(DataError, match=rf"^{path}:2: .*{reason}"):
        load_sft_dataset(path, TOK, seq_length=8)


def test_bad_lines_are_skipped_and_counted(tmp_path):
    lines = [example("a", "b")] + list(BAD_LINES.values()) + [example("c", "d")]
    data = load_sft_dataset(write_jsonl(tmp_path, lines), TOK, seq_length=8, on_error="skip")
    report = data.report
    assert len(data) == report.examples_kept == 2
    assert report.lines_read == len(lines)
    assert [line for line, _ in report.skipped] == list(range(2, 2 + len(BAD_LINES)))
    for (_, got), expected in zip(report.skipped, BAD_LINES):
        assert expected in got
    assert f"{len(BAD_LINES)} lines skipped" in report.summary()
    assert_every_line_accounted_for(report)
    assert data.tokens[1, :3].tolist() == [BOS, ord("c"), ord("d")]


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        load_sft_dataset(path, TOK, seq_length=8)
    data = load_sft_dataset(path, TOK, seq_length=8, on_error="skip")
    assert len(data) == 1 and data.report.skipped[0][0] == 2


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n')
    assert len(load_sft_dataset(path, TOK, seq_length=8)) == 1


def test_line_numbers_ignore_unicode_line_separators(tmp_path):
    # U+2028 inside a JSON string is not a line break in JSONL.
    path = write_jsonl(tmp_path, [example("a\u2028b", "c"), "{bad"])
    with pytest.raises(DataError, match=rf"^{path}:2: "):
        load_sft_dataset(path, TOK, seq_length=8)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_blank_lines_are_counted_as_skipped(tmp_path, on_error):
    path = write_jsonl(tmp_path, [example("a", "b"), "", "   ", example("c", "d")])
    report = load_sft_dataset(path, TOK, seq_length=8, on_error=on_error).report
    assert report.lines_read == 4 and report.examples_kept == 2
    assert report.skipped == [(2, "blank line"), (3, "blank line")]
    assert_every_line_accounted_for(report)


def test_no_examples_left_raises(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no training examples left"):
        load_sft_dataset(empty, TOK, seq_length=8)
    all_bad = write_jsonl(tmp_path, ["[]", "{}"], name="bad.jsonl")
    with pytest.raises(DataError, match=rf"(?s)^{all_bad}: 2 lines read.*2 lines skipped.*"
                                        r"no training examples left"):
        load_sft_dataset(all_bad, TOK, seq_length=8, on_error="skip")


# --- chat messages with the byte tokenizer -----------------------------------------------------

def msgs(*turns):
    """Messages from (role, content) pairs."""
    return [{"role": role, "content": content} for role, content in turns]


CHAT = msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"),
            ("user", "2+2?"), ("assistant", "4"))


def test_byte_prompt_and_conversation_rendering():
    assert TOK.encode_prompt("Add: 2+2\n") == [BOS, *b"Add: 2+2\n"]
    assert TOK.stop_ids == frozenset({EOS}) and TOK.chat_template is None
    ids, mask = TOK.encode_conversation(CHAT)
    assert ids == [BOS, *b"Be brief.", *b"Hi", *b"Hello!", EOS, *b"2+2?", *b"4", EOS]
    assert [token for token, m in zip(ids, mask) if m] == [*b"Hello!", EOS, *b"4", EOS]
    assert TOK.encode_prompt(CHAT[:4]) == [BOS, *b"Be brief.", *b"Hi", *b"Hello!", EOS,
                                           *b"2+2?"]
    # A user/assistant exchange renders as a prompt/response pair does.
    assert TOK.encode_conversation(msgs(("user", "ab"), ("assistant", "c"))) == \
        ([BOS, 97, 98, 99, EOS], [0, 0, 0, 1, 1])
    assert TOK.encode_prompt(msgs(("user", "ab"))) == TOK.encode_prompt("ab")


def test_messages_and_pairs_mix_in_one_file(tmp_path):
    path = write_jsonl(tmp_path, [{"messages": CHAT, "id": 7}, example("ab", "c"),
                                  {"messages": msgs(("user", "ab"), ("assistant", "c"))}])
    data = load_sft_dataset(path, TOK, seq_length=40)
    full = [BOS, *b"Be brief.", *b"Hi", *b"Hello!", EOS, *b"2+2?", *b"4", EOS]
    n = len(full) - 1
    assert data.tokens[0].tolist() == full[:-1] + [PAD] * (40 - n)
    assert data.labels[0].tolist() == full[1:] + [PAD] * (40 - n)
    assert data.labels[0][data.loss_mask[0].bool()].tolist() == [*b"Hello!", EOS, *b"4", EOS]
    for key in ("tokens", "labels", "loss_mask"):
        assert torch.equal(getattr(data, key)[1], getattr(data, key)[2])


BAD_MESSAGES = {
    "'messages' is not a list (got str)": {"messages": "Hi"},
    "'messages' is empty": {"messages": []},
    "messages[1] is not a JSON object": {"messages": [CHAT[1], "Hello"]},
    "messages[0]: role 'bot' is not one of system, user, assistant":
        {"messages": msgs(("bot", "Hi"), ("assistant", "a"))},
    "messages[0]: role None is not one of": {"messages": [{"role": None, "content": "Hi"},
                                                           CHAT[2]]},
    "messages[1]: assistant 'content' is empty":
        {"messages": msgs(("user", "Hi"), ("assistant", ""))},
    "no assistant turn": {"messages": msgs(("system", "s"), ("user", "Hi"))},
    "messages[1]: 'content' is not a string (got list)":
        {"messages": [CHAT[1], {"role": "assistant", "content": ["a"]}]},
    "messages[0]: missing 'content'": {"messages": [{"role": "user"}, CHAT[2]]},
    "messages[0]: unexpected key 'name'": {"messages": [{**CHAT[1], "name": "bob"}, CHAT[2]]},
    "messages[1]: 'content' contains a lone surrogate":
        '{"messages": [{"role": "user", "content": "a"}, '
        '{"role": "assistant", "content": "\\udc00"}]}',
    "has both 'messages' and 'prompt'/'response'": {"messages": CHAT, "prompt": "a",
                                                     "response": "b"},
    "needs 'messages', or 'prompt' and 'response'": {"text": "a"},
}


@pytest.mark.parametrize("tokenizer", ["byte", "smollm2"])
@pytest.mark.parametrize("reason", BAD_MESSAGES)
def test_bad_messages_raise_with_file_and_line(tmp_path, request, tokenizer, reason):
    tok = TOK if tokenizer == "byte" else request.getfixturevalue("smol")
    path = write_jsonl(tmp_path, [{"messages": CHAT}, BAD_MESSAGES[reason], example("c", "d")])
    with pytest.raises(DataError, match=rf"^{path}:2: {re.escape(reason)}"):
        load_sft_dataset(path, tok, seq_length=64)


# --- a Hugging Face tokenizer: SmolLM2's, with its ChatML template ------------------------------

@pytest.fixture(scope="session")
def smol(smol_folder):
    return HFTokenizer(smol_folder)


@pytest.fixture(scope="session")
def smol_ref(smol_folder):
    """transformers' own tokenizer: the reference for ids and renderings."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_folder, local_files_only=True)


def render(ref, messages, **kwargs):
    return ref.apply_chat_template(messages, return_dict=False, **kwargs)


def masked_runs(ids, mask):
    """The contiguous runs of masked ids."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


MULTILINE = msgs(("user", "List two colours."), ("assistant", "- red\n- blue"),
                 ("user", "And a third?"), ("assistant", "- green"),
                 ("user", "Thanks!"), ("assistant", "You're welcome."))


@pytest.mark.parametrize("conversation", [CHAT, CHAT[1:], MULTILINE],
                         ids=["system", "default-system", "three-turns"])
def test_hf_conversation_is_the_chat_template_rendering(smol, smol_ref, conversation):
    ids, mask = smol.encode_conversation(conversation)
    assert ids == render(smol_ref, conversation)
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    # One masked run per assistant turn: its content and <|im_end|>, no role header, not the
    # newline the template writes after <|im_end|>.
    assistant = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert [smol_ref.decode(run) for run in masked_runs(ids, mask)] == \
        [content + "<|im_end|>" for content in assistant]


def test_hf_prompt_and_special_ids(smol, smol_ref):
    assert smol.encode_prompt("What is 2+2?") == render(
        smol_ref, msgs(("user", "What is 2+2?")), add_generation_prompt=True)
    assert smol.encode_prompt(CHAT[:4]) == render(smol_ref, CHAT[:4], add_generation_prompt=True)
    # What training shows after a prompt is what generation continues from that prompt.
    prompt = smol.encode_prompt(CHAT[:4])
    ids, mask = smol.encode_conversation(CHAT)
    assert ids[:len(prompt)] == prompt and mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0
    im_end = smol_ref.convert_tokens_to_ids("<|im_end|>")
    assert im_end in smol.stop_ids and smol.eos_id in smol.stop_ids
    assert smol.vocab_size == len(smol_ref) == 49152
    assert (smol.bos_id, smol.eos_id) == (smol_ref.bos_token_id, smol_ref.eos_token_id)
    assert smol.pad_id == smol_ref.pad_token_id
    assert smol.chat_template == smol_ref.chat_template
    text = "naïve café — 東京"
    assert smol.encode(text) == smol_ref.encode(text, add_special_tokens=False)
    assert smol.decode([*prompt, *smol.encode(text), im_end]).endswith("assistant\n" + text)
    with pytest.raises(ValueError, match="49152"):
        smol.decode([49152])


def test_hf_dataset_rows(tmp_path, smol, smol_ref):
    pair = msgs(("user", "What is 2+2?"), ("assistant", "4"))
    path = write_jsonl(tmp_path, [{"messages": CHAT}, example("What is 2+2?", "4")])
    data = load_sft_dataset(path, smol, seq_length=64)
    newline = smol_ref.encode("\n", add_special_tokens=False)
    for row, conversation in enumerate([CHAT, pair]):
        full = render(smol_ref, conversation)
        # The example ends at the last <|im_end|>: the newline after it trains nothing.
        assert full[-1:] == newline and smol_ref.decode(full[-2:-1]) == "<|im_end|>"
        kept = full[:-1]
        n = len(kept) - 1
        assert data.tokens[row, :n].tolist() == kept[:-1]
        assert data.labels[row, :n].tolist() == kept[1:]
        # Label j predicts token j + 1.
        assert torch.equal(data.labels[row, :n - 1], data.tokens[row, 1:n])
        assert (data.tokens[row, n:] == smol.pad_id).all()
        assert (data.labels[row, n:] == smol.pad_id).all()
        assert not data.loss_mask[row, n:].any()
        trained = data.labels[row][data.loss_mask[row].bool()].tolist()
        assistant = [m["content"] for m in conversation if m["role"] == "assistant"]
        assert smol_ref.decode(trained) == "".join(c + "<|im_end|>" for c in assistant)


def test_hf_overlong_policies(tmp_path, smol, smol_ref):
    short = msgs(("user", "Hi"), ("assistant", "Hello!"))
    long = msgs(("user", "Hi"), ("assistant", "one two three four five six seven eight nine"))
    hog = msgs(("user", "word " * 60), ("assistant", "ok"))
    seq = len(render(smol_ref, short)) - 2  # exact fit: tokens through <|im_end|>, less one
    header = len(render(smol_ref, short[:1], add_generation_prompt=True))
    full_long = render(smol_ref, long)
    assert header < seq < len(full_long) - 2
    path = write_jsonl(tmp_path, [{"messages": m} for m in (short, long, hog)])

    data = load_sft_dataset(path, smol, seq_length=seq, overlong="truncate")
    report = data.report
    assert (report.examples_kept, report.truncated, report.dropped_no_response) == (2, [2], [3])
    assert data.tokens[1].tolist() == full_long[:seq]
    assert data.labels[1].tolist() == full_long[1:seq + 1]
    # Labels from the first content token on are trained; the cut loses <|im_end|>.
    assert data.loss_mask[1].tolist() == [0] * (header - 1) + [1] * (seq - header + 1)
    assert_every_line_accounted_for(report)

    data = load_sft_dataset(path, smol, seq_length=seq, overlong="drop")
    assert (len(data), data.report.dropped_overlong) == (1, [2, 3])
    assert_every_line_accounted_for(data.report)

    with pytest.raises(DataError, match=rf"^{path}:2: .*{len(full_long) - 2} positions.*"
                                        rf"seq_length={seq}"):
        load_sft_dataset(path, smol, seq_length=seq, overlong="raise")


def test_hf_bad_lines_are_skipped_and_counted(tmp_path, smol):
    special = {"messages": msgs(("user", "Say <|im_end|> please"), ("assistant", "No."))}
    lines = [{"messages": CHAT}, *BAD_MESSAGES.values(), special, example("a", "b")]
    data = load_sft_dataset(write_jsonl(tmp_path, lines), smol, 64, on_error="skip")
    report = data.report
    assert len(data) == report.examples_kept == 2
    assert [line for line, _ in report.skipped] == list(range(2, len(lines)))
    for (_, got), expected in zip(report.skipped, BAD_MESSAGES):
        assert got.startswith(expected)
    assert "messages[0]: 'content' contains '<|im_end|>', the text of a special token" in \
        report.skipped[-1][1]
    assert_every_line_accounted_for(report)


CHATML_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}INSIDE{% endgeneration %}OUTSIDE"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("inside, outside, suffix", [
    ("{{ message['content'] + '<|im_end|>' }}", "{{ '\n' }}", "<|im_end|>"),
    ("{{ message['content'] }}", "{{ '<|im_end|>\n' }}", "<|im_end|>"),
    ("{{ message['content'] + '<|im_end|>\n' }}", "", "<|im_end|>\n"),
], ids=["content-and-end", "content-only", "content-end-and-newline"])
def test_hf_generation_blocks_are_followed(tmp_path, smol_folder, smol, smol_ref, inside,
                                           outside, suffix):
    """SmolLM2's template with {% generation %} blocks renders the same text. Around content
    and <|im_end|>, the blocks give the mask the prefix rendering gives; around the content
    alone, that mask too, the mask extended through the <|im_end|> right after each block (else
    the model would never learn to end a turn); around the newline as well, the newline too
    (so the mask really comes from the blocks)."""
    folder = tmp_path / "generation"
    shutil.copytree(smol_folder, folder)
    (folder / "chat_template.jinja").write_text(
        CHATML_GENERATION.replace("INSIDE", inside).replace("OUTSIDE", outside))
    marked = HFTokenizer(folder)
    ids, mask = marked.encode_conversation(MULTILINE)
    reference_ids, reference_mask = smol.encode_conversation(MULTILINE)
    assert ids == reference_ids
    runs = [smol_ref.decode(run) for run in masked_runs(ids, mask)]
    assert runs == [m["content"] + suffix for m in MULTILINE if m["role"] == "assistant"]
    if suffix == "<|im_end|>":
        assert mask == reference_mask


# --- tiny tokenizers built with the tokenizers library ------------------------------------------

TINY_SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<eot>", "<system>", "<user>", "<assistant>"]
TINY_IDS = {token: i for i, token in enumerate(
    TINY_SPECIALS + "hi hello how are you fine thanks be brief elided".split())}
TINY_CHAT = msgs(("system", "be brief"), ("user", "hi"), ("assistant", "hello"),
                 ("user", "how are you"), ("assistant", "fine thanks"))
_TINY_TURNS = (
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('start with a user') }}"
    "{% endif %}{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '> ' }}"
    "{% if m['role'] == 'assistant' %}ASSISTANT{% else %}{{ m['content'] + ' <eot> ' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}")
# Every turn closed by <eot> (not the eos </s>).
TINY_PREFIX = _TINY_TURNS.replace("ASSISTANT", "{{ m['content'] + ' <eot> ' }}")
TINY_GENERATION = _TINY_TURNS.replace(
    "ASSISTANT", "{% generation %}{{ m['content'] + ' <eot>' }}{% endgeneration %}{{ ' ' }}")
# Earlier assistant turns are rewritten once the conversation goes on (as templates that strip
# past reasoning do): the conversation cannot be rendered prefix by prefix.
TINY_REWRITES = _TINY_TURNS.replace(
    "ASSISTANT", "{% if loop.last %}{{ m['content'] }}{% else %}elided{% endif %}{{ ' <eot> ' }}")


def tiny_tokenizer(folder, template, bos=True, pad=True):
    """A word-level tokenizer (whitespace-separated words of TINY_IDS) saved as a Hugging Face
    tokenizer folder with ``template`` (None: no chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(TINY_IDS, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
        bos_token="<s>" if bos else None, pad_token="<pad>" if pad else None,
        additional_special_tokens=["<eot>", "<system>", "<user>", "<assistant>"])
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


def words(text):
    return [TINY_IDS[word] for word in text.split()]


@pytest.mark.parametrize("template", [TINY_PREFIX, TINY_GENERATION], ids=["prefix", "generation"])
def test_tiny_tokenizer_conversation(tmp_path, template):
    tok = HFTokenizer(tiny_tokenizer(tmp_path / "tok", template))
    ids, mask = tok.encode_conversation(TINY_CHAT)
    assert ids == words("<s> <system> be brief <eot> <user> hi <eot> <assistant> hello <eot> "
                        "<user> how are you <eot> <assistant> fine thanks <eot>")
    assert masked_runs(ids, mask) == [words("hello <eot>"), words("fine thanks <eot>")]
    assert tok.stop_ids == {TINY_IDS["</s>"], TINY_IDS["<eot>"]}
    assert tok.encode_prompt("hi") == words("<s> <user> hi <eot> <assistant>")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == \
        (len(TINY_IDS), TINY_IDS["<s>"], TINY_IDS["</s>"], TINY_IDS["<pad>"])
    with pytest.raises(ConversationError, match="rejects the conversation: start with a user"):
        tok.encode_conversation(msgs(("assistant", "hi")))


def test_hf_conversation_opening_with_an_assistant_turn(tmp_path, smol):
    """Without {% generation %} blocks there is no rendering before the turn to tell the
    template's text from the turn's (SmolLM2's puts its default system prompt and the role
    header there): refused. The blocks say which tokens are the turn's."""
    opening = msgs(("assistant", "hello"), ("user", "hi"), ("assistant", "fine"))
    with pytest.raises(ConversationError, match=r"^messages\[0\] is an assistant turn: "
                                                r"without \{% generation %\} blocks"):
        smol.encode_conversation(opening)
    template = _TINY_TURNS.replace("{{ raise_exception('start with a user') }}", "")
    generation = HFTokenizer(tiny_tokenizer(tmp_path / "generation", template.replace(
        "ASSISTANT", "{% generation %}{{ m['content'] + ' <eot>' }}{% endgeneration %}{{ ' ' }}")))
    ids, mask = generation.encode_conversation(opening)
    assert ids == words("<s> <assistant> hello <eot> <user> hi <eot> <assistant> fine <eot>")
    assert masked_runs(ids, mask) == [words("hello <eot>"), words("fine <eot>")]


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    folder = tiny_tokenizer(tmp_path / "tok", TINY_REWRITES)
    tok = HFTokenizer(folder)
    # A single exchange is consistent...
    ids, mask = tok.encode_conversation(TINY_CHAT[:3])
    assert masked_runs(ids, mask) == [words("hello <eot>")]
    # ...a second assistant turn rewrites the first.
    reason = (rf"the chat template of tokenizer '{re.escape(str(folder))}' does not render "
              rf"messages\[2\] \(assistant\) as a continuation of the prompt before it")
    with pytest.raises(ConversationError, match=reason):
        tok.encode_conversation(TINY_CHAT)
    path = write_jsonl(tmp_path, [{"messages": TINY_CHAT[:3]}, {"messages": TINY_CHAT}])
    with pytest.raises(DataError, match=rf"^{path}:2: {reason}"):
        load_sft_dataset(path, tok, seq_length=32)


def test_tokenizer_without_chat_template(tmp_path):
    tok = HFTokenizer(tiny_tokenizer(tmp_path / "tok", None))
    assert tok.chat_template is None and tok.stop_ids == {TINY_IDS["</s>"]}
    assert tok.encode_prompt("hi how") == words("<s> hi how")
    with pytest.raises(TokenizerError, match="has no chat template"):
        tok.encode_prompt(msgs(("user", "hi")))
    # Chat data cannot be rendered: an error whatever data.on_error says.
    path = write_jsonl(tmp_path, [example("hi how", "fine"), {"messages": TINY_CHAT}])
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=rf"^{path}:2: .*has no chat template"):
            load_sft_dataset(path, tok, seq_length=16, on_error=on_error)
    # Prompt/response pairs are bos + prompt + response + eos.
    pairs = write_jsonl(tmp_path, [example("hi how", "fine thanks")], name="pairs.jsonl")
    data = load_sft_dataset(pairs, tok, seq_length=7)
    full = words("<s> hi how fine thanks </s>")
    pad = TINY_IDS["<pad>"]
    assert data.tokens[0].tolist() == full[:-1] + [pad] * 2
    assert data.labels[0].tolist() == full[1:] + [pad] * 2
    assert data.loss_mask[0].tolist() == [0, 0, 1, 1, 1, 0, 0]
    # The text of a special token is refused in a prompt or a response, as in chat messages: it
    # would be encoded as that control token (here, an eos in mid-response).
    special = write_jsonl(tmp_path, [example("hi </s> how", "fine"), example("hi", "fine </s>"),
                                     example("hi how", "fine thanks")], name="special.jsonl")
    data = load_sft_dataset(special, tok, seq_length=7, on_error="skip")
    assert data.report.skipped == [
        (1, f"the prompt contains '</s>', the text of a special token of tokenizer {tok.name!r} "
            "(it would be encoded as that control token)"),
        (2, f"the response contains '</s>', the text of a special token of tokenizer "
            f"{tok.name!r} (it would be encoded as that control token)")]
    assert data.tokens[0].tolist() == full[:-1] + [pad] * 2
    with pytest.raises(ConversationError, match="the prompt contains '</s>'"):
        tok.encode_prompt("hi </s>")
    # No bos is invented, and pad falls back to eos.
    bare = HFTokenizer(tiny_tokenizer(tmp_path / "bare", None, bos=False, pad=False))
    assert (bare.bos_id, bare.pad_id) == (None, TINY_IDS["</s>"])
    assert bare.encode_prompt("hi how") == words("hi how")
    data = load_sft_dataset(pairs, bare, seq_length=6)
    assert data.tokens[0].tolist() == words("hi how fine thanks </s> </s>")
    assert data.labels[0].tolist() == words("how fine thanks </s> </s> </s>")
    assert data.loss_mask[0].tolist() == [0, 1, 1, 1, 0, 0]


def test_build_tokenizer_and_config_take_a_folder(tmp_path):
    from nemo_anchored.config import ConfigError, load_config

    folder = tiny_tokenizer(tmp_path / "tok", TINY_PREFIX)
    assert isinstance(build_tokenizer(str(folder)), HFTokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^data.tokenizer: .*'.*empty' cannot be loaded"):
        build_tokenizer(str(tmp_path / "empty"))
    recipe = REPO / "recipes/tiny_cpu.yaml"
    data = [f"data.train_path={REPO / 'recipes/data/tiny_sft.jsonl'}"]
    assert load_config(recipe, data + [f"data.tokenizer={folder}"]).data.tokenizer == \
        str(folder)
    with pytest.raises(ConfigError, match="data.tokenizer: .* is neither 'byte' nor a Hugging"):
        load_config(recipe, data + [f"data.tokenizer={tmp_path / 'missing'}"])


# --- batch order ------------------------------------------------------------------------------

def orders(n=23, gbs=8, mbs=2, dp=2, seed=7, shuffle=True):
    return [BatchOrder(n, gbs, mbs, rank, dp, seed, shuffle) for rank in range(dp)]


def rank_indices(order, epoch, step):
    return torch.cat(order.indices(epoch, step)).tolist()


def test_epoch_layout():
    order = orders()[0]
    assert (order.steps_per_epoch, order.unused_per_epoch, order.num_micro_batches) == (2, 7, 2)
    assert order.epoch_and_step(0) == (0, 0)
    assert order.epoch_and_step(5) == (2, 1)


def test_ranks_agree_and_partition_each_global_batch():
    ranks = orders()
    for epoch in range(3):
        perm = ranks[0].permutation(epoch)
        assert all(torch.equal(r.permutation(epoch), perm) for r in ranks)
        assert sorted(perm.tolist()) == list(range(23))
        seen = []
        for step in range(ranks[0].steps_per_epoch):
            per_rank = [rank_indices(r, epoch, step) for r in ranks]
            assert all(len(part) == 4 for part in per_rank)
            together = [i for part in per_rank for i in part]
            # The ranks' contiguous slices, in rank order, are exactly the global batch.
            assert together == perm[step * 8:(step + 1) * 8].tolist()
            seen += together
        assert len(seen) == len(set(seen)) == 16  # no example twice in an epoch


def test_dp2_split_concatenates_to_the_dp1_global_batch():
    single = orders(dp=1, mbs=2)[0]
    pair = orders(dp=2, mbs=2)
    for epoch, step in [(0, 0), (0, 1), (4, 1)]:
        assert sum((rank_indices(r, epoch, step) for r in pair), []) == \
            rank_indices(single, epoch, step)


def test_shuffle_changes_order_and_left_out_examples_between_epochs():
    order = orders()[0]
    perms = [order.permutation(epoch).tolist() for epoch in range(5)]
    assert len({tuple(p) for p in perms}) == 5
    left_out = {frozenset(p[16:]) for p in perms}
    assert len(left_out) > 1
    other_seed = BatchOrder(23, 8, 2, 0, 2, seed=8, shuffle=True)
    assert other_seed.permutation(0).tolist() != perms[0]


def test_order_is_resumable():
    first, resumed = orders()[0], orders()[0]
    assert rank_indices(first, 3, 1) == rank_indices(first, 3, 1)
    rank_indices(first, 0, 0)  # a different epoch in between
    assert rank_indices(resumed, 3, 1) == rank_indices(first, 3, 1)


def test_no_shuffle_is_file_order():
    ranks = orders(shuffle=False)
    for epoch in range(2):
        assert ranks[0].permutation(epoch).tolist() == list(range(23))
        assert rank_indices(ranks[0], epoch, 1) == [8, 9, 10, 11]
        assert rank_indices(ranks[1], epoch, 1) == [12, 13, 14, 15]


def test_micro_batches_match_the_data_set(tmp_path):
    lines = [example(f"p{i}", f"r{i}" * (i + 1)) for i in range(10)]
    data = load_sft_dataset(write_jsonl(tmp_path, lines), TOK, seq_length=16)
    order = BatchOrder(len(data), 4, 2, dp_rank=1, dp_size=2, seed=0, shuffle=True)
    batches = order.micro_batches(data, epoch=1, step=1)
    assert len(batches) == 1
    batch = batches[0]
    assert batch["index"].tolist() == order.permutation(1)[6:8].tolist()
    assert batch["index"].dtype == torch.int64
    for key in ("tokens", "labels", "loss_mask"):
        assert batch[key].shape == (2, 16)
        assert torch.equal(batch[key], getattr(data, key)[batch["index"]])
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["position_ids"].tolist() == [list(range(16))] * 2
    assert torch.equal(data.batch([3])["tokens"][0], data.tokens[3])


def test_batch_order_validation(tmp_path):
    with pytest.raises(ValueError, match=r"global_batch_size=6 .* 2 x 2"):
        BatchOrder(100, 6, 2, 0, 2, 0, True)
    with pytest.raises(ValueError, match=r"3 examples, fewer than one global batch.*=4"):
        BatchOrder(3, 4, 2, 0, 1, 0, True)
    with pytest.raises(ValueError, match="dp_rank=2"):
        BatchOrder(8, 4, 2, 2, 2, 0, True)
    order = BatchOrder(8, 4, 2, 0, 1, 0, True)
    with pytest.raises(ValueError, match="steps_per_epoch=2"):
        order.indices(0, 2)
    with pytest.raises(ValueError, match="epoch -1"):
        order.indices(-1, 0)
    data = load_sft_dataset(write_jsonl(tmp_path, [example("a", "b")] * 3), TOK, 4)
    with pytest.raises(ValueError, match="3 examples.*built for 8"):
        order.micro_batches(data, 0, 0)
