"""The batched sampler against per-row references written from the parameters' definitions.

    python -m pytest tests/test_sampling.py -q
"""

import math

import pytest
import torch

from tpserve.errors import TpserveError
from tpserve.serve.sampling import SampleRow, process, sample, truncate
from tpserve.serve.sampling_params import SamplingParams
from tpserve.serve import stop
from tpserve.serve.stop import StopText

V = 50
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rows_of(params, prompts=None, outputs=None, eos=(3,)):
    prompts = prompts or [[1, 2]] * len(params)
    outputs = outputs or [[]] * len(params)
    return [SampleRow(p, list(a), list(b), eos) for p, a, b in zip(params, prompts, outputs)]


def reference_process(logits, row):
    """One row, by the definitions (vLLM's and OpenAI's)."""
    p, x = row.params, logits.clone().tolist()
    for t, b in p.logit_bias:
        x[t] += b
    seen = set(row.prompt) | set(row.output)
    for t in range(len(x)):
        if t in seen and p.repetition_penalty != 1:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        c = row.output.count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    if len(row.output) < p.min_tokens:
        for t in set(p.stop_token_ids) | ({} if p.ignore_eos else set(row.eos_token_ids)):
            x[t] = -math.inf
    return torch.tensor(x)


@pytest.mark.parametrize("device", DEVICES)
def test_process_matches_the_definitions(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g) * 3
    params = [SamplingParams(repetition_penalty=1.7, logit_bias=((4, 2.5), (9, -100))),
              SamplingParams(presence_penalty=0.6, frequency_penalty=-0.4, min_tokens=5,
                             stop_token_ids=(7,)),
              SamplingParams(),
              SamplingParams(repetition_penalty=0.5, frequency_penalty=1.5, min_tokens=1,
                             ignore_eos=True, stop_token_ids=(8,))]
    rows = rows_of(params, [[1, 2, 4], [5], [6], [10, 11, 12]],
                   [[4, 4, 9], [5, 5, 5, 20], [], [30, 31, 31]])
    got = process(logits.to(device), rows).cpu()
    for i, row in enumerate(rows):
        assert torch.allclose(got[i], reference_process(logits[i], row), atol=1e-5), i


def test_penalty_counts_follow_the_output_step_by_step():
    """The same rows over several steps (as the engine keeps them): the counts each row carries
    are brought up to its output, and match the definitions at every step."""
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2),
              SamplingParams(), SamplingParams(frequency_penalty=-1.0)]
    rows = rows_of(params, [[1, 2, 3], [4], [6, 6]])
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        logits = torch.randn(3, V, generator=g)
        got = process(logits, rows)
        for i, row in enumerate(rows):
            assert torch.allclose(got[i], reference_process(logits[i], row), atol=1e-5), (step, i)
        for i, row in enumerate(rows):
            row.output.extend([5 + (step + i) % 3] * (1 + step % 2))  # bursts add several


def test_truncate_keeps_the_reference_sets():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, V, generator=g)
    params = [SamplingParams(top_k=5), SamplingParams(top_p=0.3), SamplingParams(top_k=10,
              top_p=0.5), SamplingParams(), SamplingParams(top_k=10**9, top_p=0.9)]
    kept = torch.isfinite(truncate(logits, params))
    for i, p in enumerate(params):
        order = logits[i].argsort(descending=True).tolist()[:min(p.top_k or V, V)]
        probs = logits[i][order].softmax(-1).tolist()
        want, mass = set(), 0.0
        for t, q in zip(order, probs):  # the smallest prefix whose mass reaches top_p
            if mass >= p.top_p and p.top_p < 1:
                break
            want.add(t)
            mass += q
        assert set(kept[i].nonzero().flatten().tolist()) == want, i


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -8.0])
    n, temp = 20000, 0.7
    rows = rows_of([SamplingParams(temperature=temp)] * n)
    tokens, _ = sample(logits.expand(n, -1), rows)
    freq = torch.bincount(torch.tensor(tokens), minlength=5) / n
    want = (logits / temp).softmax(-1)
    assert (freq - want).abs().max() < 0.015  # ~4 standard errors at n=20000


def test_min_p_and_greedy_rows_in_one_batch():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0, -2.0]] * 400)
    params = [SamplingParams(temperature=1.0, min_p=0.5)] * 399 + [SamplingParams()]
    tokens, _ = sample(logits, rows_of(params))
    assert set(tokens[:-1]) == {0, 1} and tokens[-1] == 0


