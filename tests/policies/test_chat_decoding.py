"""The decoding pieces of the chat endpoint without a model: characters split over byte tokens, stop sequences split
over pieces, temperatures too small to divide by, nucleus sampling."""

import torch

from policies.lm.decoding import GREEDY_BELOW, IncrementalDecoder, StopMatcher, sample_token


class Bytes:
    """A byte-level tokenizer in miniature: token id = byte value, decoded the way byte-level BPE decodes."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _pieces(data: bytes) -> list[str]:
    decoder = IncrementalDecoder(Bytes())
    return [decoder.push(byte) for byte in data] + [decoder.flush()]


def test_a_character_over_several_tokens_is_sent_once_complete_and_never_as_a_replacement():
    text = "😀 é 世界"
    pieces = _pieces(text.encode())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert [piece for piece in pieces if piece] == ["😀", " ", "é", " ", "世", "界"]


def test_bytes_that_never_complete_come_out_as_a_whole_decode_gives_them():
    assert "".join(_pieces(b"\xf0\x9fa")) == "\ufffda"  # a broken sequence followed by more text
    assert "".join(_pieces(b"ok\xe4\xb8")) == "ok\ufffd"  # cut off by the end of generation: flushed


def test_stop_sequence_split_over_pieces_is_cut_and_never_shown_in_part():
    stops = StopMatcher(["END"])
    assert [stops.push(text) for text in ["hel", "lo E", "N"]] == [("hel", False), ("lo ", False), ("", False)]
    assert stops.push("D world") == ("", True)


def test_a_held_prefix_that_does_not_become_a_stop_sequence_is_released():
    stops = StopMatcher(["END", "\n\n"])
    assert stops.push("see E") == ("see ", False)
    assert stops.push("x\n") == ("Ex", False)
    assert stops.flush() == "\n"


def test_the_earliest_of_several_stop_sequences_wins():
    assert StopMatcher(["world", "lo"]).push("hello world") == ("hel", True)
    assert StopMatcher([]).push("hello") == ("hello", False)


def test_temperatures_below_the_threshold_are_greedy_instead_of_overflowing():
    logits = torch.tensor([0.0, 1.0, 0.5])
    for temperature in (0.0, 1e-300, 1e-40, GREEDY_BELOW / 2):
        assert sample_token(logits, temperature, 1.0, torch.Generator().manual_seed(0)) == 1
    # at the threshold itself sampling is well defined (finite probabilities) and still the argmax here
    assert sample_token(logits, GREEDY_BELOW, 1.0, torch.Generator().manual_seed(0)) == 1


def test_top_p_keeps_the_smallest_set_of_likely_tokens():
    logits = torch.tensor([0.6, 0.3, 0.1]).log()
    draws = {p: {sample_token(logits, 1.0, p, torch.Generator().manual_seed(seed)) for seed in range(200)}
             for p in (0.0, 0.5, 0.7, 1.0)}
    assert draws == {0.0: {0}, 0.5: {0}, 0.7: {0, 1}, 1.0: {0, 1, 2}}