def test_a_captured_steps_argmax_serves_plain_greedy_rows_only():
    # The captured step hands its argmax along; the sampler must use it only where the logits
    # reach argmax unchanged (here a deliberately different argmax shows which one was used).
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    fake = torch.tensor([7, 9])
    plain = [SamplingParams(), SamplingParams()]
    assert sample(logits, rows_of(plain), fake)[0] == [7, 9]
    assert sample(logits, rows_of(plain))[0] == logits.argmax(-1).tolist()
    biased = [SamplingParams(logit_bias=((11, 100.0),)), SamplingParams()]
    assert sample(logits, rows_of(biased), fake)[0] == [11, int(logits[1].argmax())]
    hot = [SamplingParams(temperature=1.0, seed=1), SamplingParams()]
    assert sample(logits, rows_of(hot), fake)[0][1] == 9


def test_seeded_rows_repeat_whatever_the_batch():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    seeded = SamplingParams(temperature=1.0, seed=2**63 - 1)
    alone = [sample(logits[1:2], rows_of([seeded]))[0][0] for _ in range(2)]
    mixed = sample(logits, rows_of([SamplingParams(temperature=1.0), seeded, SamplingParams()]))
    assert alone[0] == alone[1] == mixed[0][1]


def test_logprobs_are_the_models_log_softmax():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(logprobs=3, repetition_penalty=2.0), SamplingParams()]
    tokens, lps = sample(logits, rows_of(params))
    ref = logits[0].log_softmax(-1)
    assert lps[1] is None and lps[0].token == tokens[0]
    assert lps[0].logprob == pytest.approx(ref[tokens[0]].item(), abs=1e-6)
    top = ref.topk(3)
    assert [t for t, _ in lps[0].top] == top.indices.tolist()
    assert [v for _, v in lps[0].top] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_hostile_rows_never_fail_the_batch():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(4))
    everything = tuple((t, -100.0) for t in range(V))
    params = [SamplingParams(logit_bias=everything, temperature=1.0),
              SamplingParams(temperature=1e-30),
              SamplingParams(temperature=1e6, top_k=2**31 - 1),
              SamplingParams(repetition_penalty=100.0, temperature=2.0),
              SamplingParams(min_p=1.0, temperature=1.0),
              SamplingParams()]
    tokens, _ = sample(logits, rows_of(params, outputs=[list(range(V))] * 6))
    assert all(0 <= t < V for t in tokens)
    assert tokens[1] == logits[1].argmax().item()  # a vanishing temperature is greedy
    assert tokens[5] == logits[5].argmax().item()


@pytest.mark.parametrize("kw,fragment", [
    (dict(temperature=float("nan")), "temperature=nan is not a finite number"),
    (dict(temperature=float("-inf")), "temperature=-inf is not a finite number"),
    (dict(top_p=float("nan")), "top_p=nan"),
    (dict(seed=2**63), "seed=9223372036854775808 must be an integer in [-2**63, 2**63 - 1]"),
    (dict(seed=True), "seed=True"),
    (dict(logit_bias=((1, float("inf")),)), "logit_bias[1]=inf"),
    (dict(min_tokens=17), "min_tokens=17"),
    (dict(logprobs=-1), "logprobs=-1"),
    (dict(repetition_penalty=1e-300), "repetition_penalty=1e-300 must be in [0.01, 100]"),
])
def test_params_refuse_what_would_break_a_step(kw, fragment):
    with pytest.raises(TpserveError) as e:
        SamplingParams(**kw)
    assert fragment in str(e.value)


def test_a_negative_seed_samples_as_its_residue_mod_2_63():
    """vLLM takes any 64-bit signed seed (clients send -1); here s < 0 is s mod 2**63, so -1
    and 2**63 - 1 draw the same tokens, and choice i of n adds i to it as for any seed."""
    assert SamplingParams(temperature=1.0, seed=-1).seed == 2**63 - 1
    assert SamplingParams(temperature=1.0, seed=-2**63).seed == 0
    assert SamplingParams(temperature=1.0, seed=-1).for_choice(1).seed == 0
    logits = torch.randn(2, 50)
    rows = lambda s: rows_of([SamplingParams(temperature=1.0, seed=s)] * 2,  # noqa: E731
                             outputs=[[], []])
    assert sample(logits, rows(-1))[0] == sample(logits, rows(2**63 - 1))[0]


class Chars:
    """A tokenizer whose token i is chr(i): stop strings span several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_stop_text_never_leaks_the_start_of_a_stop_string():
    text, stop = "ab}Bx}Bn tail", "}Bn"
    st, sent = StopText(Chars(), (stop, "zz")), []
    for i in range(1, len(text) + 1):
        new, hit = st.update([ord(c) for c in text[:i]], final=False)
        sent.append(new)
        if hit:
            break
    assert hit and "".join(sent) == "ab}Bx"
    assert sent[2:5] == ["", "", "}Bx"]  # "}B" held until "x" showed it is not the stop
    st = StopText(Chars(), (stop,))
    assert st.update([ord(c) for c in "ab}B"], final=True) == ("ab}B", False)  # length: flush


@pytest.mark.parametrize("stops,active_from", [(("zz", "xyx"), 0), ((), 0), (("zz",), 20000)])
def test_stop_text_keeps_a_bounded_window_of_a_long_output(stops, active_from):
    """Per token the engine hands StopText the whole output; the text it keeps (and copies when
    a token's text is appended) stays a window behind what was handed out, not the whole output
    (with stop strings, without, and while min_tokens keeps them inactive), while what it hands
    out adds up to the text and a late stop string still cuts it."""
    text = ("ab" * 7 + "c") * 3000 + "xyzz tail"
    st, out, sent, longest, hit = StopText(Chars(), stops), [], "", 0, False
    for i, ch in enumerate(text):
        out.append(ord(ch))
        new, hit = st.update(out, final=i == len(text) - 1, stops_active=i >= active_from)
        sent += new
        longest = max(longest, len(st.text))
        if hit:
            break
    assert (hit, sent) == ((True, text[:text.index("zz")]) if stops else (False, text))
    assert longest <= 2 * stop.TRIM_CHARS + 8 < len(text) // 4


def _stop_reference(text: str, stops, search_from: int, final: bool):
    """What a stream may hand out of `text` so far, by brute force: cut at the earliest stop
    string (counted from search_from), else hold back the longest stop-string prefix that ends
    the text (and a trailing U+FFFD), unless final."""
    found = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
    if found:
        return text[:min(found)], True
    if final:
        return text, False
    end = len(text.rstrip("\ufffd"))
    cut = end
    for s in stops:
        for k in range(min(len(s) - 1, end - search_from), 0, -1):
            if text.endswith(s[:k], 0, end):
                cut = min(cut, end - k)
                break
    return text[:cut], False


@pytest.mark.parametrize("trim", [stop.TRIM_CHARS, 1])  # 1: the kept text cut often
def test_stop_strings_match_a_brute_force_reference(trim, monkeypatch):
    """Random outputs over a small alphabet (stop strings overlap themselves and each other) and
    min_tokens: what StopText hands out, token by token, is what the brute-force search allows."""
    monkeypatch.setattr(stop, "TRIM_CHARS", trim)
    import random
    rnd = random.Random(3)
    for trial in range(300):
        stops = tuple("".join(rnd.choice("ab") for _ in range(rnd.randint(1, 5)))
                      for _ in range(rnd.randint(1, 3)))
        text = "".join(rnd.choice("abc") for _ in range(rnd.randint(1, 40)))
        min_chars = rnd.choice([0, 0, 3])
        st, sent, search_from = StopText(Chars(), stops), "", 0
        for i in range(1, len(text) + 1):
            final = i == len(text)
            active = i >= min_chars
            new, hit = st.update([ord(c) for c in text[:i]], final, active)
            sent += new
            want, want_hit = _stop_reference(text[:i], stops if active else (), search_from,
                                             final)
            assert (sent, hit) == (want, want_hit), (trial, stops, text[:i], min_chars)
            if not active:
                search_from = len(sent)
            if hit:
                break


def test_bytes_that_never_form_a_character_still_stream():
    """An output of tokens that each decode to U+FFFD for good (invalid UTF-8) is handed out as it
    grows, a few tokens behind, not held until the end; the whole text arrives at the end."""
    st, sent = StopText(Chars(), ("zz",)), ""
    out = [0xFFFD] * 60
    for i in range(1, len(out) + 1):
        sent += st.update(out[:i], final=False)[0]
        if i == 40:
            assert len(sent) >= 40 - 3 * 4, len(sent)  # streamed, MAX_CHAR_BYTES-ish behind
    sent += st.update(out, final=True)[0]
    assert sent == "\ufffd" * 60


def test_only_plain_greedy_rows_go_without_logits():
    """needs_logits decides whether a step may return the argmax alone (the head on rank 0)."""
    from tpserve.serve.sampling import needs_logits
    def row(**kw):
        return SampleRow(SamplingParams(max_tokens=4, **kw), [1, 2], [], (0,))
    plain = row()
    assert not needs_logits([plain, row(ignore_eos=True)])
    for kw in ({"temperature": 0.7}, {"logprobs": 1}, {"logit_bias": ((3, 1.0),)},
               {"repetition_penalty": 1.2}, {"min_tokens": 2}):
        assert needs_logits([plain, row(**kw)]), kw
    # and where they need none, sampling takes the given argmax as it is
    argmax = torch.tensor([5, 7])
    assert sample(None, [plain, plain], argmax)[0] == [5, 7]


@pytest.mark.parametrize("folder", ["gemma2_g32_sym", "mistral_v2_asym_g128", "qwen3_8bit_g64",
                                    "llama_g128_sym"])
@pytest.mark.parametrize("trim", [stop.TRIM_CHARS, 1])  # 1: the kept text cut often
def test_incremental_text_equals_the_whole_decode(folder, trim, monkeypatch):
    """StopText decodes only the new tokens (with the previous ones as context); what it hands
    out, token by token, must be the text of decoding the whole output at once, for these
    tokenizers' decoders (byte-level, metaspace), partial characters and special tokens included."""
    monkeypatch.setattr(stop, "TRIM_CHARS", trim)
    import random
    from test_peer_fixtures import FIXTURES
    from tpserve.serve.text import TextCodec
    tok = TextCodec.load(FIXTURES / folder).tokenizer
    decoded = [0]

    class Counting:  # the real tokenizer, counting the tokens each update decodes
        def decode(self, ids, skip_special_tokens=True):
            decoded[0] += len(ids)
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)
    rnd = random.Random(7)
    for _ in range(100):
        out = [rnd.randrange(tok.get_vocab_size()) for _ in range(rnd.randrange(1, 50))]
        st, sent = StopText(Counting()), ""
        for i in range(1, len(out) + 1):
            sent += st.update(out[:i], final=i == len(out))[0]
        assert sent == tok.decode(out, skip_special_tokens=True), out
    long = [rnd.randrange(3, tok.get_vocab_size()) for _ in range(2000)]
    st, decoded[0] = StopText(Counting()), 0
    for i in range(1, len(long) + 1):
        st.update(long[:i], final=False)
    assert decoded[0] < 20 * len(long)  # a few tokens per update, not the whole output


class Bytes:
    """A byte-level tokenizer: token i is the i-th byte string below; text is their bytes decoded
    with U+FFFD for what is not UTF-8 (as byte-level BPE decoders do). `cleanup` also drops the
    space before a full stop, so a later token can rewrite earlier text."""
    PIECES = [b"a", b" ", b".", b"b", b"\x80", b"\xc3", b"\xa9", b".\xc3", b"\xa9\xc3", b"\xf0",
              b"\xa9\xa9", b"a\x80"]

    def __init__(self, cleanup=False):
        self.cleanup = cleanup

    def decode(self, ids, skip_special_tokens=True):
        text = b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")
        return text.replace(" .", ".") if self.cleanup else text


@pytest.mark.parametrize("trim", [stop.TRIM_CHARS, 1])  # 1: the kept text cut often
def test_stop_text_on_bytes_that_form_characters_late_or_never(trim, monkeypatch):
    """Random byte tokens (partial characters, lone continuation bytes): no update fails, a stop
    string (U+FFFD ones too) cuts the text where the whole text has it, and without one the
    pieces handed out add up to the whole decode."""
    monkeypatch.setattr(stop, "TRIM_CHARS", trim)
    import random
    rnd = random.Random(11)
    tok = Bytes()
    cases = [([4] * 8 + [11, 0], ("\ufffd",))]  # a match in the settled text, a tail after it
    for trial in range(400):
        out = [rnd.randrange(len(Bytes.PIECES)) for _ in range(rnd.randint(1, 30))]
        cases.append((out, () if trial % 2 else (rnd.choice(["\ufffd", "a\ufffd", "b.", "é"]),)))
    for out, stops in cases:
        st, sent, hit = StopText(tok, stops), "", False
        for i in range(1, len(out) + 1):
            new, hit = st.update(out[:i], final=i == len(out))
            sent += new
            if hit:
                break
        full = tok.decode(out)
        if not stops:
            assert sent == full, (out, sent, full)
        else:
            assert sent == (full[:full.find(stops[0])] if stops[0] in full else full) or (
                hit and full.startswith(sent)), (out, stops, sent, full)


def test_a_rewriting_decoder_never_hands_out_a_partial_character():
    """A decoder that rewrites earlier text (drops the space before a full stop) while the newest
    token ends inside a character: the character is handed out once it is whole, never as U+FFFD
    (`a`, ` `, `.\\xc3`, `\\xa9`, `b`)."""
    st, sent = StopText(Bytes(cleanup=True)), ""
    out = [0, 1, 7, 6, 3]
    for i in range(1, len(out) + 1):
        sent += st.update(out[:i], final=i == len(out))[0]
    assert "\ufffd" not in sent and sent.endswith("éb"), sent
